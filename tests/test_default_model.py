"""The bundled checkpoint: it loads, rebuilds from its own config, and segments a real image from one click."""

import numpy as np
import pytest
import torch
from synthetic import DATA

from napari_deepcrop.checkpoint import default_checkpoint_path, read_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor

GRABCUT = DATA / "GrabCut"
# benchmarks/accuracy.py (README): the bundled model's mean IoU after one click on GrabCut is 0.52 (0.46 without
# edge snapping), spread from near 0 to 1; fullmoon, a clear object, measured 0.995 (0.979 without snapping). The
# margin below that catches broken weights, a broken crop/paste path or a click-encoding mismatch without failing
# on float noise, with or without snapping.
IMAGE, MIN_IOU = "fullmoon", 0.85


def test_recorded_config_rebuilds_the_same_model():
    payload = read_checkpoint(default_checkpoint_path())
    config = DeepCropConfig.from_dict(payload["config"])
    model = DeepCropV2(config)
    model.load_state_dict({k: v.float() for k, v in payload["model"].items()})
    assert config.head == "refine" and config.negative_clicks and config.prev_mask
    assert payload["meta"]["git_commit"]
    assert default_checkpoint_path().stat().st_size < 25e6
    assert all(v.dtype in (torch.float16, torch.int64) for v in payload["model"].values())


@pytest.mark.skipif(not GRABCUT.is_dir(), reason=f"GrabCut benchmark data not found at {GRABCUT}")
def test_one_protocol_click_on_a_real_image():
    from napari_deepcrop.training.evaluate import load_grabcut_folder, mask_iou, next_click

    sample = next(s for s in load_grabcut_folder(GRABCUT) if s.name == IMAGE)
    row, col, positive = next_click(np.zeros_like(sample.gt), sample.gt, sample.ignore)
    assert positive
    predictor = DeepCropPredictor.from_checkpoint(device="cpu")
    predictor.set_image(sample.image)
    mask, score = predictor.predict(np.array([[row, col]]), np.array([1]))
    assert mask_iou(mask, sample.gt, sample.ignore) > MIN_IOU
    assert 0 <= score <= 1


def test_the_checkpoint_records_both_stages_of_its_recipe():
    """One command's two stages, ladder crops from objects from scratch: the file says so, with its numbers."""
    meta = read_checkpoint(default_checkpoint_path())["meta"]
    assert meta["args"]["ladder_prob"] > 0 and meta["args"]["init"] and meta["args"]["stage"] == "ladder (2/2)"
    assert meta["args"]["config"].endswith("default.toml") and meta["git_commit"]
    first = meta["init_meta"]["args"]
    assert first["config"] == meta["args"]["config"] and first["stage"] == "objects (1/2)" and not first["init"]
    assert meta["init_meta"]["git_commit"] == meta["git_commit"]  # one command, one version of the code
    assert {"grabcut", "coco_val_interactive", "val_patches"} <= set(meta["metrics"])
