"""Issue 6 in the widget: never lose work, and bad input gets a clear message and changes nothing.

Commits survive napari's undo/redo and switching layers; an image-less viewer, a contrast-less image, a
checkpoint of another architecture or a truncated one, and a prediction out of memory each give a
notification that says why, and leave every layer as it was. The real DeepCropPredictor (a small untrained
network) runs where the predictor's own checks are what is tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_deepcrop._widget import CLICKS, PREVIEW, DeepCropWidget
from napari_deepcrop.checkpoint import save_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor
from napari_deepcrop.session import ObjectMask

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)
MODEL_TIMEOUT = 120_000  # ms: two shared cores, models training in the background


def click(widget, qtbot, position, positive=True, timeout=5000):
    assert widget._add_click(position, positive)
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def snapshot(viewer, skip=()) -> dict[str, np.ndarray]:
    """A copy of every layer's data (Shapes: the list of its shapes' vertices), by name."""
    copies = {}
    for layer in viewer.layers:
        if layer.name in skip:
            continue
        data = layer.data
        copies[layer.name] = [np.array(d, copy=True) for d in data] if isinstance(data, list) else np.array(data)
    return copies


def assert_same_layers(viewer, before: dict[str, np.ndarray], skip=()) -> None:
    after = snapshot(viewer, skip)
    assert list(after) == list(before), "a layer was added or removed"
    for name, data in before.items():
        if isinstance(data, list):
            assert len(after[name]) == len(data), name
            for a, b in zip(after[name], data, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_array_equal(after[name], data, err_msg=name)  # NaN == NaN here


def small_model() -> DeepCropV2:
    torch.manual_seed(0)
    return DeepCropV2(DeepCropConfig(input_size=64))


@pytest.fixture
def real_predictor() -> DeepCropPredictor:
    return DeepCropPredictor(small_model(), "cpu")


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "small.pt", small_model())


# ----- 1. undo and redo after a commit ---------------------------------------------------------------------
def test_undo_and_redo_give_back_exactly_the_committed_pixels(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    widget.commit()
    labels = widget._target.value
    first = labels.data.copy()
    np.testing.assert_array_equal(first, predictor.disk((30, 40)).astype(first.dtype))
    widget._overwrite.value = True  # the second object takes pixels of the first: undo must give them back
    click(widget, qtbot, (30, 46))
    widget.commit()
    second = labels.data.copy()
    assert (second == 2).any() and (second == 1).sum() < (first == 1).sum()

    labels.undo()
    np.testing.assert_array_equal(labels.data, first)
    labels.undo()
    assert not labels.data.any()
    labels.redo()
    np.testing.assert_array_equal(labels.data, first)
    labels.redo()
    np.testing.assert_array_equal(labels.data, second)
    labels.redo()  # nothing left to redo: nothing changes
    np.testing.assert_array_equal(labels.data, second)


def test_click_tool_undo_then_redo(make_widget, predictor, qtbot):
    """Ctrl+Z in the click tool (no clicks left) undoes the commit in napari's history; Ctrl+Shift+Z redoes it."""
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    widget.commit()
    labels = widget._target.value
    committed = labels.data.copy()
    widget.undo()
    assert not labels.data.any()
    widget.redo()  # Ctrl+Shift+Z in the click tool
    np.testing.assert_array_equal(labels.data, committed)
    assert labels.data.dtype == committed.dtype


# ----- 2. switching layers keeps each Labels layer's commits --------------------------------------------
def test_switching_the_target_and_back_keeps_each_layers_objects(make_widget, predictor, qtbot):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    a = viewer.add_labels(np.zeros(IMAGE.shape, np.int32), name="a")
    b = viewer.add_labels(np.zeros(IMAGE.shape, np.int32), name="b")
    widget._target.value = a
    click(widget, qtbot, (20, 20))
    widget.commit()
    in_a = a.data.copy()
    widget._target.value = b
    assert widget._target.value is b
    click(widget, qtbot, (40, 60))
    widget.commit()
    in_b = b.data.copy()
    np.testing.assert_array_equal(a.data, in_a)  # committing into b did not touch a
    np.testing.assert_array_equal(in_b > 0, predictor.disk((40, 60)))
    widget._target.value = a
    np.testing.assert_array_equal(a.data, in_a)
    np.testing.assert_array_equal(b.data, in_b)
    click(widget, qtbot, (40, 20))
    widget.commit()
    assert set(np.unique(a.data)) == {0, 1, 2}  # the next free id of a, not of b
    np.testing.assert_array_equal(a.data == 1, in_a == 1)
    np.testing.assert_array_equal(b.data, in_b)
    widget.undo()  # undoes a's last commit, nothing of b
    np.testing.assert_array_equal(a.data, in_a)
    np.testing.assert_array_equal(b.data, in_b)


def test_switching_the_image_and_back_keeps_each_layers_objects(make_widget, predictor, qtbot):
    other = np.random.default_rng(1).integers(0, 255, (50, 50), dtype=np.uint8)
    viewer, widget = make_widget((IMAGE, {"name": "image"}), (other, {"name": "other"}))
    widget._image.value = viewer.layers["image"]
    click(widget, qtbot, (30, 40))
    widget.commit()
    first = widget._target.value
    first_data = first.data.copy()

    click(widget, qtbot, (10, 10))  # an object in progress when the image changes is dropped, not committed
    widget._image.value = viewer.layers["other"]
    assert widget.session.mask is None and len(viewer.layers[CLICKS].data) == 0
    assert widget._target.value is None  # no Labels layer of the other image's shape yet
    click(widget, qtbot, (25, 25))
    widget.commit()
    second = widget._target.value
    assert second is not first and second.data.shape == other.shape
    second_data = second.data.copy()
    np.testing.assert_array_equal(first.data, first_data)

    widget._image.value = viewer.layers["image"]
    assert widget._target.value is first  # the Labels layer of this image's shape is picked again
    np.testing.assert_array_equal(first.data, first_data)
    np.testing.assert_array_equal(second.data, second_data)
    click(widget, qtbot, (30, 60))
    widget.commit()
    np.testing.assert_array_equal(first.data == 1, first_data == 1)
    assert (first.data == 2).any()
    np.testing.assert_array_equal(second.data, second_data)


# ----- 3. no image layer: Labels and Shapes only ---------------------------------------------------------
def test_labels_and_shapes_only_offer_no_image_and_change_nothing(make_napari_viewer, qtbot, notifications, tmp_path):
    viewer = make_napari_viewer()
    labels = viewer.add_labels(np.zeros((40, 50), np.int32), name="labels")
    labels.data[5:10, 5:10] = 3
    viewer.add_shapes([np.array([[1, 1], [1, 20], [20, 20], [20, 1]])], name="shapes")
    widget = DeepCropWidget(viewer)
    viewer.window.add_dock_widget(widget)
    before = snapshot(viewer)

    assert widget._image.value is None
    assert widget._image.choices == ()  # neither the Labels nor the Shapes layer is offered as the image
    assert all(c is None or c is labels for c in widget._target.choices)  # Shapes is never a target
    assert not widget._add_click((10, 10))
    assert not widget._click_at_world((10, 10))
    widget._tool.value = True
    assert not widget._tool.value
    widget.commit()
    assert widget.export_coco(tmp_path, overwrite=True) is False
    assert list(tmp_path.iterdir()) == []
    qtbot.wait(50)
    assert not widget.busy and not widget.task_running
    assert_same_layers(viewer, before)
    assert notifications and all("no image layer" in message for message in notifications)


def test_labels_and_shapes_are_never_offered_as_the_image(make_widget, qtbot, notifications):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    viewer.add_labels(np.zeros(IMAGE.shape, np.int32), name="labels")
    viewer.add_shapes([np.array([[1, 1], [1, 20], [20, 20]])], shape_type="polygon", name="shapes")
    assert [c.name for c in widget._image.choices] == ["image"]
    viewer.layers.remove("image")  # the user deletes the image: nothing else takes its place
    assert widget._image.value is None and widget._image.choices == ()
    before = snapshot(viewer)
    assert not widget._add_click((10, 10))
    assert "no image layer" in notifications[-1]
    assert_same_layers(viewer, before)


# ----- 4. images without contrast, and NaNs, with the real predictor -------------------------------------
RGB_CONSTANT = np.full((40, 50, 3), (200, 30, 90), np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        np.full((40, 50), 120, np.uint8),
        np.full((40, 50), 7.0),
        np.full((40, 50), np.nan, np.float32),
        RGB_CONSTANT,
    ],
    ids=["uint8-constant", "float-constant", "float-all-nan", "rgb-constant"],
)
def test_an_image_without_contrast_notifies_and_changes_nothing(
    make_widget, real_predictor, qtbot, notifications, image
):
    viewer, widget = make_widget((image, {"name": "image"}))
    widget.predictor = real_predictor
    labels = viewer.add_labels(np.zeros(image.shape[:2], np.int32), name="labels")
    labels.data[2:6, 2:6] = 1
    widget._target.value = labels
    before = snapshot(viewer)
    click(widget, qtbot, (20, 25), timeout=MODEL_TIMEOUT)
    assert any("no contrast" in message for message in notifications), notifications
    assert widget.session.mask is None
    assert not viewer.layers[PREVIEW].data.any()
    widget.commit()  # nothing to commit
    assert_same_layers(viewer, before, skip=(CLICKS, PREVIEW))


def test_a_float_image_with_some_nans_segments(make_widget, real_predictor, qtbot, notifications):
    image = np.random.default_rng(3).normal(100, 20, (64, 80)).astype(np.float32)
    image[:, :20] = np.nan
    image[40:, 50:] = np.nan
    viewer, widget = make_widget((image, {"name": "image"}))
    widget.predictor = real_predictor
    finite = []  # the inputs and outputs of the networks the predictor runs: NaNs never reach them
    for net in real_predictor.nets.values():
        net.register_forward_hook(
            lambda module, inputs, output: finite.append(
                all(bool(torch.isfinite(t).all()) for t in (*inputs, *output) if isinstance(t, torch.Tensor))
            )
        )
    for position in ((30, 40), (10, 10), (50, 60)):  # on finite pixels, then on NaNs
        click(widget, qtbot, position, timeout=MODEL_TIMEOUT)
        mask = widget.session.mask
        assert isinstance(mask, ObjectMask) and mask.shape == image.shape and mask.crop.dtype == bool
        preview = viewer.layers[PREVIEW].data
        assert preview.shape == mask.crop.shape if mask.crop.size else not preview.any()  # untrained: maybe empty
        widget.discard()
    assert len(finite) == 3 and all(finite)
    assert notifications == []


# ----- 5. a checkpoint that does not load ----------------------------------------------------------------
def other_architecture(path):
    payload = torch.load(path, weights_only=True)
    payload["config"]["trunk"] = "resnet34"
    torch.save(payload, path)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("spoil", [other_architecture, truncate], ids=["other-architecture", "truncated"])
def test_a_bad_checkpoint_notifies_with_its_name_and_changes_nothing(
    make_widget, predictor, qtbot, notifications, tmp_path, checkpoint, spoil
):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))  # an object committed with the model in use
    widget.commit()
    bad = save_checkpoint(tmp_path / "spoilt_model.pt", small_model())
    spoil(bad)
    widget._checkpoint.value = bad
    assert widget.predictor is None  # the next click loads the selected file
    before = snapshot(viewer, skip=(CLICKS,))
    notifications.clear()

    click(widget, qtbot, (10, 10), timeout=MODEL_TIMEOUT)
    assert any("spoilt_model.pt" in message for message in notifications), notifications
    assert widget.predictor is None and widget.session.mask is None
    assert_same_layers(viewer, before, skip=(CLICKS,))
    assert not viewer.layers[PREVIEW].data.any()

    widget.discard()
    widget._checkpoint.value = checkpoint  # a good file: the next click works
    click(widget, qtbot, (10, 10), timeout=MODEL_TIMEOUT)
    assert isinstance(widget.predictor, DeepCropPredictor)
    assert isinstance(widget.session.mask, ObjectMask)
    assert_same_layers(viewer, {k: v for k, v in before.items() if k != PREVIEW}, skip=(CLICKS, PREVIEW))


# ----- 6. the device note ---------------------------------------------------------------------------------
def test_device_note_names_the_device_used(make_widget, qtbot, checkpoint, notifications):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    widget._checkpoint.value = checkpoint
    assert widget._device.value == "auto"
    assert "cpu" not in widget._device_note.value  # not loaded yet: the device is not known
    click(widget, qtbot, (30, 40), timeout=MODEL_TIMEOUT)
    device = widget.predictor.device
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    note = widget._device_note.value
    assert str(device) in note and checkpoint.name in note, note
    if not torch.cuda.is_available():
        assert "cpu" in note
    assert notifications == []


# ----- 7. out of memory -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, reason",
    [
        (MemoryError("Unable to allocate 7.45 GiB for an array"), "Unable to allocate 7.45 GiB"),
        (MemoryError(), "memory"),
    ],
    ids=["numpy-message", "bare"],
)
def test_out_of_memory_changes_no_layer_and_says_why(
    make_widget, predictor, qtbot, notifications, monkeypatch, error, reason
):
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    click(widget, qtbot, (30, 40))
    widget.commit()  # a committed object
    click(widget, qtbot, (20, 60))  # and an object in progress, shown in the preview
    shown = widget.session.mask
    before = snapshot(viewer, skip=(CLICKS,))
    clicks_before = viewer.layers[CLICKS].data.copy()

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(predictor, "predict", out_of_memory)
    notifications.clear()
    click(widget, qtbot, (22, 66), positive=False)
    assert len(notifications) == 1 and reason in notifications[0], notifications
    assert_same_layers(viewer, before, skip=(CLICKS,))
    assert widget.session.mask is shown
    # the user's clicks are kept: the failed one too, so the next prediction can retry them
    np.testing.assert_array_equal(viewer.layers[CLICKS].data, np.vstack([clicks_before, [[22, 66]]]))
    monkeypatch.undo()
    widget.commit()  # committing still writes what the preview shows
    np.testing.assert_array_equal(widget._target.value.data == 2, shown.full() & (before["image objects"] == 0))


# ----- found while writing these: a prediction of nothing ------------------------------------------------
def test_a_prediction_of_nothing_shows_an_empty_preview_and_the_next_click_works(
    make_widget, predictor, qtbot, monkeypatch, notifications
):
    """The predictor returns a (0, 0) crop when nothing is foreground; napari cannot show a layer of size 0."""
    viewer, widget = make_widget((IMAGE, {"name": "image"}))
    disk = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: (np.zeros((0, 0), bool), (0, 0), 0.1))
    click(widget, qtbot, (30, 40))  # pytest-qt fails the test on an exception in the Qt event loop
    assert widget.session.mask.crop.size == 0
    assert not viewer.layers[PREVIEW].data.any()
    widget.commit()
    assert "nothing to commit" in notifications[-1] and widget._target.value is None
    monkeypatch.setattr(predictor, "predict", disk)
    click(widget, qtbot, (30, 44))  # the object goes on from the clicks made
    np.testing.assert_array_equal(predictor.calls[-1]["points"], [[30, 40], [30, 44]])
    assert widget.session.mask.crop.any()


def test_has_contrast_checks_the_channels_the_network_sees():
    from napari_deepcrop.session import has_contrast

    dot = np.zeros((2001, 2001), np.uint8)
    dot[1001, 1001] = 1  # missed by the strided sample: the whole array is checked
    assert has_contrast(dot) and not has_contrast(np.zeros((2001, 2001), np.uint8))
    assert not has_contrast(RGB_CONSTANT)  # three different but constant channels
    alpha = np.dstack([RGB_CONSTANT, np.arange(40 * 50).reshape(40, 50) % 256]).astype(np.uint8)
    assert not has_contrast(alpha)  # only the alpha channel varies, and the network never sees it
    nans = np.full((30, 30), np.nan)
    assert not has_contrast(nans)
    nans[3, 4], nans[20, 20] = 1.0, 2.0
    assert has_contrast(nans)
    assert has_contrast(np.array([[True, False], [False, False]]))
