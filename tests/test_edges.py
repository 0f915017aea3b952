"""Edge snapping: GrabCut, seeded by the network's mask, moves a coarse boundary onto the object's edges."""

import numpy as np
from scipy import ndimage
from synthetic import blocks_image, disk_image

from napari_deepcrop.edges import SURE_LOGIT, snap_to_edges
from napari_deepcrop.predictor import DeepCropPredictor, ImageSource


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def coarse(mask: np.ndarray, shift: int) -> np.ndarray:
    """What a low-resolution network gives: the object shifted by a few pixels, as logits."""
    return np.where(np.roll(mask, shift, axis=(0, 1)), 2.0, -2.0).astype(np.float32)


def ramp(mask: np.ndarray, per_pixel: float, limit: float = 8.0) -> np.ndarray:
    """A network's logits: ``per_pixel`` times the signed distance to the mask's boundary (> 0 inside), clipped
    at +-``limit``: unsure near the boundary, sure away from it."""
    inside, outside = ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
    return np.clip(per_pixel * np.where(mask, inside, 1 - outside), -limit, limit).astype(np.float32)


def test_a_shifted_mask_snaps_onto_the_object():
    image, mask = disk_image(160, (80, 80), 45, seed=1)
    prior = coarse(mask, 6)
    snapped = snap_to_edges(image / 255.0, prior, np.array([[80, 80]]), np.array([1]), sure_logit=None) > 0
    assert iou(prior > 0, mask) < 0.8 and iou(snapped, mask) > 0.93


def test_where_the_network_is_unsure_the_boundary_snaps_and_where_it_is_sure_it_stays():
    """Sure seeds (SURE_LOGIT): a boundary 4 px off, inside the network's unsure band, still snaps onto the
    object; a wedge of the object in the background's colours, which GrabCut alone cuts away, stays object where
    the network is sure of it."""
    image, mask = disk_image(160, (80, 80), 45, seed=1)
    prior = ramp(np.roll(mask, 4, axis=(0, 1)), 0.25)  # unsure (|logit| <= 2) within 8 px of its boundary
    snapped = snap_to_edges(image / 255.0, prior, np.array([[80, 80]]), np.array([1]), sure_logit=2.0) > 0
    assert iou(prior > 0, mask) < 0.87 and iou(snapped, mask) > 0.93

    rr, cc = np.mgrid[:160, :160]
    wedge = mask & (rr < 80) & (cc > 80)  # a quarter of the disk, the background's colours
    image = image.copy()
    image[wedge] = np.random.default_rng(7).normal(70, 25, (wedge.sum(), 3)).clip(0, 255)
    sure = ramp(mask, 0.5)
    clicks, labels = np.array([[100, 60]]), np.array([1])
    alone = snap_to_edges(image / 255.0, sure, clicks, labels, sure_logit=None) > 0
    seeded = snap_to_edges(image / 255.0, sure, clicks, labels, sure_logit=SURE_LOGIT) > 0
    deep = wedge & (sure > SURE_LOGIT)  # the wedge where the network is sure
    assert alone[deep].mean() < 0.5  # GrabCut alone cuts most of it away
    assert seeded[deep].all() and iou(seeded, mask) > 0.95


def test_clicks_are_sure_seeds():
    """A negative click inside the object stays background; a positive click stays object."""
    image, mask = disk_image(160, (80, 80), 45, seed=2)
    points, labels = np.array([[80, 80], [60, 80]]), np.array([1, 0])
    snapped = snap_to_edges(image / 255.0, coarse(mask, 0), points, labels, sure_logit=None) > 0
    assert snapped[80, 80] and not snapped[60, 80]


def test_wild_disagreement_keeps_the_network_mask():
    """On an image with no edges at all GrabCut may go anywhere: unless it agrees with the network, the network's
    mask is returned unchanged; an empty or full mask is returned as it came."""
    flat = np.full((96, 96, 3), 0.5, np.float32)
    prior = np.full((96, 96), -1.0, np.float32)
    prior[30:60, 30:60] = 1.0
    out = snap_to_edges(flat, prior, np.array([[45, 45]]), np.array([1]))
    assert iou(out > 0, prior > 0) >= 0.5
    empty = np.full((96, 96), -1.0, np.float32)
    assert snap_to_edges(flat, empty, np.array([[45, 45]]), np.array([1])) is empty


def test_the_predictor_snaps_a_coarse_crop_mask_in_image_pixels():
    """A 64-pixel crop's mask of a 140-pixel disk, off by 8 image pixels, snapped and pasted back: the
    neighbourhood, the warp of the logits and the paste all agree on where the disk is."""
    from napari_deepcrop.crops import Crop, PlacedMask, paste_logits, read_crop

    image, mask = disk_image(400, (220, 180), 70, seed=3)
    source = ImageSource.from_array(image)
    crop = Crop.centered((230, 190), 240)
    # unsure within 4 input px (15 image px) of its boundary, as a network is: the default sure seeds apply
    logits = ramp(read_crop(np.roll(mask, 8, axis=(0, 1)), crop, 64) > 0.5, SURE_LOGIT / 4)
    clicks, labels = np.array([[220, 180]]), np.array([1])
    region, snapped = DeepCropPredictor._snap(source, crop, logits, clicks, labels)

    def full(crop_logits, where):
        return PlacedMask(*paste_logits(crop_logits, where, mask.shape), mask.shape).full()

    assert iou(full(logits, crop), mask) < 0.85 and iou(full(snapped, region), mask) > 0.93


def test_snapping_is_deterministic():
    """GrabCut's colour models start from a random k-means: the same input must still give the same mask (on
    colour blocks, where an unseeded OpenCV RNG gives a different mask on each call)."""
    image = blocks_image(seed=0) / 255.0
    square = np.zeros(image.shape[:2], bool)
    square[30:90, 30:90] = True
    clicks, labels = np.array([[60, 60]]), np.array([1])
    runs = [snap_to_edges(image, coarse(square, 0), clicks, labels, sure_logit=None) for _ in range(3)]
    assert all(np.array_equal(runs[0], run) for run in runs[1:])
    assert not np.array_equal(runs[0] > 0, square)  # GrabCut's own mask, not the network's kept as it was
