"""The object being annotated, without Qt or napari: clicks in, mask out, commit into a label image.

The napari widget is a thin layer over this module: it turns mouse clicks into (row, col) pixels, runs
:func:`predict_object` on a worker thread, and writes what :func:`commit_indices` returns with
``Labels.data_setitem``. Everything here is testable with numpy arrays alone.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from .crops import PlacedMask
from .predictor import ChannelStack, DeepCropPredictor

# One click: (row, col, label) in pixels of the 2D slice, label 1 = positive, 0 = negative.
Click = tuple[int, int, int]


@dataclass(frozen=True)
class ObjectMask(PlacedMask):
    """The current object's mask (the crop of its bounding box, so large images cost only the object) and score."""

    score: float = 0.0


def load_predictor(
    checkpoint: str | os.PathLike | None = None, device: str = "auto"
) -> tuple[DeepCropPredictor, str | None]:
    """Load a predictor; when the GPU fails, fall back to the CPU and say so (the second item)."""
    try:
        return DeepCropPredictor.from_checkpoint(checkpoint, None if device == "auto" else device), None
    except RuntimeError as exc:  # no CUDA, a driver error, out of GPU memory (checkpoint errors: ValueError)
        if device == "cpu":
            raise
        return DeepCropPredictor.from_checkpoint(checkpoint, "cpu"), f"CUDA failed, running on the CPU: {exc}"


def predict_object(
    predictor: DeepCropPredictor,
    image: np.ndarray | ChannelStack,
    clicks: tuple[Click, ...],
    prev: ObjectMask | None = None,
    contrast_limits=None,
) -> ObjectMask:
    """Segment the object the clicks point at in a 2D ``image`` ((H, W) or (H, W, C)), refining ``prev``.

    ``contrast_limits``: one (low, high) pair, or one per channel of a :class:`ChannelStack`."""
    predictor.set_image(image, contrast_limits=contrast_limits)
    points = np.array([c[:2] for c in clicks], dtype=np.float64).reshape(-1, 2)
    labels = np.array([c[2] for c in clicks], dtype=np.int64)
    crop, origin, score = predictor.predict(points, labels, prev_mask=prev, return_crop=True)
    shape = tuple(image.shape[:2])
    return ObjectMask(np.asarray(crop, bool), (int(origin[0]), int(origin[1])), shape, float(score))


def has_contrast(image, sample_pixels: int = 1_000_000) -> bool:
    """False when the channels the network sees (the first three) are each constant over the finite pixels.

    napari's contrast limits of such an image are not degenerate (a dtype's range, or 0..1 for all NaN), so
    the predictor's own check does not see it. A strided sample is checked first; a numpy array only when
    that sample is flat (a few bright dots). Lazy (dask, zarr) arrays are not read whole: assumed to have it.
    A :class:`ChannelStack` has it when any of its channels has.
    """
    if isinstance(image, ChannelStack):
        return any(has_contrast(channel, sample_pixels) for channel in image.channels)
    if not isinstance(image, np.ndarray):
        return True
    step = max(1, int((image.shape[0] * image.shape[1] / sample_pixels) ** 0.5))
    for pixels in (image[::step, ::step], image) if step > 1 else (image,):
        pixels = pixels[..., :3] if pixels.ndim == 3 else pixels[..., None]
        if np.issubdtype(pixels.dtype, np.floating):
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels
                low, high = np.nanmin(pixels, axis=(0, 1)), np.nanmax(pixels, axis=(0, 1))
        else:
            low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
        if (high > low).any():
            return True
    return False


def next_label_id(labels: np.ndarray) -> int:
    """The label after the largest one in use; an error when the array's dtype cannot hold it."""
    label = int(np.max(labels)) + 1 if np.size(labels) else 1
    if np.issubdtype(labels.dtype, np.integer) and label > np.iinfo(labels.dtype).max:
        raise ValueError(f"no free label id: dtype {labels.dtype} holds no label above {label - 1}")
    return label


def commit_indices(
    labels: np.ndarray, mask: ObjectMask, plane: tuple[int, ...] = (), overwrite: bool = False
) -> tuple[np.ndarray, ...]:
    """Indices into ``labels`` of the mask's pixels in slice ``plane`` (leading indices of a stack).

    Only the mask's bounding box is read. Without ``overwrite``, pixels of other objects are left out.
    """
    rows, cols = mask.bbox
    keep = mask.crop
    if not overwrite:
        keep = keep & (np.asarray(labels[(*plane, rows, cols)]) == 0)
    r, c = np.nonzero(keep)
    return (*(np.full(r.size, p) for p in plane), r + rows.start, c + cols.start)


class AnnotationSession:
    """The one object being annotated: its slice, its clicks and the masks they gave.

    Masks are remembered per click sequence: a prediction refines the mask of the longest known prefix of
    its clicks, so a new click refines the current mask, and removing a click refines from what the clicks
    before it gave rather than from a mask that the removed click shaped.
    """

    def __init__(self) -> None:
        self.object_id = 0
        self.reset()

    def reset(self) -> None:
        """Forget the object (after a commit or a discard); results for it that arrive later are ignored."""
        self.object_id += 1
        self.plane: tuple[int, ...] | None = None
        self.clicks: tuple[Click, ...] = ()
        self.mask: ObjectMask | None = None
        self._masks: dict[tuple[Click, ...], ObjectMask] = {}

    def prev_mask(self, clicks: tuple[Click, ...]) -> ObjectMask | None:
        for n in range(len(clicks) - 1, 0, -1):
            if clicks[:n] in self._masks:
                return self._masks[clicks[:n]]
        return None

    def forget_masks(self) -> None:
        """Keep the clicks, drop the masks they gave (the image's channels changed): predict from scratch."""
        self._masks = {}
        self.mask = None

    def remember(self, clicks: tuple[Click, ...], mask: ObjectMask) -> None:
        self._masks[clicks] = mask
