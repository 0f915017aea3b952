"""The bundled checkpoint: it loads, rebuilds from its own config, and segments a real image from one click."""

import numpy as np
import pytest
import torch
from synthetic import DATA

from napari_deepcrop.checkpoint import default_checkpoint_path, read_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import DeepCropPredictor

GRABCUT = DATA / "GrabCut"
# One protocol click on four clear GrabCut objects, measured with the bundled model (refinement at 256 px; snapped /
# the network's own mask): fullmoon 0.999 / 0.993, flower 0.992 / 0.930, llama 0.924 / 0.891, sheep 0.954 / 0.953
# (stage 3 before it, at 192 px: llama 0.901 / 0.863, flower 0.994 / 0.879). The ResNet-18 before those fails the
# bound on two of them (llama 0.197 / 0.197, flower unsnapped 0.509), so the test catches a fall back to a model of
# that quality, broken weights, a broken crop/paste path or a click-encoding mismatch, without failing on float
# noise.
IMAGES, MIN_IOU = ("fullmoon", "flower", "llama", "sheep"), 0.88


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
@pytest.mark.parametrize("snap_edges", [True, False], ids=["snapped", "network"])
def test_one_protocol_click_on_real_images(snap_edges):
    from napari_deepcrop.training.evaluate import load_grabcut_folder, mask_iou, next_click

    predictor = DeepCropPredictor.from_checkpoint(device="cpu", snap_edges=snap_edges)
    samples = [s for s in load_grabcut_folder(GRABCUT) if s.name in IMAGES]
    assert len(samples) == len(IMAGES)
    for sample in samples:
        row, col, positive = next_click(np.zeros_like(sample.gt), sample.gt, sample.ignore)
        assert positive
        predictor.set_image(sample.image)
        mask, score = predictor.predict(np.array([[row, col]]), np.array([1]))
        assert mask_iou(mask, sample.gt, sample.ignore) > MIN_IOU, sample.name
        assert 0 <= score <= 1


def test_the_checkpoint_records_the_four_stages_of_its_recipe():
    """Refinement crops at 256 px, from refinement crops at 192 px, from ladder crops, from objects, from the ImageNet
    Lite0 trunk: the file says so, each stage's settings and code, with its numbers."""
    payload = read_checkpoint(default_checkpoint_path())
    meta = payload["meta"]
    assert payload["config"]["refine_size"] == meta["args"]["refine_size"] == 256 and meta["args"]["init"]
    assert payload["config"]["input_size"] == 128 and meta["args"]["ladder_prob"] > 0
    focus = meta["init_meta"]
    assert focus["args"]["refine_size"] == 192 and focus["args"]["init"] and focus["git_commit"]
    ladder = focus["init_meta"]["args"]
    assert ladder["stage"] == "ladder (2/2)" and ladder["ladder_prob"] > 0 and ladder["config"].endswith("default.toml")
    first = focus["init_meta"]["init_meta"]["args"]
    assert first["config"] == ladder["config"] and first["stage"] == "objects (1/2)" and not first["init"]
    assert first["trunk"] == ladder["trunk"] == focus["args"]["trunk"] == meta["args"]["trunk"] == "efficientnet_lite0"
    assert first["pretrained"] == "imagenet" and meta["git_commit"]
    assert focus["init_meta"]["init_meta"]["git_commit"] == focus["init_meta"]["git_commit"]  # stages 1-2: one command
    assert {"grabcut", "coco_val_interactive", "val_patches"} <= set(meta["metrics"])
