"""One object through a whole stack (a volume's z, a time-lapse's t) from a few clicks; no Qt, no napari.

Design. A stack is any array (numpy, dask, zarr) of shape (*leading, H, W[, C]), or a list of such arrays (the
channels of one image, as napari's ``channel_axis`` gives them). A slice is addressed by its leading indices, its
``plane``; propagation runs along one leading axis (z of a volume, t of a time series: tracking is the same
walk), from the mask of a seed slice outwards, one slice at a time:

- the previous slice's mask is first moved to where the object went (:func:`track`: a masked template match of
  its pixels in the next slice, near where it was): objects move between slices, cells in a time-lapse and
  structures through z, and a mask left where it was drifts off them within a few slices;
- the next slice is segmented by :meth:`DeepCropPredictor.predict` with that moved mask as ``prev_mask`` and one
  positive click at its deepest interior point (farthest from its boundary), so the network sees exactly what
  a refinement click gives it;
- the walk stops where the object ends: the mask vanishes (fewer than ``min_pixels``), its predicted IoU falls
  below ``min_score``, or it overlaps the moved mask of the slice before by less than ``min_iou`` (objects do
  not change shape abruptly between neighbouring slices; a jump means the network lost this object or found
  another). The slice that stopped it is left empty.

A :class:`VolumeObject` holds one mask per index along the axis, each the crop of its bounding box (memory is
bounded by the object, not the stack), and the *source* of each: the fixed slice (the seed or a user's
correction) its chain of propagation started from. Correcting slice k (:func:`correct_slice`) fixes it and
re-propagates outwards, away from its source: the masks of k's chain beyond k are predicted again (those the new
walk does not reach are kept), and a walk never enters a slice that holds a mask of another chain, so slices
the user corrected stay as they are. The contrast limits are fixed once for the whole walk (by default from the
seed's neighbourhood), so that no slice is read whole: a lazy stack loads only the slices visited and, in them,
the crops the predictor reads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from .crops import PlacedMask, enclosing_window
from .predictor import ChannelStack, ImageSource
from .session import ObjectMask

# why a walk ended, per direction
STOP_EMPTY = "the mask vanished"
STOP_SCORE = "the predicted IoU fell below the threshold"
STOP_CHANGE = "the mask changed too much from the slice before"
STOP_END = "the end of the stack"
STOP_MASK = "a slice that already holds a mask"
STOP_LIMIT = "the slice limit"

# seed contrast limits come from the seed's bounding box grown by this many times its side on each side
CONTRAST_MARGIN = 1.0
# track() looks for the object within its box grown by this share of its longer side on each side (within the
# crops the predictor reads next), matching a template of at most TRACK_SIDE pixels a side
TRACK_MARGIN = 0.5
TRACK_SIDE = 64
# the refinement crop of each slice: the moved mask's box filling REFINE_RATIO of it (the predictor's first
# refinement crop alone, not also its 1.5x one, nor a focus crop: a slice's object changes little from the last)
PROPAGATION_FACTORS = (1.0,)

OnSlice = Callable[[int, ObjectMask | None], None]  # (index along the axis, its mask or None); may raise to stop


@dataclass(frozen=True)
class StopRules:
    """When a walk through the stack ends (see the module docstring)."""

    min_score: float = 0.5
    min_iou: float = 0.5
    min_pixels: int = 4
    max_slices: int | None = None  # per direction; None: up to the end of the stack

    def why_stop(self, mask: ObjectMask, prev: PlacedMask) -> str | None:
        area = int(mask.crop.sum())
        if area < self.min_pixels:
            return STOP_EMPTY
        if mask.score < self.min_score:
            return STOP_SCORE
        if mask_iou(mask, prev) < self.min_iou:
            return STOP_CHANGE
        return None


@dataclass
class VolumeObject:
    """One object along ``axis`` (an index among the leading axes) of a stack of ``length`` slices there.

    ``plane`` gives the other leading indices (a 4D (t, z, y, x) stack propagated along z keeps its t);
    ``masks[k]`` is the mask of slice k, ``sources[k]`` the fixed slice whose chain gave it (k itself: fixed).
    """

    plane: tuple[int, ...]
    axis: int
    length: int
    masks: dict[int, ObjectMask] = field(default_factory=dict)
    sources: dict[int, int] = field(default_factory=dict)
    stops: dict[int, str] = field(default_factory=dict)  # direction (+1, -1) -> why its last walk ended

    def __post_init__(self) -> None:
        if not 0 <= self.axis < len(self.plane):
            raise ValueError(
                f"the propagation axis must be one of the {len(self.plane)} leading (non-image) axes, got {self.axis}"
            )

    def plane_at(self, k: int) -> tuple[int, ...]:
        """The leading indices of slice ``k`` along the axis."""
        return (*self.plane[: self.axis], k, *self.plane[self.axis + 1 :])

    def index_of(self, plane: tuple[int, ...]) -> int | None:
        """The index along the axis of ``plane``, None when it is not on this object's line of slices."""
        plane = tuple(plane)
        if len(plane) != len(self.plane) or any(
            a != b for i, (a, b) in enumerate(zip(plane, self.plane, strict=True)) if i != self.axis
        ):
            return None
        return plane[self.axis]

    @property
    def fixed(self) -> set[int]:
        return {k for k, s in self.sources.items() if s == k}

    @property
    def slices(self) -> list[int]:
        return sorted(self.masks)

    def copy(self) -> VolumeObject:
        return replace(self, masks=dict(self.masks), sources=dict(self.sources), stops=dict(self.stops))

    def fix(self, k: int, mask: ObjectMask, outward: bool = True) -> tuple[int, ...]:
        """Make ``mask`` slice k's, fixed; the directions to walk from k, whose masks (of k's chain) are dropped
        when ``outward``.

        The seed (a slice without a source) walks both ways; a correction only away from its source, so the
        slices between it and its source stay as they are. Only the masks up to the next fixed slice are dropped:
        the walk stops there, so masks beyond it (of k's chain, when it was fixed without propagating) would be
        lost rather than predicted again.
        """
        if not 0 <= k < self.length:
            raise ValueError(f"slice {k} is outside the stack's {self.length} slices")
        source = self.sources.get(k)
        directions = (1, -1) if source is None or source == k else ((1,) if k > source else (-1,))
        if source is not None and outward:
            fixed = self.fixed
            for d in directions:
                barrier = min(((j - k) * d for j in fixed if (j - k) * d > 0), default=self.length)
                for j in [j for j, s in self.sources.items() if s == source and 0 < (j - k) * d < barrier]:
                    del self.masks[j], self.sources[j]
        self.masks[k], self.sources[k] = mask, k
        return directions

    def voxels(self) -> int:
        return sum(int(m.crop.sum()) for m in self.masks.values())


def mask_iou(a: PlacedMask, b: PlacedMask) -> float:
    """IoU of two placed masks of one image, from their crops alone."""
    window = enclosing_window(a.bbox, b.bbox)
    ma, mb = a[window], b[window]
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 0.0


def deepest_point(mask: PlacedMask) -> tuple[int, int]:
    """(row, col) in image pixels of the mask's pixel farthest from its boundary (the protocol's first click)."""
    padded = np.pad(mask.crop.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row) - 1 + mask.origin[0], int(col) - 1 + mask.origin[1]


def read_slice(stack: Any, plane: tuple[int, ...]) -> Any:
    """Slice ``plane`` of the stack, still lazy for a lazy stack; a ChannelStack for a list of channel stacks."""
    if isinstance(stack, (list, tuple)):
        return ChannelStack([channel[plane] for channel in stack])
    return stack[plane]


def stack_shape(stack: Any) -> tuple[int, ...]:
    return tuple((stack[0] if isinstance(stack, (list, tuple)) else stack).shape)


def contrast_around(image: Any, mask: PlacedMask | None = None, margin: float = CONTRAST_MARGIN):
    """Contrast limits (what ``set_image`` takes) of a 2D ``image``, from the neighbourhood of ``mask`` only.

    The predictor's own limits come from a sample of the whole slice, which would read every chunk of a lazy
    stack; the seed's neighbourhood is what the walk sees anyway. ``mask`` None: the whole image (as
    ``set_image`` would).
    """
    region = image
    if mask is not None:
        (rows, cols), (h, w) = mask.bbox, mask.crop.shape
        grow = int(math.ceil(margin * max(h, w, 1)))
        region = np.asarray(
            image[max(0, rows.start - grow) : rows.stop + grow, max(0, cols.start - grow) : cols.stop + grow]
        )
    source = ImageSource.from_array(region)
    pairs = [
        (float(lo), float(hi) if math.isfinite(hi) else float(lo) + 1)
        for lo, hi in zip(source.low, source.high, strict=True)
    ]
    return pairs[0] if len(pairs) == 1 else pairs


def _intensity(region: np.ndarray, contrast_limits) -> np.ndarray:
    """A 2D float32 image of ``region`` ((h, w) or (h, w, C)), each channel scaled by its contrast limits."""
    region = np.asarray(region, np.float32)
    channels = region[..., None] if region.ndim == 2 else region
    limits = np.asarray(contrast_limits, np.float32).reshape(-1, 2)
    low, high = limits[:, 0], limits[:, 1]
    return ((channels - low) / np.maximum(high - low, 1e-6)).mean(axis=-1)


def track(prev_image: Any, image: Any, mask: ObjectMask, contrast_limits, margin: float = TRACK_MARGIN,
          side: int = TRACK_SIDE) -> ObjectMask:  # fmt: skip
    """``mask`` of ``prev_image`` moved to where its pixels are in ``image`` (two 2D slices of one stack).

    A masked template match (``cv2.matchTemplate``, squared differences under the mask) of the mask's pixels
    within its box grown by ``margin`` times its longer side, both scaled so that the template is at most
    ``side`` pixels a side: a translation, to a few pixels, that keeps the mask where the object went. The mask
    stays where it was when that fits as well (a textureless object), or when there is nothing to match. Reads
    only the mask's box of ``prev_image`` and the grown box of ``image``.
    """
    (rows, cols), (h, w), (height, width) = mask.bbox, mask.crop.shape, mask.shape
    if h == 0 or w == 0:
        return mask
    grow = int(math.ceil(margin * max(h, w)))
    r0, c0 = max(0, rows.start - grow), max(0, cols.start - grow)
    r1, c1 = min(height, rows.stop + grow), min(width, cols.stop + grow)
    scale = min(1.0, side / max(h, w))

    def resized(a: np.ndarray) -> np.ndarray:
        size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
        return cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    template = resized(_intensity(prev_image[rows, cols], contrast_limits))
    weight = resized(mask.crop.astype(np.float32))
    search = resized(_intensity(image[r0:r1, c0:c1], contrast_limits))
    if weight.sum() < 4 or template.shape[0] > search.shape[0] or template.shape[1] > search.shape[1]:
        return mask
    cost = cv2.matchTemplate(search, template, cv2.TM_SQDIFF, mask=weight)
    stay = (
        min(cost.shape[0] - 1, round((rows.start - r0) * scale)),
        min(cost.shape[1] - 1, round((cols.start - c0) * scale)),
    )
    row, col = np.unravel_index(int(np.argmin(cost)), cost.shape)
    if cost[stay] <= cost[row, col] * 1.05 + 1e-6:  # no better fit elsewhere: the mask stays
        return mask
    origin = (
        int(np.clip(r0 + round(row / scale), 0, height - h)),
        int(np.clip(c0 + round(col / scale), 0, width - w)),
    )
    return replace(mask, origin=origin)


def _predict_next(predictor, image, prev: ObjectMask, contrast_limits) -> ObjectMask:
    predictor.set_image(image, contrast_limits=contrast_limits)
    point = np.array([deepest_point(prev)], np.float64)
    crop, origin, score = predictor.predict(point, np.array([1]), prev_mask=prev, return_crop=True)
    return ObjectMask(np.asarray(crop, bool), (int(origin[0]), int(origin[1])), prev.shape, float(score))


def walk(
    predictor,
    stack: Any,
    volume: VolumeObject,
    start: int,
    directions: Sequence[int] = (1, -1),
    contrast_limits=None,
    rules: StopRules | None = None,
    on_slice: OnSlice | None = None,
) -> set[int]:
    """Propagate from slice ``start``'s mask in ``directions`` (+1, -1), adding masks to ``volume``.

    Returns the indices whose masks were added. ``on_slice`` hears of each slice segmented (for progress; it
    may raise to stop the walk, from either direction's thread). ``contrast_limits`` None: from the start
    mask's neighbourhood. Two directions walk at once, each on a shallow copy of the predictor (its image is
    per copy, the network shared): on 2 CPU cores two small batches at a time keep the cores busier than one.
    """
    rules = rules or StopRules()
    # the caller's predictor stays as it is: a copy, with one refinement crop per slice
    predictor = copy.copy(predictor)
    predictor.refine_factors = PROPAGATION_FACTORS
    predictor.focus_ratio = None  # a slice's click is its mask's deepest point, not a correction to focus on
    if contrast_limits is None:
        contrast_limits = contrast_around(read_slice(stack, volume.plane_at(start)), volume.masks[start])
    if len(directions) == 1:
        return _walk_one(predictor, stack, volume, start, directions[0], contrast_limits, rules, on_slice)
    with ThreadPoolExecutor(len(directions)) as pool:
        futures = [
            pool.submit(_walk_one, copy.copy(predictor), stack, volume, start, d, contrast_limits, rules, on_slice)
            for d in directions
        ]
        return set().union(*(f.result() for f in futures))


def _walk_one(predictor, stack, volume: VolumeObject, start: int, direction: int, contrast_limits, rules, on_slice):
    """One direction of :func:`walk`; the other direction's thread writes other keys of ``volume``."""
    added: set[int] = set()
    prev, k, prev_image = volume.masks[start], start + direction, read_slice(stack, volume.plane_at(start))
    while True:
        if not 0 <= k < volume.length:
            volume.stops[direction] = STOP_END
            return added
        if k in volume.masks:
            volume.stops[direction] = STOP_MASK
            return added
        if rules.max_slices is not None and len(added) >= rules.max_slices:
            volume.stops[direction] = STOP_LIMIT
            return added
        image = read_slice(stack, volume.plane_at(k))
        prev = track(prev_image, image, prev, contrast_limits)
        mask = _predict_next(predictor, image, prev, contrast_limits)
        why = rules.why_stop(mask, prev)
        if on_slice is not None:
            on_slice(k, None if why else mask)
        if why:
            volume.stops[direction] = why
            return added
        volume.masks[k], volume.sources[k] = mask, start
        added.add(k)
        prev, k, prev_image = mask, k + direction, image


def segment_volume(
    predictor,
    stack: Any,
    plane: tuple[int, ...],
    seed: ObjectMask,
    axis: int = 0,
    contrast_limits=None,
    rules: StopRules | None = None,
    on_slice: OnSlice | None = None,
) -> VolumeObject:
    """The object whose mask on slice ``plane`` is ``seed``, through the stack along leading axis ``axis``.

    ``stack``: (*leading, H, W[, C]), or a list of such stacks (channels); ``plane``: the seed slice's leading
    indices. ``predictor``: a :class:`~napari_deepcrop.predictor.DeepCropPredictor` (or anything of its
    ``set_image``/``predict`` API).
    """
    shape = stack_shape(stack)
    plane = tuple(int(p) for p in plane)
    if not plane:
        raise ValueError(f"propagation needs a stack (a 3D volume or a time series), got a 2D image of shape {shape}")
    if len(plane) > len(shape) - 2 or any(not 0 <= p < n for p, n in zip(plane, shape, strict=False)):
        raise ValueError(f"slice {plane} is not in the stack of shape {shape}")
    if not seed.any():
        raise ValueError("the seed mask is empty: segment the object on one slice first")
    volume = VolumeObject(plane, axis, shape[axis])
    volume.fix(plane[axis], seed)
    walk(predictor, stack, volume, plane[axis], (1, -1), contrast_limits, rules, on_slice)
    return volume


def correct_slice(
    predictor,
    stack: Any,
    volume: VolumeObject,
    k: int,
    mask: ObjectMask,
    contrast_limits=None,
    rules: StopRules | None = None,
    on_slice: OnSlice | None = None,
    propagate: bool = True,
) -> set[int]:
    """Replace slice ``k``'s mask by the user's ``mask`` and (``propagate``) re-propagate outwards from it.

    The re-propagation replaces the masks beyond k as far as it gets; where it stops sooner than the masks it
    replaces went (the network lost the object from the corrected mask), those masks are kept, now of k's chain:
    a correction never loses slices of the object. Returns the indices whose masks changed (added, replaced or
    dropped): the slices to write again.
    """
    before = dict(volume.masks)
    directions = volume.fix(k, mask, outward=propagate)
    if propagate:
        walk(predictor, stack, volume, k, directions, contrast_limits, rules, on_slice)
        for j, kept in before.items():
            if j not in volume.masks:
                volume.masks[j], volume.sources[j] = kept, k
    return {j for j in set(before) | set(volume.masks) if before.get(j) is not volume.masks.get(j)}
