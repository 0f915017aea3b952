"""The click protocol, its metrics, the dataset loaders and the classical baselines, on hand-made masks."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage

from napari_deepcrop.training.baselines import GrabCutClicks, MagicWand, RandomWalkerClicks
from napari_deepcrop.training.evaluate import (
    Sample,
    evaluate_dataset,
    evaluate_patches,
    inside_click,
    load_coco,
    load_dataset,
    load_grabcut_folder,
    main,
    mask_iou,
    next_click,
    patch_metrics,
    run_protocol,
    summarize,
)

GRABCUT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "GrabCut"


def box(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


class ScriptedSegmenter:
    """Returns ``masks[k - 1]`` after k clicks (the last one from then on), and records what it was given."""

    def __init__(self, masks):
        self.masks = masks
        self.calls = []

    def set_image(self, image):
        self.image = image

    def predict(self, points, labels, prev_mask=None):
        self.calls.append((points.copy(), labels.copy(), prev_mask))
        return self.masks[min(len(points), len(self.masks)) - 1], 0.5


class AlternativesSegmenter(ScriptedSegmenter):
    """A ScriptedSegmenter whose first click also has ``alternatives`` (masks), as the predictor's ``alternative``
    picks them (0: the scripted first mask)."""

    def __init__(self, masks, alternatives):
        super().__init__(masks)
        self.others = alternatives

    def alternatives(self):
        return 1 + len(self.others)

    def predict(self, points, labels, prev_mask=None, alternative=0):
        if alternative:
            assert prev_mask is None
            self.calls.append((points.copy(), labels.copy(), prev_mask, alternative))
            return self.others[alternative - 1], 0.4
        return super().predict(points, labels, prev_mask)


def first_pixels(gt, count):
    """A mask of the first ``count`` object pixels in raster order: IoU count / gt.sum() by construction."""
    mask = np.zeros(gt.size, bool)
    mask[np.flatnonzero(gt)[:count]] = True
    return mask.reshape(gt.shape)


# --- next_click --------------------------------------------------------------------------------------------


def test_first_click_is_the_distance_transform_maximum():
    gt = box((20, 30), (1, 10), (1, 10)) | box((20, 30), (4, 6), (10, 28))  # a 9x9 square with a thin arm
    assert next_click(np.zeros_like(gt), gt) == (5, 5, True)


def test_image_border_counts_as_object_boundary():
    gt = box((10, 30), (0, 7), (0, 30))  # touches the top, left and right borders
    row, col, positive = next_click(np.zeros_like(gt), gt)
    assert positive and row == 3  # 4 from the top border and from the bottom edge; unpadded it would be row 0


def test_missed_object_gives_a_positive_click_inside_it():
    gt = box((30, 30), (5, 25), (5, 25))
    pred = box((30, 30), (5, 25), (5, 15))  # the right half is missed
    row, col, positive = next_click(pred, gt)
    assert positive and gt[row, col] and not pred[row, col]
    assert col in (19, 20)  # the middle of the 10-column missed strip


def test_false_object_gives_a_negative_click_inside_it():
    gt = box((40, 40), (5, 15), (5, 15))
    pred = gt | box((40, 40), (20, 36), (20, 36))
    row, col, positive = next_click(pred, gt)
    assert not positive and pred[row, col] and not gt[row, col]
    assert 27 <= row <= 28 and 27 <= col <= 28


def test_the_deeper_error_region_wins():
    gt = box((40, 40), (0, 20), (0, 40))
    missed_thin = gt & ~box((40, 40), (0, 20), (0, 38))  # 2 columns missed
    pred = (gt & ~missed_thin) | box((40, 40), (25, 39), (5, 19))  # and a thick false blob
    assert next_click(pred, gt)[2] is False
    assert next_click(gt & ~box((40, 40), (2, 18), (2, 18)), gt)[2] is True


def test_clicked_pixels_are_not_clicked_again():
    gt = box((20, 20), (5, 10), (5, 10))
    first = next_click(np.zeros_like(gt), gt)
    second = next_click(np.zeros_like(gt), gt, clicked=[first[:2]])
    assert second[:2] != first[:2] and gt[second[:2]]


def test_nothing_left_to_correct_gives_none():
    gt = box((20, 20), (5, 10), (5, 10))
    assert next_click(gt, gt) is None


# --- ignore pixels -----------------------------------------------------------------------------------------


def test_ignore_pixels_are_left_out_of_the_iou():
    gt = box((20, 20), (5, 15), (5, 15))
    band = box((20, 20), (4, 16), (4, 16)) & ~box((20, 20), (6, 14), (6, 14))
    pred = box((20, 20), (4, 16), (4, 16))  # the object plus a ring of errors, all in the band
    assert mask_iou(pred, gt) == pytest.approx(100 / 144)
    assert mask_iou(pred, gt, ignore=band) == 1.0


def test_ignore_pixels_are_left_out_of_the_error_regions():
    gt = box((40, 40), (0, 20), (0, 20))
    ignore = box((40, 40), (0, 20), (0, 10))  # the left half of the object does not count
    row, col, positive = next_click(np.zeros_like(gt), gt, ignore)
    assert positive and not ignore[row, col] and col in (14, 15)
    false_blob = box((40, 40), (25, 35), (25, 35))
    assert next_click(gt | false_blob, gt, ignore=false_blob) is None


def test_ground_truth_all_ignored_is_an_error():
    gt = box((10, 10), (2, 5), (2, 5))
    with pytest.raises(ValueError, match="no object pixel"):
        run_protocol(ScriptedSegmenter([gt]), np.zeros((10, 10)), gt, ignore=gt)


# --- the protocol and NoC ----------------------------------------------------------------------------------


def test_protocol_passes_all_clicks_and_the_previous_mask():
    gt = box((30, 30), (5, 15), (5, 15))
    masks = [first_pixels(gt, 50), first_pixels(gt, 80), gt]
    segmenter = ScriptedSegmenter(masks)
    result = run_protocol(segmenter, np.zeros((30, 30, 3)), gt, max_clicks=5)
    assert [len(points) for points, _, _ in segmenter.calls] == [1, 2, 3]
    assert segmenter.calls[0][2] is None
    assert np.array_equal(segmenter.calls[1][2], masks[0])
    assert list(segmenter.calls[2][1]) == [1, 1, 1]
    assert np.allclose(result.ious, [0.5, 0.8, 1.0, 1.0, 1.0])  # the user stops at a perfect mask
    assert len(result.seconds) == 3 and len(result.clicks) == 3


def test_noc_counts_clicks_to_reach_the_threshold():
    gt = box((30, 30), (5, 15), (5, 15))  # 100 pixels: first_pixels(gt, n) has IoU n / 100
    reaching = run_protocol(
        ScriptedSegmenter([first_pixels(gt, n) for n in (50, 86, 88, 95)]), None, gt, None, 6
    )
    never_90 = run_protocol(ScriptedSegmenter([first_pixels(gt, 86)]), None, gt, None, 6)
    summary = summarize([reaching, never_90])
    assert summary["noc@85"] == pytest.approx((2 + 1) / 2)
    assert summary["noc@90"] == pytest.approx((4 + 6) / 2)  # never reached counts max_clicks
    assert summary["failures@85"] == 0 and summary["failures@90"] == 1
    assert summary["miou@1"] == pytest.approx((0.5 + 0.86) / 2)
    assert summary["miou@3"] == pytest.approx((0.88 + 0.86) / 2)
    assert summary["miou@5"] == pytest.approx((0.95 + 0.86) / 2)
    assert summary["n"] == 2


@pytest.mark.parametrize("k", [1, 3, 7])
def test_noc_of_a_segmenter_right_after_k_clicks(k):
    gt = box((30, 30), (5, 20), (5, 20))
    masks = [np.zeros_like(gt)] * (k - 1) + [gt]
    summary = summarize([run_protocol(ScriptedSegmenter(masks), None, gt, max_clicks=20)])
    assert summary["noc@85"] == summary["noc@90"] == k


# --- patch metrics -----------------------------------------------------------------------------------------


def test_patch_metrics_by_hand():
    metrics = patch_metrics([0.2, 0.7, 0.8, 1.0])
    assert metrics["mean_iou"] == pytest.approx(0.675)
    assert metrics["median_iou"] == pytest.approx(0.75)
    assert metrics["iou@0.7"] == pytest.approx(0.75)  # 0.7 itself counts
    assert metrics["n"] == 4


def test_evaluate_patches_from_mask_pairs_and_batches():
    half = np.array([[1, 1], [0, 0]], bool)
    corner = np.array([[1, 0], [0, 0]], bool)
    pairs = [(half, corner), (half, half), (np.stack([corner, half]), np.stack([half, ~half]))]
    metrics = evaluate_patches(pairs)  # IoUs 0.5, 1.0, 0.5, 0.0
    assert metrics["n"] == 4
    assert metrics["mean_iou"] == pytest.approx(0.5)
    assert metrics["median_iou"] == pytest.approx(0.5)
    assert metrics["iou@0.7"] == pytest.approx(0.25)


# --- baselines ---------------------------------------------------------------------------------------------


def disk_on_noise(gray16=False):
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:120, :140]
    disk = (rows - 55) ** 2 + (cols - 75) ** 2 < 30**2
    image = np.where(disk[..., None], [200, 80, 80], [60, 90, 60]) + rng.normal(0, 12, (120, 140, 3))
    image = np.clip(image, 0, 255)
    if gray16:
        image = (image.mean(axis=-1) * 200).astype(np.uint16)
    return image.astype(np.uint16 if gray16 else np.uint8), disk


@pytest.mark.parametrize("gray16", [False, True], ids=["rgb8", "gray16"])
@pytest.mark.parametrize("method", [MagicWand, GrabCutClicks, RandomWalkerClicks])
def test_baseline_segments_a_disk_from_one_click(method, gray16):
    image, disk = disk_on_noise(gray16)
    segmenter = method()
    segmenter.set_image(image)
    mask, _ = segmenter.predict(np.array([[55.0, 75.0]]), np.array([1]))
    assert mask.shape == disk.shape and mask.dtype == bool
    assert mask_iou(mask, disk) > 0.8


@pytest.mark.parametrize("method", [MagicWand, GrabCutClicks, RandomWalkerClicks])
def test_baseline_gives_the_same_mask_for_the_same_clicks(method):
    """A benchmark row must not change between runs: GrabCut's random k-means start is seeded (on colour
    blocks an unseeded one gives a different mask on each call)."""
    from synthetic import blocks_image

    segmenter = method()
    segmenter.set_image(blocks_image(seed=0))
    runs = [segmenter.predict(np.array([[60.0, 60.0]]), np.array([1]))[0] for _ in range(3)]
    assert all(np.array_equal(runs[0], run) for run in runs[1:])


@pytest.mark.parametrize("method", [MagicWand, GrabCutClicks, RandomWalkerClicks])
def test_baseline_needs_a_positive_click(method):
    segmenter = method()
    segmenter.set_image(disk_on_noise()[0])
    with pytest.raises(ValueError, match="positive"):
        segmenter.predict(np.array([[55.0, 75.0]]), np.array([0]))


# --- datasets ----------------------------------------------------------------------------------------------


def write_grabcut_layout(root):
    (root / "data_GT").mkdir(parents=True)
    (root / "boundary_GT").mkdir()
    mask = np.zeros((16, 20), np.uint8)
    mask[4:12, 5:15] = 128
    mask[5:11, 6:14] = 255
    for stem, suffix in (("a", ".JPG"), ("b", ".bmp")):
        image = np.full((16, 20, 3), 100, np.uint8)
        iio.imwrite(root / "data_GT" / f"{stem}{suffix}", image, extension=suffix.lower())
        iio.imwrite(root / "boundary_GT" / f"{stem}.bmp", mask)
    return mask


def test_grabcut_layout_matches_stems_and_decodes_ignore(tmp_path):
    mask = write_grabcut_layout(tmp_path)
    samples = list(load_dataset(tmp_path))
    assert [s.name for s in samples] == ["a", "b"]
    assert np.array_equal(samples[0].gt, mask == 255)
    assert np.array_equal(samples[0].ignore, mask == 128)
    assert samples[0].image.shape == (16, 20, 3)


def test_grabcut_layout_without_a_mask_is_an_error(tmp_path):
    write_grabcut_layout(tmp_path)
    (tmp_path / "boundary_GT" / "b.bmp").unlink()
    with pytest.raises(FileNotFoundError, match="b"):
        list(load_grabcut_folder(tmp_path))


def test_plain_layout_and_fixed_seed_subset(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for index in range(6):
        iio.imwrite(tmp_path / "img" / f"{index}.png", np.zeros((8, 8, 3), np.uint8))
        iio.imwrite(tmp_path / "gt" / f"{index}.png", np.eye(8, dtype=np.uint8))
    names = [s.name for s in load_dataset(tmp_path, max_instances=3)]
    assert len(names) == 3 and names == sorted(names)
    assert names == [s.name for s in load_dataset(tmp_path, max_instances=3)]
    sample = next(load_dataset(tmp_path))
    assert np.array_equal(sample.gt, np.eye(8, dtype=bool)) and sample.ignore is None


def test_coco_loader_keeps_large_non_crowd_objects(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    iio.imwrite(tmp_path / "val2017" / "000001.png", np.zeros((100, 100, 3), np.uint8))
    square = [[10.0, 10.0, 60.0, 10.0, 60.0, 60.0, 10.0, 60.0]]  # 50 x 50
    tiny = [[80.0, 80.0, 85.0, 80.0, 85.0, 85.0, 80.0, 85.0]]
    coco = {
        "images": [{"id": 1, "file_name": "000001.png", "height": 100, "width": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": square,
                "area": 2500.0,
                "iscrowd": 0,
                "bbox": [10, 10, 50, 50],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "segmentation": tiny,
                "area": 25.0,
                "iscrowd": 0,
                "bbox": [80, 80, 5, 5],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "segmentation": square,
                "area": 2500.0,
                "iscrowd": 1,
                "bbox": [10, 10, 50, 50],
            },
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    annotation_file = tmp_path / "annotations" / "instances_val2017.json"
    annotation_file.write_text(json.dumps(coco))
    samples = list(load_coco(annotation_file))
    assert [s.name for s in samples] == ["000001#1"]
    assert samples[0].gt.shape == (100, 100) and 2400 < samples[0].gt.sum() < 2700


@pytest.mark.skipif(not GRABCUT.is_dir(), reason=f"the GrabCut benchmark is not at {GRABCUT}")
def test_grabcut_loader_on_the_real_benchmark():
    samples = list(load_grabcut_folder(GRABCUT))
    assert len(samples) == 50
    for sample in samples:
        assert sample.image.ndim == 3 and sample.image.shape[:2] == sample.gt.shape == sample.ignore.shape
        assert sample.gt.any() and not (sample.gt & sample.ignore).any()
    assert sum(s.ignore.any() for s in samples) == 42  # SOURCE.txt: 42 masks have a 128 band


# --- command line ------------------------------------------------------------------------------------------


def write_disk_folder(root):
    """An img/ + gt/ dataset of one disk on noise, as the eval command reads it."""
    (root / "img").mkdir()
    (root / "gt").mkdir()
    image, disk = disk_on_noise()
    iio.imwrite(root / "img" / "disk.png", image)
    iio.imwrite(root / "gt" / "disk.png", disk.astype(np.uint8) * 255)


def test_eval_command_writes_a_report(tmp_path, capsys):
    write_disk_folder(tmp_path)
    output = tmp_path / "results.json"
    argv = ["--dataset", str(tmp_path), "--max-clicks", "2", "--device", "cpu", "--output", str(output)]
    report = main(argv)
    assert "NoC@90" in capsys.readouterr().out
    assert json.loads(output.read_text())["summary"] == report["summary"]
    assert len(report["per_sample"]["disk"]["ious"]) == 2
    assert report["first_click"] == "deepest"
    inside = main([*argv, "--first-click", "inside"])
    assert inside["first_click"] == "inside"
    first = tuple(inside["per_sample"]["disk"]["clicks"][0])
    gt = iio.imread(tmp_path / "gt" / "disk.png") > 0
    assert first == inside_click(gt, None, "disk") != tuple(report["per_sample"]["disk"]["clicks"][0])


def test_eval_command_measures_snapped_and_own_masks(tmp_path, monkeypatch):
    """--no-snap evaluates the network's own masks; by default the predictor snaps them, as the widget does."""
    from napari_deepcrop.predictor import DeepCropPredictor

    write_disk_folder(tmp_path)
    seen = []
    original = DeepCropPredictor.predict

    def recording(self, *args, **kwargs):
        seen.append(self.snap_edges)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeepCropPredictor, "predict", recording)
    argv = ["--dataset", str(tmp_path), "--max-clicks", "1", "--device", "cpu", "--output", str(tmp_path / "r.json")]
    main(argv)
    main([*argv, "--no-snap"])
    assert seen == [True, False]


def test_an_inside_first_click_is_off_the_edge_off_the_centre_and_the_same_for_every_method():
    gt = box((60, 60), (10, 50), (10, 50))  # depth 20 at the centre: inside clicks at depth >= 5
    ignore = box((60, 60), (10, 50), (30, 50))  # the right half counts for nothing
    depth = ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
    clicks = {inside_click(gt, None, f"image#{k}") for k in range(50)}
    assert len(clicks) > 40  # spread over the object, not its deepest point
    assert all(positive and depth[r, c] >= 5 for r, c, positive in clicks)
    assert {inside_click(gt, None, "image#3") for _ in range(3)} == {inside_click(gt, None, "image#3")}
    halves = {inside_click(gt, ignore, k) for k in range(50)}
    assert all(c < 30 for _, c, _ in halves)  # never where the ignore region is
    with pytest.raises(ValueError, match="no object pixel"):
        inside_click(gt, gt, 0)


def test_the_protocol_puts_the_first_click_inside_and_the_rest_as_before():
    gt = box((60, 60), (10, 50), (10, 50))
    half = box((60, 60), (10, 50), (10, 30))
    standard = ScriptedSegmenter([half, gt])
    run_protocol(standard, np.zeros((60, 60, 3)), gt, max_clicks=3)
    assert tuple(standard.calls[0][0][0]) == (29, 29)  # the deepest point (first of the 2x2 centre)
    inside = ScriptedSegmenter([half, gt])
    result = run_protocol(inside, np.zeros((60, 60, 3)), gt, max_clicks=3, first_click="inside", seed="x#1")
    assert tuple(inside.calls[0][0][0]) == inside_click(gt, None, "x#1")[:2]
    assert tuple(inside.calls[1][0][1]) == next_click(half, gt, clicked=[inside_click(gt, None, "x#1")[:2]])[:2]
    assert np.allclose(result.ious[:2], [0.5, 1.0])
    samples = [Sample(f"im#{k}", np.zeros((60, 60, 3)), gt) for k in range(2)]
    results = evaluate_dataset(ScriptedSegmenter([gt]), samples, 2, first_click="inside")
    firsts = {name: r.clicks[0] for name, r in results.items()}
    assert firsts == {s.name: inside_click(gt, None, s.name) for s in samples}
    with pytest.raises(ValueError, match="first_click"):
        run_protocol(ScriptedSegmenter([gt]), None, gt, first_click="centre")


def test_with_alternatives_the_user_keeps_the_best_of_the_first_clicks_masks():
    """SAM's oracle protocol: up to ``alternatives`` of the first click's masks are looked at, the best kept and
    refined; later clicks get one mask each."""
    gt = box((20, 20), (0, 10), (0, 10))
    scripted = [first_pixels(gt, 40), gt]
    others = [first_pixels(gt, 60), first_pixels(gt, 90), first_pixels(gt, 80)]
    plain = run_protocol(AlternativesSegmenter(scripted, others), np.zeros((20, 20, 3)), gt, max_clicks=3)
    assert plain.ious[0] == pytest.approx(0.4)
    segmenter = AlternativesSegmenter(scripted, others)
    result = run_protocol(segmenter, np.zeros((20, 20, 3)), gt, max_clicks=3, alternatives=3)
    assert result.ious[0] == pytest.approx(0.9)  # the best of masks 0..2; the 0.8 one is beyond three
    assert [c[3] if len(c) == 4 else 0 for c in segmenter.calls[:3]] == [0, 1, 2]
    np.testing.assert_array_equal(segmenter.calls[3][2], others[1])  # the second click refines the one kept
    assert len(result.seconds) == len(result.clicks) == 2
    many = run_protocol(AlternativesSegmenter(scripted, others), np.zeros((20, 20, 3)), gt, alternatives=10)
    assert many.ious[0] == pytest.approx(0.9)  # no more than the segmenter has


def test_coco_loader_reads_the_plugins_own_export_and_names_a_missing_image(tmp_path):
    """`napari-deepcrop export` writes the json beside its images, not in COCO's annotations/ layout: evaluation
    finds them there as training and the reader do (it used to look only in ../<split>/ and fail)."""
    from napari_deepcrop.coco import export_label_folders

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = np.zeros((64, 64), np.uint16)
    image[8:40, 8:40] = 3000  # a 12-bit frame with one 32 x 32 object
    labels = (image > 0).astype(np.uint8)
    iio.imwrite(tmp_path / "images" / "frame.tif", image)
    iio.imwrite(tmp_path / "labels" / "frame.tif", labels)
    json_path = export_label_folders(tmp_path / "images", tmp_path / "labels", tmp_path / "export")
    samples = list(load_coco(json_path, min_area=100))
    assert [s.name for s in samples] == ["frame#1"]
    assert samples[0].image.dtype == np.uint16 and np.array_equal(samples[0].image, image)  # as stored
    assert np.array_equal(samples[0].gt, labels > 0)
    (json_path.parent / "frame.tif").unlink()
    with pytest.raises(FileNotFoundError, match="frame.tif"):
        list(load_coco(json_path, min_area=100))
