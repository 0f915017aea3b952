"""DeepCropWidget in a real napari viewer: clicks, previews, commits, undo, keys, stacks, transforms, errors.

A DiskPredictor (conftest) gives known masks; the last test runs the bundled model and checks only types.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
from skimage import data

from napari_deepcrop._widget import CLICKS, PREVIEW
from napari_deepcrop.session import ObjectMask

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)


def click(widget, qtbot, position, positive=True):
    assert widget._add_click(position, positive)
    wait(widget, qtbot)


def wait(widget, qtbot, timeout=5000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def press(viewer, key):
    """A key pressed on the canvas, through napari's keymap chain (the active layer's, then the viewer's)."""
    viewer.window._qt_viewer._key_map_handler.press_key(key)


def preview_mask(viewer, shape):
    """The preview layer pasted into an array of ``shape`` (the image's data pixels)."""
    image, preview = viewer.layers["image"], viewer.layers[PREVIEW]
    offset = np.round((np.asarray(preview.translate) - image.translate) / image.scale).astype(int)
    full = np.zeros(shape, bool)
    full[tuple(slice(o, o + n) for o, n in zip(offset, preview.data.shape, strict=True))] = preview.data > 0
    return full


def test_click_shows_preview(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    clicks = viewer.layers[CLICKS]
    np.testing.assert_array_equal(clicks.data, [[30, 40]])
    assert clicks.features["positive"].tolist() == [True]
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), predictor.disk((30, 40)))
    assert predictor.images == [(IMAGE.shape, np.uint8, tuple(viewer.layers["image"].contrast_limits))]
    assert viewer.layers.selection.active is not viewer.layers[PREVIEW]
    assert viewer.layers[PREVIEW] not in widget._target.choices  # the preview is never a target


@dataclass
class MouseEvent:
    """What napari's mouse callbacks read of a vispy event (as napari's own tests simulate them)."""

    type: str
    position: tuple  # world coordinates
    pos: tuple = (0, 0)  # canvas pixels
    button: int = 1
    modifiers: list = field(default_factory=list)
    is_dragging: bool = False
    handled: bool = False


def mouse_click(layer, position, drag_to=None, **kwargs):
    """Press and release at ``position``; with ``drag_to`` (canvas pixels), move the mouse in between."""
    from napari.utils import interactions
    from napari.utils._proxies import ReadOnlyWrapper  # how napari's tests wrap simulated events

    def event(kind, pos=(0, 0), **more):
        return ReadOnlyWrapper(MouseEvent(kind, position, pos, **kwargs, **more), exceptions=("handled",))

    interactions.mouse_press_callbacks(layer, event("mouse_press"))
    end = (0, 0) if drag_to is None else drag_to
    if drag_to is not None:
        interactions.mouse_move_callbacks(layer, event("mouse_move", end, is_dragging=True))
    interactions.mouse_release_callbacks(layer, event("mouse_release", end))


def test_canvas_clicks_with_the_tool(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    widget._tool.value = True
    clicks = viewer.layers[CLICKS]
    mouse_click(clicks, (30, 40))
    mouse_click(clicks, (30, 45), modifiers=["Shift"])
    mouse_click(clicks, (25, 40), button=2)
    mouse_click(clicks, (10, 10), drag_to=(20, 0))  # a drag pans: no click
    wait(widget, qtbot)
    np.testing.assert_array_equal(clicks.data, [[30, 40], [30, 45], [25, 40]])
    assert clicks.features["positive"].tolist() == [True, False, False]
    widget._tool.value = False
    mouse_click(clicks, (10, 10))
    assert len(clicks.data) == 3


def test_commit_writes_next_id_and_undo_removes_it(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    widget.commit()
    labels = widget._target.value
    assert labels.name == "image objects" and labels.data.shape == IMAGE.shape
    np.testing.assert_array_equal(labels.data, predictor.disk((30, 40)).astype(int))
    assert labels.features[["label", "category"]].to_dict("list") == {"label": [1], "category": ["object"]}
    assert len(viewer.layers[CLICKS].data) == 0 and not viewer.layers[PREVIEW].data.any()
    assert widget.session.mask is None
    labels.undo()  # napari's Ctrl+Z on the Labels layer
    assert not labels.data.any()


def test_second_object_gets_next_id_and_keeps_the_first(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    for center in ((30, 40), (30, 48)):
        click(widget, qtbot, center)
        widget.commit()
    first, second, third = (predictor.disk(c) for c in ((30, 40), (30, 48), (30, 32)))
    labels = widget._target.value.data
    np.testing.assert_array_equal(labels == 1, first)
    np.testing.assert_array_equal(labels == 2, second & ~first)
    widget._overwrite.value = True
    click(widget, qtbot, (30, 32))
    widget.commit()
    np.testing.assert_array_equal(labels == 3, third)
    np.testing.assert_array_equal(labels == 1, first & ~third)


def test_category_goes_into_features(make_widget, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    widget._category.native.setCurrentText("cup")
    click(widget, qtbot, (30, 40))
    widget.commit()
    click(widget, qtbot, (10, 10))
    widget._category.value = "object"
    widget.commit()
    features = widget._target.value.features
    assert features[["label", "category"]].to_dict("list") == {"label": [1, 2], "category": ["cup", "object"]}
    assert "cup" in widget._category.choices


def test_keys_on_the_clicks_layer(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    widget._tool.value = True
    clicks = viewer.layers[CLICKS]
    assert viewer.layers.selection.active is clicks and clicks.mode == "pan_zoom"
    click(widget, qtbot, (30, 40))
    press(viewer, "Escape")  # discards
    assert len(clicks.data) == 0 and widget.session.mask is None and not viewer.layers[PREVIEW].data.any()
    assert len(viewer.layers) == 3  # image, preview, clicks: nothing committed
    click(widget, qtbot, (30, 40))
    press(viewer, "Enter")  # commits
    labels = widget._target.value
    assert (labels.data == 1).sum() == predictor.disk((30, 40)).sum()
    assert viewer.layers.selection.active is clicks  # creating the Labels layer kept the tool's layer active
    click(widget, qtbot, (10, 10))
    press(viewer, "Control-Z")  # removes the click
    wait(widget, qtbot)
    assert len(clicks.data) == 0 and (labels.data == 1).any()
    press(viewer, "Control-Z")  # no clicks left: undoes the commit
    assert not labels.data.any()


def test_n_cycles_the_first_clicks_masks_and_a_further_click_refines_the_one_shown(
    make_widget, predictor, qtbot, notifications
):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    widget._tool.value = True
    click(widget, qtbot, (30, 40))
    assert viewer.status == "DeepCrop: mask 1 of 3 (N: the next)"
    shown = []
    for _ in range(3):
        press(viewer, "n")
        wait(widget, qtbot)
        shown.append(preview_mask(viewer, IMAGE.shape).sum())
    radius = predictor.radius
    assert shown == [predictor.disk((30, 40), 2 * radius).sum(), predictor.disk((30, 40), 3 * radius).sum(),
                     predictor.disk((30, 40)).sum()]  # fmt: skip
    assert [c["alternative"] for c in predictor.calls] == [0, 1, 2, 0]
    assert viewer.status == "DeepCrop: mask 1 of 3 (N: the next)"
    press(viewer, "n")
    wait(widget, qtbot)
    click(widget, qtbot, (30, 50), positive=False)  # refines the second mask, the one shown
    assert predictor.calls[-1]["alternative"] == 0
    np.testing.assert_array_equal(predictor.calls[-1]["prev_mask"], predictor.disk((30, 40), 2 * radius))
    calls = len(predictor.calls)
    assert not widget.other_mask()  # a refined mask has no alternatives
    assert len(predictor.calls) == calls and "for an object's first click only" in notifications[-1]
    press(viewer, "Control-Z")  # the negative click removed: the first click's chosen mask again
    wait(widget, qtbot)
    assert predictor.calls[-1]["alternative"] == 1
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), predictor.disk((30, 40), 2 * radius))
    press(viewer, "Enter")
    assert (widget._target.value.data == 1).sum() == predictor.disk((30, 40), 2 * radius).sum()
    click(widget, qtbot, (10, 10))  # a new object starts from the network's choice
    assert predictor.calls[-1]["alternative"] == 0


def test_negative_click_passes_label_0_and_previous_mask(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    click(widget, qtbot, (30, 45), positive=False)
    call = predictor.calls[-1]
    np.testing.assert_array_equal(call["points"], [[30, 40], [30, 45]])
    np.testing.assert_array_equal(call["labels"], [1, 0])
    np.testing.assert_array_equal(call["prev_mask"], predictor.disk((30, 40)))
    clicks = viewer.layers[CLICKS]
    assert clicks.features["positive"].tolist() == [True, False]
    assert not np.allclose(clicks.face_color[0], clicks.face_color[1])
    expected = predictor.disk((30, 40)) & ~predictor.disk((30, 45))
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), expected)


def test_deleting_a_click_predicts_from_the_rest(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    click(widget, qtbot, (30, 46), positive=False)
    click(widget, qtbot, (24, 40), positive=False)
    clicks = viewer.layers[CLICKS]
    clicks.selected_data = {1}
    clicks.remove_selected()  # select + Delete
    wait(widget, qtbot)
    call = predictor.calls[-1]
    assert len(predictor.calls) == 4
    np.testing.assert_array_equal(call["points"], [[30, 40], [24, 40]])
    # refined from what the first click gave, not from the mask the removed click shaped
    np.testing.assert_array_equal(call["prev_mask"], predictor.disk((30, 40)))
    expected = predictor.disk((30, 40)) & ~predictor.disk((24, 40))
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), expected)


def test_newer_click_supersedes_a_pending_one(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    predictor.gate = threading.Event()
    for position, positive in (((30, 40), True), ((30, 46), False), ((24, 40), False)):
        assert widget._add_click(position, positive)
    predictor.gate.set()
    wait(widget, qtbot)
    assert len(predictor.calls) == 2  # the first click, then the two made while it ran, together
    np.testing.assert_array_equal(predictor.calls[1]["labels"], [1, 0, 0])
    np.testing.assert_array_equal(predictor.calls[1]["prev_mask"], predictor.disk((30, 40)))
    expected = predictor.disk((30, 40)) & ~predictor.disk((30, 46)) & ~predictor.disk((24, 40))
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), expected)


def test_discard_ignores_a_result_still_running(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    predictor.gate = threading.Event()
    assert widget._add_click((30, 40))
    widget.discard()
    predictor.gate.set()
    wait(widget, qtbot)
    assert widget.session.mask is None and not viewer.layers[PREVIEW].data.any()


def test_stack_click_writes_only_that_slice(make_widget, predictor, qtbot, notifications):
    stack = np.stack([IMAGE] * 4)
    viewer, widget = make_widget((stack, {"name": "image"}))
    click(widget, qtbot, (2, 30, 40))
    assert predictor.images[-1][0] == IMAGE.shape  # the slice, not the stack
    expected = np.zeros(stack.shape, bool)
    expected[2] = predictor.disk((30, 40))
    np.testing.assert_array_equal(preview_mask(viewer, stack.shape), expected)
    assert not widget._add_click((1, 30, 40))  # another slice while this object is open
    assert "another slice" in notifications[-1]
    widget.commit()
    labels = widget._target.value.data
    assert labels.shape == stack.shape
    np.testing.assert_array_equal(labels > 0, expected)


def test_clicks_respect_scale_and_translate(make_widget, predictor, qtbot):
    scale, translate = (2.0, 3.0), (10.0, 20.0)
    viewer, widget = make_widget((IMAGE, {"name": "image", "scale": scale, "translate": translate}))
    assert widget._click_at_world((10 + 2 * 30, 20 + 3 * 40))
    wait(widget, qtbot)
    np.testing.assert_array_equal(predictor.calls[-1]["points"], [[30, 40]])
    clicks = viewer.layers[CLICKS]
    np.testing.assert_array_equal(clicks.data, [[30, 40]])
    assert tuple(clicks.scale) == scale and tuple(clicks.translate) == translate
    np.testing.assert_array_equal(preview_mask(viewer, IMAGE.shape), predictor.disk((30, 40)))
    widget.commit()
    labels = widget._target.value
    assert tuple(labels.scale) == scale and tuple(labels.translate) == translate
    np.testing.assert_array_equal(labels.data > 0, predictor.disk((30, 40)))


def test_rgb_image_and_its_contrast_limits(make_widget, predictor, qtbot):
    rgb = np.stack([IMAGE] * 3, axis=-1)
    viewer, widget = make_widget((rgb, {"name": "image", "contrast_limits": (10, 200)}))
    click(widget, qtbot, (30, 40))
    assert predictor.images[-1] == (rgb.shape, np.uint8, (10.0, 200.0))
    widget.commit()
    assert widget._target.value.data.shape == IMAGE.shape


def test_no_image_layer_notifies_and_changes_nothing(make_napari_viewer, notifications):
    from napari_deepcrop._widget import DeepCropWidget

    viewer = make_napari_viewer()
    widget = DeepCropWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert not widget._add_click((3, 3))
    widget._tool.value = True
    widget.commit()
    assert len(viewer.layers) == 0 and not widget._tool.value and not widget.busy
    assert notifications and all("no image layer" in message for message in notifications)


@pytest.mark.parametrize("position", [(64, 10), (-1, 10), (10, 80), (1, 2, 3)])
def test_click_outside_the_image_is_refused(make_widget, predictor, notifications, position):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    assert not widget._add_click(position)
    assert "outside" in notifications[-1] and len(viewer.layers) == 1 and not predictor.calls


def test_labels_of_another_shape_are_refused(make_widget, predictor, notifications):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    other = viewer.add_labels(np.zeros((10, 10), np.int32), name="other")
    assert widget._target.value is None  # not picked by itself: its shape does not match
    widget._target.value = other
    assert not widget._add_click((30, 40))
    assert "shape" in notifications[-1] and not predictor.calls and CLICKS not in viewer.layers


def test_a_labels_layer_of_the_image_shape_is_picked(make_widget):
    viewer, widget = make_widget((IMAGE, {"name": "image"}), (IMAGE[:10, :10], {"name": "small"}))
    small = viewer.add_labels(np.zeros((10, 10), np.int32), name="small labels")
    mine = viewer.add_labels(np.zeros(IMAGE.shape, np.int32), name="mine")
    widget._image.value = viewer.layers["small"]
    assert widget._target.value is small
    widget._image.value = viewer.layers["image"]
    assert widget._target.value is mine


def test_prediction_errors_become_notifications(make_widget, predictor, qtbot, notifications):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    predictor.error = ValueError("the model is unhappy")
    click(widget, qtbot, (30, 40))
    assert any("the model is unhappy" in message for message in notifications)
    assert widget.session.mask is None and not viewer.layers[PREVIEW].data.any()


def test_opened_from_the_plugin_menu(make_napari_viewer, qtbot):
    """napari builds the widget from the manifest (handing it a proxy of the viewer) and the sample opens."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-deepcrop", "coins")
    _, widget = viewer.window.add_plugin_dock_widget("napari-deepcrop", "DeepCrop click segmentation")
    widget._tool.value = True
    assert widget._image.value is viewer.layers["coins"]
    assert viewer.layers.selection.active is viewer.layers[CLICKS]


def test_layer_removed_by_the_user_ends_the_object(make_widget, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    viewer.layers.remove(CLICKS)
    assert widget.session.mask is None and not viewer.layers[PREVIEW].data.any()
    click(widget, qtbot, (10, 10))  # a new clicks layer, a new object
    assert len(viewer.layers[CLICKS].data) == 1


OPENGL_THEN_WIDGET = """
from qtpy.QtGui import QOffscreenSurface, QOpenGLContext
from qtpy.QtWidgets import QApplication
app = QApplication([])
context, surface = QOpenGLContext(), QOffscreenSurface()
context.create(), surface.create(), context.makeCurrent(surface)
import napari_deepcrop._widget
"""


def test_widget_imports_torch_safely_after_opengl():
    """As napari opens it: after the canvas's OpenGL (Mesa's libLLVM), importing torch (triton) segfaulted."""
    result = subprocess.run([sys.executable, "-c", OPENGL_THEN_WIDGET], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_end_to_end_with_the_bundled_model(make_widget, qtbot):
    viewer, widget = make_widget((data.coffee(), {"name": "image"}))
    widget.predictor = None  # load the bundled checkpoint, as a user would
    widget._device.value = "cpu"
    click(widget, qtbot, (200, 300))
    wait(widget, qtbot, timeout=120_000)
    mask = widget.session.mask
    assert isinstance(mask, ObjectMask) and mask.crop.dtype == bool and mask.shape == (400, 600)
    assert widget.predictor is not None and "cpu" in widget._device_note.value
    preview = viewer.layers[PREVIEW]
    assert preview.data.dtype == np.uint8 and preview.data.shape == mask.crop.shape
    if mask.crop.any():  # the placeholder model may predict nothing; the plumbing is what is tested
        widget.commit()
        labels = widget._target.value
        assert labels.data.shape == (400, 600) and labels.data.max() == 1


def test_channels_of_a_multichannel_image_go_to_the_network_together(make_widget, predictor, qtbot, notifications):
    """napari's channel_axis splits a microscopy image into one layer per channel: the '+ channels' choice adds
    up to two of them, each with its own contrast limits; RGB images and other shapes are not offered."""

    rng = np.random.default_rng(4)
    channels = rng.integers(0, 4000, (4, 64, 80), dtype=np.uint16)
    viewer, widget = make_widget()
    viewer.add_image(channels, channel_axis=0, name=["dapi", "gfp", "rfp", "cy5"], contrast_limits=[
        (0, 4000), (100, 3000), (200, 2000), (0, 1000)])  # fmt: skip
    viewer.add_image(np.stack([IMAGE] * 3, axis=-1), name="rgb")
    viewer.add_image(rng.random((32, 32)), name="small")
    widget._image.value = viewer.layers["dapi"]
    assert [layer.name for layer in widget._channels.choices] == ["gfp", "rfp", "cy5"]

    click(widget, qtbot, (30, 40))  # no channel chosen: the image alone
    assert predictor.images[-1] == ((64, 80), np.uint16, (0.0, 4000.0))
    widget._channels.value = [viewer.layers["gfp"], viewer.layers["rfp"]]
    wait(widget, qtbot)  # the current object is segmented again with the channels now chosen
    assert predictor.images[-1] == ((64, 80, 3), np.uint16, [(0.0, 4000.0), (100.0, 3000.0), (200.0, 2000.0)])
    assert len(predictor.calls) == 2 and predictor.calls[-1]["prev_mask"] is None
    click(widget, qtbot, (10, 10), positive=False)
    assert predictor.images[-1][0] == (64, 80, 3) and predictor.calls[-1]["prev_mask"] is not None

    widget._channels.value = [viewer.layers[name] for name in ("gfp", "rfp", "cy5")]
    assert "at most two more" in notifications[-1]
    assert [layer.name for layer in widget._channels.value] == ["gfp", "rfp"]

    widget._image.value = viewer.layers["rgb"]
    assert widget._channels.choices == () and widget._channels.value == []


def test_channel_stack_reaches_the_real_predictor(make_widget, qtbot):
    """With the bundled model, two channels with very different ranges give a mask (no dtype or shape error)."""
    from napari_deepcrop.session import load_predictor

    rng = np.random.default_rng(5)
    nuclei = rng.integers(0, 60000, (96, 96), dtype=np.uint16)
    membrane = rng.random((96, 96)).astype(np.float32)
    viewer, widget = make_widget((nuclei, {"name": "image"}), (membrane, {"name": "membrane"}))
    widget.predictor, _ = load_predictor(None, "cpu")
    widget._image.value = viewer.layers["image"]
    widget._channels.value = [viewer.layers["membrane"]]
    click(widget, qtbot, (48, 48))
    assert isinstance(widget.session.mask, ObjectMask) and widget.session.mask.shape == (96, 96)


def test_snap_to_edges_reaches_the_predictor(make_widget, predictor, qtbot):
    """The checkbox sets the predictor's snapping for the next prediction (on by default)."""
    predictor.snap_edges = None
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    assert predictor.snap_edges is True
    widget._snap.value = False
    click(widget, qtbot, (32, 40))
    assert predictor.snap_edges is False
