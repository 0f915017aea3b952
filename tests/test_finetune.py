"""Fine-tuning on an exported dataset: before/after IoU on held-out objects, the new model, cancelling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from synthetic import disks

from napari_deepcrop.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from napari_deepcrop.coco import CocoEntry, write_coco_dataset
from napari_deepcrop.finetune import CHECKPOINT, finetune, next_run_dir, usable_objects
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.training import train


@pytest.fixture
def export(tmp_path):
    image, labels = disks()
    return write_coco_dataset(tmp_path / "export", [CocoEntry(image, labels, None, "disks.png")])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", DeepCropV2(DeepCropConfig(input_size=64)))


def test_finetune_measures_before_and_after_and_writes_a_usable_model(export, tiny_checkpoint):
    phases = []
    result = finetune(
        export, 2, tiny_checkpoint, batch_size=2, device="cpu", on_progress=lambda *p: phases.append(p)
    )
    assert phases == [("before", 0), ("training", 0), ("training", 1), ("after", 2)]
    run = export.parent / "finetune"
    assert result.checkpoint == run / CHECKPOINT and result.held_out == 1 and result.steps == 2
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT, "log.csv"]  # no optimizer state kept
    for metrics in (result.before, result.after):
        assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert result.before["n"] == result.after["n"] == 4  # the same held-out patches, 4 per object
    assert f"{result.before['mean_iou']:.3f} before" in result.summary
    model, payload = load_checkpoint(result.checkpoint)
    assert payload["meta"]["before"] == result.before and payload["meta"]["init"] == str(tiny_checkpoint)
    assert "optimizer" not in payload
    start, _ = load_checkpoint(tiny_checkpoint)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed  # two optimizer steps moved the weights
    assert next_run_dir(export.parent).name == "finetune-2"  # a second run never replaces this model


def test_cancel_from_a_thread_leaves_nothing(export, tiny_checkpoint):
    """Cancelled (an exception from the progress callback) on a worker thread, as the widget runs it."""

    class Stop(Exception):
        pass

    def progress(phase, step):
        if step == 1:
            raise Stop

    errors = []

    def run():
        try:
            finetune(export, 50, tiny_checkpoint, batch_size=2, device="cpu", on_progress=progress)
        except Stop as exc:  # signal handlers cannot be installed off the main thread: training must not try
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(300)
    assert len(errors) == 1
    assert sorted(p.name for p in export.parent.iterdir()) == ["annotations.json", "disks.png"]
    assert read_checkpoint(tiny_checkpoint)["format"] == "napari-deepcrop"


def test_too_few_objects_is_a_clear_error_before_any_work(tmp_path, tiny_checkpoint):
    image, labels = disks(centers=[(48, 48)])
    labels[5:8, 5:8] = 2  # too small to train on
    json_path = write_coco_dataset(tmp_path, [CocoEntry(image, labels, None, "one.png")])
    assert usable_objects(json_path, 100) == 1
    with pytest.raises(ValueError, match="at least 2 objects .* has 1"):
        finetune(json_path, 5, tiny_checkpoint)
    assert not (tmp_path / "finetune").exists()


def split(export, by: str):
    args = train.parse_args(["--data-path", str(export), "--val-split-by", by, "--val-split", "0.5",
                             "--min-area", "100", "--input-size", "64"])  # fmt: skip
    return train.build_datasets(args, train.model_config(args))


def test_held_out_share_of_objects_within_one_image(export):
    """train.py --val-split-by objects: one image, its objects split, none both trained on and measured."""
    train_set, val_set = split(export, "objects")
    trained = {obj.annotation["id"] for obj in train_set.objects}
    measured = {obj.annotation["id"] for obj in val_set.objects}
    assert len(trained) == len(measured) == 2 and trained | measured == {1, 2, 3, 4}
    train_set, val_set = split(export, "images")
    assert train_set is val_set  # one image split by images: nothing can be held out


@pytest.fixture
def two_network_checkpoint(tmp_path):
    """A checkpoint holding a first-click network beside its refining one, as the bundled file does."""
    torch.manual_seed(0)
    first = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk")).eval()
    return save_checkpoint(tmp_path / "two.pt", DeepCropV2(DeepCropConfig(input_size=64)), first_click_model=first)


def test_the_finetuned_network_learns_to_read_first_clicks(export, two_network_checkpoint):
    """The run trains the network on the first click's scales (ladder crops) with the starting checkpoint's
    first-click network left out; the fine-tuned file holds that network only if it was measured the better reader
    of the held-out objects' first clicks. The starting file keeps its own."""
    from napari_deepcrop.checkpoint import load_first_click_model
    from napari_deepcrop.finetune import LADDER_PROB
    from napari_deepcrop.predictor import DeepCropPredictor

    result = finetune(export, 1, two_network_checkpoint, batch_size=2, device="cpu")
    payload = read_checkpoint(result.checkpoint)
    args = payload["meta"]["args"]
    assert args["drop_first_click_network"] and args["ladder_prob"] == LADDER_PROB > 0
    assert set(result.first_click) == {"fine-tuned", "starting"}
    assert all(0.0 <= v <= 1.0 for v in result.first_click.values())
    assert payload["meta"]["first_click"] == {**result.first_click, "kept": result.kept_first_click_network}
    kept = DeepCropPredictor.from_checkpoint(result.checkpoint, device="cpu").first_click_model is not None
    better = result.first_click["starting"] > result.first_click["fine-tuned"]
    assert kept == result.kept_first_click_network == better
    assert load_first_click_model(read_checkpoint(two_network_checkpoint)) is not None


@pytest.mark.parametrize("starting_better", [True, False])
def test_first_clicks_go_to_the_network_that_read_the_held_out_objects_better(
    export, two_network_checkpoint, monkeypatch, starting_better
):
    """The choice is made on the held-out objects alone (never a training object), whole images and masks, and the
    file and the summary follow it."""
    from napari_deepcrop import finetune as finetune_module
    from napari_deepcrop.checkpoint import load_first_click_model

    seen = []

    def measured(model, first_click_model, samples, device):
        samples = list(samples)
        seen.append(sorted(s.name for s in samples))
        assert all(s.image.shape[:2] == s.gt.shape == (96, 96) and s.gt.any() for s in samples)
        reads_first_clicks = model if first_click_model is None else first_click_model
        assert reads_first_clicks.config.click_encoding == ("disk" if first_click_model is not None else "distance")
        return 0.6 if (first_click_model is not None) == starting_better else 0.4

    monkeypatch.setattr(finetune_module, "first_click_iou", measured)
    result = finetune(export, 1, two_network_checkpoint, batch_size=2, device="cpu")
    held_out = {f"disks#{obj.annotation['id']}" for obj in split_objects(export, 0.25)[1].objects}
    assert len(seen) == 2 and seen[0] == seen[1] == sorted(held_out) and len(held_out) == result.held_out == 1
    assert result.kept_first_click_network == starting_better
    assert result.first_click == ({"fine-tuned": 0.4, "starting": 0.6} if starting_better else
                                  {"fine-tuned": 0.6, "starting": 0.4})  # fmt: skip
    kept = load_first_click_model(read_checkpoint(result.checkpoint))
    assert (kept is not None) == starting_better
    if starting_better:
        assert kept.config.click_encoding == "disk"
        assert "first clicks read by the starting model's first-click network" in result.summary
    else:
        assert "first clicks read by the new network" in result.summary


def test_cancel_while_choosing_the_first_click_network_leaves_nothing(export, two_network_checkpoint):
    """The choice runs after training, the progress callback called before each held-out object: a cancel there
    leaves no file behind, as a cancel during training does."""

    class Stop(Exception):
        pass

    calls = []

    def progress(phase, step):
        calls.append((phase, step))
        if calls.count(("after", 1)) == 2:  # the last step's report, then the first held-out object's
            raise Stop

    with pytest.raises(Stop):
        finetune(export, 1, two_network_checkpoint, batch_size=2, device="cpu", on_progress=progress)
    assert sorted(p.name for p in export.parent.iterdir()) == ["annotations.json", "disks.png"]
    assert read_checkpoint(two_network_checkpoint)["format"] == "napari-deepcrop"


def test_without_a_first_click_network_nothing_is_chosen(export, tiny_checkpoint, monkeypatch):
    from napari_deepcrop import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "first_click_iou", lambda *a: pytest.fail("nothing to choose between"))
    result = finetune(export, 1, tiny_checkpoint, batch_size=2, device="cpu")
    assert result.first_click == {} and not result.kept_first_click_network
    assert "first clicks" not in result.summary and "first_click" not in read_checkpoint(result.checkpoint)["meta"]


def test_first_click_iou_is_the_predictors_first_click_with_that_network():
    """The measure runs the predictor as a file holding both networks runs (the bundled one): the first-click
    network reads the click; the same network in both roles measures as that network alone."""
    from napari_deepcrop.checkpoint import default_checkpoint_path, load_first_click_model
    from napari_deepcrop.finetune import first_click_iou
    from napari_deepcrop.predictor import DeepCropPredictor
    from napari_deepcrop.training.evaluate import Sample, mask_iou, next_click

    image, labels = disks()
    samples = [Sample(f"disk{k}", image, labels == k) for k in (1, 2, 3)]
    model, payload = load_checkpoint(default_checkpoint_path())
    first = load_first_click_model(payload)
    predictor = DeepCropPredictor.from_checkpoint(None, device="cpu", snap_edges=False)
    expected = []
    for s in samples:
        predictor.set_image(s.image)
        row, col, _ = next_click(np.zeros_like(s.gt), s.gt, None, [])
        expected.append(mask_iou(predictor.predict(np.array([[row, col]]), np.array([1]))[0], s.gt))
    assert first_click_iou(model, first, samples, "cpu") == pytest.approx(np.mean(expected))
    alone = first_click_iou(model, None, samples, "cpu")
    assert first_click_iou(model, model, samples, "cpu") == pytest.approx(alone)
    assert 0.0 < np.mean(expected) <= 1.0
    assert alone != pytest.approx(np.mean(expected))  # a different network read the first clicks


def split_objects(export, share):
    args = train.parse_args(["--data-path", str(export), "--val-split-by", "objects", "--val-split", str(share),
                             "--min-area", "100", "--input-size", "64"])  # fmt: skip
    return train.build_datasets(args, train.model_config(args))
