"""Propagation through stacks (napari_deepcrop.volume) and the headless ``segment --propagate``.

The small disk model of conftest, trained at test time, segments the synthetic blobs in the tests that the
network and the tracking follow an object. The tests of what the walk does (where it stops, what a correction
changes, which slices and crops it reads, the headless command) run the same predictor on
:class:`synthetic.BrightNet`, a fixed stand-in for the network whose masks are the same on every machine: the
trained disk model's masks on the slices where the object ends are borderline, and its float rounding differs
with the CPU, which moved those tests' stops by a slice on one machine and not on another.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
from synthetic import BrightNet, disk_image

from napari_deepcrop.cli import main
from napari_deepcrop.crops import PlacedMask
from napari_deepcrop.model import DeepCropConfig
from napari_deepcrop.predictor import DeepCropPredictor
from napari_deepcrop.session import ObjectMask, predict_object
from napari_deepcrop.volume import (
    STOP_END,
    VolumeObject,
    correct_slice,
    deepest_point,
    mask_iou,
    segment_volume,
    track,
)

SIDE = 128


def blob_stack(n: int = 20, first: int = 0, last: int | None = None, side: int = SIDE):
    """A textured disk that moves and grows through slices first..last of n (noise elsewhere): (stack, truth)."""
    last = n - 1 if last is None else last
    images, truth = [], []
    for z in range(n):
        t = (z - first) / max(1, last - first)
        image, mask = disk_image(side, (44 + 40 * t, 50 + 25 * t), 14 + 10 * t, seed=z, channels=1)
        if not first <= z <= last:
            image, mask = disk_image(side, (-999, -999), 1, seed=z, channels=1)
        images.append(image[..., 0])
        truth.append(mask)
    return np.stack(images), np.stack(truth)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def full_masks(volume: VolumeObject, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    for k, mask in volume.masks.items():
        out[k] = mask.full()
    return out


def click_seed(predictor, stack, truth, z: int) -> ObjectMask:
    """The mask of one click at the object's deepest point on slice z."""
    row, col = deepest_point(PlacedMask.from_full(truth[z]))
    return predict_object(predictor, stack[z], ((row, col, 1),), contrast_limits=(0, 255))


@pytest.fixture(scope="module")
def disk_predictor(disk_model):
    return DeepCropPredictor(disk_model, "cpu", snap_edges=False)


def bright_net() -> BrightNet:
    return BrightNet(DeepCropConfig(input_size=64, decoder_width=16))


@pytest.fixture(scope="module")
def bright_predictor():
    return DeepCropPredictor(bright_net(), "cpu", snap_edges=False)


def test_one_click_follows_a_moving_growing_blob_through_20_slices(disk_predictor):
    stack, truth = blob_stack(20)
    seed = click_seed(disk_predictor, stack, truth, 10)
    volume = segment_volume(disk_predictor, stack, (10,), seed)
    assert volume.slices == list(range(20))
    assert volume.stops == {1: STOP_END, -1: STOP_END}
    per_slice = [iou(m, t) for m, t in zip(full_masks(volume, stack.shape), truth, strict=True)]
    assert min(per_slice) > 0.8, np.round(per_slice, 2)


def moving_disk_stack(steps, radius: float = 14, side: int = SIDE):
    """A textured disk at each of ``steps`` (row, col) centres on one still textured background: (stack, truth)."""
    background, _ = disk_image(side, (-999, -999), 1, seed=100, channels=1)
    texture, disk = disk_image(side, (side // 2, side // 2), radius, seed=101, channels=1)
    rows, cols = np.nonzero(disk)
    images, truth = [], []
    for dr, dc in steps:
        image, mask = background[..., 0].copy(), np.zeros((side, side), bool)
        r, c = rows + int(dr) - side // 2, cols + int(dc) - side // 2
        image[r, c], mask[r, c] = texture[rows, cols, 0], True
        images.append(image)
        truth.append(mask)
    return np.stack(images), np.stack(truth)


def test_track_moves_the_mask_with_the_object_and_keeps_a_still_one():
    stack, truth = moving_disk_stack([(50, 50), (59, 37), (59, 37)])
    mask = ObjectMask.from_full(truth[0])
    moved = track(stack[0], stack[1], mask, (0, 255))
    assert moved.crop is mask.crop and np.abs(np.subtract(moved.origin, mask.origin) - (9, -13)).max() <= 1
    still = ObjectMask.from_full(truth[1])
    assert track(stack[1], stack[2], still, (0, 255)) is still  # nothing moved: the very same mask
    # a larger object is matched on a template scaled down to TRACK_SIDE pixels: still within a few pixels
    big, big_truth = moving_disk_stack([(128, 128), (140, 110)], radius=60, side=256)
    moved = track(big[0], big[1], ObjectMask.from_full(big_truth[0]), (0, 255))
    assert np.abs(np.subtract(moved.origin, ObjectMask.from_full(big_truth[1]).origin)).max() <= 3


def test_one_click_follows_an_object_that_moves_further_than_its_radius_each_slice(disk_predictor):
    # 18 pixels a slice, more than the disk's radius: the last slice's mask, where it was, misses the object
    steps = [(80 + 6 * np.sin(z / 2), 24 + 18 * z) for z in range(7)]
    stack, truth = moving_disk_stack(steps, radius=12, side=160)
    seed = click_seed(disk_predictor, stack, truth, 3)
    volume = segment_volume(disk_predictor, stack, (3,), seed, contrast_limits=(0, 255))
    assert volume.slices == list(range(7)), volume.stops
    per_slice = [iou(m, t) for m, t in zip(full_masks(volume, stack.shape), truth, strict=True)]
    assert min(per_slice) > 0.8, np.round(per_slice, 2)


def test_propagation_stops_where_the_object_ends(bright_predictor):
    stack, truth = blob_stack(30, first=6, last=23)
    volume = segment_volume(bright_predictor, stack, (15,), click_seed(bright_predictor, stack, truth, 15))
    assert volume.slices == list(range(6, 24)), volume.stops
    assert set(volume.stops) == {1, -1} and STOP_END not in volume.stops.values()


def test_a_time_series_in_4d_propagates_along_the_chosen_axis(disk_predictor):
    stack, truth = blob_stack(12)
    tzyx = np.stack([np.roll(stack, 30, axis=-1), stack])  # (t=2, z=12, y, x): the object is elsewhere at t=0
    seed = click_seed(disk_predictor, stack, truth, 5)
    volume = segment_volume(disk_predictor, tzyx, (1, 5), seed, axis=1)
    assert volume.plane_at(7) == (1, 7) and volume.index_of((0, 7)) is None
    assert min(iou(m, t) for m, t in zip(full_masks(volume, stack.shape), truth, strict=True)) > 0.8


def test_a_correction_changes_only_the_slices_beyond_it_and_keeps_corrected_ones(bright_predictor):
    stack, truth = blob_stack(20)
    volume = segment_volume(bright_predictor, stack, (10,), click_seed(bright_predictor, stack, truth, 10))
    before = dict(volume.masks)
    # the user corrects slice 14: 15.. are segmented again from it, 0..13 are untouched
    corrected = ObjectMask.from_full(truth[14])
    changed = correct_slice(bright_predictor, stack, volume, 14, corrected)
    assert changed == set(range(14, 20))
    assert all(volume.masks[k] is before[k] for k in range(14))
    assert volume.masks[14] is corrected and volume.fixed == {10, 14}
    assert all(volume.masks[k] is not before[k] for k in range(15, 20))
    # a correction on the other side of the seed, then one between the seed and 14: 14 and beyond stay
    after_14 = dict(volume.masks)
    assert correct_slice(bright_predictor, stack, volume, 4, ObjectMask.from_full(truth[4])) == set(range(5))
    assert correct_slice(bright_predictor, stack, volume, 12, ObjectMask.from_full(truth[12])) == {12, 13}
    assert all(volume.masks[k] is after_14[k] for k in range(14, 20))
    assert volume.fixed == {4, 10, 12, 14}


def test_a_correction_keeps_the_masks_its_repropagation_does_not_reach(bright_predictor):
    stack, truth = blob_stack(20)
    volume = segment_volume(bright_predictor, stack, (10,), click_seed(bright_predictor, stack, truth, 10))
    before = dict(volume.masks)
    lost = stack.copy()
    lost[17:] = blob_stack(20, first=0, last=-1)[0][17:]  # the re-walk from 14 loses the object at 17
    corrected = ObjectMask.from_full(truth[14])
    changed = correct_slice(bright_predictor, lost, volume, 14, corrected)
    assert changed == {14, 15, 16} and volume.stops[1] != STOP_END
    assert volume.slices == list(range(20))  # nothing lost
    assert all(volume.masks[k] is before[k] for k in (*range(14), 17, 18, 19))
    assert all(volume.sources[k] == 14 for k in range(15, 20))  # of 14's chain now: correcting 14 again redoes them
    assert correct_slice(bright_predictor, stack, volume, 14, corrected) == set(range(15, 20))


def test_a_correction_without_propagation_changes_that_slice_alone(bright_predictor):
    stack, truth = blob_stack(12)
    volume = segment_volume(bright_predictor, stack, (6,), click_seed(bright_predictor, stack, truth, 6))
    before = dict(volume.masks)
    fixed = ObjectMask.from_full(truth[8])
    assert correct_slice(bright_predictor, stack, volume, 8, fixed, propagate=False) == {8}
    assert all(volume.masks[k] is before[k] for k in before if k != 8)


class GuardedStack:
    """A numpy stack that raises when a read reaches outside slices ``allowed`` or the box ``rows`` x ``cols``."""

    def __init__(self, array: np.ndarray, allowed: range, rows: slice, cols: slice) -> None:
        self.array, self.allowed, self.rows, self.cols = array, allowed, rows, cols
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.slices_read: set[int] = set()

    def __getitem__(self, key):
        z, rows, cols = key
        zs = range(*z.indices(self.shape[0])) if isinstance(z, slice) else [z]
        for index, size, box in ((rows, self.shape[1], self.rows), (cols, self.shape[2], self.cols)):
            start, stop, _ = index.indices(size)
            if stop > start and (start < box.start or stop > box.stop):
                raise AssertionError(f"read {start}:{stop} outside {box}")
        if any(k not in self.allowed for k in zs):
            raise AssertionError(f"read slices {list(zs)} outside {self.allowed}")
        self.slices_read.update(zs)
        return self.array[key]


def test_a_dask_stack_is_read_only_in_the_slices_and_crops_needed(bright_predictor):
    stack, truth = blob_stack(40, first=10, last=21, side=512)
    guarded = GuardedStack(stack, range(9, 23), slice(0, 256), slice(0, 256))  # the object and a slice each side
    lazy = da.from_array(guarded, chunks=(1, 64, 64), asarray=False)
    seed = ObjectMask.from_full(truth[15])
    volume = segment_volume(bright_predictor, lazy, (15,), seed)
    assert volume.slices == list(range(10, 22))
    assert guarded.slices_read <= set(range(9, 23))
    assert sum(m.crop.size for m in volume.masks.values()) < 0.2 * truth[10:22].size  # crops, not slices


def test_bad_input_is_a_clear_error(bright_predictor):
    stack, truth = blob_stack(4)
    seed = ObjectMask.from_full(truth[1])
    with pytest.raises(ValueError, match="needs a stack"):
        segment_volume(bright_predictor, stack[1], (), seed)
    with pytest.raises(ValueError, match="leading"):
        segment_volume(bright_predictor, stack, (1,), seed, axis=1)
    with pytest.raises(ValueError, match="not in the stack"):
        segment_volume(bright_predictor, stack, (7,), seed)
    with pytest.raises(ValueError, match="empty"):
        segment_volume(bright_predictor, stack, (1,), ObjectMask.from_full(np.zeros(truth[1].shape, bool)))


def test_mask_iou_and_deepest_point_from_crops():
    a = np.zeros((50, 60), bool)
    a[10:20, 10:30] = True
    b = np.zeros_like(a)
    b[15:25, 10:30] = True
    assert mask_iou(PlacedMask.from_full(a), PlacedMask.from_full(b)) == pytest.approx(iou(a, b))
    assert mask_iou(PlacedMask.from_full(a), PlacedMask.from_full(np.zeros_like(a))) == 0.0
    rows, cols = np.mgrid[:50, :60]
    disk = (rows - 25) ** 2 + (cols - 33) ** 2 <= 64
    assert deepest_point(PlacedMask.from_full(disk | (rows == 49))) == (25, 33)  # not on the thin line


def test_segment_propagate_writes_the_stack_mask(tmp_path, monkeypatch, capsys):
    stack, truth = blob_stack(20, first=3, last=16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    row, col = deepest_point(PlacedMask.from_full(truth[9]))
    out = tmp_path / "mask.tif"
    loaded = []

    def from_checkpoint(cls, path=None, device=None, **kwargs):  # the command's predictor, on the fixed network
        loaded.append((path, device, kwargs))
        return cls(bright_net(), device, **kwargs)

    monkeypatch.setattr(DeepCropPredictor, "from_checkpoint", classmethod(from_checkpoint))
    main(["segment", str(tmp_path / "stack.tif"), "--click", f"9,{row},{col}", "--propagate", "-o", str(out),
          "--checkpoint", str(tmp_path / "any.pt"), "--device", "cpu", "--no-snap"])  # fmt: skip
    assert loaded == [(tmp_path / "any.pt", "cpu", {"snap_edges": False})]
    written = tifffile.imread(out) > 0
    assert written.shape == truth.shape
    assert not written[:3].any() and not written[17:].any()
    assert iou(written, truth) > 0.8
    assert "slice(s) 3..16 of axis 0" in capsys.readouterr().out


def test_segment_propagate_bad_input_writes_nothing(tmp_path):
    image, _ = disk_image(64, (32, 32), 10, channels=1)
    tifffile.imwrite(tmp_path / "flat.tif", image[..., 0])
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([image[..., 0]] * 3))
    out = tmp_path / "m.tif"
    with pytest.raises(SystemExit, match="needs a stack"):
        main(["segment", str(tmp_path / "flat.tif"), "--click", "32,32", "--propagate", "-o", str(out)])
    with pytest.raises(SystemExit, match="each click is Z,ROW,COL"):
        main(["segment", str(tmp_path / "stack.tif"), "--click", "32,32", "--propagate", "-o", str(out)])
    with pytest.raises(SystemExit, match="outside the stack"):
        main(["segment", str(tmp_path / "stack.tif"), "--click", "5,32,32", "--propagate", "-o", str(out)])
    with pytest.raises(SystemExit, match="as TIFF"):
        main(["segment", str(tmp_path / "stack.tif"), "--click", "1,32,32", "-o", str(tmp_path / "m.png")])
    assert not out.exists() and not (tmp_path / "m.png").exists()


def test_a_correction_keeps_the_slices_beyond_a_slice_fixed_without_propagating(bright_predictor):
    """Slice 14 fixed alone (its neighbours keep the seed's chain), then slice 12 corrected and re-propagated:
    the walk from 12 stops at 14, so 15.. must stay as they were, not be dropped."""
    stack, truth = blob_stack(20)
    volume = segment_volume(bright_predictor, stack, (10,), click_seed(bright_predictor, stack, truth, 10))
    correct_slice(bright_predictor, stack, volume, 14, ObjectMask.from_full(truth[14]), propagate=False)
    before = dict(volume.masks)
    assert correct_slice(bright_predictor, stack, volume, 12, ObjectMask.from_full(truth[12])) == {12, 13}
    assert volume.slices == list(range(20))
    assert all(volume.masks[k] is before[k] for k in (*range(12), *range(14, 20)))


def test_the_walk_predicts_one_refinement_crop_per_slice_and_leaves_the_predictor_as_it_was(
    bright_predictor, monkeypatch
):
    stack, truth = blob_stack(8)
    batches, focus = [], set()
    run = DeepCropPredictor._run

    def counting(self, source, crops, *args):
        batches.append(len(crops))
        focus.add(self.focus_ratio)
        return run(self, source, crops, *args)

    monkeypatch.setattr(DeepCropPredictor, "_run", counting)
    monkeypatch.setattr(bright_predictor, "refine_factors", (1.0, 1.5))
    monkeypatch.setattr(bright_predictor, "focus_ratio", 1.5)
    volume = segment_volume(bright_predictor, stack, (4,), ObjectMask.from_full(truth[4]))
    assert len(volume.masks) == 8 and batches == [1] * 7  # one crop per slice: not (1.0, 1.5), no focus crop
    assert focus == {None}
    assert bright_predictor.refine_factors == (1.0, 1.5) and bright_predictor.focus_ratio == 1.5  # as they were
    batches.clear()
    monkeypatch.setattr(bright_predictor, "focus_ratio", None)
    predict_object(bright_predictor, stack[4], ((40, 50, 1), (60, 70, 0)), volume.masks[4], (0, 255))
    assert batches == [2]  # a refinement click still weighs both crops
