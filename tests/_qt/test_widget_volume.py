"""Propagate in the widget: one object through a stack, one label id, one undo step, cancel, corrections.

A BlobPredictor segments the bright region under the click exactly, so every slice's expected labels are known
and the tests check pixels, not just that something was written.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from napari_deepcrop._widget import CLICKS, PREVIEW
from napari_deepcrop.checkpoint import save_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor

SLICES, FIRST, LAST, SHAPE = 20, 3, 16, (48, 64)


def blob_stack() -> tuple[np.ndarray, np.ndarray]:
    """A bright disk moving and growing through slices FIRST..LAST; each slice's background is its own index
    (below the threshold), so the predictor can tell which slice it was given. (stack uint8, truth bool)."""
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    stack = np.zeros((SLICES, *SHAPE), np.uint8)
    truth = np.zeros(stack.shape, bool)
    for z in range(SLICES):
        stack[z] = z
        if FIRST <= z <= LAST:
            t = z - FIRST
            truth[z] = (rows - 20 - 0.7 * t) ** 2 + (cols - 18 - 1.5 * t) ** 2 <= (7 + 0.3 * t) ** 2
    stack[truth] = 255
    return stack, truth


STACK, TRUTH = blob_stack()


def center(z: int) -> tuple[int, int]:
    r, c = ndimage.center_of_mass(TRUTH[z])
    return int(round(r)), int(round(c))


class BlobPredictor:
    """The bright (> 128) region connected to the first positive click, minus a disk of ``radius`` around each
    negative click; nothing when the click is on the background. Records (slice, points, labels) per call."""

    def __init__(self, radius: int = 3) -> None:
        self.radius = radius
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.gate: threading.Event | None = None

    def set_image(self, image, contrast_limits=None, channels=None) -> None:
        self.image = np.asarray(image)

    def alternatives(self) -> int:
        return 1

    def predict(self, points, labels, prev_mask=None, return_crop=False, alternative=0):
        self.calls.append((int(self.image[0, 0]), points.copy(), labels.copy()))
        if self.gate is not None:
            self.gate.wait(10)
        regions, _ = ndimage.label(self.image > 128)
        row, col = np.round(points[labels == 1][0]).astype(int)
        mask = (regions == regions[row, col]) & (regions[row, col] > 0)
        rr, cc = np.mgrid[: mask.shape[0], : mask.shape[1]]
        for r, c in points[labels == 0]:
            mask &= (rr - r) ** 2 + (cc - c) ** 2 > self.radius**2
        if not mask.any():
            return np.zeros((0, 0), bool), (0, 0), 0.0
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], (rows[0], cols[0]), 0.9

    def slices_seen(self) -> set[int]:
        return {z for z, _, _ in self.calls}


@pytest.fixture
def blob_predictor() -> BlobPredictor:
    return BlobPredictor()


@pytest.fixture
def stack_widget(make_widget, blob_predictor):
    viewer, widget = make_widget((STACK, {"name": "image"}))
    widget.predictor = blob_predictor
    return viewer, widget


def click(widget, qtbot, position, positive=True):
    assert widget._add_click(position, positive)
    qtbot.waitUntil(lambda: not widget.busy, timeout=5000)


def propagate(widget, qtbot):
    assert widget.propagate()
    qtbot.waitUntil(lambda: not widget.task_running, timeout=20_000)


def press(viewer, key):
    viewer.window._qt_viewer._key_map_handler.press_key(key)


def disk(point, radius=3):
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return (rows - point[0]) ** 2 + (cols - point[1]) ** 2 <= radius**2


def test_propagate_writes_one_label_id_on_every_slice_of_the_object(stack_widget, blob_predictor, qtbot):
    viewer, widget = stack_widget
    click(widget, qtbot, (10, *center(10)))
    propagate(widget, qtbot)
    labels = widget._target.value
    assert labels.name == "image objects" and labels.data.shape == STACK.shape
    np.testing.assert_array_equal(labels.data, TRUTH.astype(labels.data.dtype))  # label 1 exactly, slices 3..16
    assert labels.features[["label", "category"]].to_dict("list") == {"label": [1], "category": ["object"]}
    # the walk read the object's slices and the one past each end (where it vanished), no further
    assert blob_predictor.slices_seen() == set(range(FIRST - 1, LAST + 2))
    assert "slices 3..16 of axis 0" in widget._task_note.value
    assert len(viewer.layers[CLICKS].data) == 0 and not viewer.layers[PREVIEW].data.any()  # the preview went in


def test_one_undo_removes_the_whole_propagation_of_a_committed_object(stack_widget, qtbot, notifications):
    viewer, widget = stack_widget
    click(widget, qtbot, (10, *center(10)))
    widget.commit()
    labels = widget._target.value
    viewer.dims.set_point(0, 5)
    assert not widget.propagate()  # the committed object is on slice 10, not the slice shown
    assert "nothing to propagate on this slice" in notifications[-1]
    viewer.dims.set_point(0, 10)
    propagate(widget, qtbot)  # no preview: the object committed on the slice shown, under its own id
    np.testing.assert_array_equal(labels.data, TRUTH.astype(labels.data.dtype))
    viewer.layers.selection.active = viewer.layers[CLICKS]
    press(viewer, "Control-Z")  # no clicks: the Labels layer's last edit, the whole propagation
    committed = np.zeros(STACK.shape, bool)
    committed[10] = TRUTH[10]
    np.testing.assert_array_equal(labels.data > 0, committed)
    press(viewer, "Control-Shift-Z")
    np.testing.assert_array_equal(labels.data, TRUTH.astype(labels.data.dtype))
    labels.undo()
    labels.undo()  # then the commit
    assert not labels.data.any()


def test_overwrite_off_keeps_another_objects_pixels(stack_widget, qtbot):
    viewer, widget = stack_widget
    other = np.zeros(STACK.shape, np.int32)
    other[5:13, 15:30, 20:40] = 7
    labels = viewer.add_labels(other.copy(), name="cells")
    widget._target.value = labels
    click(widget, qtbot, (10, *center(10)))
    propagate(widget, qtbot)
    np.testing.assert_array_equal(labels.data == 7, other == 7)
    np.testing.assert_array_equal(labels.data == 8, TRUTH & (other == 0))
    labels.undo()
    np.testing.assert_array_equal(labels.data, other)
    widget._overwrite.value = True
    click(widget, qtbot, (10, *center(10)))
    propagate(widget, qtbot)
    np.testing.assert_array_equal(labels.data == 8, TRUTH)
    np.testing.assert_array_equal(labels.data == 7, (other == 7) & ~TRUTH)


def test_a_labels_layer_of_another_shape_is_refused_and_nothing_changes(stack_widget, qtbot, notifications):
    viewer, widget = stack_widget
    click(widget, qtbot, (10, *center(10)))
    flat = viewer.add_labels(np.zeros(SHAPE, np.int32), name="one slice")
    widget._target.value = flat
    assert not widget.propagate()
    assert "shape" in notifications[-1] and "'one slice'" in notifications[-1]
    assert not widget.task_running and not flat.data.any()
    assert widget.session.mask is not None and viewer.layers[PREVIEW].data.any()  # the object is still there
    assert [layer.name for layer in viewer.layers] == ["image", PREVIEW, CLICKS, "one slice"]


def test_a_2d_image_is_refused(make_widget, blob_predictor, qtbot, notifications):
    viewer, widget = make_widget((STACK[10], {"name": "image"}))
    widget.predictor = blob_predictor
    click(widget, qtbot, center(10))
    assert not widget.propagate()
    assert "needs a stack" in notifications[-1] and not widget.task_running


@pytest.mark.parametrize("how", ["cancel button", "napari progress"])
def test_cancel_writes_nothing_and_keeps_the_object(stack_widget, blob_predictor, qtbot, notifications, how):
    viewer, widget = stack_widget
    labels = viewer.add_labels(np.zeros(STACK.shape, np.int32), name="cells")
    widget._target.value = labels
    click(widget, qtbot, (10, *center(10)))
    blob_predictor.gate = threading.Event()
    assert widget.propagate()
    qtbot.waitUntil(lambda: len(blob_predictor.calls) >= 2, timeout=5000)  # the walk is under way
    if how == "cancel button":
        widget.cancel_task()
    else:
        widget._progress.cancel()  # the cancel button of napari's activity dock
    blob_predictor.gate.set()
    qtbot.waitUntil(lambda: not widget.task_running, timeout=20_000)
    assert not labels.data.any()  # nothing written
    assert "propagation cancelled: nothing was written" in notifications[-1]
    assert len(blob_predictor.calls) <= 5  # stopped at the next slice of each direction, not at the ends
    assert widget.session.mask is not None  # the preview stays: propagate again
    blob_predictor.gate = None
    propagate(widget, qtbot)
    np.testing.assert_array_equal(labels.data == 1, TRUTH)


def test_the_p_key_propagates(stack_widget, qtbot):
    viewer, widget = stack_widget
    widget._tool.value = True
    click(widget, qtbot, (10, *center(10)))
    assert viewer.layers.selection.active is viewer.layers[CLICKS]
    press(viewer, "P")
    assert widget.task_running or widget._target.value is not None
    qtbot.waitUntil(lambda: not widget.task_running, timeout=20_000)
    np.testing.assert_array_equal(widget._target.value.data == 1, TRUTH)


def test_a_4d_stack_propagates_along_the_last_slider_moved(make_widget, blob_predictor, qtbot):
    tzyx = np.stack([STACK, STACK])  # (t, z, y, x): the same blob at both times
    viewer, widget = make_widget((tzyx, {"name": "image"}))
    widget.predictor = blob_predictor
    viewer.dims.last_used = 1  # z
    click(widget, qtbot, (1, 10, *center(10)))
    propagate(widget, qtbot)
    labels = widget._target.value.data
    np.testing.assert_array_equal(labels[1] == 1, TRUTH)
    assert not labels[0].any()
    viewer.dims.last_used = 0  # t: tracking through time, at z = 5
    click(widget, qtbot, (0, 5, *center(5)))
    propagate(widget, qtbot)
    np.testing.assert_array_equal(labels[0, 5] == 2, TRUTH[5])  # t = 0
    assert not (labels == 2)[1].any()  # t = 1 holds label 1 there, and Overwrite is off
    assert ((labels == 2).sum(axis=(2, 3)) > 0).sum() == 1


def test_clicks_on_a_propagated_slice_correct_it_and_p_repropagates_beyond_it(stack_widget, blob_predictor, qtbot):
    viewer, widget = stack_widget
    click(widget, qtbot, (10, *center(10)))
    propagate(widget, qtbot)
    labels = widget._target.value
    propagated = labels.data.copy()

    # a negative click on slice 14 inside the object corrects slice 14: the hole goes in on Enter, 14 alone
    hole14 = (center(14)[0] + 4, center(14)[1])
    click(widget, qtbot, (14, *hole14), positive=False)
    assert widget.session.corrects == 14
    _, points, point_labels = blob_predictor.calls[-1]
    assert point_labels.tolist() == [1, 0] and points[1].tolist() == list(hole14)  # base click, then the user's
    widget.commit()
    expected = propagated.copy()
    expected[14][disk(hole14)] = 0
    np.testing.assert_array_equal(labels.data, expected)
    labels.undo()  # one undo step
    np.testing.assert_array_equal(labels.data, propagated)
    labels.redo()

    # a click far from the object on a slice of it starts a new object, not a correction
    click(widget, qtbot, (14, 45, 60))
    assert widget.session.corrects is None
    widget.discard()

    # correct slice 12 and re-propagate: 13 is segmented again, 14 (corrected before) and beyond stay
    hole12 = (center(12)[0] - 4, center(12)[1])
    click(widget, qtbot, (12, *hole12), positive=False)
    assert widget.session.corrects == 12
    calls = len(blob_predictor.calls)
    propagate(widget, qtbot)
    assert {z for z, _, _ in blob_predictor.calls[calls:]} == {13}
    expected_12 = expected.copy()
    expected_12[12][disk(hole12)] = 0
    np.testing.assert_array_equal(labels.data, expected_12)
    labels.undo()
    np.testing.assert_array_equal(labels.data, expected)


def test_the_model_loaded_to_propagate_is_kept_for_the_next_click(stack_widget, qtbot, tmp_path):
    viewer, widget = stack_widget
    click(widget, qtbot, (10, *center(10)))
    widget.commit()
    checkpoint = save_checkpoint(tmp_path / "small.pt", DeepCropV2(DeepCropConfig(input_size=64)))
    widget._checkpoint.value = checkpoint  # another model: nothing loaded until it is needed
    assert widget.predictor is None
    viewer.dims.set_point(0, 10)
    propagate(widget, qtbot)  # the committed object, propagated by the model it loads
    loaded = widget.predictor
    assert isinstance(loaded, DeepCropPredictor)
    assert checkpoint.name in widget._device_note.value and str(loaded.device) in widget._device_note.value
    click(widget, qtbot, (5, 10, 10))
    assert widget.predictor is loaded  # the click used it: no second load


def test_any_propagated_object_can_be_corrected_not_only_the_last(make_widget, blob_predictor, qtbot):
    tzyx = np.stack([STACK, STACK])  # (t, z, y, x): the same blob at both times
    viewer, widget = make_widget((tzyx, {"name": "image"}))
    widget.predictor = blob_predictor
    viewer.dims.last_used = 1  # z, at t = 1: label 1
    click(widget, qtbot, (1, 10, *center(10)))
    propagate(widget, qtbot)
    viewer.dims.last_used = 0  # t, at z = 5: label 2, propagated last
    click(widget, qtbot, (0, 5, *center(5)))
    propagate(widget, qtbot)
    labels = widget._target.value
    before = labels.data.copy()
    hole = (center(14)[0] + 4, center(14)[1])
    click(widget, qtbot, (1, 14, *hole), positive=False)  # on label 1's slice 14
    assert widget.session.corrects == 14 and "label 1" in widget._task_note.value
    widget.commit()
    expected = before.copy()
    expected[1, 14][disk(hole)] = 0
    np.testing.assert_array_equal(labels.data, expected)  # label 1's slice 14 alone; label 2 untouched
