"""The object being annotated, without Qt or napari: clicks in, mask out, commit into a label image.

The napari widget is a thin layer over this module: it turns mouse clicks into (row, col) pixels, runs
:func:`predict_object` on a worker thread, and writes what :func:`commit_indices` returns with
``Labels.data_setitem``. Everything here is testable with numpy arrays alone.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .crops import PlacedMask
from .predictor import ChannelStack, DeepCropPredictor

if TYPE_CHECKING:
    from .volume import VolumeObject

# One click: (row, col, label) in pixels of the 2D slice, label 1 = positive, 0 = negative.
Click = tuple[int, int, int]
# a click corrects a propagated object's slice when it lands within the slice's mask box grown by this (x its side)
CORRECTION_MARGIN = 0.5


@dataclass(frozen=True)
class ObjectMask(PlacedMask):
    """The current object's mask (the crop of its bounding box, so large images cost only the object) and score;
    a first click's also which of its ``alternatives`` masks it is (0: the network's choice)."""

    score: float = 0.0
    alternative: int = 0
    alternatives: int = 1


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
    alternative: int = 0,
) -> ObjectMask:
    """Segment the object the clicks point at in a 2D ``image`` ((H, W) or (H, W, C)), refining ``prev``.

    ``contrast_limits``: one (low, high) pair, or one per channel of a :class:`ChannelStack`. Without ``prev``,
    ``alternative`` picks one of the first click's masks (:meth:`DeepCropPredictor.predict`), taken modulo
    their number, so that counting up cycles through them; with ``prev`` it is ignored."""
    predictor.set_image(image, contrast_limits=contrast_limits)
    points = np.array([c[:2] for c in clicks], dtype=np.float64).reshape(-1, 2)
    labels = np.array([c[2] for c in clicks], dtype=np.int64)
    alternatives = 1 if prev is not None else predictor.alternatives()
    alternative %= alternatives
    crop, origin, score = predictor.predict(
        points, labels, prev_mask=prev, return_crop=True, alternative=alternative
    )
    shape = tuple(image.shape[:2])
    origin = (int(origin[0]), int(origin[1]))
    return ObjectMask(np.asarray(crop, bool), origin, shape, float(score), alternative, alternatives)


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
    labels: np.ndarray,
    mask: PlacedMask,
    plane: tuple[int, ...] = (),
    overwrite: bool = False,
    label: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Indices into ``labels`` of the mask's pixels in slice ``plane`` (leading indices of a stack).

    Only the mask's bounding box is read. Without ``overwrite``, pixels of other objects are left out (pixels
    that already hold ``label`` are this object's, not another's).
    """
    rows, cols = mask.bbox
    keep = mask.crop
    if not overwrite:
        held = np.asarray(labels[(*plane, rows, cols)])
        keep = keep & ((held == 0) | (held == label) if label is not None else held == 0)
    return _indices(keep, mask.origin, plane)


def release_indices(
    labels: np.ndarray, mask: PlacedMask, plane: tuple[int, ...], label: int, keep: PlacedMask | None = None
) -> tuple[np.ndarray, ...]:
    """Indices of the pixels in ``mask``'s bounding box on slice ``plane`` that hold ``label`` and are not in
    ``keep``: what to clear when the object's mask there changes from ``mask`` to ``keep``."""
    rows, cols = mask.bbox
    free = np.asarray(labels[(*plane, rows, cols)]) == label
    if keep is not None:
        free &= ~keep[rows, cols]
    return _indices(free, mask.origin, plane)


def _indices(pixels: np.ndarray, origin: tuple[int, int], plane: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    r, c = np.nonzero(pixels)
    return (*(np.full(r.size, p) for p in plane), r + origin[0], c + origin[1])


@dataclass
class PropagatedObject:
    """An object propagated through a stack (:mod:`.volume`) and written under ``label`` into a label stack.

    A click on one of its slices corrects that slice (:meth:`slice_at`): the clicks refine the slice's mask, and
    the result replaces it, alone or re-propagated outwards (:func:`.volume.correct_slice`). :meth:`writes`
    turns a change of masks into what to write, so that the label stack follows the object.
    """

    label: int
    volume: VolumeObject

    def slice_at(self, labels: np.ndarray, plane: tuple[int, ...], point: tuple[int, int]) -> int | None:
        """The index along the axis of the slice that a click at ``point`` (row, col) on slice ``plane`` corrects,
        or None: the slice holds a mask of this object, still in ``labels`` (not undone), and the click lands
        within the mask's bounding box grown by :data:`CORRECTION_MARGIN` of its side."""
        k = self.volume.index_of(plane)
        mask = None if k is None else self.volume.masks.get(k)
        if mask is None:
            return None
        (rows, cols), (h, w) = mask.bbox, mask.crop.shape
        grow = int(np.ceil(CORRECTION_MARGIN * max(h, w)))
        near = all(box.start - grow <= p < box.stop + grow for p, box in zip(point, (rows, cols), strict=True))
        if not near or not (np.asarray(labels[(*plane, rows, cols)]) == self.label).any():
            return None
        return k

    def writes(
        self, labels: np.ndarray, before: dict[int, ObjectMask], changed: Iterable[int], overwrite: bool = False
    ) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
        """(indices, value) to write, slice by slice, for the slices ``changed`` from the masks ``before``
        (the object's masks when last written, {} for a new object) to the volume's: the old mask's pixels
        cleared where the new one has none, then the new mask written (other objects kept unless ``overwrite``).

        A generator: each slice is read after the slices before it were written.
        """
        for k in sorted(changed):
            plane, old, new = self.volume.plane_at(k), before.get(k), self.volume.masks.get(k)
            if old is not None:
                yield release_indices(labels, old, plane, self.label, keep=new), 0
            if new is not None:
                yield commit_indices(labels, new, plane, overwrite, self.label), self.label


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
        self.corrects: int | None = None  # the slice (along its axis) of a propagated object the clicks correct
        self._base: ObjectMask | None = None
        self.base_clicks: tuple[Click, ...] = ()
        self.alternative = 0  # which of the first click's masks (predict_object's ``alternative``)

    def correct(self, k: int, base: ObjectMask, click: tuple[int, int]) -> None:
        """The clicks correct slice ``k`` of a propagated object, whose mask there is ``base``.

        The network refines ``base`` from the click propagation gave it (``click``, the positive one at base's
        deepest point) and the user's clicks after it: a correction is one more click in the sequence that
        made the mask, as in the interactive protocol, and a negative click alone is a valid correction. The
        network is given ``base_clicks`` before the user's clicks.
        """
        self.corrects, self._base, self.base_clicks = k, base, ((int(click[0]), int(click[1]), 1),)

    def prev_mask(self, clicks: tuple[Click, ...]) -> ObjectMask | None:
        for n in range(len(clicks) - 1, 0, -1):
            if clicks[:n] in self._masks:
                return self._masks[clicks[:n]]
        return self._base

    def forget_masks(self) -> None:
        """Keep the clicks, drop the masks they gave (the image's channels changed): predict from scratch."""
        self._masks = {}
        self.mask = None

    def remember(self, clicks: tuple[Click, ...], mask: ObjectMask) -> None:
        self._masks[clicks] = mask
