"""DeepCropPredictor: numpy in, numpy out, whole images of any size.

The network only ever sees square crops around the clicks, resized to its input size, with the click planes of
:func:`napari_deepcrop.clicks.encode_clicks`, exactly as in training. A first click sends crops at several
scales through the network in one batch and keeps the one whose score (predicted IoU) is best (training cuts
some of its crops at these same scales, so that the score head learns to rank them), then zooms in on that mask
(RITM's zoom-in: the crop a refinement would get, twice); a refinement crops around the current mask and all
clicks, at the network's refinement size (``config.refinement_size``, FocalClick's focus crop at a finer
resolution: training cuts its corrective-click batches at that size too), the object's crop averaged with its
mirror image's. Last, the mask's boundary is snapped to the image's edges (:mod:`napari_deepcrop.edges`), and
from the object's PROGRESSIVE_MERGE_FROM-th click on, only the change connected to the newest click reaches the
previous mask (FocalClick's progressive merge). Time and memory depend on the crop, not on the image.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint, load_first_click_model
from .clicks import encode_clicks
from .crops import Crop, PlacedMask, logits_extent, paste_logits, progressive_merge, read_crop, warp_logits
from .edges import EDGE_SIDE, snap_to_edges
from .model import DeepCropV2

MIN_CROP_SIDE = 64
# training draws object extent / crop side in [0.3, 1.4]; a refinement crop puts the current object at this ratio
REFINE_RATIO = 0.6
# a further click's focus crop: the object's extent FOCUS_RATIO times its side, run only where its grid is at least
# FOCUS_MIN_GAIN times finer than the object crop's; its weight falls to 0 over FOCUS_FEATHER of its side at each
# border
FOCUS_RATIO = 2.0
FOCUS_MIN_GAIN = 1.3
FOCUS_FEATHER = 0.15
# the first click's zoom-in passes: the first by the first-click network, each further one by the refining network
# (mirrored too, flip_average), each on a crop around the mask before it. tiny_coco val2017, 192 objects, the bundled
# networks, mIoU@1 snapped / own mask: 1 pass 0.634 / 0.648; 2 passes 0.651 / 0.663 (paired +0.017 +- 0.005 /
# +0.014 +- 0.003). Unmirrored, a second pass by the first-click network gained +0.012 / +0.011, by the refining one
# +0.016 / +0.014, and a third pass 0.001 more
ZOOM_IN_PASSES = 2
# from this click on (counting all of an object's clicks), a further click changes the previous mask only where the
# new mask differs from it in the part connected to that click (FocalClick's progressive merge, which starts at the
# 10th): late clicks fix their own error and leave the rest of the mask as it was. tiny_coco val2017, 192 objects,
# NoC@90 paired against never: from the 3rd click +0.07 +- 0.14 snapped; 6th -0.17 +- 0.12 snapped, -0.33 +- 0.13
# own mask; 8th -0.10 +- 0.09 snapped; 10th -0.07 +- 0.09 snapped, -0.25 +- 0.09 own mask
PROGRESSIVE_MERGE_FROM = 6
# edge snapping (GrabCut) only for a mask whose box is at least this many image pixels on its longer side; 0: every
# mask. On tiny_coco val2017's 185 objects under 32² px snapping costs clicks (NoC@90 19.22 snapped, 17.62 not);
# 64 is measured there (all 377 objects, NoC@90 paired -0.94 +- 0.20) but not yet on GrabCut or nuclei: still 0
SNAP_MIN_SIDE = 0
STATS_PIXELS = 1_000_000
# a lazy (dask, zarr) image loads every chunk a crop touches, strided or not: a first click reads at most this
# square of it (objects up to about this size), not up to the whole image
LAZY_MAX_CROP_SIDE = 4096


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU (use 'cpu' or 'auto')")
    return device


class ChannelStack:
    """Separate 2D channels of one image, e.g. napari layers opened with ``channel_axis``, as one (H, W, C) array.

    Nothing is copied or stacked up front: slicing reads the same region of each channel and stacks only that,
    so lazy (dask, zarr) channels stay lazy.
    """

    def __init__(self, channels) -> None:
        channels = list(channels)
        if not channels:
            raise ValueError("a ChannelStack needs at least one channel")
        shapes = {tuple(c.shape) for c in channels}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            shapes = [tuple(c.shape) for c in channels]
            raise ValueError(f"channels must be 2D arrays of one shape, got shapes {shapes}")
        self.channels = channels
        self.shape = (*channels[0].shape, len(channels))
        self.dtype = np.result_type(*(c.dtype for c in channels))
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.stack([np.asarray(c[key]) for c in self.channels], axis=-1).astype(self.dtype, copy=False)


@dataclass
class ImageSource:
    """A 2D image as the network sees it: 3 channels, float32 in [0, 1], read region by region.

    Holds a reference to the array, never a converted copy, so a 10,000 x 10,000 (or dask/zarr-backed) image
    costs no memory beyond the crops read from it. Contrast limits come from the caller (napari's layer: one
    (low, high) pair for all channels, or one pair per channel in ``channels``) or from percentiles of a strided
    subsample.
    """

    array: np.ndarray
    channels: tuple[int, ...]
    low: np.ndarray  # (1,) or one per channel in ``channels``
    high: np.ndarray

    @classmethod
    def from_array(
        cls,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channels: tuple[int, ...] | None = None,
    ) -> ImageSource:
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(
                f"image must be 2D (H, W) or (H, W, C), got shape {tuple(image.shape)}; for stacks pass one slice"
            )
        if image.shape[0] < 2 or image.shape[1] < 2:
            raise ValueError(f"image is too small to segment: shape {tuple(image.shape)}")
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            raise ValueError(f"image must be numeric, got dtype {image.dtype}")
        n_channels = 1 if image.ndim == 2 else image.shape[2]
        if channels is None:
            channels = (0, 1, 2) if n_channels in (3, 4) else tuple(range(min(n_channels, 3)))
        if not channels or len(channels) > 3 or any(not 0 <= c < n_channels for c in channels):
            raise ValueError(f"channels must be 1 to 3 indices below {n_channels}, got {channels}")
        if contrast_limits is None:
            contrast_limits = _auto_contrast(image, channels)
        limits = np.asarray(contrast_limits, np.float64).reshape(-1, 2) if np.size(contrast_limits) else None
        if limits is None or (np.shape(contrast_limits) != (2,) and len(limits) != len(channels)):
            raise ValueError(
                f"contrast_limits must be one (low, high) pair or one pair for each of the {len(channels)} "
                f"channels, got {contrast_limits!r}"
            )
        low, high = limits[:, 0], limits[:, 1]
        if not (np.isfinite(low).all() and np.isfinite(high).all()) or (high <= low).all():
            text = ", ".join(f"{lo:g}..{hi:g}" for lo, hi in limits)
            raise ValueError(
                f"the image has no contrast to segment (contrast limits {text}): it is empty, constant, or all NaN"
            )
        # a channel of no contrast (constant, say) is all 0 rather than a division by zero
        return cls(image, tuple(channels), low, np.where(high > low, high, np.inf))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape[:2])

    @property
    def max_crop_side(self) -> float:
        """A strided read of a numpy array touches only the rows it keeps; of a chunked one, whole chunks."""
        arrays = self.array.channels if isinstance(self.array, ChannelStack) else [self.array]
        return math.inf if all(isinstance(a, np.ndarray) for a in arrays) else LAZY_MAX_CROP_SIDE

    def to_float(self, region: np.ndarray) -> np.ndarray:
        """A region of the raw array -> (h, w, 3) float32 in [0, 1], each channel by its contrast limits; NaNs
        become 0."""
        region = np.asarray(region)
        if region.ndim == 2:
            region = region[..., None]
        elif self.channels != tuple(range(region.shape[-1])):  # an index copy leaves a strided layout: only if needed
            region = region[..., list(self.channels)]
        low, high = self.low.astype(np.float32), self.high.astype(np.float32)
        # in place on one C-ordered copy (the crop's warp wants it contiguous): a 667² RGB region 0.4 ms, not 2.3
        out = region.astype(np.float32, order="C")
        out -= low
        out /= high - low
        if np.issubdtype(region.dtype, np.floating):  # integers have no NaN or inf: spare a pass over the region
            np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(out, 0.0, 1.0, out=out)
        if out.shape[-1] == 3:
            return out
        if out.shape[-1] == 1:
            return np.repeat(out, 3, axis=-1)
        return np.concatenate([out, np.zeros_like(out[..., :1])], axis=-1)


def _auto_contrast(image: np.ndarray, channels: tuple[int, ...]) -> tuple[float, float]:
    if image.dtype == np.uint8:
        return 0.0, 255.0
    if image.dtype == bool:
        return 0.0, 1.0
    step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / STATS_PIXELS)))
    sample = np.asarray(image[::step, ::step]).astype(np.float32)
    if sample.ndim == 3:
        sample = sample[..., list(channels)]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:  # a few bright objects on a flat background: fall back to the full range
        low, high = float(finite.min()), float(finite.max())
    return float(low), float(high)


def first_click_sides(shape: tuple[int, ...], max_side: float = math.inf) -> list[float]:
    """The crop sides a first click tries: 64, 128, ... up to the first at least the image's longer side (or
    ``max_side``).

    Training draws some of its crops from the same ladder, so that the score head learns to rank them. A rung
    at twice the image's side (a click at the border of an object filling the image) was never the one chosen
    on GrabCut or COCO val (the same mIoU@1 without it) and cost a sixth of the first click's network time.
    """
    sides, side = [], float(MIN_CROP_SIDE)
    while side < min(max(shape[:2]), max_side):
        sides.append(side)
        side *= 2
    sides.append(min(side, max_side))
    return sides


def _crops_around(lo: np.ndarray, hi: np.ndarray, points: np.ndarray, factors) -> list[Crop]:
    """Square crops around pixels lo..hi (a mask's bounding box) and the clicks, the box filling REFINE_RATIO of
    a crop of factor 1."""
    lo, hi = np.minimum(lo, points.min(axis=0)), np.maximum(hi, points.max(axis=0))
    extent = max(float((hi - lo).max()) + 1, MIN_CROP_SIDE * REFINE_RATIO)
    return [Crop.centered((lo + hi) / 2, extent / REFINE_RATIO * f) for f in factors]


def _runnable(model: DeepCropV2, device: torch.device) -> tuple[DeepCropV2, dict[int, DeepCropV2]]:
    """``model`` in eval mode on ``device``, and what runs: a copy for each of its input sizes with its batch norms
    folded into the convolutions (:meth:`DeepCropV2.folded`).

    Channels-last convolutions: the same masks (to float rounding), a first click ~12 % faster on the CPU (oneDNN),
    and the layout tensor cores want. Folding: the same masks to float rounding; a 1024² first click 51 ms against
    80 (snapped 80 against 95; benchmarks/latency.py, 2 CPU cores); no statistics swapped, so a click and a
    propagation run side by side. Making the copies adds 0.13 s to loading the predictor.
    """
    model = model.eval().to(device, memory_format=torch.channels_last)
    return model, {s: model.folded(s).to(memory_format=torch.channels_last) for s in model.config.sizes}


class DeepCropPredictor:
    """Click-to-mask segmentation with a DeepCropV2; (row, col) coordinates in image pixels.

    >>> p = DeepCropPredictor.from_checkpoint()
    >>> p.set_image(image)
    >>> mask, score = p.predict(np.array([[120, 200]]), np.array([1]))
    """

    def __init__(
        self,
        model: DeepCropV2,
        device: str | torch.device | None = None,
        snap_edges: bool = True,
        zoom_in: bool = True,
        first_click_model: DeepCropV2 | None = None,
    ) -> None:
        self.device = pick_device(device)
        # GrabCut moves the mask's boundary onto the image's edges (napari_deepcrop.edges); False: the network's
        # own mask, 20-30 ms less per click (benchmarks/latency.py, 2 CPU cores)
        self.snap_edges = snap_edges
        # only a mask whose box is at least this many image pixels on its longer side is snapped (SNAP_MIN_SIDE)
        self.snap_min_side = SNAP_MIN_SIDE
        # first click: more passes, each on a crop around the mask before it, that mask as prev_mask (RITM's
        # zoom-in from the first click on): the crop a refinement click gets, ``zoom_in_passes`` more forward passes
        # (ZOOM_IN_PASSES). tiny_coco val2017 (benchmarks/accuracy.py, pretrained Lite0, one pass): mIoU@1 0.568 ->
        # 0.594 snapped, 0.559 -> 0.601 not
        self.zoom_in = zoom_in
        self.zoom_in_passes = ZOOM_IN_PASSES
        # a further click: the object's crop, around the mask and the clicks with the mask's box filling
        # REFINE_RATIO of it (more factors: a crop of each factor times that side, the best by score), then the
        # focus crop (FocalClick's): a crop around the newest click, the object's extent ``focus_ratio`` times
        # its side, predicted again at the refinement size with the object crop's mask as its previous mask and
        # blended into that mask, where its grid is finer (None: no focus crop). Two passes a click. tiny_coco
        # val2017, 100 objects, the network's own mask, NoC@85 / NoC@90 / failures@90: factors (1.0, 1.5) without
        # focus 8.77 / 13.21 / 55; (1.0,) 8.05 / 12.94 / 52; (1.0,) with focus 2.0 7.52 / 12.10 / 43
        self.refine_factors: tuple[float, ...] = (1.0,)
        self.focus_ratio: float | None = FOCUS_RATIO
        # the refining network's object crops (a further click's, the zoom-in's later passes, a stack's slices) run
        # with their mirror images in one batch, the logits and scores averaged (test-time flip augmentation): that
        # pass's network time twice. tiny_coco val2017, 192 objects, NoC@90 paired: snapped -0.32 +- 0.18, own mask
        # -0.19 +- 0.14; the first click's scales mirrored too -0.11 +- 0.15 and mIoU@1 -0.002, the focus crop too
        # -0.04 +- 0.04 / -0.01 +- 0.05: neither is mirrored
        self.flip_average = True
        # progressive merge (PROGRESSIVE_MERGE_FROM) from this many clicks on; None: never
        self.progressive_merge_from: int | None = PROGRESSIVE_MERGE_FROM
        if self.device.type == "cpu":
            # trained weights hold denormal floats, which x86 CPUs compute slowly; flushing them to zero changes
            # no mask and speeds inference up (a process-wide setting, harmless for napari)
            torch.set_flush_denormal(True)
        self.model, self.nets = _runnable(model, self.device)
        self.config = model.config
        # a second network for first clicks (its scales, its alternatives and its zoom-in), ``model`` for every click
        # with a previous mask: one trained to read a click alone, one to refine (a checkpoint's ``first_click``)
        self.first_click_model = None
        self.first_config, self.first_nets = self.config, self.nets
        if first_click_model is not None:
            self.first_click_model, self.first_nets = _runnable(first_click_model, self.device)
            self.first_config = first_click_model.config
        self._source: ImageSource | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None, **kwargs: Any
    ) -> DeepCropPredictor:
        """Load a checkpoint (None: the bundled default) onto ``device`` (None: CUDA when available, else CPU),
        with its first-click network if it holds one; ``kwargs`` go to the constructor (``snap_edges``)."""
        model, payload = load_checkpoint(path)
        kwargs.setdefault("first_click_model", load_first_click_model(payload, path or "the bundled checkpoint"))
        return cls(model, device, **kwargs)

    def set_image(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channels: tuple[int, ...] | None = None,
    ) -> None:
        """(H, W) or (H, W, C), any numeric dtype; RGBA drops alpha; other channel counts take ``channels`` (up
        to 3 indices). Separate channels (napari layers of one image) go in as a :class:`ChannelStack`.
        ``contrast_limits``: one (low, high) pair, or one per channel seen; None: from the image itself."""
        self._source = ImageSource.from_array(image, contrast_limits, channels)

    def reset_image(self) -> None:
        self._source = None

    @property
    def image_shape(self) -> tuple[int, int]:
        return self._require_image().shape

    def predict(
        self,
        points: np.ndarray,
        labels: np.ndarray,
        prev_mask: np.ndarray | PlacedMask | None = None,
        return_crop: bool = False,
        alternative: int = 0,
    ):
        """Segment the object the clicks point at.

        Returns (mask (H, W) bool, score), or with ``return_crop`` (mask of its bounding box, (row0, col0),
        score): the same mask without allocating anything of image size. ``prev_mask``, the current mask of
        this object, is a full (H, W) mask or, for large images, a :class:`~napari_deepcrop.crops.PlacedMask`.
        ``score`` in [0, 1] is the network's own estimate of its IoU. From ``progressive_merge_from`` clicks on (the
        last point the newest click), only the change connected to the newest click reaches ``prev_mask``.

        ``alternative`` (without ``prev_mask``: a first click) picks the first click's scale ranked that far down
        by score, 0 the best: the other masks a click on an ambiguous object (a shirt or its wearer) can mean, as
        SAM offers several; :meth:`alternatives` of them, each zoomed in on (and snapped) as the best one is.
        """
        source = self._require_image()
        points, labels = self._check_clicks(points, labels, source.shape)
        prev_mask = self._check_prev_mask(prev_mask, source.shape)
        crops = self._candidate_crops(points, labels, prev_mask, source.shape, source.max_crop_side)
        alternative = operator.index(alternative)
        if alternative and (prev_mask is not None or not 0 <= alternative < len(crops)):
            raise ValueError(
                "alternative masks are a first click's (no prev_mask)" if prev_mask is not None
                else f"alternative must be in 0..{len(crops) - 1} on this image, got {alternative}"
            )  # fmt: skip
        first = prev_mask is None
        size = self.first_config.input_size if first else self.config.refinement_size
        logits, scores = self._run(source, crops, points, labels, prev_mask, size, first, self._mirror(first))
        best = int(np.argsort(-scores, kind="stable")[alternative])
        crop, chosen = crops[best], logits[best]
        if first and self.zoom_in:
            crop, chosen, scores[best] = self._zoom_in(source, crop, chosen, scores[best], points, labels)
        elif not first and self.focus_ratio is not None and self.config.prev_mask:
            chosen = self._focus(source, crop, chosen, points, labels)
        if self.snap_edges:
            crop, chosen = self._snap(source, crop, chosen, points, labels, self.snap_min_side)
        crop_mask, (row0, col0) = paste_logits(chosen, crop, source.shape)
        if not first and self.progressive_merge_from is not None and len(points) >= self.progressive_merge_from:
            merged = progressive_merge(PlacedMask(crop_mask, (row0, col0), source.shape), prev_mask, points[-1])
            crop_mask, (row0, col0) = merged.crop, merged.origin
        score = float(scores[best])
        if return_crop:
            return crop_mask, (row0, col0), score
        mask = np.zeros(source.shape, bool)
        mask[row0 : row0 + crop_mask.shape[0], col0 : col0 + crop_mask.shape[1]] = crop_mask
        return mask, score

    def alternatives(self) -> int:
        """How many masks a first click offers on the image set (``predict``'s ``alternative``): one per scale
        it tries."""
        source = self._require_image()
        return len(first_click_sides(source.shape, source.max_crop_side))

    def _require_image(self) -> ImageSource:
        if self._source is None:
            raise RuntimeError("no image set: call set_image(image) before predict()")
        return self._source

    @staticmethod
    def _check_prev_mask(prev_mask, shape) -> PlacedMask | None:
        """A full (H, W) mask or a PlacedMask (what return_crop gives) -> a PlacedMask, None when empty."""
        if prev_mask is None:
            return None
        if not isinstance(prev_mask, PlacedMask):
            prev_mask = np.asarray(prev_mask)
        if tuple(prev_mask.shape) != shape:
            raise ValueError(f"prev_mask must have the image's shape {shape}, got {prev_mask.shape}")
        if not isinstance(prev_mask, PlacedMask):
            prev_mask = PlacedMask.from_full(prev_mask)
        return prev_mask if prev_mask.any() else None

    @staticmethod
    def _check_clicks(points, labels, shape) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(points, dtype=np.float64)
        labels = np.asarray(labels)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be an (N, 2) array of (row, col), got shape {points.shape}")
        if labels.shape != (len(points),):
            raise ValueError(f"labels must have shape ({len(points)},) to match points, got {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 1 (positive) or 0 (negative)")
        if not (labels == 1).any():
            raise ValueError("at least one positive click (label 1) is needed")
        if not np.isfinite(points).all():
            raise ValueError("points must be finite")
        outside = (points < 0).any(axis=1) | (points[:, 0] >= shape[0]) | (points[:, 1] >= shape[1])
        if outside.any():
            raise ValueError(f"click {points[outside][0].tolist()} is outside the image of shape {shape}")
        return points, labels.astype(np.int64)

    def _candidate_crops(self, points, labels, prev_mask, shape, max_side: float = math.inf) -> list[Crop]:
        """First click: a geometric series of scales around it (up to ``max_side``); refinement: around the
        mask and all clicks."""
        if prev_mask is None:
            center = points[labels == 1][0]
            return [Crop.centered(center, s) for s in first_click_sides(shape, max_side)]
        (row0, col0), (h, w) = prev_mask.origin, prev_mask.crop.shape
        lo, hi = np.array([row0, col0]), np.array([row0 + h - 1, col0 + w - 1])
        return _crops_around(lo, hi, points, self.refine_factors)

    def _zoom_in(self, source: ImageSource, crop: Crop, logits: np.ndarray, score: float, points, labels):
        """The first click's mask predicted again on the crop a refinement would use, with itself as prev_mask:
        ``zoom_in_passes`` times, the first pass by the first-click network, the later ones by the refining one
        (when it reads a previous mask), each around the mask of the pass before."""
        for n in range(self.zoom_in_passes):
            first = n == 0
            config = self.first_config if first else self.config
            extent = logits_extent(logits, crop) if config.prev_mask else None
            if extent is None:  # a network that reads no previous mask, or no mask to zoom in on
                break
            crop_mask, origin = paste_logits(logits, crop, source.shape)
            zoomed = _crops_around(*extent, points, (1.0,))
            prev = PlacedMask(crop_mask, origin, source.shape)
            size = config.refinement_size
            z_logits, z_scores = self._run(source, zoomed, points, labels, prev, size, first, self._mirror(first))
            crop, logits, score = zoomed[0], z_logits[0], z_scores[0]
        return crop, logits, score

    def _focus(self, source: ImageSource, crop: Crop, logits: np.ndarray, points, labels) -> np.ndarray:
        """The refined ``logits`` of ``crop`` with a focus crop's around the newest click blended in, on a grid of
        ``crop`` as fine as the focus crop's (the logits unchanged where it would not be finer)."""
        extent = logits_extent(logits, crop)
        if extent is None:
            return logits
        lo, hi = extent
        size = self.config.refinement_size
        side = max((float((hi - lo).max()) + 1) / self.focus_ratio, MIN_CROP_SIDE)
        if crop.side < FOCUS_MIN_GAIN * side or crop.side / size < 1.5:  # not finer, or the crop near full res
            return logits
        focus = Crop.centered(tuple(points[-1]), side)
        crop_mask, origin = paste_logits(logits, crop, source.shape)
        prev = PlacedMask(crop_mask, origin, source.shape)
        f_logits, _ = self._run(source, [focus], points, labels, prev, size)
        fine = int(math.ceil(size * crop.side / side))
        # the focus crop's weight: 1 inside, falling to 0 over its outer FOCUS_FEATHER on each side
        ramp = np.clip((np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5) / (FOCUS_FEATHER * size), 0, 1)
        weight = warp_logits(np.minimum.outer(ramp, ramp), focus, crop, fill=0.0, size=fine)
        merged = warp_logits(logits, crop, crop, size=fine) * (1 - weight)
        return merged + warp_logits(f_logits[0], focus, crop, size=fine) * weight

    @staticmethod
    def _snap(
        source: ImageSource, crop: Crop, logits: np.ndarray, points, labels, min_side: float = 0
    ) -> tuple[Crop, np.ndarray]:
        """The mask snapped to edges by GrabCut, on the object's neighbourhood at up to EDGE_SIDE pixels; a mask
        whose box is under ``min_side`` image pixels on its longer side is left as it is."""
        extent = logits_extent(logits, crop)
        if extent is None or (extent[1] - extent[0]).max() + 1 < min_side:
            return crop, logits
        region = _crops_around(*extent, points, (1.0,))[0]
        size = int(min(EDGE_SIDE, max(math.ceil(region.side), MIN_CROP_SIDE)))
        rgb = read_crop(source.array, region, size, source.to_float)
        prior = warp_logits(logits, crop, region, size=size)
        return region, snap_to_edges(rgb, prior, region.to_input(points, size), labels)

    def _mirror(self, first: bool) -> bool:
        """Whether a pass of the object's crop(s) also runs their mirror images: the refining network's, by
        ``flip_average``."""
        return self.flip_average and not first

    @torch.inference_mode()
    def _run(
        self,
        source: ImageSource,
        crops,
        points,
        labels,
        prev_mask,
        size: int,
        first: bool = False,
        mirror: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The network (``first``: the first click's) on ``crops``, each resized to ``size`` input pixels: (logits
        (N, size, size), scores). ``mirror``: each crop also runs mirrored left-right (its click and mask planes with
        it) in the same batch, and the two outputs are averaged."""
        config, nets = (self.first_config, self.first_nets) if first else (self.config, self.nets)
        images, planes = [], []
        for crop in crops:
            images.append(read_crop(source.array, crop, size, source.to_float))
            prev = None
            if prev_mask is not None and config.prev_mask:
                prev = read_crop(prev_mask, crop, size, lambda m: m.astype(np.float32)) > 0.5
            planes.append(encode_clicks(crop.to_input(points, size), labels, config, prev, size))
        image_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        planes_t = torch.from_numpy(np.stack(planes)).to(self.device)
        if mirror:
            image_t, planes_t = torch.cat([image_t, image_t.flip(-1)]), torch.cat([planes_t, planes_t.flip(-1)])
        planes_t = planes_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            mask_logits, score_logits = nets[size](image_t, planes_t)
        mask_logits, score_logits = mask_logits[:, 0].float(), score_logits.float()
        if mirror:
            n = len(crops)
            mask_logits = (mask_logits[:n] + mask_logits[n:].flip(-1)) / 2
            score_logits = (score_logits[:n] + score_logits[n:]) / 2
        return mask_logits.cpu().numpy(), torch.sigmoid(score_logits).cpu().numpy()
