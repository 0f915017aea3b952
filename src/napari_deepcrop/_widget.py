"""DeepCropWidget: click-assisted annotation in napari, a thin layer over the Qt-free modules.

Clicks live in a Points layer ("DeepCrop clicks", in the image's data coordinates), the current object in a
small Labels layer ("DeepCrop preview", the mask's bounding box only), and committed objects in the target
Labels layer, written with ``Labels.data_setitem`` so napari's undo works. Predictions run on a worker thread,
one at a time: clicks made while one runs are predicted together as soon as it returns (:mod:`.session`).

A dataset navigator (:mod:`.dataset`) shows a folder of images or a COCO file one image at a time in two layers,
keeping each image's labels as the user steps on. Export to COCO and fine-tuning (:mod:`.finetune`) run on a
worker thread, one at a time, with napari progress and a cancel button; they never open a dialog themselves
(``export_coco(folder)``, ``fine_tune(folder)``): the buttons ask for the folder first.

In a stack, Propagate (P) takes the current object (the preview, else the object last committed on the slice
shown) through the slices along the last-used slider's axis (:mod:`.volume`), as one such task, and writes it
under one label id in one undo step. A click on a slice of an object propagated into the Labels layer corrects
that slice: Enter keeps the correction alone, P re-propagates outwards from it (slices corrected before stay).
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from app_model.types import KeyCode, KeyMod
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton, Select, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.transforms import CompositeAffine
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QMenu, QMessageBox

from . import _llvm_guard  # noqa: F401  (before the modules that import torch)
from ._writer import _file_stem
from .checkpoint import default_checkpoint_path
from .coco import ANNOTATIONS_JSON
from .dataset import AnnotationDataset, image_source
from .finetune import FinetuneResult, finetune
from .predictor import DeepCropPredictor
from .session import (
    AnnotationSession,
    Click,
    ObjectMask,
    PropagatedObject,
    commit_indices,
    has_contrast,
    load_predictor,
    next_label_id,
    predict_object,
)
from .volume import VolumeObject, correct_slice, deepest_point, read_slice, segment_volume

if TYPE_CHECKING:
    import napari
    from napari.layers import Points

CLICKS = "DeepCrop clicks"
PREVIEW = "DeepCrop preview"
DATASET_IMAGE = "DeepCrop dataset image"
DATASET_LABELS = "DeepCrop dataset labels"
FINETUNE_PHASES = {
    "before": "Fine-tune: measuring the current model",
    "training": "Fine-tune: training",
    "after": "Fine-tune: measuring the fine-tuned model",
}
NEW_LABELS = "(new Labels layer)"
DEFAULT_CATEGORY = "object"
DRAG_PIXELS = 5  # a press and release closer than this on the canvas is a click, farther a pan
POSITIVE_COLORS = {True: "lime", False: "magenta"}
SHORTCUTS = """<b>Shortcuts</b> (click tool on, clicks layer selected)<br>
Click: positive click (add to the object)<br>
Shift+click or right click: negative click (remove)<br>
Enter: commit the object &nbsp; Escape: discard it<br>
N: the first click's next mask (the network's other readings of it, e.g. a part or the whole)<br>
P: propagate the object through the stack; on a slice of a propagated object, clicks correct it and P
re-propagates beyond it<br>
Ctrl+Z: remove the last click, or undo the last commit; Ctrl+Shift+Z: redo it<br>
S, select clicks, Delete: remove them; Z: back to clicking"""


@dataclass(frozen=True)
class _Job:
    """Everything one prediction needs, copied on the UI thread so the worker shares no mutable state."""

    generation: int
    object_id: int
    clicks: tuple[Click, ...]
    image: Any  # the 2D slice, (H, W) or (H, W, C), or a ChannelStack (volume.read_slice) of several layers
    contrast_limits: Any  # (low, high), or one pair per channel of a ChannelStack
    prev: ObjectMask | None
    predictor: DeepCropPredictor | None  # None: load from checkpoint/device first
    checkpoint: Path | None
    device: str
    settings: int
    snap_edges: bool
    base_clicks: tuple[Click, ...] = ()  # a correction's: the click that propagation gave this slice
    alternative: int = 0  # which of a first click's masks (N cycles them)


@dataclass(frozen=True)
class _Result:
    job: _Job
    predictor: DeepCropPredictor | None
    mask: ObjectMask | None = None
    error: str | None = None
    warning: str | None = None


def _run(job: _Job) -> _Result:
    """The worker: never raises, so every error reaches the user as a notification."""
    predictor, warning = job.predictor, None
    try:
        if predictor is None:
            predictor, warning = load_predictor(job.checkpoint, job.device)
        predictor.snap_edges = job.snap_edges
        if not has_contrast(job.image):  # napari's contrast limits of such an image are not degenerate
            raise ValueError("the image has no contrast to segment: it is empty, constant, or all NaN")
        clicks = job.base_clicks + job.clicks
        mask = predict_object(predictor, job.image, clicks, job.prev, job.contrast_limits, job.alternative)
        return _Result(job, predictor, mask=mask, warning=warning)
    except Exception as exc:  # shown as a notification on the UI thread
        return _Result(job, predictor, error=f"DeepCrop: {_reason(exc)}", warning=warning)


def _reason(exc: Exception) -> str:
    """What went wrong, also for errors raised without a message (a bare MemoryError says nothing)."""
    if isinstance(exc, MemoryError):
        return f"out of memory{f': {exc}' if str(exc) else ''}; nothing was changed"
    return str(exc) or type(exc).__name__


class _Cancelled(Exception):
    """Raised in a task's progress report when the user cancelled it."""


@dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: str | None = None
    cancelled: bool = False


Report = Callable[[str, int], None]  # (description, progress value); raises _Cancelled


class _ProgressRelay(QObject):
    """Carries a task's progress reports from its worker thread to the main thread: one QObject's signal, made
    once on the main thread, which Qt queues across threads. superqt's ``ensure_main_thread`` makes a QObject per
    call and destroys it on whichever thread drops it last; under PyQt6 that deadlocked a test run once (the
    main thread holding the GIL and waiting for Qt's connection lock, the worker holding the lock and waiting
    for the GIL)."""

    report = Signal(object, str, int)  # (progress bar, description, value)


def _run_task(work: Callable[[Report], Any], report: Report) -> _Outcome:
    """The worker of an export or fine-tune: never raises, so every error reaches the user as a notification."""
    try:
        return _Outcome(work(report))
    except _Cancelled:
        return _Outcome(cancelled=True)
    except (Exception, SystemExit) as exc:  # the training CLI exits on bad arguments
        return _Outcome(error=f"DeepCrop: {exc}")


def _export(dataset: AnnotationDataset, folder: Path, overwrite: bool, report: Report) -> Path:
    return dataset.export(folder, overwrite, on_image=lambda done, total: report("Exporting COCO", done))


def _fine_tune(
    dataset: AnnotationDataset, folder: Path, overwrite: bool, init: Path | None, steps: int, device: str,
    report: Report,
) -> FinetuneResult:  # fmt: skip
    report("Fine-tune: exporting the annotations", 0)
    json_path = dataset.export(folder, overwrite)
    return finetune(
        json_path, steps, init, device=device, on_progress=lambda phase, step: report(FINETUNE_PHASES[phase], step)
    )


@dataclass(frozen=True)
class _Propagation:
    """What a propagation (or a correction's re-propagation) computes on the worker, copied on the UI thread."""

    predictor: DeepCropPredictor | None  # None: load from checkpoint/device first
    checkpoint: Path | None
    device: str
    snap_edges: bool
    stack: Any  # the image's array, or a list of the chosen channels' arrays
    contrast_limits: Any
    plane: tuple[int, ...]  # the seed slice's leading indices
    axis: int
    seed: ObjectMask  # the seed slice's mask, or the corrected slice's
    volume: VolumeObject | None = None  # a correction: the object before it (copied, never changed)


@dataclass(frozen=True)
class _Written:
    """Where a propagation's result goes, decided on the UI thread when it starts."""

    image: Image
    target: Labels | None  # None: a new Labels layer, made when the result arrives
    label: int | None  # None: a new object, under the next free label id
    before: dict[int, ObjectMask]  # the object's masks as written before (a correction), else {}
    object_id: int  # the session's object: its preview is discarded once written
    category: str
    settings: int  # the widget's model settings when it started: a model loaded for them is kept


def _propagate(job: _Propagation, report: Report) -> tuple[VolumeObject, set[int], DeepCropPredictor | None]:
    """The object through the stack (or a correction re-propagated): its volume, the slices that changed and
    the predictor loaded for it (None: the widget's was used)."""
    loaded = None if job.predictor is not None else load_predictor(job.checkpoint, job.device)[0]
    predictor = copy.copy(job.predictor or loaded)  # clicks on other objects use the widget's meanwhile
    predictor.snap_edges = job.snap_edges
    segmented = itertools.count(1)

    def on_slice(k: int, mask: ObjectMask | None) -> None:  # from either direction's thread
        report("Propagating", next(segmented))

    if job.volume is None:
        volume = segment_volume(
            predictor, job.stack, job.plane, job.seed, job.axis, job.contrast_limits, on_slice=on_slice
        )
        return volume, set(volume.masks), loaded
    volume = job.volume.copy()
    k = job.plane[job.axis]
    changed = correct_slice(predictor, job.stack, volume, k, job.seed, job.contrast_limits, on_slice=on_slice)
    return volume, changed, loaded


def _image_array(image: Image) -> Any:
    return image.data[0] if image.multiscale else image.data


def _spatial_shape(image: Image) -> tuple[int, ...]:
    shape = tuple(_image_array(image).shape)
    return shape[:-1] if image.rgb else shape


def _transforms(layer) -> dict[str, Any]:
    return {name: getattr(layer, name) for name in ("scale", "translate", "rotate", "shear", "affine")}


class DeepCropWidget(Container):
    """Dock widget: pick an image and a target Labels layer, click objects, commit them one by one."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        self.session = AnnotationSession()
        self.predictor: DeepCropPredictor | None = None  # loaded on the first click; tests may set their own
        self._settings = 0  # bumped when checkpoint or device change: a predictor loaded before is dropped
        self._worker = None
        self._generation = 0  # bumped when the clicks change: results for older clicks are not shown
        self._wanted = False  # the clicks changed while a prediction ran: predict again when it returns
        self._clicks_layer: Points | None = None
        self._preview_layer: Labels | None = None
        self.dataset: AnnotationDataset | None = None  # the navigator's set, when one is open
        self._dataset_layers: tuple[Image | None, Labels | None] = (None, None)
        self._task = None  # the export or fine-tune running, one at a time
        self.fine_tune_result: FinetuneResult | None = None  # the last fine-tune's
        self._progress: cancelable_progress | None = None
        self._relay = _ProgressRelay(self.native)  # made here, on the main thread, whose slot it queues to
        self._relay.report.connect(self._show_progress)
        self._cancel_requested = threading.Event()
        self._folder: Path | None = None  # where dialogs start: the last export, or the open dataset
        self._committed: tuple[Labels, int, tuple[int, ...], ObjectMask] | None = None  # the last commit's
        # the objects propagated, by (Labels layer id, label), the latest last; the one being corrected
        self._propagated: dict[tuple[int, int], tuple[Image, Labels, PropagatedObject]] = {}
        self._correcting: tuple[int, int] | None = None

        self._image = ComboBox(label="Image", choices=self._image_choices)
        # multichannel images (napari's channel_axis gives one layer per channel): up to two more channels
        self._channels = Select(label="+ channels", choices=self._channel_choices, allow_multiple=True)
        self._channels.native.setMaximumHeight(60)
        self._channels.tooltip = (
            "Other channels of the image (layers of its shape) that the network sees beside it, each with its "
            "own contrast limits: at most two. None selected: the image alone."
        )
        self._target = ComboBox(label="Labels", choices=self._target_choices)
        self._category = ComboBox(label="Category", choices=[DEFAULT_CATEGORY])
        self._category.native.setEditable(True)
        self._category.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self._checkpoint = FileEdit(label="Checkpoint", filter="*.pt", value=default_checkpoint_path())
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda"])
        self._device_note = Label(label="Model")
        self._tool = CheckBox(text="Click tool")
        self._overwrite = CheckBox(text="Overwrite other objects")
        self._snap = CheckBox(text="Snap to edges", value=True)
        self._snap.tooltip = (
            "Move the network's mask boundary onto the image's edges (GrabCut around the object) where the "
            "network is unsure of it: fewer clicks on most objects, 20-30 ms more per click on a laptop CPU"
        )
        commit = PushButton(text="Commit (Enter)")
        discard = PushButton(text="Discard (Escape)")
        propagate = PushButton(text="Propagate (P)")
        other = PushButton(text="Other mask (N)")
        other.tooltip = (
            "The first click's next mask: the network reads a click at several scales (a part, the object, a "
            "group) and shows the one it rates best; N steps through the others, best first, and back"
        )
        propagate.tooltip = (
            "A stack: segment the current object on the slices before and after this one, along the last slider "
            "moved, until it ends; one label id, one undo step. On a slice of a propagated object, clicks "
            "correct it and Propagate re-propagates beyond it."
        )
        open_dataset = PushButton(text="Open folder / COCO…")
        menu = QMenu(open_dataset.native)
        menu.addAction("Folder of images…", self._open_folder_dialog)
        menu.addAction("COCO json…", self._open_json_dialog)
        open_dataset.native.setMenu(menu)
        previous, next_ = PushButton(text="◀ Previous"), PushButton(text="Next ▶")
        self._dataset_note = Label(value="no dataset open: annotate the image layers, or open a folder")
        export, tune = PushButton(text="Export COCO…"), PushButton(text="Fine-tune on these annotations…")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._steps = SpinBox(label="Fine-tune steps", value=200, min=1, max=100_000)
        self._task_note = Label(label="Jobs", value="none yet")
        # Whole-layer actions (export, training) add their buttons to this row.
        self.actions = Container(widgets=[export, tune, self._cancel], layout="horizontal", labels=False)
        buttons = Container(widgets=[commit, discard, propagate, other], layout="horizontal", labels=False)
        navigator = Container(widgets=[open_dataset, previous, next_], layout="horizontal", labels=False)
        self.extend([
            self._image, self._channels, self._target, self._category, self._checkpoint, self._device,
            self._device_note, self._tool, self._overwrite, self._snap, buttons, navigator, self._dataset_note,
            self.actions, self._steps, self._task_note, Label(value=SHORTCUTS),
        ])  # fmt: skip

        self._image.changed.connect(self._on_image_changed)
        self._channels.changed.connect(self._on_channels_changed)
        self._target.changed.connect(self._on_target_changed)
        self._checkpoint.changed.connect(self._on_model_changed)
        self._device.changed.connect(self._on_model_changed)
        self._tool.changed.connect(self._on_tool_changed)
        commit.clicked.connect(self.commit)
        discard.clicked.connect(self.discard)
        propagate.clicked.connect(self.propagate)
        other.clicked.connect(self.other_mask)
        previous.clicked.connect(self.previous_image)
        next_.clicked.connect(self.next_image)
        export.clicked.connect(self._export_clicked)
        tune.clicked.connect(self._fine_tune_clicked)
        self._cancel.clicked.connect(self.cancel_task)
        for event in ("inserted", "removed", "renamed"):
            getattr(viewer.layers.events, event).connect(self.reset_choices)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self.reset_choices()
        self._on_model_changed()
        self._on_image_changed()

    # ----- the user's actions -----------------------------------------------------------------------------
    def commit(self) -> None:
        """Write the current object into the target Labels layer under the next free label id (a correction of a
        propagated object's slice: that slice, under the object's id)."""
        mask, image = self.session.mask, self._require_image()
        if image is None:
            return
        if mask is None or not mask.crop.any():
            show_info("DeepCrop: nothing to commit yet: click on an object first")
            return
        if not self._check_target(image):
            return
        if self.session.corrects is not None:
            self._commit_correction()
            return
        target = self._target.value or self._create_target(image)
        try:
            label = next_label_id(target.data)
        except ValueError as exc:
            show_error(f"DeepCrop: {exc}")
            return
        indices = commit_indices(target.data, mask, self.session.plane, self._overwrite.value)
        if indices[0].size == 0:
            show_warning("DeepCrop: the object lies entirely on other objects (and 'Overwrite' is off)")
            return
        target.data_setitem(indices, label)
        _set_category(target, label, self._category_name())
        self._committed = (target, label, self.session.plane, mask)
        self.discard()

    def propagate(self) -> bool:
        """Propagate the current object through the stack on a worker thread (napari progress, cancellable), or
        re-propagate the corrected slice of a propagated object. The result is written when it arrives, in one
        undo step; cancelled, nothing is. False when nothing was started."""
        image = self._require_image()
        if image is None or not self._check_target(image):
            return False
        spatial = _spatial_shape(image)
        if len(spatial) < 3:
            show_warning(
                f"DeepCrop: Propagate needs a stack (a 3D volume or a time series); '{image.name}' is a 2D image"
            )
            return False
        if self.busy or self._wanted:
            show_info("DeepCrop: the object is still being segmented: propagate once its mask shows")
            return False
        if self.session.corrects is not None:
            return self._repropagate(image)
        seed = self._seed(image)
        if seed is None:
            return False
        mask, plane, label = seed
        axis = self._propagation_axis(image)
        job = self._propagation(image, plane, axis, mask)
        written = _Written(
            image, self._target.value, label, {}, self.session.object_id, self._category_name(), self._settings
        )
        return self._start_propagation(job, written, spatial[axis] - 1)

    def other_mask(self) -> bool:
        """N: the first click's next mask by the network's score (after the last, the best again), refined by
        the clicks after it as the shown one would be. False when there is none: not a first click's mask."""
        mask, clicks = self.session.mask, self.session.clicks
        if mask is None or not clicks or self.busy or self._wanted:
            show_info("DeepCrop: other masks are offered once the first click's mask shows")
            return False
        if self.session.prev_mask(clicks) is not None or mask.alternatives < 2:
            show_info(
                "DeepCrop: other masks are offered for an object's first click only: remove the clicks after it "
                "(Ctrl+Z) to choose another"
            )
            return False
        self.session.alternative = (mask.alternative + 1) % mask.alternatives
        self._generation += 1
        self._wanted = True
        self._start_job()
        return True

    def discard(self) -> None:
        """Forget the current object: its clicks and its preview."""
        layer = self._clicks_layer
        if layer is not None and len(layer.data):
            layer.data = np.empty((0, layer.ndim))  # its data event resets the object
        self._reset_object()

    def undo(self) -> None:
        """Ctrl+Z on the clicks layer: the last click; with no clicks, the target Labels layer's last edit."""
        layer = self._clicks_layer
        if layer is not None and len(layer.data):
            layer.selected_data = {len(layer.data) - 1}
            layer.remove_selected()
        elif self._target.value is not None:
            self._target.value.undo()

    def redo(self) -> None:
        """Ctrl+Shift+Z on the clicks layer: redo the target Labels layer's last undone edit."""
        if self._target.value is not None:
            self._target.value.redo()

    @property
    def busy(self) -> bool:
        """A prediction is running."""
        return self._worker is not None

    # ----- stacks: propagation and corrections ---------------------------------------------------------------
    def _seed(self, image: Image) -> tuple[ObjectMask, tuple[int, ...], int | None] | None:
        """The object to propagate: the preview's mask, else the object last committed, if on the slice shown
        (as its pixels in the Labels layer now are). With its slice and its label (None: not written yet)."""
        mask = self.session.mask
        if mask is not None and mask.any():
            return mask, self.session.plane, None
        shown = tuple(int(v) for v in np.round(image.world_to_data(self._viewer.dims.point))[:-2])
        if self._committed is not None:
            target, label, plane, committed = self._committed
            if target is self._target.value and target in self._viewer.layers and plane == shown:
                crop = np.asarray(target.data[(*plane, *committed.bbox)]) == label
                if crop.any():
                    return ObjectMask(crop, committed.origin, committed.shape, committed.score), plane, label
        show_info("DeepCrop: nothing to propagate on this slice: click an object on it (or commit one) first")
        return None

    def _propagation_axis(self, image: Image) -> int:
        """The image axis of the slider moved last, when it is one of the image's stack axes; else the one
        before the image's plane (z of (t, z, y, x))."""
        leading = len(_spatial_shape(image)) - 2
        axis = self._viewer.dims.last_used - (self._viewer.dims.ndim - image.ndim)
        return axis if 0 <= axis < leading else leading - 1

    def _propagation(self, image: Image, plane, axis: int, seed: ObjectMask, volume=None) -> _Propagation:
        stack, contrast_limits = self._stack(image)
        return _Propagation(
            self.predictor, self._checkpoint_path(), self._device.value, self._snap.value, stack,
            contrast_limits, tuple(plane), axis, seed, volume,
        )  # fmt: skip

    def _start_propagation(self, job: _Propagation, written: _Written, slices: int) -> bool:
        return self._start_task(
            "Propagating", max(1, slices), partial(_propagate, job), partial(self._on_propagated, written),
            cancelled="propagation cancelled: nothing was written",
        )  # fmt: skip

    def _live_propagations(self) -> list[tuple[tuple[int, int], Image, Labels, PropagatedObject]]:
        """The propagated objects of the widget's image and Labels layer, the latest first (forgetting those
        whose layers were removed)."""
        layers, live = self._viewer.layers, []
        for key, (image, target, propagated) in list(self._propagated.items()):
            if image not in layers or target not in layers:
                del self._propagated[key]
            elif image is self._image.value and target is self._target.value:
                live.append((key, image, target, propagated))
        return live[::-1]

    def _live_propagation(self) -> tuple[Image, Labels, PropagatedObject] | None:
        """The propagated object being corrected, if its image and Labels layer are still the widget's."""
        for key, image, target, propagated in self._live_propagations():
            if key == self._correcting:
                return image, target, propagated
        return None

    def _keep_propagated(self, image: Image, target: Labels, propagated: PropagatedObject) -> None:
        key = (id(target), propagated.label)
        self._propagated.pop(key, None)  # re-inserted: the latest
        self._propagated[key] = (image, target, propagated)

    def _start_correction(self, point: np.ndarray) -> None:
        """A new object's first click: on a slice of a propagated object, the clicks correct that slice. The
        object under the click first, else the latest whose mask there is near it."""
        plane, pixel = tuple(int(v) for v in point[:-2]), tuple(int(v) for v in point[-2:])
        found = []
        for key, _, target, propagated in self._live_propagations():
            k = propagated.slice_at(target.data, plane, pixel)
            if k is not None:
                under = propagated.volume.masks[k][pixel[0] : pixel[0] + 1, pixel[1] : pixel[1] + 1].any()
                found.append((not under, len(found), key, k, propagated))
        if found:
            _, _, self._correcting, k, propagated = min(found)
            base = propagated.volume.masks[k]
            self.session.correct(k, base, deepest_point(base))
            self._task_note.value = (
                f"correcting slice {k} of label {propagated.label}: Enter keeps it, P re-propagates beyond it"
            )

    def _commit_correction(self) -> None:
        """Enter on a corrected slice: that slice's mask replaced, nothing re-propagated."""
        live = self._live_propagation()
        if live is None:
            show_warning("DeepCrop: the propagated object's image or Labels layer changed: nothing written")
            return
        _, target, propagated = live
        volume, k = propagated.volume.copy(), self.session.corrects
        changed = correct_slice(None, None, volume, k, self.session.mask, propagate=False)
        corrected = PropagatedObject(propagated.label, volume)
        self._write_object(target, corrected, propagated.volume.masks, changed)
        self._keep_propagated(live[0], target, corrected)
        self._task_note.value = f"slice {k} of label {propagated.label} corrected"
        self.discard()

    def _repropagate(self, image: Image) -> bool:
        live = self._live_propagation()
        mask = self.session.mask
        if live is None or mask is None or not mask.any():
            show_info("DeepCrop: nothing to re-propagate: the correction has no mask, or its layers changed")
            return False
        _, target, propagated = live
        volume = propagated.volume
        job = self._propagation(image, volume.plane_at(self.session.corrects), volume.axis, mask, volume)
        written = _Written(
            image, target, propagated.label, dict(volume.masks), self.session.object_id, "", self._settings
        )
        return self._start_propagation(job, written, volume.length - 1)

    def _on_propagated(self, written: _Written, result: tuple[VolumeObject, set[int], Any]) -> None:
        """Write the propagated object (or its correction) into the Labels layer, in one undo step."""
        volume, changed, loaded = result
        if loaded is not None and self.predictor is None and written.settings == self._settings:
            self._use_predictor(loaded)  # the next click needs no second load
        image, target, layers = written.image, written.target, self._viewer.layers
        if image not in layers or (target is not None and target not in layers):
            show_error("DeepCrop: the image or Labels layer was removed while propagating: nothing written")
            return
        if target is None:
            target = self._create_target(image)
        elif tuple(target.data.shape) != _spatial_shape(image):
            show_error(f"DeepCrop: Labels layer '{target.name}' no longer has the image's shape: nothing written")
            return
        try:
            label = written.label or next_label_id(target.data)
        except ValueError as exc:
            show_error(f"DeepCrop: {exc}")
            return
        propagated = PropagatedObject(label, volume)
        self._write_object(target, propagated, written.before, changed)
        if written.label is None:
            _set_category(target, label, written.category)
        self._keep_propagated(image, target, propagated)
        if self.session.object_id == written.object_id:
            self.discard()
        span = volume.slices
        stops = "; ".join(f"{'after' if d > 0 else 'before'}: {why}" for d, why in sorted(volume.stops.items()))
        self._task_note.value = f"label {label} on slices {span[0]}..{span[-1]} of axis {volume.axis} ({stops})"
        show_info(f"DeepCrop: {self._task_note.value}")

    def _write_object(
        self, target: Labels, propagated: PropagatedObject, before: dict[int, ObjectMask], changed: Iterable[int]
    ) -> None:
        """The changed slices written with data_setitem, within each mask's box, as one undo step."""
        with target.block_history():
            for indices, value in propagated.writes(target.data, before, changed, self._overwrite.value):
                target.data_setitem(indices, value, refresh=False)
        target.refresh()

    # ----- clicks ------------------------------------------------------------------------------------------
    def _click_at_world(self, position, positive: bool = True) -> bool:
        image = self._require_image()
        return image is not None and self._add_click(image.world_to_data(position), positive)

    def _add_click(self, position, positive: bool = True) -> bool:
        """Add a click at ``position`` (the image's data coordinates, all axes); False when refused."""
        image = self._require_image()
        if image is None:
            return False
        point = np.round(np.asarray(position, float)).astype(int)
        shape = _spatial_shape(image)
        if point.shape != (len(shape),) or (point < 0).any() or (point >= shape).any():
            show_warning(f"DeepCrop: the click {tuple(point.tolist())} is outside '{image.name}' {shape}")
            return False
        if not (self._check_view() and self._check_target(image)):
            return False
        if self.session.clicks and tuple(point[:-2]) != self.session.plane:
            show_warning("DeepCrop: the current object is on another slice: commit or discard it first")
            return False
        layer = self._ensure_layers(image)
        layer.feature_defaults = {"positive": positive}
        layer.add(point)  # its data event predicts
        layer.feature_defaults = {"positive": True}  # for points added in the layer's own "add" mode
        return True

    def _on_clicks_data(self, event) -> None:
        if event.action in ("added", "removed", "changed"):  # not the "-ing" events before each change
            self._sync_clicks()

    def _sync_clicks(self) -> None:
        """The clicks layer changed (a click added, deleted, moved): predict from the clicks it now holds."""
        layer = self._clicks_layer
        if not len(layer.data):
            self._reset_object()
            return
        self._generation += 1
        self._wanted = False
        points = np.round(layer.data).astype(int)
        positive = layer.features["positive"].to_numpy(bool)
        new_object = not self.session.clicks
        self.session.plane = tuple(points[0, :-2].tolist())
        pixels = points[:, -2:].tolist()
        clicks = tuple((r, c, int(p)) for (r, c), p in zip(pixels, positive, strict=True))
        if clicks[:1] != self.session.clicks[:1]:
            self.session.alternative = 0  # a new first click: the network's choice first
        self.session.clicks = clicks
        if new_object:
            self._start_correction(points[0])
        if (points[:, :-2] != points[0, :-2]).any():
            show_warning("DeepCrop: the clicks of one object must all be on one slice")
        elif not positive.any() and self.session.corrects is None:
            show_warning("DeepCrop: an object needs at least one positive click")
        else:
            self._wanted = True
            self._start_job()

    # ----- predictions -------------------------------------------------------------------------------------
    def _start_job(self) -> None:
        image = self._image.value
        if self._worker is not None or not self._wanted or image is None:
            return
        self._wanted = False
        clicks = self.session.clicks
        pixels, contrast_limits = self._job_image(image)
        job = _Job(
            generation=self._generation,
            object_id=self.session.object_id,
            clicks=clicks,
            image=pixels,
            contrast_limits=contrast_limits,
            prev=self.session.prev_mask(clicks),
            predictor=self.predictor,
            checkpoint=self._checkpoint_path(),
            device=self._device.value,
            settings=self._settings,
            snap_edges=self._snap.value,
            base_clicks=self.session.base_clicks,
            alternative=self.session.alternative,
        )
        self._worker = create_worker(_run, job, _connect={"returned": self._on_result})

    def _job_image(self, image: Image) -> tuple[Any, Any]:
        """The slice the clicks are on, of the image and of the extra channels chosen, with contrast limits."""
        stack, contrast_limits = self._stack(image)
        return read_slice(stack, self.session.plane), contrast_limits

    def _stack(self, image: Image) -> tuple[Any, Any]:
        """The image's array, or a list of the arrays of it and the extra channels chosen; contrast limits."""
        layers = [image, *(la for la in self._channels.value if la is not image and la in self._viewer.layers)]
        if len(layers) == 1:
            return _image_array(image), tuple(image.contrast_limits)
        return [_image_array(layer) for layer in layers], [tuple(layer.contrast_limits) for layer in layers]

    def _on_result(self, result: _Result) -> None:
        self._worker = None
        job = result.job
        loaded = result.predictor is not None and result.predictor is not self.predictor
        if loaded and job.settings == self._settings:
            self._use_predictor(result.predictor)
        if result.warning:
            show_warning(f"DeepCrop: {result.warning}")
        if result.mask is not None and job.object_id == self.session.object_id:
            self.session.remember(job.clicks, result.mask)
        if job.generation == self._generation:
            if result.error:
                show_error(result.error)
            else:
                self.session.mask = result.mask
                self._show_preview()
                if result.mask.alternatives > 1:  # a first click's
                    mask = result.mask
                    self._viewer.status = f"DeepCrop: mask {mask.alternative + 1} of {mask.alternatives} (N: the next)"
        self._start_job()  # newer clicks, if any

    def _use_predictor(self, predictor: DeepCropPredictor) -> None:
        self.predictor = predictor
        self._device_note.value = f"{self._checkpoint.value.name} on {predictor.device}"

    def _reset_object(self) -> None:
        self.session.reset()
        self._generation += 1
        self._wanted = False
        self._show_preview()

    # ----- layers ------------------------------------------------------------------------------------------
    def _ensure_layers(self, image: Image) -> Points:
        """The clicks layer for ``image`` (and the preview layer), created or given the image's transforms."""
        layers, transforms = self._viewer.layers, _transforms(image)
        if self._preview_layer not in layers or self._preview_layer.ndim != image.ndim:
            empty = np.zeros((1,) * image.ndim, np.uint8)
            self._preview_layer = self._add_layer(self._viewer.add_labels, empty, name=PREVIEW, opacity=0.6)
        if self._clicks_layer not in layers or self._clicks_layer.ndim != image.ndim:
            if self._clicks_layer in layers:
                layers.remove(self._clicks_layer)
            self._clicks_layer = self._add_layer(
                self._viewer.add_points,
                ndim=image.ndim,
                name=CLICKS,
                features={"positive": np.zeros(0, bool)},
                face_color="positive",
                face_color_cycle=POSITIVE_COLORS,
                border_color="white",
                size=max(3.0, max(_spatial_shape(image)[-2:]) / 100),
            )
            self._hook_clicks_layer(self._clicks_layer)
        for layer in (self._clicks_layer, self._preview_layer):
            for name, value in transforms.items():
                setattr(layer, name, value)
        return self._clicks_layer

    def _hook_clicks_layer(self, layer: Points) -> None:
        layer.events.data.connect(self._on_clicks_data)
        layer.mouse_drag_callbacks.append(self._on_mouse_drag)
        # layer keymaps take precedence over the viewer's, and work while the canvas has the focus
        layer.bind_key(KeyCode.Enter, lambda _: self.commit(), overwrite=True)
        layer.bind_key(KeyCode.Escape, lambda _: self.discard(), overwrite=True)
        layer.bind_key(KeyCode.KeyP, lambda _: self.propagate(), overwrite=True)
        layer.bind_key(KeyCode.KeyN, lambda _: self.other_mask(), overwrite=True)
        layer.bind_key(KeyMod.CtrlCmd | KeyCode.KeyZ, lambda _: self.undo(), overwrite=True)
        layer.bind_key(KeyMod.CtrlCmd | KeyMod.Shift | KeyCode.KeyZ, lambda _: self.redo(), overwrite=True)

    def _on_mouse_drag(self, layer: Points, event):
        """A click in pan/zoom mode (a drag pans) adds a click; with Shift or the right button, negative."""
        if not self._tool.value or layer.mode != "pan_zoom" or event.button not in (1, 2):
            return
        start = np.asarray(event.pos)
        yield
        while event.type == "mouse_move":
            if np.linalg.norm(np.asarray(event.pos) - start) < DRAG_PIXELS:
                event.handled = True  # no camera jitter from a click
            yield
        if np.linalg.norm(np.asarray(event.pos) - start) < DRAG_PIXELS:
            negative = event.button == 2 or "Shift" in event.modifiers
            self._click_at_world(event.position, positive=not negative)

    def _show_preview(self) -> None:
        """Show the current mask as a Labels layer of its bounding box, placed over the image's slice."""
        layer, mask, image = self._preview_layer, self.session.mask, self._image.value
        if layer not in self._viewer.layers or image is None:
            return
        if mask is None or mask.crop.size == 0:  # napari cannot show a layer of size 0 (nothing was found)
            layer.data = np.zeros((1,) * layer.ndim, np.uint8)
            return
        plane = self.session.plane
        offset = np.array([*plane, *mask.origin], float)
        linear = CompositeAffine(scale=image.scale, rotate=image.rotate, shear=image.shear, ndim=image.ndim)
        layer.translate = np.asarray(image.translate) + linear.linear_matrix @ offset
        layer.data = mask.crop.astype(np.uint8).reshape((1,) * len(plane) + mask.crop.shape)

    def _create_target(self, image: Image) -> Labels:
        name = f"{image.name} objects"
        data = np.zeros(_spatial_shape(image), np.int32)
        layer = self._add_layer(self._viewer.add_labels, data, name=name, **_transforms(image))
        layers = self._viewer.layers
        layers.move(layers.index(layer), layers.index(image) + 1)  # under the preview and the clicks
        self._target.value = layer
        return layer

    def _add_layer(self, add, *args, **kwargs):
        """Add a layer without taking the selection from the active one (whose keys the user is using)."""
        active = self._viewer.layers.selection.active
        layer = add(*args, **kwargs)
        if active is not None:
            self._viewer.layers.selection.active = active
        return layer

    # ----- the dataset navigator -----------------------------------------------------------------------------
    def open_dataset(self, path: str | Path) -> bool:
        """Open a folder of images or a COCO json in the navigator and show its first image."""
        try:
            dataset = AnnotationDataset.open(path)
            shown = dataset.image(), *dataset.labels()
        except (OSError, ValueError, KeyError) as exc:  # unreadable, no images, not COCO
            show_error(f"DeepCrop: cannot open {path}: {exc}")
            return False
        self.dataset = dataset
        self._folder = Path(path) if Path(path).is_dir() else Path(path).parent
        self._show_dataset_image(*shown)
        return True

    def next_image(self) -> bool:
        return self.go_to_image(self.dataset.index + 1) if self._require_dataset() else False

    def previous_image(self) -> bool:
        return self.go_to_image(self.dataset.index - 1) if self._require_dataset() else False

    def go_to_image(self, index: int) -> bool:
        """Keep the labels of the image shown, then show image ``index`` of the set (0-based) with its labels."""
        dataset = self._require_dataset()
        if dataset is None:
            return False
        if not 0 <= index < len(dataset):
            show_info(f"DeepCrop: {'last' if index >= len(dataset) else 'first'} image of the set")
            return False
        self._store_dataset_image()
        leaving = dataset.index
        dataset.go(index)
        try:
            shown = dataset.image(), *dataset.labels()
        except (OSError, ValueError) as exc:
            dataset.go(leaving)
            show_error(f"DeepCrop: cannot show image {index + 1}: {exc}")
            return False
        self._show_dataset_image(*shown)
        return True

    def _store_dataset_image(self) -> None:
        """Keep what the dataset's Labels layer holds for the image shown (unless the user removed the layer)."""
        labels = self._dataset_layers[1]
        if self.dataset is not None and labels in self._viewer.layers:
            self.dataset.store(labels.data, labels.features)

    def _show_dataset_image(self, pixels: np.ndarray, labels: np.ndarray, features: dict[str, list]) -> None:
        """Put the current image of the set and its labels into the two dataset layers (made when missing)."""
        self.discard()
        dataset, layers = self.dataset, self._viewer.layers
        item = dataset.current
        image_layer, labels_layer = self._dataset_layers
        old_shape = None if image_layer not in layers else _spatial_shape(image_layer)
        image_meta = {"coco": {"path": str(item.image)}} if isinstance(item.image, Path) else {}
        kept = {"categories": dataset.categories, "info": dataset.info, "licenses": dataset.licenses}
        labels_meta = {"coco": {**({"image": item.record} if item.record else {}), **kept}}
        features = {**features, "index": features["label"]} if "label" in features else features
        if image_layer in layers and image_layer.rgb == (pixels.ndim == 3):
            image_layer.data, image_layer.metadata = pixels, image_meta
            image_layer.reset_contrast_limits_range()
            image_layer.reset_contrast_limits()
        else:
            if image_layer in layers:
                layers.remove(image_layer)
            image_layer = self._add_layer(self._viewer.add_image, pixels, name=DATASET_IMAGE, metadata=image_meta)
        if labels_layer in layers:
            labels_layer.data, labels_layer.features, labels_layer.metadata = labels, features, labels_meta
            labels_layer._reset_history()  # napari would otherwise undo the last image's edits onto this one
        else:
            labels_layer = self._add_layer(
                self._viewer.add_labels, labels, name=DATASET_LABELS, features=features, metadata=labels_meta
            )
        self._dataset_layers = (image_layer, labels_layer)
        for layer in (labels_layer, self._preview_layer, self._clicks_layer):  # image, labels, then the tool's
            if layer in layers:
                layers.move(layers.index(layer), len(layers))
        self._image.value = image_layer
        self._target.value = labels_layer
        self._on_target_changed(labels_layer)
        self._dataset_note.value = dataset.title
        if old_shape != _spatial_shape(image_layer):
            self._viewer.reset_view()

    def _require_dataset(self) -> AnnotationDataset | None:
        if self.dataset is None:
            show_info("DeepCrop: no dataset open: Open folder / COCO… first")
        return self.dataset

    def _open_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self.native, "Open a folder of images", self._start_folder())
        if folder:
            self.open_dataset(folder)

    def _open_json_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self.native, "Open a COCO json", self._start_folder(), "COCO json (*.json)"
        )
        if path:
            self.open_dataset(path)

    # ----- export and fine-tuning ----------------------------------------------------------------------------
    def export_coco(self, folder: str | Path, overwrite: bool | None = None) -> bool:
        """Write ``annotations.json`` and the images into ``folder`` on a worker thread: the navigator's whole set
        if one is open, else the image and its Labels layer. ``overwrite=None``: ask before replacing an export.
        False when nothing was started."""
        dataset = self._annotations()
        overwrite = None if dataset is None else self._may_write(Path(folder), overwrite)
        if overwrite is None:
            return False
        annotated, total = len(dataset.annotated()), len(dataset)
        left_out = f" ({total - annotated} never opened are left out)" if annotated < total else ""

        def done(json_path: Path) -> None:
            self._folder = json_path.parent
            self._task_note.value = f"exported {annotated} image(s) to {json_path}"
            show_info(f"DeepCrop: exported {annotated} image(s) to {json_path}{left_out}")

        work = partial(_export, dataset, Path(folder), overwrite)
        return self._start_task("Exporting COCO", annotated, work, done)

    def fine_tune(self, folder: str | Path, steps: int | None = None, overwrite: bool | None = None) -> bool:
        """Export the annotations into ``folder``, fine-tune the current model on them for ``steps`` (default:
        the widget's) on a worker thread, then use the new model; the result reports the mean IoU on held-out
        objects before and after. Cancelling keeps the current model. False when nothing was started."""
        dataset = self._annotations()
        overwrite = None if dataset is None else self._may_write(Path(folder), overwrite)
        if overwrite is None:
            return False
        steps = steps or self._steps.value
        init = self._checkpoint_path()
        work = partial(_fine_tune, dataset, Path(folder), overwrite, init, steps, self._device.value)
        return self._start_task("Fine-tune", steps, work, partial(self._on_fine_tuned, init))

    def cancel_task(self) -> None:
        """Stop the running export, fine-tune or propagation at its next step; nothing of it is kept."""
        if self._task is not None:
            self._cancel_requested.set()
            self._task_note.value = "cancelling at the next step…"

    @property
    def task_running(self) -> bool:
        """An export, fine-tune or propagation is running."""
        return self._task is not None

    def _on_fine_tuned(self, init: Path | None, result: FinetuneResult) -> None:
        self.fine_tune_result = result
        self._folder = result.checkpoint.parent.parent
        previous = (init or default_checkpoint_path()).name
        self._checkpoint.value = result.checkpoint  # the next click loads it
        self._task_note.value = f"{result.summary}; now using {result.checkpoint}"
        worse = result.after["mean_iou"] < result.before["mean_iou"]
        advice = f" It did worse: set the checkpoint back to {previous} to undo." if worse else ""
        show_info(f"DeepCrop: fine-tuned: {result.summary}. Now using {result.checkpoint}.{advice}")

    def _annotations(self) -> AnnotationDataset | None:
        """What an export holds: a copy of the navigator's set, else the image with its target Labels layer."""
        if self.dataset is not None:
            self._store_dataset_image()
            return self.dataset.snapshot()
        image = self._require_image()
        if image is None or not self._check_target(image):
            return None
        target = self._target.value
        if target is None:
            show_warning("DeepCrop: nothing to export: commit objects into a Labels layer first")
            return None
        pixels = _image_array(image)
        if len(_spatial_shape(image)) != 2:
            show_warning(f"DeepCrop: COCO export takes 2D images; '{image.name}' is {image.ndim}D")
            return None
        path = image.metadata.get("coco", {}).get("path") or image.source.path
        source = image_source(path, pixels.shape)
        kept = target.metadata.get("coco", {})
        file_name = source.name if source else f"{_file_stem(image.name)}.png"
        try:
            image = source if source else np.asarray(pixels)
            return AnnotationDataset.single(image, file_name, target.data, target.features, kept.get("image"), kept)
        except ValueError as exc:
            show_error(f"DeepCrop: {exc}")
            return None

    def _may_write(self, folder: Path, overwrite: bool | None) -> bool | None:
        """The overwrite flag to export with; None when an export is there and is not to be replaced."""
        json_path = folder / ANNOTATIONS_JSON
        if json_path.exists():
            if overwrite is None:
                overwrite = self._ask_overwrite(json_path)
            if not overwrite:
                show_info(f"DeepCrop: {json_path} exists and was kept: nothing written")
                return None
        return bool(overwrite)

    def _start_task(
        self, title: str, total: int, work: Callable[[Report], Any], done: Callable,
        cancelled: str = "cancelled; the model in use is unchanged",
    ) -> bool:  # fmt: skip
        if self._task is not None:
            show_warning("DeepCrop: a task (export, fine-tune or propagation) is running: wait for it, or cancel it")
            return False
        self._cancel_requested.clear()
        bar = cancelable_progress(total=total, desc=title)
        self._progress = bar
        self._task_note.value = title
        self._cancel.enabled = True

        def report(description: str, value: int) -> None:  # on the worker thread
            if self._cancel_requested.is_set() or bar.is_canceled:  # our button, or napari's activity dock
                raise _Cancelled
            self._relay.report.emit(bar, description, value)

        finished = partial(self._task_done, done, cancelled)
        self._task = create_worker(_run_task, work, report, _connect={"returned": finished})
        return True

    def _show_progress(self, bar: cancelable_progress, description: str, value: int) -> None:
        if bar is not self._progress:  # a late report of a task that has finished
            return
        total = f" {value} / {bar.total}" if description.endswith("training") else ""
        self._task_note.value = f"{description}{total}"
        # napari's progress bar widget can process events while it redraws, so the task may finish (and write
        # its own note) inside set_description: the note is written first and the bar updated only while live
        bar.set_description(description)
        if bar is self._progress:
            bar.update(value - bar.n)

    def _task_done(self, done: Callable, cancelled: str, outcome: _Outcome) -> None:
        self._task, bar, self._progress = None, self._progress, None
        bar.close()
        self._cancel.enabled = False
        if outcome.cancelled:
            self._task_note.value = "cancelled: nothing kept"
            show_info(f"DeepCrop: {cancelled}")
        elif outcome.error:
            self._task_note.value = "failed (see the notification)"
            show_error(outcome.error)
        else:
            done(outcome.value)

    def _export_clicked(self) -> None:
        folder = self._ask_folder("Export COCO: choose the folder for annotations.json and the images")
        if folder is not None:
            self.export_coco(folder)

    def _fine_tune_clicked(self) -> None:
        folder = self._ask_folder("Fine-tune: choose the folder to export to (the new model goes there too)")
        if folder is not None:
            self.fine_tune(folder)

    # ----- dialogs: the buttons' only; tests replace them ---------------------------------------------------
    def _ask_folder(self, title: str) -> Path | None:
        folder = QFileDialog.getExistingDirectory(self.native, title, self._start_folder())
        return Path(folder) if folder else None

    def _ask_overwrite(self, json_path: Path) -> bool:
        answer = QMessageBox.question(
            self.native,
            "Replace the export?",
            f"{json_path} exists. Replace it?\n\nImages already in the folder are kept (never replaced by others).",
        )
        return answer == QMessageBox.StandardButton.Yes

    def _start_folder(self) -> str:
        return str(self._folder or Path.home())

    # ----- settings ----------------------------------------------------------------------------------------
    def reset_choices(self, *_: Any) -> None:
        """Refresh the layer lists only: resetting the category list would drop what the user typed."""
        self._image.reset_choices()
        self._channels.reset_choices()
        self._target.reset_choices()

    def _image_choices(self, _widget) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _channel_choices(self, _widget) -> list[tuple[str, Image]]:
        """Other single-channel image layers of the image's shape (and transforms): its other channels."""
        image = self._image.value
        if image is None or image.rgb:
            return []
        shape = _image_array(image).shape
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image) and layer is not image and not layer.rgb
            and _image_array(layer).shape == shape and _same_placement(layer, image)
        ]  # fmt: skip

    def _on_channels_changed(self, chosen: list) -> None:
        if len(chosen) > 2:
            show_warning(
                f"DeepCrop: the network sees three channels: the image and at most two more, not {len(chosen)}; "
                f"keeping {chosen[0].name} and {chosen[1].name}"
            )
            self._channels.value = chosen[:2]
            return
        if self.session.clicks:  # the current object, segmented again with the channels now chosen
            self.session.forget_masks()
            self._generation += 1
            self._wanted = True
            self._start_job()

    def _target_choices(self, _widget) -> list[tuple[str, Labels | None]]:
        labels = [layer for layer in self._viewer.layers if isinstance(layer, Labels)]
        return [(NEW_LABELS, None)] + [(la.name, la) for la in labels if la is not self._preview_layer]

    def _on_image_changed(self, *_: Any) -> None:
        self.discard()
        self._channels.reset_choices()
        image = self._image.value
        if image is None:
            return
        target = self._target.value
        if target is None or target.data.shape != _spatial_shape(image):
            choices = [c for c in self._target.choices if c is not None]
            self._target.value = next((c for c in choices if c.data.shape == _spatial_shape(image)), None)
        if self._tool.value:
            self._on_tool_changed(True)

    def _on_target_changed(self, target: Labels | None) -> None:
        """Offer the categories the target layer already uses."""
        if target is not None and "category" in target.features:
            used = map(str, target.features["category"].dropna().unique())
            known = [c for c in used if c not in self._category.choices]
            if known:
                text = self._category.native.currentText()
                self._category.choices = [*self._category.choices, *known]
                self._category.native.setCurrentText(text)

    def _on_layer_removed(self, event) -> None:
        if event.value is self._clicks_layer:  # the user deleted the clicks: the object goes with them
            self._reset_object()

    def _on_tool_changed(self, on: bool) -> None:
        if not on:
            return
        image = self._require_image()
        if image is None:
            self._tool.value = False
            return
        layer = self._ensure_layers(image)
        layer.mode = "pan_zoom"
        self._viewer.layers.selection.active = layer

    def _on_model_changed(self, *_: Any) -> None:
        self._settings += 1
        self.predictor = None
        name, device = self._checkpoint.value.name, self._device.value
        self._device_note.value = f"{name}, loads at the first click ({device})"

    def _checkpoint_path(self) -> Path | None:
        path = Path(self._checkpoint.value)
        return None if str(path) in ("", ".") or path == default_checkpoint_path() else path

    def _category_name(self) -> str:
        name = self._category.native.currentText().strip() or DEFAULT_CATEGORY
        if name not in self._category.choices:
            self._category.choices = [*self._category.choices, name]
        self._category.value = name
        return name

    # ----- checks: a clear notification, and nothing changes ------------------------------------------------
    def _require_image(self) -> Image | None:
        image = self._image.value
        if image is None:
            show_warning("DeepCrop: no image layer: open an image first (or File > Open Sample > DeepCrop)")
        return image

    def _check_target(self, image: Image) -> bool:
        target, shape = self._target.value, _spatial_shape(image)
        if target is not None and tuple(target.data.shape) != shape:
            show_warning(
                f"DeepCrop: Labels layer '{target.name}' has shape {tuple(target.data.shape)}, but image "
                f"'{image.name}' has {shape}: pick a Labels layer of the image's shape, or '{NEW_LABELS}'"
            )
            return False
        return True

    def _check_view(self) -> bool:
        dims = self._viewer.dims
        if dims.ndisplay != 2 or tuple(dims.order[-2:]) != (dims.ndim - 2, dims.ndim - 1):
            show_warning("DeepCrop: click in the 2D view, with the image's last two axes shown")
            return False
        return True


def _same_placement(a: Image, b: Image) -> bool:
    """Whether two layers' pixels lie on the same world positions (channels of one image do)."""
    return all(
        np.allclose(x, y)
        for x, y in ((a.scale, b.scale), (a.translate, b.translate), (a.affine.affine_matrix, b.affine.affine_matrix))
    )


def _set_category(layer: Labels, label: int, category: str) -> None:
    """Record ``label``'s category in the layer's features: "label", "category" ("index" for napari)."""
    table = layer.features
    if "label" not in table:  # napari's convention without an "index" column: row i is label i
        table = table.assign(label=table["index"] if "index" in table else np.arange(len(table)))
    row = pd.DataFrame({"label": [label], "category": [category]})
    table = table[table["label"] != label]
    table = row if table.empty else pd.concat([table, row], ignore_index=True)
    layer.features = table.assign(index=table["label"])
