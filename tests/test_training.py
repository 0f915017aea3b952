"""Training on a tiny synthetic COCO dataset made here: loss goes down, resume is exact, DDP, interrupts."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from synthetic import disk_image

from napari_deepcrop.checkpoint import load_checkpoint, read_checkpoint
from napari_deepcrop.training import train


def write_synthetic_coco(folder, n_images=6, seed=0):
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        radius = rng.uniform(15, 35)
        center = rng.uniform(radius + 2, 128 - radius - 2, size=2)
        image, mask = disk_image(128, center, radius, seed=image_id)
        name = f"img{image_id}.png"
        cv2.imwrite(str(folder / name), image)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
            }
        )
        images.append({"id": image_id, "file_name": name, "height": 128, "width": 128})
    path = folder / "annotations.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "disk", "supercategory": "shape"}],
            }
        )
    )
    return path


@pytest.fixture()
def coco(tmp_path):
    return write_synthetic_coco(tmp_path)


def args_for(coco, out, *extra):
    return train.parse_args(
        [
            "--data-path",
            str(coco),
            "--output-dir",
            str(out),
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--samples-per-epoch",
            "12",
            "--epochs",
            "3",
            "--workers",
            "0",
            "--val-samples",
            "8",
            "--val-split",
            "0.34",
            "--no-progress",
            "--warmup-steps",
            "2",
            *extra,
        ]
    )


def test_a_few_steps_lower_the_loss(coco, tmp_path):
    from napari_deepcrop.model import DeepCropV2
    from napari_deepcrop.training.data import CocoObjects, CocoSource
    from napari_deepcrop.training.engine import full_iou, mask_loss

    args = args_for(coco, tmp_path / "run", "--epochs", "10", "--lr", "3e-3", "--iterative-prob", "0")
    config = train.model_config(args)
    data = CocoObjects([CocoSource.from_paths(coco)], config, train=False)
    batch = torch.utils.data.default_collate([data[(i % len(data), i)] for i in range(8)])

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            logits, _ = model(batch["image"], batch["planes"])
        return mask_loss(logits, batch["mask"]).item(), full_iou(
            logits, batch["mask"], batch["outside"]
        ).mean()

    torch.manual_seed(0)
    before, _ = loss_of(DeepCropV2(config))
    train.main(args)
    after, iou_after = loss_of(load_checkpoint(tmp_path / "run" / "checkpoint.pt")[0])
    assert after < 0.8 * before
    assert (tmp_path / "run" / "log.csv").read_text().startswith("mean_iou,")


def test_resume_continues_exactly(coco, tmp_path):
    train.main(args_for(coco, tmp_path / "straight", "--max-steps", "5"))
    train.main(args_for(coco, tmp_path / "split", "--max-steps", "2"))
    assert read_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    train.main(
        args_for(
            coco,
            tmp_path / "split",
            "--max-steps",
            "5",
            "--resume",
            str(tmp_path / "split" / "checkpoint.pt"),
        )
    )
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 5 and a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def test_fine_tune_from_init_and_test_only(coco, tmp_path):
    train.main(args_for(coco, tmp_path / "base", "--max-steps", "1"))
    metrics = train.main(
        args_for(coco, tmp_path / "tuned", "--init", str(tmp_path / "base" / "checkpoint.pt"), "--test-only")
    )
    assert 0.0 <= metrics["mean_iou"] <= 1.0 and metrics["n"] > 0
    assert not (tmp_path / "tuned" / "checkpoint.pt").exists()


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def train_command(coco, out, *extra):
    """``-m napari_deepcrop.training.train`` arguments for a small run on the synthetic dataset."""
    return ["-m", "napari_deepcrop.training.train", "--data-path", str(coco), "--output-dir", str(out),
            "--input-size", "64", "--workers", "0", "--val-split", "0.34", *extra]


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_checkpoint(coco, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           *train_command(coco, out, "--batch-size", "2", "--samples-per-epoch", "8", "--epochs", "1",
                          "--val-samples", "4", "--no-progress", "--device", "cpu")]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "log.csv"]
    checkpoint = read_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == 2  # 8 samples / 2 processes / batch 2
    assert result.stdout.count("done:") == 1  # only rank 0 reports


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(coco, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, *train_command(coco, out, "--batch-size", "2", "--samples-per-epoch", "100000",
                                          "--epochs", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        progress, deadline = b"", time.time() + 300
        while proc.poll() is None and time.time() < deadline and not re.search(rb"\| [1-9][0-9]*/", progress):
            progress += os.read(proc.stderr.fileno(), 4096)  # tqdm's bar: "| 3/50000" once 3 steps are done
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        err = (progress + err).decode(errors="replace")
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in err
    assert read_checkpoint(out / "checkpoint.pt")["step"] > 0
    load_checkpoint(out / "checkpoint.pt")  # what the predictor loads


@pytest.mark.parametrize("name, ladder_prob", [("default", 0.0), ("ladder", 0.3)])
def test_the_recipe_configs_parse_and_name_real_data(name, ladder_prob):
    """The bundled model's two configs: every key is a flag, and every data path exists where the data is."""
    from pathlib import Path

    config = Path(train.__file__).parent / "configs" / f"{name}.toml"
    args = train.parse_args(["--config", str(config)])
    assert args.ladder_prob == ladder_prob and args.head == "refine" and args.input_size == 128
    paths = [*args.data_path, *args.val_data_path]
    if not paths[0].exists():
        pytest.skip(f"the COCO subsets are not at {paths[0].parent.parent.parent} (../shared/data)")
    assert all(path.exists() for path in paths)
