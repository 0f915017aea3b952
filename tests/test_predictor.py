import numpy as np
import pytest
import torch
from synthetic import disk_image

from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.fixture(scope="module")
def predictor(disk_model):
    return DeepCropPredictor(disk_model, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("size, center, radius", [(256, (128, 128), 40), (512, (100, 380), 25), (1024, (600, 500), 90)])
def test_trained_model_segments_a_disk_on_noise(predictor, size, center, radius):
    image, mask = disk_image(size, center, radius, seed=123)
    predictor.set_image(image)
    pred, score = predictor.predict(np.array([center], float), np.array([1]))
    assert pred.shape == mask.shape and pred.dtype == bool
    assert iou(pred, mask) > 0.8
    assert 0.0 <= score <= 1.0


@pytest.mark.slow
def test_return_crop_is_the_same_mask(predictor):
    image, _ = disk_image(512, (300, 200), 50, seed=5)
    predictor.set_image(image)
    full, score = predictor.predict(np.array([[300, 200]]), np.array([1]))
    crop, (r0, c0), score2 = predictor.predict(np.array([[300, 200]]), np.array([1]), return_crop=True)
    assert score == score2
    rebuilt = np.zeros_like(full)
    rebuilt[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
    assert np.array_equal(rebuilt, full)
    assert crop.shape[0] < 200 and crop.shape[1] < 200


@pytest.mark.slow
def test_refinement_with_previous_mask_and_negative_click(predictor):
    image, mask = disk_image(256, (128, 128), 40, seed=9)
    predictor.set_image(image)
    first, _ = predictor.predict(np.array([[128, 128]]), np.array([1]))
    refined, _ = predictor.predict(np.array([[128, 128], [20, 20]]), np.array([1, 0]), prev_mask=first)
    assert iou(refined, mask) > 0.8
    assert not refined[20, 20]


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 65535, (128, 96), dtype=np.uint16),
        np.random.default_rng(0).random((128, 96, 4)).astype(np.float32),
        np.random.default_rng(0).integers(0, 255, (128, 96, 5), dtype=np.uint8),
    ],
    ids=["uint16-gray", "float-rgba", "5-channel"],
)
def test_any_image_kind_gives_a_mask_of_image_size(image):
    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")
    p.set_image(image)
    mask, score = p.predict(np.array([[60, 40]]), np.array([1]))
    assert mask.shape == (128, 96) and mask.dtype == bool and 0 <= score <= 1


def test_clear_errors():
    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")
    with pytest.raises(RuntimeError, match="no image set"):
        p.predict(np.array([[1, 1]]), np.array([1]))
    p.set_image(np.zeros((50, 60, 3), np.uint8) + np.arange(60, dtype=np.uint8)[None, :, None])
    with pytest.raises(ValueError, match="outside the image"):
        p.predict(np.array([[10, 60]]), np.array([1]))
    with pytest.raises(ValueError, match="positive click"):
        p.predict(np.array([[10, 10]]), np.array([0]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        p.predict(np.array([10, 10]), np.array([1]))
    with pytest.raises(ValueError, match="prev_mask"):
        p.predict(np.array([[10, 10]]), np.array([1]), prev_mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="no contrast"):
        p.set_image(np.full((50, 50), 7, np.uint16))
    with pytest.raises(ValueError, match="no contrast"):
        p.set_image(np.full((50, 50), np.nan, np.float32))
    with pytest.raises(ValueError, match="2D"):
        p.set_image(np.zeros((4, 50, 50, 3), np.uint8))
    p.reset_image()
    with pytest.raises(RuntimeError, match="no image set"):
        p.predict(np.array([[1, 1]]), np.array([1]))


def test_nans_in_a_float_image_are_handled():
    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")
    image = np.random.default_rng(1).random((80, 80)).astype(np.float32)
    image[:10] = np.nan
    p.set_image(image)
    mask, score = p.predict(np.array([[40, 40]]), np.array([1]))
    assert np.isfinite(score)


def test_device_auto_picks_cpu_without_cuda():
    import torch

    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)))
    assert p.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_placed_mask_slices_like_the_full_mask():
    from napari_deepcrop.crops import PlacedMask

    rng = np.random.default_rng(3)
    full = np.zeros((90, 70), bool)
    full[20:50, 10:40] = rng.random((30, 30)) > 0.5
    placed = PlacedMask.from_full(full)
    assert placed.crop.shape == (30, 30) and placed.origin == (20, 10) and np.array_equal(placed.full(), full)
    keys = [(slice(0, 90, 1), slice(0, 70, 1)), (slice(15, 60, 3), slice(5, 70, 2)), (slice(60, 90), slice(0, 9))]
    # windows overlapping the crop in part, inside it, and empty
    keys += [(slice(25, 80), slice(30, 60)), (slice(0, 30), slice(0, 20)), (slice(22, 40), slice(12, 35))]
    keys += [(slice(5, 5), slice(0, 70)), (slice(40, 30), slice(0, 70))]
    for key in keys:
        assert np.array_equal(placed[key], full[key])


def test_refinement_from_a_placed_mask_equals_refinement_from_the_full_mask():
    from napari_deepcrop.crops import PlacedMask

    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")
    image, mask = disk_image(300, (150, 150), 40, seed=4)
    p.set_image(image)
    clicks, labels = np.array([[150, 150], [40, 40]]), np.array([1, 0])
    from_full, score_full = p.predict(clicks, labels, prev_mask=mask)
    from_placed, score_placed = p.predict(clicks, labels, prev_mask=PlacedMask.from_full(mask))
    assert np.array_equal(from_full, from_placed) and score_full == score_placed
    with pytest.raises(ValueError, match="prev_mask"):
        p.predict(clicks, labels, prev_mask=PlacedMask(mask[:10, :10], (0, 0), (10, 10)))


def test_to_float_normalises_each_kept_channel_into_one_contiguous_array():
    """Strided views (a large crop read with a step), channel selection and reordering, RGBA, grayscale and NaN
    all give the per-channel (x - low) / (high - low) clipped to [0, 1], C-contiguous for the crop's warp."""
    from napari_deepcrop.predictor import ImageSource

    rng = np.random.default_rng(5)

    def reference(region, channels, low, high):
        region = region[..., None] if region.ndim == 2 else region[..., list(channels)]
        out = np.clip((region.astype(np.float64) - low) / (high - low), 0, 1)
        out = np.nan_to_num(out, nan=0.0)
        return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out

    rgb = rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)
    five = rng.normal(100, 40, (60, 50, 5)).astype(np.float32)
    five[3, 4, 2] = np.nan
    gray = rng.integers(0, 4096, (70, 40), dtype=np.uint16)
    cases = [
        (rgb, None, None, (slice(5, 75, 2), slice(3, 90, 3))),
        (np.dstack([rgb, rgb[..., :1]]), None, (10, 200), (slice(0, 80), slice(0, 90))),  # RGBA: alpha dropped
        (five, (4, 0, 2), [(50, 150), (0, 200), (90, 110)], (slice(1, 60, 2), slice(0, 50))),
        (gray, None, (100, 3000), (slice(10, 70, 3), slice(0, 40, 2))),
    ]
    for image, channels, limits, key in cases:
        source = ImageSource.from_array(image, limits, channels)
        out = source.to_float(image[key])
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape[-1] == 3
        np.testing.assert_allclose(out, reference(image[key], source.channels, source.low, source.high), atol=1e-6)


def test_separate_channels_are_each_normalised_by_their_own_contrast_limits():
    """napari's channel_axis gives one layer per channel: a ChannelStack sees them as one image, each channel
    with its layer's contrast limits, and segments exactly as the stacked array would."""
    from napari_deepcrop.predictor import ChannelStack, ImageSource

    rng = np.random.default_rng(2)
    nuclei = rng.integers(0, 4000, (120, 100), dtype=np.uint16)
    membrane = rng.random((120, 100)).astype(np.float32) * 50 - 10
    stack = ChannelStack([nuclei, membrane])
    assert stack.shape == (120, 100, 2) and stack.dtype == np.float32
    limits = [(100.0, 3900.0), (-10.0, 40.0)]
    region = ImageSource.from_array(stack, limits).to_float(stack[10:20, 30:40])
    np.testing.assert_allclose(region[..., 0], np.clip((nuclei[10:20, 30:40] - 100.0) / 3800.0, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(region[..., 1], np.clip((membrane[10:20, 30:40] + 10.0) / 50.0, 0, 1), rtol=1e-5)
    assert (region[..., 2] == 0).all()  # two channels: the third input channel is empty

    p = DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")
    p.set_image(stack, contrast_limits=limits)
    from_stack, score = p.predict(np.array([[60, 40]]), np.array([1]))
    p.set_image(np.stack([nuclei, membrane], axis=-1).astype(np.float32), contrast_limits=limits)
    from_array, score_array = p.predict(np.array([[60, 40]]), np.array([1]))
    assert np.array_equal(from_stack, from_array) and score == score_array

    with pytest.raises(ValueError, match="one pair for each of the 2 channels"):
        p.set_image(stack, contrast_limits=[(0, 1), (0, 1), (0, 1)])
    with pytest.raises(ValueError, match="one shape"):
        ChannelStack([nuclei, membrane[:, :50]])
    with pytest.raises(ValueError, match="no contrast"):  # every channel flat: nothing to segment
        p.set_image(stack, contrast_limits=[(5, 5), (1, 0)])


def test_warped_logits_match_logits_cut_at_the_target_crop():
    """warp_logits moves a crop's logits onto another crop's grid (what edge snapping starts from): the same as
    cutting that crop directly."""
    from napari_deepcrop.crops import Crop, logits_extent, read_crop, warp_logits

    rows, cols = np.mgrid[0:400, 0:400].astype(np.float32)
    field = (rows - 180) * 0.05 + (cols - 220) * 0.03  # a smooth "logit" over the image
    source, target = Crop(100.0, 120.0, 200.0), Crop(150.0, 170.0, 90.0)
    warped = warp_logits(read_crop(field, source, 64), source, target)
    np.testing.assert_allclose(warped, read_crop(field, target, 64), atol=0.02)
    outside = warp_logits(read_crop(field, target, 64), target, source)
    assert (outside[:5, :5] == -20).all()  # the source crop's corner lies outside the target crop

    logits = np.full((64, 64), -1.0, np.float32)
    logits[16:32, 8:40] = 1.0  # input pixels -> image: 100 + 16 * 200 / 64 = 150 ... 100 + 32 * 200 / 64 = 200
    lo, hi = logits_extent(logits, source)
    np.testing.assert_array_equal(lo, [150, 145])
    np.testing.assert_array_equal(hi, [199, 244])
    assert logits_extent(np.full((64, 64), -1.0), source) is None


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((300, 300), float("inf"), [64, 128, 256, 512]),  # up to the first side covering the image, no further
        ((700, 1024, 3), float("inf"), [64, 128, 256, 512, 1024]),  # the longer side counts
        ((40, 50), float("inf"), [64]),  # an image smaller than the smallest crop: one crop
        ((10_000, 10_000), 4096, [64, 128, 256, 512, 1024, 2048, 4096]),  # a lazy image's cap
        ((10_000, 10_000), 3000, [64, 128, 256, 512, 1024, 2048, 3000]),  # a cap off the ladder is its last rung
    ],
)
def test_first_click_scales_run_from_the_smallest_crop_to_the_whole_image(shape, max_side, expected):
    from napari_deepcrop.predictor import first_click_sides

    assert first_click_sides(shape, max_side) == expected


@pytest.mark.slow
def test_first_click_zoom_in_refines_the_chosen_scales_mask_on_the_refinement_crop(disk_model):
    """zoom_in: the first click runs zoom_in_passes more times, each on one crop around the mask of the pass before
    (the mask's box filling 0.6 of it), that mask as prev_mask; the mask and score returned are the last pass's.
    The first zoom-in pass is the first-click network's, the later ones the refining network's (``first`` False).
    zoom_in=False gives the scales' pass alone."""
    from napari_deepcrop.crops import PlacedMask, paste_logits
    from napari_deepcrop.predictor import first_click_sides

    image, truth = disk_image(512, (260, 240), 45, seed=21)
    click, label = np.array([[260, 240]]), np.array([1])
    plain = DeepCropPredictor(disk_model, device="cpu", snap_edges=False, zoom_in=False)
    plain.set_image(image)
    first, _ = plain.predict(click, label)
    zoomed = DeepCropPredictor(disk_model, device="cpu", snap_edges=False)
    assert zoomed.zoom_in_passes == 2
    zoomed.set_image(image)
    calls, results = [], []
    run = zoomed._run

    def spy(source, crops, points, labels, prev_mask, size, first=False, mirror=False):
        calls.append((list(crops), prev_mask, first, mirror))
        results.append(run(source, crops, points, labels, prev_mask, size, first, mirror))
        return results[-1]

    zoomed._run = spy
    mask, score = zoomed.predict(click, label)
    scales = len(first_click_sides(image.shape))
    # the scales, the first-click network's zoom-in pass, the refining network's (with the crop's mirror image)
    passes = [(len(c), p is None, f, m) for c, p, f, m in calls]
    assert passes == [(scales, True, True, False), (1, False, True, False), (1, False, False, True)]
    assert isinstance(calls[1][1], PlacedMask) and np.array_equal(calls[1][1].full(), first)
    for crops, prev, *_ in calls[1:]:
        extent = max(np.ptp(np.nonzero(prev.full())[0]), np.ptp(np.nonzero(prev.full())[1])) + 1
        assert crops[0].side == pytest.approx(extent / 0.6, rel=0.05)  # around the mask before it
    second, origin = paste_logits(results[1][0][0], calls[1][0][0], image.shape[:2])
    assert np.array_equal(calls[2][1].crop, second) and calls[2][1].origin == origin
    assert score == pytest.approx(float(results[2][1][0]))
    assert iou(mask, truth) > 0.8
    zoomed.zoom_in_passes = 1
    calls.clear()
    zoomed.predict(click, label)
    assert len(calls) == 2


@pytest.mark.slow
def test_refinement_crops_run_at_the_refinement_size_and_first_click_scales_at_the_input_size(disk_model):
    """refine_size: the first click's scales at input_size, its zoom-in and every refinement at refine_size."""
    from napari_deepcrop.predictor import first_click_sides

    model = disk_model.with_refine_size(96).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    p = DeepCropPredictor(model, device="cpu", snap_edges=False)
    image, truth = disk_image(512, (260, 240), 45, seed=21)
    p.set_image(image)
    first, _ = p.predict(np.array([[260, 240]]), np.array([1]))
    # the scales, the first-click network's zoom-in, the refining network's (a crop and its mirror image)
    assert seen == [(len(first_click_sides(image.shape)), 3, 64, 64), (1, 3, 96, 96), (2, 3, 96, 96)]
    seen.clear()
    refined, _ = p.predict(np.array([[260, 240], [100, 100]]), np.array([1, 0]), prev_mask=first)
    # the object's crop(s) with their mirror images, the focus crop
    assert seen == [(2 * len(p.refine_factors), 3, 96, 96), (1, 3, 96, 96)]
    assert refined.shape == truth.shape and refined[260, 240] and not refined[100, 100]


def test_the_focus_crop_refines_the_boundary_near_the_newest_click_on_a_finer_grid(monkeypatch):
    """A large disk with a thin slot cut into it: the object's refinement crop (1000 image px at 96 input px)
    is too coarse to see the slot; the focus crop around a click next to it is fine enough, and changes the mask
    near that click only. BrightNet, the fixed stand-in network, makes the masks the same on every machine."""
    from synthetic import BrightNet

    image, disk = disk_image(1024, (512, 512), 300, seed=5, channels=3)
    slot = np.zeros_like(disk)
    slot[500:524, 212:420] = True  # 24 px wide, 208 px deep, from the disk's left edge inwards
    image[slot] = 70
    truth = disk & ~slot
    net = BrightNet(DeepCropConfig(input_size=64, refine_size=96, decoder_width=8))
    predictor = DeepCropPredictor(net, device="cpu", snap_edges=False)
    predictor.refine_factors, predictor.focus_ratio = (1.0, 1.5), None
    predictor.set_image(image, contrast_limits=(0, 255))
    points, labels = np.array([[512.0, 512.0], [512.0, 300.0]]), np.array([1, 0])  # a negative click in the slot
    passes = []
    run = DeepCropPredictor._run

    def counting(self, source, crops, *args):
        passes.append(len(crops))
        return run(self, source, crops, *args)

    monkeypatch.setattr(DeepCropPredictor, "_run", counting)
    plain, _ = predictor.predict(points, labels, prev_mask=disk)
    predictor.focus_ratio = 1.5
    focused, _ = predictor.predict(points, labels, prev_mask=disk)
    assert passes == [2, 2, 1]  # the object's two crops, then those and one focus crop
    near = np.zeros_like(disk)
    near[412:612, 200:500] = True  # around the slot and the click
    assert iou(focused & near, truth & near) > iou(plain & near, truth & near) + 0.05
    far = np.zeros_like(disk)
    far[:, 700:] = True  # the focus crop, 400 px around (512, 300), does not reach here
    assert iou(focused & far, plain & far) > 0.995  # the same mask, resampled once more
    # a small object's crop is already near full resolution: no focus pass
    small, small_truth = disk_image(256, (128, 128), 30, seed=6, channels=3)
    predictor.set_image(small, contrast_limits=(0, 255))
    passes.clear()
    predictor.predict(np.array([[128.0, 128.0]]), np.array([1]), prev_mask=small_truth)
    assert passes == [2]


@pytest.mark.slow
def test_alternative_masks_are_the_first_click_scales_in_the_order_of_their_scores(disk_model):
    """alternative=k: the first click's scale ranked k-th by score (0: the network's choice, the default), as
    that scale's own pass gives it (here without zoom-in or snapping); alternatives() counts them."""
    from napari_deepcrop.crops import paste_logits
    from napari_deepcrop.predictor import first_click_sides

    image, _ = disk_image(512, (260, 240), 45, seed=21)
    click, label = np.array([[260, 240]]), np.array([1])
    p = DeepCropPredictor(disk_model, device="cpu", snap_edges=False, zoom_in=False)
    p.set_image(image)
    assert p.alternatives() == len(first_click_sides(image.shape)) > 1
    crops = p._candidate_crops(click, label, None, image.shape[:2])
    logits, scores = p._run(p._source, crops, click, label, None, 64, True)  # a first click's pass
    order = np.argsort(-scores)
    assert len(set(scores.tolist())) == len(scores)  # a strict order to check against
    masks = []
    for k in range(p.alternatives()):
        mask, score = p.predict(click, label, alternative=k)
        crop_mask, (r0, c0) = paste_logits(logits[order[k]], crops[order[k]], image.shape[:2])
        expected = np.zeros(image.shape[:2], bool)
        expected[r0 : r0 + crop_mask.shape[0], c0 : c0 + crop_mask.shape[1]] = crop_mask
        assert np.array_equal(mask, expected) and score == pytest.approx(scores[order[k]])
        masks.append(mask)
    assert np.array_equal(p.predict(click, label)[0], masks[0])
    assert len({m.tobytes() for m in masks}) > 1  # the scales do give different masks


def test_alternative_errors(disk_model):
    p = DeepCropPredictor(disk_model, device="cpu", snap_edges=False)
    image, _ = disk_image(128, (64, 64), 20, seed=1)
    p.set_image(image)
    click, label = np.array([[64, 64]]), np.array([1])
    n = p.alternatives()
    for bad in (n, -1):
        with pytest.raises(ValueError, match=rf"alternative must be in 0\.\.{n - 1} on this image, got {bad}"):
            p.predict(click, label, alternative=bad)
    with pytest.raises(TypeError):
        p.predict(click, label, alternative=1.5)
    first, _ = p.predict(click, label)
    with pytest.raises(ValueError, match="alternative masks are a first click's"):
        p.predict(click, label, prev_mask=first, alternative=1)
    p.reset_image()
    with pytest.raises(RuntimeError, match="no image set"):
        p.alternatives()


def test_a_first_click_network_reads_first_clicks_and_the_main_network_every_later_click(disk_model):
    """first_click_model: a first click's scales, their ranking and its first zoom-in pass are that network's, as if it
    were the only one; the later zoom-in passes and every click with a previous mask (and propagation) are the main
    network's alone."""
    torch.manual_seed(1)
    other = DeepCropV2(DeepCropConfig(input_size=64, decoder_width=16, click_encoding="disk")).eval()
    both = DeepCropPredictor(disk_model, device="cpu", snap_edges=False, first_click_model=other)
    main_only = DeepCropPredictor(disk_model, device="cpu", snap_edges=False)
    other_only = DeepCropPredictor(other, device="cpu", snap_edges=False)
    image, _ = disk_image(300, (150, 140), 40, seed=5)
    for p in (both, main_only, other_only):
        p.set_image(image)
    click, label = np.array([[150, 140]]), np.array([1])
    runs = []
    # the trained network reading first clicks (the untrained one finds no object to zoom in on)
    swapped = DeepCropPredictor(other, device="cpu", snap_edges=False, first_click_model=disk_model)
    for p in (both, swapped):
        for name, nets in (("first", p.first_nets), ("main", p.nets)):
            for net in nets.values():
                net.register_forward_pre_hook(lambda module, args, name=name: runs.append(name))
    swapped.set_image(image)
    swapped.predict(click, label)
    assert runs == ["first", "first", "main"]  # the scales, the first zoom-in pass, the second
    runs.clear()
    both.zoom_in_passes = other_only.zoom_in_passes = main_only.zoom_in_passes = 1
    first, first_score = both.predict(click, label)
    expected, expected_score = other_only.predict(click, label)
    assert np.array_equal(first, expected) and first_score == pytest.approx(expected_score)
    assert first_score != pytest.approx(main_only.predict(click, label)[1])  # the two networks do differ
    prev, _ = main_only.predict(click, label)
    clicks, labels = np.array([[150, 140], [150, 185]]), np.array([1, 0])
    runs.clear()
    refined, refined_score = both.predict(clicks, labels, prev_mask=prev)
    assert set(runs) == {"main"}
    expected, expected_score = main_only.predict(clicks, labels, prev_mask=prev)
    assert np.array_equal(refined, expected) and refined_score == pytest.approx(expected_score)
    assert both.alternatives() == main_only.alternatives()
    second = other_only.predict(click, label, alternative=1)[0]
    assert np.array_equal(both.predict(click, label, alternative=1)[0], second)


def test_flip_average_runs_each_refining_crop_and_its_mirror_image(disk_model):
    """flip_average: a pass of the refining network on the object's crop averages the network on the crop and on
    its mirror image (the click and previous-mask planes mirrored with it), so the mirrored image with the mirrored
    clicks and mask gives the mirrored logits to float rounding; the network alone is not mirror-symmetric. First-click
    passes and focus crops are never mirrored (predict's passes: the zoom-in and refinement tests above)."""
    from napari_deepcrop.crops import Crop, PlacedMask

    image, truth = disk_image(256, (120, 100), 40, seed=3)
    width = image.shape[1]
    points, labels = np.array([[120.0, 100.0], [120.0, 150.0]]), np.array([1, 0])
    mirrored_points = np.stack([points[:, 0], width - 1 - points[:, 1]], axis=1)
    crop = Crop.centered((120, 100), 110)
    mirrored_crop = Crop(crop.row0, width - crop.col0 - crop.side, crop.side)
    p = DeepCropPredictor(disk_model, device="cpu", snap_edges=False)
    assert p.flip_average and p._mirror(first=False) and not p._mirror(first=True)
    p.flip_average = False
    assert not p._mirror(first=False)

    def logits(mirrored: bool, mirror: bool):
        img, c, pts, prev = (image, crop, points, truth)
        if mirrored:
            img, c, pts, prev = image[:, ::-1].copy(), mirrored_crop, mirrored_points, truth[:, ::-1].copy()
        p.set_image(img, contrast_limits=(0, 255))
        size = p.config.refinement_size
        out = p._run(p._source, [c], pts, labels, PlacedMask.from_full(prev), size, False, mirror)[0][0]
        return out[:, ::-1] if mirrored else out

    averaged = logits(False, mirror=True)
    np.testing.assert_allclose(logits(True, mirror=True), averaged, atol=1e-4)
    alone, alone_mirrored = logits(False, mirror=False), logits(True, mirror=False)
    assert np.abs(alone_mirrored - alone).max() > 1e-2
    np.testing.assert_allclose((alone + alone_mirrored) / 2, averaged, atol=1e-4)


def test_progressive_merge_changes_the_previous_mask_only_where_the_click_is():
    """FocalClick's progressive merge: of everything the new mask changes, only the part connected to the click
    reaches the previous mask: added for a click outside it, removed for a click inside; a click whose pixel the
    new mask leaves as it was merges nothing (the new mask is kept)."""
    from napari_deepcrop.crops import PlacedMask, progressive_merge

    shape = (5000, 6000)  # only the masks' boxes are read
    prev = np.zeros(shape, bool)
    prev[1000:1100, 2000:2100] = True
    prev[1000:1010, 2200:2210] = True  # a stray blob the new mask drops
    new = prev.copy()
    new[1000:1010, 2200:2210] = False
    new[1100:1130, 2000:2050] = True  # grown where the click is (touching the old mask)
    new[1200:1220, 2300:2320] = True  # and a blob far away
    new[1000:1020, 2000:2020] = False  # a bite out of the old mask
    merged = progressive_merge(PlacedMask.from_full(new), PlacedMask.from_full(prev), (1120, 2010)).full()
    expected = prev.copy()
    expected[1100:1130, 2000:2050] = True
    assert np.array_equal(merged, expected)

    # a negative click in the bite removes the bite alone
    merged = progressive_merge(PlacedMask.from_full(new), PlacedMask.from_full(prev), (1005, 2005)).full()
    expected = prev.copy()
    expected[1000:1020, 2000:2020] = False
    assert np.array_equal(merged, expected)

    # a click the new mask does not answer (its pixel as before): the new mask as it is
    placed = PlacedMask.from_full(new)
    assert progressive_merge(placed, PlacedMask.from_full(prev), (1050, 2050)) is placed

    # removing the whole previous mask: an empty mask
    only = np.zeros(shape, bool)
    only[10:20, 10:20] = True
    gone = progressive_merge(PlacedMask.from_full(np.zeros(shape, bool)), PlacedMask.from_full(only), (15, 15))
    assert not gone.any() and gone.shape == shape


@pytest.mark.slow
def test_clicks_from_progressive_merge_from_on_merge_into_the_previous_mask(disk_model):
    """From ``progressive_merge_from`` clicks on, predict() returns the previous mask merged with the new one by
    progressive_merge at the newest click; before, the new mask itself; None never merges."""
    from napari_deepcrop.crops import PlacedMask, progressive_merge

    image, truth = disk_image(256, (128, 128), 40, seed=9)
    prev = truth.copy()
    prev[60:80, 150:200] = True  # an error away from the newest click, which the network will drop
    prev[150:170, 110:150] = False  # the error the newest (positive) click is on
    points = np.array([[128.0, 128.0], [140.0, 100.0], [160.0, 130.0]])
    labels = np.array([1, 1, 1])
    p = DeepCropPredictor(disk_model, device="cpu", snap_edges=False)
    p.set_image(image)
    p.progressive_merge_from = None
    plain, plain_score = p.predict(points, labels, prev_mask=prev)
    assert not plain[60:80, 150:200].all()  # the network changes the mask away from the newest click too
    p.progressive_merge_from = 3
    merged, score = p.predict(points, labels, prev_mask=prev)
    expected = progressive_merge(PlacedMask.from_full(plain), PlacedMask.from_full(prev), points[-1]).full()
    assert np.array_equal(merged, expected) and score == plain_score
    assert merged[160, 130] and merged[60:80, 150:200].all()  # the click's error fixed, the other one kept
    p.progressive_merge_from = 4
    assert np.array_equal(p.predict(points, labels, prev_mask=prev)[0], plain)


def test_edge_snapping_skips_masks_smaller_than_snap_min_side(disk_model):
    """A mask whose box is shorter than ``snap_min_side`` on its longer side is the network's own; a larger one is
    snapped as before. The disk is 81 pixels across."""
    image, _ = disk_image(256, (128, 128), 40, seed=9)
    click = (np.array([[128.0, 128.0]]), np.array([1]))
    masks = {}
    for name, snap, min_side in [("own", False, 0), ("snapped", True, 0), ("below", True, 82), ("above", True, 70)]:
        p = DeepCropPredictor(disk_model, device="cpu", snap_edges=snap)
        p.snap_min_side = min_side
        p.set_image(image)
        masks[name] = p.predict(*click)[0]
    rows, cols = np.nonzero(masks["own"])
    assert 70 < max(np.ptp(rows), np.ptp(cols)) + 1 < 82  # the network's mask is about the disk
    assert not np.array_equal(masks["own"], masks["snapped"])  # snapping moves the boundary here
    assert np.array_equal(masks["below"], masks["own"])
    assert np.array_equal(masks["above"], masks["snapped"])
