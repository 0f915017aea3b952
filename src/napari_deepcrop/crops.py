"""Square crops: image region -> network input, and network logits -> image mask.

Training and inference both cut their inputs with :func:`read_crop`, so the network sees the same geometry,
padding and resampling in both. A crop may extend past the image border (padded with zeros); large crops are
read with a stride, so reading one costs about the output size, not the crop size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Crop:
    """A square region of an image: top-left (row0, col0) and side, in image pixels; index i spans [i, i+1)."""

    row0: float
    col0: float
    side: float

    @classmethod
    def centered(cls, center: tuple[float, float], side: float) -> Crop:
        """The crop of ``side`` whose centre is the centre of pixel ``center`` = (row, col)."""
        return cls(center[0] + 0.5 - side / 2, center[1] + 0.5 - side / 2, float(side))

    def to_input(self, points: np.ndarray, size: int) -> np.ndarray:
        """Image pixel indices (N, 2) -> input pixel indices, for a crop resized to ``size``."""
        scale = size / self.side
        origin = np.array([self.row0, self.col0], np.float32)
        return (np.asarray(points, np.float32).reshape(-1, 2) + 0.5 - origin) * scale - 0.5

    def bounds(self, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """The crop's pixel range clipped to an image of ``shape``: (r0, r1, c0, c1), possibly empty."""
        r0, c0 = max(0, math.floor(self.row0)), max(0, math.floor(self.col0))
        r1 = min(shape[0], math.ceil(self.row0 + self.side))
        c1 = min(shape[1], math.ceil(self.col0 + self.side))
        return r0, max(r0, r1), c0, max(c0, c1)


def read_crop(
    image: np.ndarray,
    crop: Crop,
    size: int,
    to_float: Callable[[np.ndarray], np.ndarray] | None = None,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Resample ``crop`` of ``image`` (H, W[, C], any array supporting strided slicing) to (size, size[, C]).

    Only the crop's own pixels are read, with a stride when the crop is over twice the output size.
    ``to_float`` converts the read region to float32 (e.g. contrast normalisation); outside the image is 0.
    """
    scale = size / crop.side
    step = max(1, int(1 / (2 * scale)))
    r0, r1, c0, c1 = crop.bounds(image.shape[:2])
    region = np.asarray(image[r0:r1:step, c0:c1:step])
    region = to_float(region) if to_float is not None else region.astype(np.float32)
    channels = region.shape[2:]  # to_float may change them (grayscale -> RGB, RGBA -> RGB)
    if region.shape[0] == 0 or region.shape[1] == 0:
        return np.zeros((size, size, *channels), np.float32)
    # output index i -> image coordinate crop.row0 + (i + 0.5) / scale -> region index (x - r0) / step - 0.5
    m = np.array(
        [
            [1 / (scale * step), 0, (crop.col0 + 0.5 / scale - c0) / step - 0.5],
            [0, 1 / (scale * step), (crop.row0 + 0.5 / scale - r0) / step - 0.5],
        ]
    )
    out = cv2.warpAffine(
        np.ascontiguousarray(region),
        m,
        (size, size),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.reshape(size, size, *channels)


def logits_extent(logits: np.ndarray, crop: Crop, margin: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The image pixel range (lo, hi), inclusive, that the foreground (logits > 0) of a crop covers, widened by
    ``margin`` input pixels on each side, or None when nothing is foreground. Not clipped to the image."""
    scale = logits.shape[0] / crop.side
    fg_rows, fg_cols = np.nonzero((logits > 0).any(axis=1))[0], np.nonzero((logits > 0).any(axis=0))[0]
    if len(fg_rows) == 0:
        return None
    origin = np.array([crop.row0, crop.col0])
    lo = np.floor(origin + (np.array([fg_rows[0], fg_cols[0]]) - margin) / scale)
    hi = np.ceil(origin + (np.array([fg_rows[-1], fg_cols[-1]]) + 1 + margin) / scale) - 1
    return lo, hi


def paste_logits(logits: np.ndarray, crop: Crop, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize crop logits (S, S) to image resolution and threshold them, only over the mask's bounding box.

    Returns (mask of the bounding box, (row0, col0) of that box in the image); an empty (0, 0) mask when nothing
    is foreground. Nothing of image size is allocated.
    """
    size = logits.shape[0]
    scale = size / crop.side
    extent = logits_extent(logits, crop, margin=1)  # one input pixel of margin for interpolation
    if extent is None:
        return np.zeros((0, 0), bool), (0, 0)
    (lo_r, lo_c), (hi_r, hi_c) = extent
    r0, c0 = max(0, int(lo_r)), max(0, int(lo_c))
    r1, c1 = min(shape[0], int(hi_r) + 1), min(shape[1], int(hi_c) + 1)
    if r1 <= r0 or c1 <= c0:
        return np.zeros((0, 0), bool), (0, 0)
    # image index y -> input index (y + 0.5 - crop.row0) * scale - 0.5
    m = np.array(
        [
            [scale, 0, (c0 + 0.5 - crop.col0) * scale - 0.5],
            [0, scale, (r0 + 0.5 - crop.row0) * scale - 0.5],
        ]
    )
    up = cv2.warpAffine(
        logits.astype(np.float32),
        m,
        (c1 - c0, r1 - r0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    mask = up > 0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return np.zeros((0, 0), bool), (0, 0)
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return mask, (r0 + int(rows[0]), c0 + int(cols[0]))


def warp_logits(
    logits: np.ndarray, source: Crop, target: Crop, fill: float = -20.0, size: int | None = None
) -> np.ndarray:
    """Logits of the ``source`` crop resampled onto the ``target`` crop's grid of ``size`` (default: the same as
    the source's), ``fill`` outside the source."""
    size = size or logits.shape[0]
    s_src, s_dst = logits.shape[0] / source.side, size / target.side
    ratio = s_src / s_dst
    # target input index j -> image y = target.row0 + (j + 0.5) / s_dst -> source index (y - source.row0) * s_src - 0.5
    m = np.array(
        [
            [ratio, 0, (target.col0 - source.col0) * s_src + 0.5 * ratio - 0.5],
            [0, ratio, (target.row0 - source.row0) * s_src + 0.5 * ratio - 0.5],
        ]
    )
    return cv2.warpAffine(
        logits.astype(np.float32),
        m,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )


@dataclass(frozen=True)
class PlacedMask:
    """A mask of an image of ``shape``, stored as the crop of its bounding box placed at ``origin`` (row0, col0).

    What ``predict(..., return_crop=True)`` returns, and what it takes back as ``prev_mask``: it slices like the
    full (H, W) mask, so :func:`read_crop` reads it without anything of image size being allocated.
    """

    crop: np.ndarray
    origin: tuple[int, int]
    shape: tuple[int, int]

    @classmethod
    def from_full(cls, mask: np.ndarray) -> PlacedMask:
        mask = np.asarray(mask, bool)
        rows = np.nonzero(mask.any(axis=1))[0]
        if len(rows) == 0:
            return cls(np.zeros((0, 0), bool), (0, 0), mask.shape)
        band = mask[rows[0] : rows[-1] + 1]  # one pass over the image, the second over the object's rows alone
        cols = np.nonzero(band.any(axis=0))[0]
        crop = band[:, cols[0] : cols[-1] + 1]
        return cls(crop, (int(rows[0]), int(cols[0])), mask.shape)

    @property
    def bbox(self) -> tuple[slice, slice]:
        (row0, col0), (h, w) = self.origin, self.crop.shape
        return slice(row0, row0 + h), slice(col0, col0 + w)

    def any(self) -> bool:
        return bool(self.crop.any())

    def full(self) -> np.ndarray:
        mask = np.zeros(self.shape, bool)
        mask[self.bbox] = self.crop
        return mask

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``mask[r0:r1:step, c0:c1:step]`` of the full mask, built from the crop alone."""
        rows, cols = (range(*k.indices(n)) for k, n in zip(key, self.shape, strict=True))
        (o_r, o_c), (h, w) = self.origin, self.crop.shape
        if rows.step == 1 and cols.step == 1:  # a window: the crop's overlap with it copied in by slicing
            out = np.zeros((len(rows), len(cols)), bool)
            r0, r1 = max(rows.start, o_r), min(rows.stop, o_r + h)
            c0, c1 = max(cols.start, o_c), min(cols.stop, o_c + w)
            if r1 > r0 and c1 > c0:
                inside = self.crop[r0 - o_r : r1 - o_r, c0 - o_c : c1 - o_c]
                out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = inside
            return out
        rows, cols = np.asarray(rows, np.intp) - o_r, np.asarray(cols, np.intp) - o_c
        out = np.zeros((len(rows), len(cols)), bool)
        keep_r, keep_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        out[np.ix_(keep_r, keep_c)] = self.crop[np.ix_(rows[keep_r], cols[keep_c])]
        return out


def enclosing_window(*boxes: tuple[slice, slice]) -> tuple[slice, slice]:
    """The smallest (rows, cols) window that holds every box (each a (rows, cols) pair of unit-step slices)."""
    rows, cols = zip(*boxes, strict=True)
    return (
        slice(min(b.start for b in rows), max(b.stop for b in rows)),
        slice(min(b.start for b in cols), max(b.stop for b in cols)),
    )


def progressive_merge(new: PlacedMask, prev: PlacedMask, point) -> PlacedMask:
    """FocalClick's progressive merge: ``prev`` changed only by the part of where ``new`` differs from it that is
    connected (8-connected) to the click at ``point`` (row, col): added where the click's pixel was outside ``prev``,
    removed where it was inside. Where ``new`` leaves the click's pixel as ``prev`` had it, there is nothing to
    merge: ``new`` itself. Only the two masks' boxes are read."""
    shape = new.shape
    row, col = (int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(point, shape, strict=True))
    boxes = [m.bbox for m in (new, prev) if m.crop.size]
    window = enclosing_window(*boxes, (slice(row, row + 1), slice(col, col + 1)))
    r0, c0 = window[0].start, window[1].start
    before, after = prev[window], new[window]
    diff = before ^ after
    at = (row - r0, col - c0)
    if not diff[at]:
        return new
    _, parts = cv2.connectedComponents(diff.astype(np.uint8), connectivity=8)
    part = parts == parts[at]
    merged = PlacedMask.from_full(before & ~part if before[at] else before | part)
    if not merged.any():
        return PlacedMask(np.zeros((0, 0), bool), (0, 0), shape)
    return PlacedMask(merged.crop, (r0 + merged.origin[0], c0 + merged.origin[1]), shape)
