"""Fine-tuning on an exported dataset: before/after IoU on held-out objects, the new model, cancelling."""

from __future__ import annotations

import threading

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


def test_the_finetuned_network_reads_first_clicks_too(export, tmp_path):
    """A first-click network of the starting checkpoint (the bundled file's, trained on photographs) is left out of
    the fine-tuned file, so that the network tuned on the user's images reads their first clicks too; it trains on
    the first click's scales (ladder crops) to rank them. The starting file keeps its own."""
    from napari_deepcrop.checkpoint import load_first_click_model
    from napari_deepcrop.finetune import LADDER_PROB
    from napari_deepcrop.predictor import DeepCropPredictor

    torch.manual_seed(0)
    first = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk")).eval()
    init = save_checkpoint(tmp_path / "two.pt", DeepCropV2(DeepCropConfig(input_size=64)), first_click_model=first)
    result = finetune(export, 1, init, batch_size=2, device="cpu")
    payload = read_checkpoint(result.checkpoint)
    assert load_first_click_model(payload) is None
    assert load_first_click_model(read_checkpoint(init)) is not None
    args = payload["meta"]["args"]
    assert args["drop_first_click_network"] and args["ladder_prob"] == LADDER_PROB > 0
    assert DeepCropPredictor.from_checkpoint(result.checkpoint, device="cpu").first_click_model is None
    assert DeepCropPredictor.from_checkpoint(init, device="cpu").first_click_model is not None
