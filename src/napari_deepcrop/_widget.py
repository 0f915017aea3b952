"""DeepCropWidget: click-assisted annotation in napari, a thin layer over :mod:`napari_deepcrop.session`.

Clicks live in a Points layer ("DeepCrop clicks", in the image's data coordinates), the current object in a
small Labels layer ("DeepCrop preview", the mask's bounding box only), and committed objects in the target
Labels layer, written with ``Labels.data_setitem`` so napari's undo works. Predictions run on a worker thread,
one at a time: clicks made while one runs are predicted together as soon as it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from app_model.types import KeyCode, KeyMod
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.transforms import CompositeAffine
from qtpy.QtWidgets import QComboBox

from . import _llvm_guard  # noqa: F401  (before the modules that import torch)
from .checkpoint import default_checkpoint_path
from .predictor import DeepCropPredictor
from .session import (
    AnnotationSession,
    Click,
    ObjectMask,
    commit_indices,
    load_predictor,
    next_label_id,
    predict_object,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Points

CLICKS = "DeepCrop clicks"
PREVIEW = "DeepCrop preview"
NEW_LABELS = "(new Labels layer)"
DEFAULT_CATEGORY = "object"
DRAG_PIXELS = 5  # a press and release closer than this on the canvas is a click, farther a pan
POSITIVE_COLORS = {True: "lime", False: "magenta"}
SHORTCUTS = """<b>Shortcuts</b> (click tool on, clicks layer selected)<br>
Click: positive click (add to the object)<br>
Shift+click or right click: negative click (remove)<br>
Enter: commit the object &nbsp; Escape: discard it<br>
Ctrl+Z: remove the last click, or undo the last commit<br>
S, select clicks, Delete: remove them; Z: back to clicking"""


@dataclass(frozen=True)
class _Job:
    """Everything one prediction needs, copied on the UI thread so the worker shares no mutable state."""

    generation: int
    object_id: int
    clicks: tuple[Click, ...]
    image: Any  # the 2D slice, (H, W) or (H, W, C)
    contrast_limits: tuple[float, float]
    prev: ObjectMask | None
    predictor: DeepCropPredictor | None  # None: load from checkpoint/device first
    checkpoint: Path | None
    device: str
    settings: int


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
        mask = predict_object(predictor, job.image, job.clicks, job.prev, job.contrast_limits)
        return _Result(job, predictor, mask=mask, warning=warning)
    except Exception as exc:  # shown as a notification on the UI thread
        return _Result(job, predictor, error=f"DeepCrop: {exc}", warning=warning)


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

        self._image = ComboBox(label="Image", choices=self._image_choices)
        self._target = ComboBox(label="Labels", choices=self._target_choices)
        self._category = ComboBox(label="Category", choices=[DEFAULT_CATEGORY])
        self._category.native.setEditable(True)
        self._category.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self._checkpoint = FileEdit(label="Checkpoint", filter="*.pt", value=default_checkpoint_path())
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda"])
        self._device_note = Label(label="Model")
        self._tool = CheckBox(text="Click tool")
        self._overwrite = CheckBox(text="Overwrite other objects")
        commit = PushButton(text="Commit (Enter)")
        discard = PushButton(text="Discard (Escape)")
        # Whole-layer actions (export, training) add their buttons to this row.
        self.actions = Container(layout="horizontal", labels=False)
        buttons = Container(widgets=[commit, discard], layout="horizontal", labels=False)
        self.extend([
            self._image, self._target, self._category, self._checkpoint, self._device, self._device_note,
            self._tool, self._overwrite, buttons, self.actions, Label(value=SHORTCUTS),
        ])  # fmt: skip

        self._image.changed.connect(self._on_image_changed)
        self._target.changed.connect(self._on_target_changed)
        self._checkpoint.changed.connect(self._on_model_changed)
        self._device.changed.connect(self._on_model_changed)
        self._tool.changed.connect(self._on_tool_changed)
        commit.clicked.connect(self.commit)
        discard.clicked.connect(self.discard)
        for event in ("inserted", "removed", "renamed"):
            getattr(viewer.layers.events, event).connect(self.reset_choices)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self.reset_choices()
        self._on_model_changed()
        self._on_image_changed()

    # ----- the user's actions -----------------------------------------------------------------------------
    def commit(self) -> None:
        """Write the current object into the target Labels layer under the next free label id."""
        mask, image = self.session.mask, self._require_image()
        if image is None:
            return
        if mask is None or not mask.crop.any():
            show_info("DeepCrop: nothing to commit yet: click on an object first")
            return
        if not self._check_target(image):
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
        self.discard()

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

    @property
    def busy(self) -> bool:
        """A prediction is running."""
        return self._worker is not None

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
        self.session.plane = tuple(points[0, :-2].tolist())
        pixels = points[:, -2:].tolist()
        self.session.clicks = tuple((r, c, int(p)) for (r, c), p in zip(pixels, positive, strict=True))
        if (points[:, :-2] != points[0, :-2]).any():
            show_warning("DeepCrop: the clicks of one object must all be on one slice")
        elif not positive.any():
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
        job = _Job(
            generation=self._generation,
            object_id=self.session.object_id,
            clicks=clicks,
            image=_image_array(image)[self.session.plane],
            contrast_limits=tuple(image.contrast_limits),
            prev=self.session.prev_mask(clicks),
            predictor=self.predictor,
            checkpoint=self._checkpoint_path(),
            device=self._device.value,
            settings=self._settings,
        )
        self._worker = create_worker(_run, job, _connect={"returned": self._on_result})

    def _on_result(self, result: _Result) -> None:
        self._worker = None
        job = result.job
        loaded = result.predictor is not None and result.predictor is not self.predictor
        if loaded and job.settings == self._settings:
            self.predictor = result.predictor
            self._device_note.value = f"{self._checkpoint.value.name} on {self.predictor.device}"
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
        self._start_job()  # newer clicks, if any

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
        layer.bind_key(KeyMod.CtrlCmd | KeyCode.KeyZ, lambda _: self.undo(), overwrite=True)

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
        if mask is None:
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

    # ----- settings ----------------------------------------------------------------------------------------
    def reset_choices(self, *_: Any) -> None:
        """Refresh the layer lists only: resetting the category list would drop what the user typed."""
        self._image.reset_choices()
        self._target.reset_choices()

    def _image_choices(self, _widget) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _target_choices(self, _widget) -> list[tuple[str, Labels | None]]:
        labels = [layer for layer in self._viewer.layers if isinstance(layer, Labels)]
        return [(NEW_LABELS, None)] + [(la.name, la) for la in labels if la is not self._preview_layer]

    def _on_image_changed(self, *_: Any) -> None:
        self.discard()
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


def _set_category(layer: Labels, label: int, category: str) -> None:
    """Record ``label``'s category in the layer's features: "label", "category" ("index" for napari)."""
    table = layer.features
    if "label" not in table:  # napari's convention without an "index" column: row i is label i
        table = table.assign(label=table["index"] if "index" in table else np.arange(len(table)))
    row = pd.DataFrame({"label": [label], "category": [category]})
    table = table[table["label"] != label]
    table = row if table.empty else pd.concat([table, row], ignore_index=True)
    layer.features = table.assign(index=table["label"])
