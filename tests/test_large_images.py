"""Large, lazy and unusual images (issue 6): the predictor reads crops, never the whole image.

An untrained model is enough: which pixels are read, and what is allocated, depends on the crop logic only.
"""

from __future__ import annotations

import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
import torch

from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor

CHUNK = 1000


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return DeepCropPredictor(DeepCropV2(DeepCropConfig(input_size=64)), device="cpu")


@pytest.fixture(scope="module")
def constant_predictor():
    """Every crop gets the same score (so the smallest wins) and an all-foreground mask.

    Memory then measures reading the candidate crops, not the size of whatever mask an untrained network
    happens to draw (a returned mask is as large as its object, by design).
    """
    model = DeepCropV2(DeepCropConfig(input_size=64))
    with torch.no_grad():
        model.mask_head.out.weight.zero_()
        model.mask_head.out.bias.fill_(4.0)
        model.score_head.fc[-1].weight.zero_()
        model.score_head.fc[-1].bias.zero_()
    # the crops as the network gave them: no snapping, and the chosen scale's crop itself (no zoom-in pass, whose
    # crop an all-foreground mask would grow)
    return DeepCropPredictor(model, device="cpu", snap_edges=False, zoom_in=False)


def lazy_image(size: int = 10_000) -> tuple[da.Array, list[tuple[int, int]]]:
    """A (size, size, 3) uint8 dask array built chunk by chunk, and the (row, col) of each chunk loaded."""
    loaded: list[tuple[int, int]] = []

    def load_chunk(block_id=None):
        loaded.append(block_id[:2])
        value = 40 + 20 * ((block_id[0] + block_id[1]) % 2)
        return np.full((CHUNK, CHUNK, 3), value, np.uint8)

    chunks = ((CHUNK,) * (size // CHUNK), (CHUNK,) * (size // CHUNK), (3,))
    image = da.map_blocks(load_chunk, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))
    return image, loaded


def chunks_within(center: tuple[int, int], radius: float) -> set[tuple[int, int]]:
    (r0, c0), (r1, c1) = (np.floor((np.array(center) + d) / CHUNK).astype(int) for d in (-radius, radius))
    return {(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)}


def test_a_refinement_click_reads_only_chunks_around_the_mask(predictor):
    """Refinement crops (2.5x the extent of mask and clicks) in the middle of chunk (5, 5) stay inside it."""
    image, loaded = lazy_image()
    prev = np.zeros(image.shape[:2], bool)
    rr, cc = np.ogrid[-80:80, -80:80]
    prev[5420:5580, 5420:5580] = rr**2 + cc**2 < 80**2
    with dask.config.set(scheduler="synchronous"):
        predictor.set_image(image, contrast_limits=(0, 255))
        assert loaded == []
        crop, (row0, col0), _ = predictor.predict(
            np.array([[5500, 5500], [5560, 5440]]), np.array([1, 0]), prev_mask=prev, return_crop=True
        )
    assert set(loaded) == {(5, 5)}
    assert crop.size == 0 or (5000 <= row0 and row0 + crop.shape[0] <= 6000)


def test_a_first_click_reads_only_chunks_near_it(predictor):
    image, loaded = lazy_image()
    with dask.config.set(scheduler="synchronous"):
        predictor.set_image(image, contrast_limits=(0, 255))
        predictor.predict(np.array([[5500, 5500]]), np.array([1]), return_crop=True)
    assert set(loaded) <= chunks_within((5500, 5500), 2048)  # 25 of the 100 chunks


def test_separate_lazy_channels_are_read_only_near_the_click(predictor):
    """A ChannelStack of dask channels (napari's channel_axis on a lazy image) reads each one only near the click."""
    from napari_deepcrop.predictor import ChannelStack

    first, loaded_first = lazy_image()
    second, loaded_second = lazy_image()
    channels = ChannelStack([first[..., 0], second[..., 1]])
    with dask.config.set(scheduler="synchronous"):
        predictor.set_image(channels, contrast_limits=[(0, 255), (0, 100)])
        predictor.predict(np.array([[5500, 5500]]), np.array([1]), return_crop=True)
    near = chunks_within((5500, 5500), 2048)
    assert loaded_first and set(loaded_first) <= near and loaded_second and set(loaded_second) <= near


def peak_numpy_bytes(predictor: DeepCropPredictor, image: np.ndarray, click) -> int:
    """Peak of numpy (tracemalloc-traced) allocations in set_image + predict(return_crop=True).

    torch's CPU tensors are not traced; numpy's are, and every image-sized buffer would be numpy.
    """
    tracemalloc.start()
    try:
        predictor.set_image(image)
        predictor.predict(np.array([click]), np.array([1]), return_crop=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_image(constant_predictor):
    small = np.zeros((1024, 1024, 3), np.uint8)  # pages never written: np.zeros costs no real memory here
    large = np.zeros((8000, 8000, 3), np.uint8)
    small_peak = peak_numpy_bytes(constant_predictor, small, (500, 600))
    large_peak = peak_numpy_bytes(constant_predictor, large, (4000, 5000))
    # 8000^2 has three more (strided, equally small) candidate crops than 1024^2; the image is 192 MB
    assert large_peak < 50e6
    assert large_peak < 2 * small_peak + 1e6, (small_peak, large_peak)


def test_the_chosen_crop_is_pasted_where_it_was_cut(constant_predictor):
    """With the smallest crop (64 px) all foreground, the mask is that square around the click, far from 0."""
    constant_predictor.set_image(np.zeros((8000, 8000, 3), np.uint8))
    click = np.array([[4000, 5000]])
    crop, (row0, col0), _ = constant_predictor.predict(click, np.array([1]), return_crop=True)
    assert 64 <= crop.shape[0] <= 67 and 64 <= crop.shape[1] <= 67 and crop.all()
    assert abs(row0 + crop.shape[0] / 2 - 4000) <= 2 and abs(col0 + crop.shape[1] / 2 - 5000) <= 2


def textured(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "make_view",
    [
        lambda a: a[::2, ::-1],  # strided and reversed
        lambda a: np.asfortranarray(a),
        lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0),  # channels-first storage
        lambda a: a[..., ::-1],  # BGR view: negative channel stride
    ],
    ids=["strided-reversed", "fortran", "channels-first", "bgr-view"],
)
def test_non_contiguous_images_give_the_same_mask_as_a_copy(predictor, make_view):
    view = make_view(textured((600, 500, 3)))
    assert not view.flags.c_contiguous
    click, clicks_labels = np.array([[150, 200]]), np.array([1])
    predictor.set_image(np.ascontiguousarray(view))
    expected, expected_score = predictor.predict(click, clicks_labels)
    predictor.set_image(view)
    mask, score = predictor.predict(click, clicks_labels)
    assert np.array_equal(mask, expected) and score == pytest.approx(expected_score, abs=1e-6)


def test_a_read_only_memmap_works(predictor, tmp_path):
    image = textured((2000, 1500, 3), seed=1)
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    predictor.set_image(image)
    expected, _ = predictor.predict(np.array([[1200, 300]]), np.array([1]))
    predictor.set_image(mapped)
    mask, _ = predictor.predict(np.array([[1200, 300]]), np.array([1]))
    assert np.array_equal(mask, expected)
    crop, (row0, col0), _ = predictor.predict(np.array([[1200, 300]]), np.array([1]), return_crop=True)
    assert np.array_equal(mask[row0 : row0 + crop.shape[0], col0 : col0 + crop.shape[1]], crop)
    assert mask.sum() == crop.sum()


def uint16_gray():
    return textured((300, 420)).astype(np.uint16) * 200 + 1000


def rgba():
    image = textured((300, 420, 4))
    image[..., 3] = 255
    return image


def float_with_nans():
    image = textured((300, 420, 3)).astype(np.float32) / 7.0
    image[100:200, 150:250] = np.nan  # the click is inside the NaN block
    image[:, :5, 1] = np.nan
    return image


@pytest.mark.parametrize("make_image", [uint16_gray, rgba, float_with_nans], ids=lambda f: f.__name__)
def test_image_kinds_give_masks_of_the_right_shape(predictor, make_image):
    predictor.set_image(make_image())
    clicks, labels = np.array([[150, 200], [10, 410]]), np.array([1, 0])
    mask, score = predictor.predict(clicks, labels)
    assert mask.shape == (300, 420) and mask.dtype == bool and 0.0 <= score <= 1.0
    refined, _ = predictor.predict(clicks, labels, prev_mask=mask)
    assert refined.shape == (300, 420) and refined.dtype == bool
    crop, (row0, col0), _ = predictor.predict(clicks, labels, return_crop=True)
    assert crop.dtype == bool and row0 + crop.shape[0] <= 300 and col0 + crop.shape[1] <= 420
    assert np.array_equal(mask[row0 : row0 + crop.shape[0], col0 : col0 + crop.shape[1]], crop)


def test_the_first_click_zoom_in_reads_only_the_objects_neighbourhood(constant_predictor):
    """Each zoom-in pass cuts one more crop around the mask before it (this network fills every crop, so the first
    mask, 64-67 px, gives a crop of about 110 px, whose mask gives one of about 185) and passes that mask as a
    PlacedMask: nothing of image size, and the mask it returns is the last pass's."""
    zooming = DeepCropPredictor(constant_predictor.model, device="cpu", snap_edges=False)
    assert zooming.zoom_in and zooming.zoom_in_passes == 2
    large = np.zeros((8000, 8000, 3), np.uint8)
    assert peak_numpy_bytes(zooming, large, (4000, 5000)) < 50e6
    for passes, low, high in ((1, 100, 120), (2, 170, 200)):
        zooming.zoom_in_passes = passes
        crop, (row0, col0), _ = zooming.predict(np.array([[4000, 5000]]), np.array([1]), return_crop=True)
        assert low <= crop.shape[0] <= high and crop.all() and abs(row0 + crop.shape[0] / 2 - 4000) <= 3
