"""Fine-tuning from the widget: on a worker thread, before/after IoU reported, the new model used; cancel.

The model is small (a 64-pixel DeepCropV2 saved in the test) and runs a few steps on a Labels layer of disks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import disks

from napari_deepcrop.checkpoint import save_checkpoint
from napari_deepcrop.finetune import CHECKPOINT
from napari_deepcrop.model import DeepCropConfig, DeepCropV2


@pytest.fixture
def annotated(make_widget, tmp_path):
    """A widget on an image of disks, each a committed object of its Labels layer, using a tiny model."""
    image, labels = disks()
    viewer, widget = make_widget((image, {"name": "disks"}))
    features = {"label": [1, 2, 3, 4], "category": ["disk"] * 4}
    widget._target.value = viewer.add_labels(labels, name="disks objects", features=features)
    torch.manual_seed(0)
    widget._checkpoint.value = save_checkpoint(tmp_path / "tiny.pt", DeepCropV2(DeepCropConfig(input_size=64)))
    widget._device.value = "cpu"
    return viewer, widget


def test_fine_tune_reports_ious_and_switches_to_the_new_model(annotated, qtbot, tmp_path, notifications):
    viewer, widget = annotated
    out = tmp_path / "export"
    assert widget.fine_tune(out, steps=2)
    assert widget.task_running and widget._cancel.enabled
    qtbot.waitUntil(lambda: not widget.task_running, timeout=300_000)
    checkpoint = out / "finetune" / CHECKPOINT
    assert checkpoint.is_file() and (out / "annotations.json").is_file()
    assert Path(widget._checkpoint.value) == checkpoint and widget.predictor is None  # loads at the next click
    assert not widget._cancel.enabled
    result = widget.fine_tune_result
    assert result.held_out == 1 and result.steps == 2 and result.checkpoint == checkpoint
    before, after = result.before["mean_iou"], result.after["mean_iou"]
    assert 0 <= before <= 1 and 0 <= after <= 1
    message = next(m for m in notifications if "fine-tuned" in m)
    assert f"1 held-out object(s): {before:.3f} before, {after:.3f} after 2 steps" in message
    assert str(checkpoint) in message and result.summary in widget._task_note.value
    # the next click runs the fine-tuned model
    assert widget._add_click((24, 24))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.predictor.config.input_size == 64 and widget.session.mask is not None


def test_cancel_keeps_the_model_in_use(annotated, predictor, qtbot, tmp_path, notifications):
    viewer, widget = annotated
    widget.predictor = predictor  # make_widget's DiskPredictor: the model in use
    checkpoint = widget._checkpoint.value
    assert widget.fine_tune(tmp_path / "export", steps=10_000)
    qtbot.waitUntil(lambda: re.match(r"Fine-tune: training [1-9]", widget._task_note.value), timeout=300_000)
    assert not widget.export_coco(tmp_path / "other")  # one job at a time
    assert "running" in notifications[-1]
    widget.cancel_task()
    qtbot.waitUntil(lambda: not widget.task_running, timeout=120_000)
    assert widget._checkpoint.value == checkpoint and widget.predictor is predictor
    assert widget._task_note.value.startswith("cancelled") and "unchanged" in notifications[-1]
    assert not (tmp_path / "export" / "finetune").exists()


def test_too_few_objects_fail_with_a_notification(make_widget, qtbot, tmp_path, notifications):
    image, labels = disks()
    viewer, widget = make_widget((image, {"name": "disks"}))
    widget._target.value = viewer.add_labels(np.where(labels == 1, 1, 0), name="one disk")
    checkpoint = widget._checkpoint.value
    assert widget.fine_tune(tmp_path / "export", steps=2)
    qtbot.waitUntil(lambda: not widget.task_running, timeout=60_000)
    assert "at least 2 objects" in notifications[-1] and widget._checkpoint.value == checkpoint
