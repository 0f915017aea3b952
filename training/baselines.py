"""Classical click segmenters, the yardsticks for DeepCropV2: magic wand, GrabCut and random walker.

Each has the DeepCropPredictor's shape (``set_image``, then ``predict(points, labels, prev_mask)`` -> (mask,
score)), so ``evaluate.run_protocol`` gives them exactly the clicks it gives the model. They are fair in that
they see nothing else: no ground truth, no per-image tuning. Each rebuilds its mask from all clicks so far,
which is how these tools are used, so ``prev_mask`` is accepted and not used. They have no estimate of their
own quality: the score is NaN.

The two slow ones (GrabCut, random walker) work on a downscaled copy of the image and resize their result
back, as a tool would to stay interactive; the mask is upsampled smoothly and thresholded, not blown up in
blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.segmentation import flood, random_walker

NO_SCORE = float("nan")


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale, RGBA, multichannel and 16-bit/float images as 8-bit RGB, which all three methods expect.

    Non-8-bit images are stretched between their 0.5 and 99.5 percentiles so that a few hot pixels do not
    flatten the contrast.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    low, high = np.percentile(image, (0.5, 99.5))
    scaled = (image.astype(np.float64) - low) / max(high - low, np.finfo(float).eps)
    return np.clip(scaled * 255, 0, 255).astype(np.uint8)


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale == 1.0:
        return image, scale
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _upscale(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A low-resolution mask or probability back at full size: linear interpolation, then threshold at 0.5."""
    resized = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized > 0.5


def _scale_points(points: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """(row, col) pixel coordinates at another resolution, pixel centres aligned, clipped to the image."""
    scaled = np.rint((np.asarray(points, float) + 0.5) * scale - 0.5).astype(int)
    return np.clip(scaled, 0, np.array(shape[:2]) - 1)


def _check_clicks(points: np.ndarray, labels: np.ndarray) -> None:
    """The same contract as the predictor: one label per point and at least one positive click."""
    if len(points) != len(labels) or np.asarray(points).shape[1:] != (2,):
        raise ValueError(
            f"points must be (N, 2) with N labels, got {np.shape(points)} and {np.shape(labels)}"
        )
    if not np.any(np.asarray(labels) == 1):
        raise ValueError("at least one positive click is needed")


def _draw_clicks(
    seeds: np.ndarray, points: np.ndarray, labels: np.ndarray, radius: int, values: tuple[int, int]
) -> np.ndarray:
    """Disks of ``values[1]`` at positive, ``values[0]`` at negative clicks; later clicks over earlier."""
    for (row, col), label in zip(points, labels, strict=True):
        cv2.circle(seeds, (int(col), int(row)), radius, int(values[int(label)]), thickness=-1)
    return seeds


class MagicWand:
    """Photoshop's magic wand, with the tolerance chosen per click instead of by the user.

    A click selects the connected pixels whose Lab colour (lightly smoothed) is within a tolerance (Delta E)
    of the clicked pixel. Positive clicks add their region, negative clicks subtract theirs; holes in the
    added regions are filled, since objects are solid. Of the regions a ladder of tolerances gives, the wand
    takes the one whose outline runs along the strongest edges (the highest mean colour-gradient magnitude on
    its boundary: the average-contrast criterion of Hojjatoleslami and Kittler's region growing), among
    regions of at least ``min_area`` pixels (OpenCV's MSER default), at most ``max_area_fraction`` of the
    image and not containing a click of the other sign, so that a negative click where a region leaked
    makes the wand stop below that leak. (Tried first, and worse on GrabCut and on a noisy disk: MSER's most
    stable region, which prefers small blobs inside textured objects, and the region before the largest
    jump in area, which noise inside an object fools.)
    """

    def __init__(
        self,
        tolerances: Sequence[float] = tuple(np.geomspace(2.0, 64.0, 20)),
        smoothing_sigma: float = 1.0,
        min_area: int = 60,
        max_area_fraction: float = 0.8,
    ) -> None:
        self.tolerances = tuple(sorted(tolerances))
        self.smoothing_sigma = smoothing_sigma
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self._lab: np.ndarray | None = None
        self._gradient: np.ndarray | None = None
        self._levels: dict[tuple[int, int], np.ndarray] = {}

    def set_image(self, image: np.ndarray) -> None:
        lab = rgb2lab(to_rgb_uint8(image))
        sigma = (self.smoothing_sigma, self.smoothing_sigma, 0)
        self._lab = ndimage.gaussian_filter(lab, sigma)
        derivatives = [
            ndimage.sobel(self._lab[..., channel], axis) for channel in range(3) for axis in (0, 1)
        ]
        self._gradient = np.sqrt(sum(d * d for d in derivatives))
        self._levels = {}

    def predict(
        self, points: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        if self._lab is None:
            raise RuntimeError("call set_image before predict")
        _check_clicks(points, labels)
        clicks = [tuple(p) for p in _scale_points(points, 1.0, self._lab.shape)]
        labels = np.asarray(labels).astype(bool)
        positives = [c for c, positive in zip(clicks, labels, strict=True) if positive]
        negatives = [c for c, positive in zip(clicks, labels, strict=True) if not positive]
        added = np.zeros(self._lab.shape[:2], bool)
        for click in positives:
            added |= self._region(click, negatives)
        removed = np.zeros_like(added)
        for click in negatives:
            removed |= self._region(click, positives)
        return ndimage.binary_fill_holes(added) & ~removed, NO_SCORE

    def _level_map(self, click: tuple[int, int]) -> np.ndarray:
        """For each pixel, the index of the smallest tolerance whose flood from ``click`` reaches it.

        Floods from one seed are nested in the tolerance, so one map holds them all: region i is
        ``level <= i``.
        """
        if click not in self._levels:
            distance = np.linalg.norm(self._lab - self._lab[click], axis=-1)
            level = np.full(distance.shape, len(self.tolerances), np.uint8)
            for index in reversed(range(len(self.tolerances))):
                level[flood(distance, click, tolerance=self.tolerances[index])] = index
            self._levels[click] = level
        return self._levels[click]

    def _region(self, click: tuple[int, int], forbidden: Sequence[tuple[int, int]]) -> np.ndarray:
        level = self._level_map(click)
        count = len(self.tolerances)
        areas = np.cumsum(np.bincount(level.ravel(), minlength=count + 1))[:count]
        allowed = (areas >= self.min_area) & (areas <= self.max_area_fraction * level.size)
        for other in forbidden:
            allowed[level[other] :] = False
        contrast = self._boundary_contrast(level, count)
        if not (allowed & (contrast >= 0)).any():
            return level < 0
        return level <= np.argmax(np.where(allowed, contrast, -1.0))

    def _boundary_contrast(self, level: np.ndarray, count: int) -> np.ndarray:
        """Mean gradient magnitude on the boundary of each ladder region (-1 where a region has none).

        A pixel lies on the boundary of region i for level[p] <= i < (highest level of its 4-neighbours), so
        one pass over the pixels, with sums accumulated by level and differenced, serves all regions.
        """
        cross = ndimage.generate_binary_structure(2, 1)
        outside = ndimage.maximum_filter(level, footprint=cross, mode="nearest")
        edge = outside > level
        inner, outer, gradient = level[edge], np.minimum(outside[edge], count), self._gradient[edge]
        sums = np.cumsum(np.bincount(inner, gradient, count + 1) - np.bincount(outer, gradient, count + 1))
        counts = np.cumsum(np.bincount(inner, None, count + 1) - np.bincount(outer, None, count + 1))
        return np.where(counts[:count] > 0, sums[:count] / np.maximum(counts[:count], 1), -1.0)


class GrabCutClicks:
    """OpenCV GrabCut seeded by clicks, on the image downscaled to ``max_side``.

    Initial mask (GC_INIT_WITH_MASK): disks of ``radius`` at positive clicks are sure object (GC_FGD), at
    negative clicks sure background (GC_BGD); a square around the first positive click, of side
    ``box_fraction`` of the image's shorter side, and the bounding box of all positive clicks are probable
    object (GC_PR_FGD); the rest, and always the image border, is probable background (GC_PR_BGD). The first
    click says "the object is here" but not how big it is, so a generous probable-object square lets the
    colour models find the extent; later positive clicks are corrections near the boundary, so they only
    stretch the box (a square around each of them made the IoU fall with more clicks on GrabCut). Everything
    stays revisable except the clicked disks.
    """

    def __init__(
        self, max_side: int = 320, radius: int = 3, box_fraction: float = 0.5, iterations: int = 5
    ) -> None:
        self.max_side = max_side
        self.radius = radius
        self.box_fraction = box_fraction
        self.iterations = iterations
        self._small: np.ndarray | None = None
        self._scale = 1.0
        self._shape: tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        self._shape = image.shape[:2]
        self._small, self._scale = _downscale(to_rgb_uint8(image), self.max_side)

    def predict(
        self, points: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        if self._small is None:
            raise RuntimeError("call set_image before predict")
        _check_clicks(points, labels)
        points = _scale_points(points, self._scale, self._small.shape)
        labels = np.asarray(labels).astype(int)
        seeds = self._initial_mask(points, labels)
        models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
        cv2.setRNGSeed(0)  # GrabCut's k-means starts from OpenCV's RNG: the same clicks, the same mask
        cv2.grabCut(self._small, seeds, None, *models, self.iterations, cv2.GC_INIT_WITH_MASK)
        return _upscale((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD), self._shape), NO_SCORE

    def _initial_mask(self, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        seeds = np.full(self._small.shape[:2], cv2.GC_PR_BGD, np.uint8)
        positives = points[labels == 1]
        half = round(self.box_fraction * min(seeds.shape) / 2)
        (row, col), low, high = positives[0], positives.min(axis=0), positives.max(axis=0) + 1
        seeds[max(row - half, 0) : row + half + 1, max(col - half, 0) : col + half + 1] = cv2.GC_PR_FGD
        seeds[low[0] : high[0], low[1] : high[1]] = cv2.GC_PR_FGD
        seeds[[0, -1], :] = seeds[:, [0, -1]] = cv2.GC_PR_BGD  # GrabCut needs some background to model
        return _draw_clicks(seeds, points, labels, self.radius, (cv2.GC_BGD, cv2.GC_FGD))


class RandomWalkerClicks:
    """scikit-image's random walker (Grady 2006) seeded by clicks, on the image downscaled to ``max_side``.

    Disks of ``radius`` at clicks are object or background seeds; the image border is a background seed too,
    as the method needs a background label before the first negative click (positive disks override it). The
    object is where a walker is more likely to reach an object seed first. The walker sees RGB scaled to
    [0, 1], the range scikit-image's edge weights assume (they are not invariant to the data's units: Lab in
    [0, 100] made every edge a wall). ``beta`` was chosen on a 16-image subset of GrabCut (130, 500, 1000,
    3000): with the default 130 one click's seed loses to the long border seed and the first mask is tiny.
    """

    def __init__(self, max_side: int = 200, radius: int = 3, beta: float = 3000.0) -> None:
        self.max_side = max_side
        self.radius = radius
        self.beta = beta
        self._rgb: np.ndarray | None = None
        self._scale = 1.0
        self._shape: tuple[int, int] = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        self._shape = image.shape[:2]
        small, self._scale = _downscale(to_rgb_uint8(image), self.max_side)
        self._rgb = small / 255.0

    def predict(
        self, points: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        if self._rgb is None:
            raise RuntimeError("call set_image before predict")
        _check_clicks(points, labels)
        points = _scale_points(points, self._scale, self._rgb.shape)
        seeds = np.zeros(self._rgb.shape[:2], np.int32)
        seeds[[0, -1], :] = seeds[:, [0, -1]] = 2
        _draw_clicks(seeds, points, np.asarray(labels).astype(int), self.radius, (2, 1))
        probability = random_walker(
            self._rgb, seeds, beta=self.beta, mode="bf", return_full_prob=True, channel_axis=-1
        )[0]
        return _upscale(probability, self._shape), NO_SCORE
