import numpy as np
import pytest

from napari_deepcrop.clicks import encode_clicks
from napari_deepcrop.crops import Crop, paste_logits, read_crop
from napari_deepcrop.model import DeepCropConfig

CONFIG = DeepCropConfig(input_size=64)


def test_planes_are_zero_at_the_click_and_grow_with_distance():
    planes = encode_clicks(np.array([[10.0, 20.0], [40.0, 40.0]]), np.array([1, 0]), CONFIG)
    assert planes.shape == (3, 64, 64) and planes.dtype == np.float32
    pos, neg, prev = planes
    assert pos[10, 20] == 0 and neg[40, 40] == 0
    assert pos[10, 20 + 16] == pytest.approx(16 / 32)  # distance / (size / 2)
    assert pos.max() == 1.0 and (prev == 0).all()


def test_planes_at_the_refinement_size_are_normalised_by_that_size():
    """A refinement crop of 96 input pixels: the same crop-relative click gives the same plane values."""
    config = DeepCropConfig(input_size=64, refine_size=96)
    small = encode_clicks(np.array([[10.0, 20.0]]), np.array([1]), config)
    large = encode_clicks(np.array([[15.0, 30.0]]), np.array([1]), config, size=96)
    assert small.shape == (3, 64, 64) and large.shape == (3, 96, 96)
    assert large[0, 15, 30 + 24] == pytest.approx(small[0, 10, 20 + 16]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="96x96"):
        encode_clicks(np.array([[15.0, 15.0]]), np.array([1]), config, np.zeros((64, 64), bool), size=96)


def test_no_click_of_a_kind_gives_a_plane_of_ones():
    planes = encode_clicks(np.array([[5.0, 5.0]]), np.array([1]), CONFIG)
    assert (planes[1] == 1).all()


def test_disk_planes_are_one_within_the_radius_of_each_click_and_scale_with_the_input_size():
    """click_encoding="disk" (RITM's): 1 within DISK_RADIUS x S of a click of the plane's kind, 0 elsewhere and
    where there is no click of that kind; the same crop-relative clicks give the same disks at any input size."""
    from napari_deepcrop.clicks import DISK_RADIUS

    config = DeepCropConfig(input_size=64, refine_size=128, click_encoding="disk")
    points = np.array([[10.0, 20.0], [40.0, 40.0], [50.0, 12.0]])
    pos, neg, _ = encode_clicks(points, np.array([1, 0, 1]), config)
    radius = DISK_RADIUS * 64
    assert radius == 2 and set(np.unique(pos)) == {0.0, 1.0}
    rows, cols = np.mgrid[:64, :64]
    for plane, clicks in ((pos, points[[0, 2]]), (neg, points[[1]])):
        d2 = np.min([(rows - r) ** 2 + (cols - c) ** 2 for r, c in clicks], axis=0)
        assert np.array_equal(plane == 1, d2 <= radius**2)
    assert (encode_clicks(points[:1], np.array([1]), config)[1] == 0).all()  # no negative click: no disk
    large = encode_clicks(points * 2 + 0.5, np.array([1, 0, 1]), config, size=128)
    assert large[0].sum() == pytest.approx(4 * pos.sum(), rel=0.15) and large[0][20, 40] == 1
    with pytest.raises(ValueError, match="click_encoding must be one of"):
        DeepCropConfig(click_encoding="gaussian")


def test_prev_mask_plane_and_shape_check():
    prev = np.zeros((64, 64), bool)
    prev[10:20, 10:20] = True
    planes = encode_clicks(np.array([[15.0, 15.0]]), np.array([1]), CONFIG, prev)
    assert planes[2].sum() == 100
    with pytest.raises(ValueError, match="64x64"):
        encode_clicks(np.array([[15.0, 15.0]]), np.array([1]), CONFIG, np.zeros((32, 32), bool))


def test_same_clicks_give_same_planes_in_training_and_inference():
    """Training samples and the predictor's first crops both centre the crop on the click and encode it alike."""
    from napari_deepcrop.model import DeepCropV2
    from napari_deepcrop.predictor import DeepCropPredictor
    from napari_deepcrop.training.data import make_sample

    image = np.zeros((300, 300, 3), np.uint8)
    mask = np.zeros((300, 300), bool)
    mask[100:201, 120:181] = True
    click = np.array([[150, 150]])  # the rectangle's deepest point: where the protocol (and validation) clicks
    sample = make_sample(image, mask, CONFIG, np.random.default_rng(0), train=False)
    predictor = DeepCropPredictor(DeepCropV2(CONFIG))
    crops = predictor._candidate_crops(click.astype(float), np.array([1]), None, mask.shape)
    centre = np.array([[31.5, 31.5]])
    assert np.allclose(sample["clicks"][0, :2].numpy(), centre[0])
    for crop in crops:
        assert np.allclose(crop.to_input(click, 64), centre)
    expected = encode_clicks(centre, np.array([1]), CONFIG)
    assert np.array_equal(sample["planes"].numpy(), expected)


def test_read_crop_pads_outside_and_keeps_geometry():
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    crop = Crop(-10, -10, 40)
    out = read_crop(image, crop, 40)  # 1:1 scale
    assert out[5, 5] == 0  # outside the image
    assert out[10, 10] == image[0, 0] and out[39, 39] == image[29, 29]


def test_paste_logits_round_trips_a_mask_at_scale():
    mask = np.zeros((400, 400), bool)
    mask[150:250, 100:300] = True
    crop = Crop.centered((200, 200), 320)
    logits = read_crop(mask.astype(np.float32), crop, 64) * 2 - 1
    pasted, (r0, c0) = paste_logits(logits, crop, mask.shape)
    full = np.zeros_like(mask)
    full[r0 : r0 + pasted.shape[0], c0 : c0 + pasted.shape[1]] = pasted
    iou = (full & mask).sum() / (full | mask).sum()
    assert iou > 0.97
    assert pasted.shape[0] < 130 and pasted.shape[1] < 230  # only the bounding box is allocated


def test_ladder_crops_are_cut_at_the_predictors_first_click_scales():
    """With ladder_prob=1 every training crop has one of the sides a first click tries on that image (what the
    score head must rank); with 0, sides follow the object's extent. The side shows in the object's area."""
    from napari_deepcrop.predictor import first_click_sides
    from napari_deepcrop.training.data import RATIO_RANGE, make_sample

    image = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    mask = np.zeros((300, 300), bool)
    mask[90:210, 90:210] = True  # 120 x 120: still 7 input pixels across in the largest crop
    ladder = np.array(first_click_sides(mask.shape))  # 64, 128, 256, 512

    def implied_side(sample):  # object pixels in the crop (inside + cut off) = area * (size / side)^2, rounded
        pixels = float(sample["mask"].sum() + sample["outside"])
        return 64 * np.sqrt(mask.sum() / pixels)

    on_ladder = [implied_side(make_sample(image, mask, CONFIG, np.random.default_rng(s), True, 1.0)) for s in range(12)]
    assert all(np.abs(ladder - side).min() / side < 0.15 for side in on_ladder), on_ladder
    assert len({int(np.abs(ladder - side).argmin()) for side in on_ladder}) >= 3  # several rungs, not one
    relative = [implied_side(make_sample(image, mask, CONFIG, np.random.default_rng(s), True)) for s in range(12)]
    low, high = 120 / RATIO_RANGE[1], 120 / RATIO_RANGE[0]
    assert all(0.85 * low <= side <= 1.15 * high for side in relative), relative


def test_focus_crops_sit_on_the_boundary_with_their_click_on_the_object():
    """With focus_prob=1 every training crop is a focus crop as the predictor cuts one around a further click: the
    object 1.5-3x its side (shown by the object's pixels in and cut off by the crop), both object and background
    in it (on the boundary), and its positive click on the object."""
    from napari_deepcrop.training.data import FOCUS_RATIO_RANGE, make_sample

    image = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    mask = np.zeros((300, 300), bool)
    mask[60:240, 80:200] = True  # extent 180
    for seed in range(16):
        sample = make_sample(image, mask, CONFIG, np.random.default_rng(seed), True, focus_prob=1.0)
        gt = sample["mask"][0].numpy().astype(bool)
        side = 64 * np.sqrt(mask.sum() / float(gt.sum() + sample["outside"]))
        assert 0.9 * 180 / FOCUS_RATIO_RANGE[1] <= side <= 1.1 * 180 / FOCUS_RATIO_RANGE[0], (seed, side)
        assert 0.02 < gt.mean() < 0.98, (seed, gt.mean())
        (row, col, label) = sample["clicks"][0].tolist()
        assert label == 1 and gt[round(row), round(col)], (seed, row, col)
    ordinary = make_sample(image, mask, CONFIG, np.random.default_rng(0), True)
    assert float(ordinary["outside"]) < 0.3 * mask.sum() * (64 / 180) ** 2  # not a focus crop: the object in it


def test_click_power_spreads_training_clicks_from_the_centre_to_the_whole_object():
    """Training clicks are drawn with weight depth ** power: 2 (the default) keeps them near a disk's centre (mean
    r/R 0.4 in theory), 0 spreads them uniformly over it (mean r/R 2/3, as people click anywhere on an object)."""
    from napari_deepcrop.training.data import CLICK_POWER, _sample_click

    rr, cc = np.ogrid[:201, :201]
    disk = (rr - 100) ** 2 + (cc - 100) ** 2 <= 80**2
    rng = np.random.default_rng(0)

    def mean_radius(power):
        clicks = np.array([_sample_click(disk, rng, protocol_click=False, power=power) for _ in range(1500)])
        assert disk[clicks[:, 0], clicks[:, 1]].all()
        return np.hypot(clicks[:, 0] - 100, clicks[:, 1] - 100).mean() / 80

    assert CLICK_POWER == 2.0 and 0.36 < mean_radius(CLICK_POWER) < 0.44
    assert 0.63 < mean_radius(0.0) < 0.70
    assert _sample_click(disk, rng, protocol_click=True, power=0.0) == (100, 100)  # the protocol's: the deepest
