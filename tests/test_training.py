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

from napari_deepcrop.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from napari_deepcrop.model import DeepCropConfig, DeepCropV2
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


def test_average_epochs_makes_the_model_the_mean_of_the_last_epochs_weights_and_resumes_exactly(coco, tmp_path):
    # 3 steps an epoch; without averaging, the weights at the end of epochs 2 and 3
    train.main(args_for(coco, tmp_path / "plain", "--max-steps", "6"))
    second = read_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    train.main(args_for(coco, tmp_path / "plain", "--resume", str(tmp_path / "plain" / "checkpoint.pt")))
    third = read_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert (second["epoch"], third["epoch"]) == (2, 3)
    # the same run averaging its last 2 epochs, interrupted after the second and resumed
    out = tmp_path / "averaged"
    train.main(args_for(coco, out, "--average-epochs", "2", "--max-steps", "6"))
    assert read_checkpoint(out / "checkpoint.pt")["averaged"]["n_averaged"] == 1
    train.main(args_for(coco, out, "--average-epochs", "2", "--resume", str(out / "checkpoint.pt")))
    done = read_checkpoint(out / "checkpoint.pt")
    assert done["epoch"] == 3 and done["averaged"]["n_averaged"] == 2
    floats = [key for key, value in third["model"].items() if value.is_floating_point()]
    assert any(key.endswith("running_mean") for key in floats)  # batch norm statistics are averaged too
    moved = 0
    for key in floats:
        mean = (second["model"][key] + third["model"][key]) / 2
        assert torch.allclose(done["model"][key], mean, atol=1e-5), key
        moved += not torch.equal(second["model"][key], third["model"][key])
    assert moved > len(floats) // 2  # the two epochs' weights differ, so the mean is neither of them
    model, _ = load_checkpoint(out / "checkpoint.pt")  # what --init and the next stage take
    assert torch.allclose(model.state_dict()[floats[0]], done["model"][floats[0]])


def test_average_epochs_out_of_range_or_without_the_epochs_to_average_is_refused(coco, tmp_path):
    with pytest.raises(SystemExit, match="--average-epochs must be from 0 to --epochs"):
        train.main(args_for(coco, tmp_path / "a", "--average-epochs", "4"))
    train.main(args_for(coco, tmp_path / "b", "--max-steps", "6"))  # 2 epochs without averaging
    with pytest.raises(SystemExit, match="trained without --average-epochs past epoch 1"):
        train.main(
            args_for(coco, tmp_path / "b", "--average-epochs", "2", "--resume", str(tmp_path / "b" / "checkpoint.pt"))
        )


def test_fine_tune_from_init_and_test_only(coco, tmp_path):
    train.main(args_for(coco, tmp_path / "base", "--max-steps", "1"))
    metrics = train.main(
        args_for(coco, tmp_path / "tuned", "--init", str(tmp_path / "base" / "checkpoint.pt"), "--test-only")
    )
    assert 0.0 <= metrics["mean_iou"] <= 1.0 and metrics["n"] > 0
    assert not (tmp_path / "tuned" / "checkpoint.pt").exists()


def test_at_size_resamples_a_batch_as_if_it_had_been_cut_at_that_size():
    """A first-click batch cut at the refinement size, resampled to the input size, is (to interpolation) the
    batch cut at the input size: clicks and their planes exactly, image and mask closely."""
    from napari_deepcrop.clicks import encode_clicks
    from napari_deepcrop.crops import Crop, read_crop
    from napari_deepcrop.training.data import MAX_CLICKS, at_size

    config = DeepCropConfig(input_size=64, refine_size=96)
    image, mask = disk_image(256, (120, 140), 40, seed=3)
    image = cv2.GaussianBlur(image, (0, 0), 2)  # pixel noise would differ after two resamplings
    crop, click = Crop.centered((125.0, 130.0), 150.0), np.array([[120, 140], [40, 40]])

    def cut(size):
        rgb = read_crop(image, crop, size, lambda r: r.astype(np.float32) / 255)
        gt = read_crop(mask, crop, size, lambda m: m.astype(np.float32)) > 0.5
        clicks = np.full((MAX_CLICKS, 3), -1.0, np.float32)
        clicks[:2, :2], clicks[:2, 2] = crop.to_input(click, size), [1, 0]
        planes = encode_clicks(clicks[:2, :2], np.array([1, 0]), config, size=size)
        return {"image": torch.from_numpy(rgb.transpose(2, 0, 1))[None], "planes": torch.from_numpy(planes)[None],
                "mask": torch.from_numpy(gt[None, None].astype(np.float32)), "clicks": torch.from_numpy(clicks)[None],
                "outside": torch.tensor([float(size) ** 2])}  # fmt: skip

    large, small = cut(96), cut(64)
    assert at_size(small, 64, config) is small
    resampled = at_size(large, 64, config)
    assert torch.allclose(resampled["clicks"], small["clicks"], atol=1e-5)
    assert torch.allclose(resampled["planes"], small["planes"], atol=1e-5)
    assert (resampled["image"] - small["image"]).abs().mean() < 0.01
    a, b = resampled["mask"].bool(), small["mask"].bool()
    assert (a & b).sum() / (a | b).sum() > 0.95
    assert resampled["outside"].item() == pytest.approx(64.0**2)
    assert large["image"].shape[-1] == 96  # the input is not changed


@pytest.mark.parametrize("iterative, size", [(1.0, 96), (0.0, 64)])
def test_corrective_batches_train_at_the_refinement_size_and_first_clicks_at_the_input_size(iterative, size):
    from synthetic import DiskObjects
    from torch.utils.data import DataLoader

    from napari_deepcrop.training.engine import TrainOptions, train_one_epoch

    torch.manual_seed(0)
    config = DeepCropConfig(input_size=64, refine_size=96, decoder_width=8)
    model = DeepCropV2(config)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[-1], args[1].shape[-1])))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = DataLoader(DiskObjects(config, n=8), batch_size=4)
    train_one_epoch(model, config, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), loader,
                    torch.device("cpu"), 0, 0, TrainOptions(iterative_prob=iterative), show_progress=False)  # fmt: skip
    assert seen and set(seen) == {(size, size)}


def test_refine_size_is_recorded_with_and_without_init(coco, tmp_path):
    train.main(args_for(coco, tmp_path / "base", "--max-steps", "1"))
    assert read_checkpoint(tmp_path / "base" / "checkpoint.pt")["config"]["refine_size"] is None
    base = str(tmp_path / "base" / "checkpoint.pt")
    train.main(args_for(coco, tmp_path / "focus", "--max-steps", "2", "--init", base, "--refine-size", "96"))
    tuned = read_checkpoint(tmp_path / "focus" / "checkpoint.pt")
    assert tuned["config"]["refine_size"] == 96 and tuned["step"] == 2
    assert load_checkpoint(tmp_path / "focus" / "checkpoint.pt")[0].config.sizes == (64, 96)
    train.main(args_for(coco, tmp_path / "new", "--max-steps", "1", "--refine-size", "96"))
    assert read_checkpoint(tmp_path / "new" / "checkpoint.pt")["config"]["refine_size"] == 96


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def torchrun(port, *args):
    """Two CPU processes under torchrun, on their own rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]


def train_command(coco, out, *extra):
    """``-m napari_deepcrop.training.train`` arguments for a small run on the synthetic dataset."""
    return ["-m", "napari_deepcrop.training.train", "--data-path", str(coco), "--output-dir", str(out),
            "--input-size", "64", "--workers", "0", "--val-split", "0.34", *extra]


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_checkpoint(coco, tmp_path):
    out = tmp_path / "ddp"
    cmd = torchrun(29517, *train_command(coco, out, "--batch-size", "2", "--samples-per-epoch", "8", "--epochs", "1",
                                         "--val-samples", "4", "--no-progress", "--device", "cpu"))
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "log.csv"]
    checkpoint = read_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == 2  # 8 samples / 2 processes / batch 2
    assert result.stdout.count("done:") == 1  # only rank 0 reports


@pytest.mark.slow
def test_ddp_runs_a_config_of_stages(coco, tmp_path):
    """Under torchrun the stages share one process group; rank 0 alone writes and reports."""
    config = staged_config(tmp_path, coco, STAGED.replace("samples-per-epoch = 12", "samples-per-epoch = 8"))
    out = tmp_path / "ddp"
    cmd = torchrun(29518, "-m", "napari_deepcrop.training.train", "--config", str(config), "--output-dir", str(out),
                   "--device", "cpu")
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(out / "first" / "checkpoint.pt")["step"] == 2  # 8 samples / 2 processes / batch 4
    assert read_checkpoint(out / "second" / "checkpoint.pt")["step"] == 1
    assert result.stdout.count("training in") == 2 and result.stdout.count("done:") == 2


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


def test_init_refuses_flags_of_another_architecture(coco, tmp_path):
    """--init's network keeps its architecture: an architecture flag that differs stops the run with the reason
    before anything is written; the same value, or none, fine-tunes it."""
    base = save_checkpoint(tmp_path / "base.pt", DeepCropV2(DeepCropConfig(trunk="resnet18", input_size=64)))
    for flags, said in [
        (["--trunk", "efficientnet_lite0"], "--trunk efficientnet_lite0 (the model's: resnet18)"),
        (["--trunk-stride", "32"], "--trunk-stride 32 (the model's: 16)"),
        (["--head", "deepmask", "--input-size", "96"], "--head deepmask (the model's: refine), --input-size 96"),
        (["--click-encoding", "disk"], "--click-encoding disk (the model's: distance)"),
    ]:
        out = tmp_path / flags[0].strip("-")
        with pytest.raises(SystemExit, match=re.escape(said)):
            train.main(args_for(coco, out, "--init", str(base), "--max-steps", "1", *flags))
        assert not out.exists() or not any(out.iterdir())
    train.main(args_for(coco, tmp_path / "same", "--init", str(base), "--max-steps", "1", "--trunk", "resnet18"))
    assert read_checkpoint(tmp_path / "same" / "checkpoint.pt")["config"]["trunk"] == "resnet18"


def test_a_recipe_recorded_with_the_architecture_defaults_continues(coco, tmp_path):
    """Runs recorded before the architecture flags defaulted to None stored the defaults themselves: the same
    command continues them; another trunk is another recipe."""
    args = args_for(coco, tmp_path / "run")
    recorded = {**train._plain(args), "trunk": "resnet18", "trunk_stride": 16, "head": "refine"}
    train._check_same_recipe(tmp_path / "run" / "checkpoint.pt", recorded, args)
    with pytest.raises(SystemExit, match=r"other settings \(trunk\)"):
        train._check_same_recipe(tmp_path / "run" / "checkpoint.pt", {**recorded, "trunk": "resnet50"}, args)


def test_train_only_score_changes_the_score_head_alone(coco, tmp_path):
    """--init with a new --score-head and --train-only score: every other weight and batch-norm statistic is
    the initial model's, the optimizer holds the score head's parameters alone, and the checkpoint records it."""
    train.main(args_for(coco, tmp_path / "base", "--max-steps", "1"))
    base = read_checkpoint(tmp_path / "base" / "checkpoint.pt")
    args = args_for(
        coco, tmp_path / "score", "--init", str(tmp_path / "base" / "checkpoint.pt"), "--score-head", "mask",
        "--train-only", "score", "--max-steps", "4", "--lr", "1e-2",
    )  # fmt: skip
    train.main(args)
    tuned = read_checkpoint(tmp_path / "score" / "checkpoint.pt")
    assert tuned["config"]["score_head"] == "mask" and base["config"]["score_head"] == "pooled"
    others = [k for k in base["model"] if not k.startswith("score_head.")]
    assert others and all(torch.equal(base["model"][k], tuned["model"][k]) for k in others)
    assert any("running_mean" in k for k in others)  # batch norm statistics among them
    score_params = [k for k in tuned["model"] if k.startswith("score_head.")]
    assert len(tuned["optimizer"]["param_groups"][0]["params"]) == len(score_params) == 4
    assert len(tuned["optimizer"]["state"]) == 4  # each has taken steps
    model, _ = load_checkpoint(tmp_path / "score" / "checkpoint.pt")
    fresh = DeepCropV2(model.config)
    assert type(model.score_head) is type(fresh.score_head) and model.config.score_head == "mask"


def test_the_recipe_config_is_four_stages_and_names_real_data(tmp_path):
    """The recipe: objects from the ImageNet Lite2 trunk with click disks, then ladder crops from its last weights,
    then refinement crops at 192 px from those, then at 256 px, one command."""
    from pathlib import Path

    config = Path(train.__file__).parent / "configs" / "default.toml"
    stages = train.parse_stages(["--config", str(config), "--output-dir", str(tmp_path)])
    objects, ladder, focus, focus256 = stages
    assert (objects.epochs, objects.ladder_prob, objects.init, objects.lr) == (14, 0.0, None, 1e-3)
    assert (ladder.epochs, ladder.ladder_prob, ladder.lr) == (5, 0.3, 3e-4)
    assert (focus.epochs, focus.ladder_prob, focus.lr, focus.refine_size) == (10, 0.3, 3e-4, 192)
    assert (focus256.epochs, focus256.ladder_prob, focus256.lr, focus256.refine_size) == (10, 0.3, 2e-4, 256)
    assert objects.refine_size is None and ladder.refine_size is None
    assert all(a.trunk == "efficientnet_lite2" and a.pretrained == "imagenet" for a in stages)
    assert all(a.click_encoding == "disk" for a in stages)  # the refining network; the first-click one: "distance"
    assert ladder.init == tmp_path / "objects" / "checkpoint.pt" and ladder.output_dir == tmp_path / "ladder"
    assert focus.init == tmp_path / "ladder" / "checkpoint.pt" and focus.output_dir == tmp_path / "focus"
    assert focus256.init == tmp_path / "focus" / "checkpoint.pt" and focus256.output_dir == tmp_path / "focus256"
    assert all(a.head == "refine" and a.input_size == 128 and a.samples_per_epoch == 3000 for a in stages)
    paths = [*objects.data_path, *objects.val_data_path]
    if not paths[0].exists():
        pytest.skip(f"the COCO subsets are not at {paths[0].parent.parent.parent} (../shared/data)")
    assert all(path.exists() for path in paths)


STAGED = """
input-size = 64
batch-size = 4
samples-per-epoch = 12
val-samples = 8
val-split = 0.34
warmup-steps = 2
workers = 0
no-progress = true

[[stage]]
name = "first"
epochs = 2
lr = 1e-3

[[stage]]
name = "second"
epochs = 1
lr = 2e-4
ladder-prob = 0.5
"""


def staged_config(tmp_path, coco, text=STAGED):
    path = tmp_path / "recipe.toml"
    path.write_text(f'data-path = ["{coco.name}"]\n' + text)  # relative to the config, as in the bundled one
    return path


def test_a_config_of_stages_runs_them_in_order_from_one_command(coco, tmp_path, capsys):
    config = staged_config(tmp_path, coco)
    out = tmp_path / "run"
    train.cli(["--config", str(config), "--output-dir", str(out)])
    first, second = read_checkpoint(out / "first" / "checkpoint.pt"), read_checkpoint(out / "second" / "checkpoint.pt")
    assert (first["epoch"], first["step"], second["epoch"], second["step"]) == (2, 6, 1, 3)
    assert second["meta"]["args"]["init"] == str(out / "first" / "checkpoint.pt")
    assert second["meta"]["config_text"] == config.read_text() and second["meta"]["args"]["stage"] == "second (2/2)"
    assert (first["meta"]["args"]["lr"], second["meta"]["args"]["lr"]) == (1e-3, 2e-4)
    assert (first["meta"]["args"]["ladder_prob"], second["meta"]["args"]["ladder_prob"]) == (0.0, 0.5)
    # stage 2 started from stage 1's last weights, not from a new model (seed 0: stage 1's own starting point)
    start = load_checkpoint(out / "first" / "checkpoint.pt")[0].state_dict()
    end = load_checkpoint(out / "second" / "checkpoint.pt")[0].state_dict()
    torch.manual_seed(0)
    fresh = DeepCropV2(DeepCropConfig.from_dict(first["config"])).state_dict()

    def distance(a, b):
        return sum((a[k].float() - b[k].float()).abs().sum().item() for k in a if a[k].is_floating_point())

    assert distance(end, start) < 0.5 * distance(end, fresh)
    # the same command again: both stages are done, nothing is trained or overwritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    capsys.readouterr()
    train.cli(["--config", str(config), "--output-dir", str(out)])
    assert capsys.readouterr().out.count("done already") == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before


def test_the_same_command_again_continues_an_interrupted_recipe(coco, tmp_path, capsys):
    config = staged_config(tmp_path, coco)
    out = tmp_path / "run"
    train.cli(["--config", str(config), "--output-dir", str(out), "--max-steps", "4"])  # stops inside stage 1
    assert read_checkpoint(out / "first" / "checkpoint.pt")["step"] == 4
    assert not (out / "second").exists()
    assert "stopped before its last epoch" in capsys.readouterr().out
    train.cli(["--config", str(config), "--output-dir", str(out)])
    assert "first (1/2): resuming" in capsys.readouterr().out
    assert read_checkpoint(out / "first" / "checkpoint.pt")["step"] == 6  # went on from step 4, not from 0
    assert read_checkpoint(out / "second" / "checkpoint.pt")["step"] == 3


def test_a_recipe_that_gains_a_stage_keeps_the_stages_it_has_run(coco, tmp_path, capsys):
    """A stage is known by its name and settings, not its place: a third stage appended to a finished recipe runs
    from the second's last weights, and the first two are not run again."""
    out = tmp_path / "run"
    train.cli(["--config", str(staged_config(tmp_path, coco)), "--output-dir", str(out)])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    grown = staged_config(tmp_path, coco, STAGED + '\n[[stage]]\nname = "third"\nepochs = 1\nlr = 1e-4\n')
    capsys.readouterr()
    train.cli(["--config", str(grown), "--output-dir", str(out)])
    said = capsys.readouterr().out
    assert "first (1/3): done already" in said and "second (2/3): done already" in said
    assert "third (3/3): training" in said
    assert {p: p.stat().st_mtime_ns for p in before} == before
    third = read_checkpoint(out / "third" / "checkpoint.pt")
    assert third["meta"]["args"]["init"] == str(out / "second" / "checkpoint.pt") and third["step"] == 3
    # a stage renamed is another stage: its folder's checkpoint is not taken for it
    renamed = staged_config(tmp_path, coco, STAGED.replace('name = "second"', 'name = "other"'))
    train.cli(["--config", str(renamed), "--output-dir", str(out), "--max-steps", "1"])
    assert "other (2/2): training" in capsys.readouterr().out


@pytest.mark.parametrize("change, differ", [("lr", "lr"), ("data", "data_path")])
def test_a_stage_folder_of_other_settings_is_not_overwritten(coco, tmp_path, change, differ):
    out = tmp_path / "run"
    train.cli(["--config", str(staged_config(tmp_path, coco)), "--output-dir", str(out), "--max-steps", "2"])
    saved = (out / "first" / "checkpoint.pt").read_bytes()
    if change == "lr":
        changed = staged_config(tmp_path, coco, STAGED.replace("lr = 1e-3", "lr = 5e-3"))
    else:
        (tmp_path / "other").mkdir()
        other = write_synthetic_coco(tmp_path / "other", seed=1)
        changed = staged_config(tmp_path, coco, STAGED)
        changed.write_text(changed.read_text().replace(f'"{coco.name}"', f'"other/{other.name}"'))
    with pytest.raises(SystemExit, match=rf"first/checkpoint.pt was trained with other settings \({differ}\)"):
        train.cli(["--config", str(changed), "--output-dir", str(out)])
    assert (out / "first" / "checkpoint.pt").read_bytes() == saved


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[stage]]\nepochs = 1\n", "needs a name"),
        ('[[stage]]\nname = "a/b"\n', "plain folder name"),
        ('[[stage]]\nname = "a"\n[[stage]]\nname = "a"\n', "names repeat"),
        ('[[stage]]\nname = "a"\nepoch = 1\n', "stage 'a': unknown keys \\['epoch'\\]"),
        ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\ninit = "x.pt"\n', "may not set"),
        ("stage = 3\n", "list of \\[\\[stage\\]\\] tables"),
        ("epochs = [\n", "--config"),
    ],
)
def test_bad_stage_configs_are_refused_with_the_reason(coco, tmp_path, capsys, text, message):
    config = staged_config(tmp_path, coco, text)
    with pytest.raises(SystemExit):
        train.parse_stages(["--config", str(config)])
    assert re.search(message, capsys.readouterr().err)


def test_resume_and_test_only_take_one_run_not_a_recipe(coco, tmp_path, capsys):
    config = staged_config(tmp_path, coco)
    for flag in (["--resume", "x.pt"], ["--test-only"]):
        with pytest.raises(SystemExit):
            train.parse_stages(["--config", str(config), *flag])
        assert "give the same command again" in capsys.readouterr().err


def test_paste_object_puts_the_object_onto_the_other_image_and_leaves_the_rest_of_it():
    """Copy-paste: the object's own pixels inside its new mask, the other image's pixels untouched away from it, at
    a scale within PASTE_SCALE_RANGE (or down to fit a smaller image), and the same draw for the same seed."""
    from scipy import ndimage

    from napari_deepcrop.training.data import PASTE_SCALE_RANGE, paste_object

    image = np.full((120, 160, 3), 90, np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:70, 50:110] = True  # a 40 x 60 red box
    image[mask] = (220, 20, 20)
    background = np.random.default_rng(1).integers(0, 60, (200, 240, 3)).astype(np.uint8)
    for seed in range(5):
        out, pasted = paste_object(image, mask, background, np.random.default_rng(seed))
        again, pasted_again = paste_object(image, mask, background, np.random.default_rng(seed))
        assert np.array_equal(out, again) and np.array_equal(pasted, pasted_again)
        assert out.shape == background.shape and pasted.shape == background.shape[:2]
        assert PASTE_SCALE_RANGE[0] ** 2 * 0.9 < pasted.sum() / mask.sum() < PASTE_SCALE_RANGE[1] ** 2 * 1.1
        inner = ndimage.binary_erosion(pasted, iterations=3)
        assert inner.any() and (np.abs(out[inner].astype(int) - (220, 20, 20)) <= 2).all()
        away = ~ndimage.binary_dilation(pasted, iterations=4)
        assert np.array_equal(out[away], background[away])
    small = background[:30, :45]  # smaller than the object: scaled down to fit
    out, pasted = paste_object(image, mask, small, np.random.default_rng(0))
    assert out.shape == small.shape and pasted.any() and pasted.sum() <= 30 * 45


def test_paste_prob_pastes_training_objects_and_zero_leaves_the_samples_as_they_were(coco):
    """paste_prob=1: every training sample is its object on another image (the crop then differs from the
    unpasted one of the same seed, its mask still the object's); paste_prob=0 draws exactly what it drew before."""
    from napari_deepcrop.training.data import CocoObjects, CocoSource

    config = DeepCropConfig(input_size=64)
    plain = CocoObjects([CocoSource.from_paths(coco)], config, True)
    pasted = CocoObjects([CocoSource.from_paths(coco)], config, True, paste_prob=1.0)
    again = CocoObjects([CocoSource.from_paths(coco)], config, True, paste_prob=0.0)
    changed = 0
    for i in range(len(plain)):
        a, b, c = plain[(i, 7)], pasted[(i, 7)], again[(i, 7)]
        assert all(torch.equal(a[k], c[k]) for k in a)
        changed += not torch.equal(a["image"], b["image"])
        # the disk, pasted: bright under its mask (the other image's own disk, unmasked, lifts the rest's mean)
        assert b["mask"].sum() > 0
        assert b["image"].mean(0)[b["mask"][0] > 0].mean() > b["image"].mean(0)[b["mask"][0] == 0].mean() + 0.1
    assert changed == len(plain)


@pytest.mark.parametrize("flag", ["--paste-prob", "--ladder-prob", "--focus-prob"])
def test_a_share_of_crops_outside_0_to_1_is_refused_by_name(coco, tmp_path, flag):
    args = args_for(coco, tmp_path / "run", flag, "1.5")
    with pytest.raises(SystemExit, match=f"{flag} is a share of the training crops, from 0 to 1: got 1.5"):
        train.build_datasets(args, train.model_config(args))


def ritm_normalized_focal_loss(logits, target, alpha=0.5, gamma=2.0, eps=1e-12):
    """isegm's NormalizedFocalLossSigmoid (no ignore label, size_average, detach_delimeter), written out as RITM
    writes it."""
    one_hot = target > 0.5
    pred = torch.sigmoid(logits)
    a = torch.where(one_hot, alpha * torch.ones_like(pred), (1 - alpha) * torch.ones_like(pred))
    pt = torch.where(one_hot, pred, 1 - pred)
    beta = (1 - pt) ** gamma
    size = torch.ones_like(pred).sum(dim=(1, 2, 3))
    mult = (size / (beta.sum(dim=(1, 2, 3)) + eps)).detach()
    loss = -a * beta * mult[:, None, None, None] * torch.log(torch.min(pt + eps, torch.ones(1)))
    return (loss.sum(dim=(1, 2, 3)) / (size + eps)).mean()


def test_the_normalized_focal_loss_is_ritms_and_keeps_a_good_masks_errors_weighty():
    from napari_deepcrop.training.engine import mask_loss, normalized_focal_loss

    torch.manual_seed(0)
    target = (torch.rand(4, 1, 32, 32) > 0.5).float()
    logits = (torch.randn(4, 1, 32, 32) * 3).requires_grad_()
    ours, theirs = normalized_focal_loss(logits, target), ritm_normalized_focal_loss(logits, target)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs)
    dice = mask_loss(logits, target) - torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(mask_loss(logits, target, "nfl"), ours + dice)
    with pytest.raises(ValueError, match="mask loss must be one of"):
        mask_loss(logits, target, "dice")
    # a mask right but for 4 pixels: the logistic loss's gradient on them shrinks with the pixels right around
    # them, the normalized focal loss's does not
    grads = {}
    for side in (16, 64):
        target = torch.zeros(1, 1, side, side)
        target[..., : side // 2, :] = 1
        logits = (target * 2 - 1) * 6.0
        logits[..., :2, :2] *= -1  # four confidently wrong pixels
        logits.requires_grad_()
        losses = (("bce", torch.nn.functional.binary_cross_entropy_with_logits), ("nfl", normalized_focal_loss))
        for name, loss in losses:
            (g,) = torch.autograd.grad(loss(logits, target), logits)
            grads[name, side] = g[..., :2, :2].abs().mean().item()
    assert grads["bce", 64] < grads["bce", 16] / 10
    assert grads["nfl", 64] == pytest.approx(grads["nfl", 16], rel=0.05)


def test_training_takes_the_mask_loss_and_records_it(coco, tmp_path):
    train.main(args_for(coco, tmp_path / "run", "--max-steps", "2", "--mask-loss", "nfl"))
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["meta"]["args"]["mask_loss"] == "nfl"
    with pytest.raises(SystemExit):
        args_for(coco, tmp_path / "bad", "--mask-loss", "dice")


def test_click_power_reaches_the_training_crops_and_is_checked(coco, tmp_path):
    train_set, val_set = train.build_datasets(
        args_for(coco, tmp_path / "r", "--click-power", "0"), DeepCropConfig(input_size=64)
    )
    assert train_set.click_power == 0.0 and train_set.train and not val_set.train
    with pytest.raises(SystemExit, match="--click-power is a power .* got -1.0"):
        train.build_datasets(args_for(coco, tmp_path / "r", "--click-power", "-1"), DeepCropConfig(input_size=64))


def test_trunk_lr_mult_trains_the_trunk_slower_but_its_first_conv_and_the_heads_at_lr(coco, tmp_path):
    """--trunk-lr-mult: two optimizer groups, the trunk's (without its first convolution, whose click filters are
    new) at lr x mult and the rest at lr, kept through a resume; the default is one group; bad values refused."""
    model = DeepCropV2(DeepCropConfig(input_size=64))
    groups = train.param_groups(model, 1e-3, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    fast, slow = ({names[id(p)] for p in g["params"]} for g in groups)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert fast | slow == set(names.values()) and not fast & slow
    assert all(n.startswith("trunk.") for n in slow) and len(slow) > 10
    assert {n for n in fast if n.startswith("trunk.")} == {"trunk.conv1.weight"}
    assert len(train.param_groups(model, 1e-3, 1.0)) == 1

    train.main(args_for(coco, tmp_path / "run", "--max-steps", "2", "--trunk-lr-mult", "0.1"))
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    lrs = [g["initial_lr"] for g in saved["optimizer"]["param_groups"]]
    assert lrs == [pytest.approx(1e-3), pytest.approx(1e-4)] and saved["meta"]["args"]["trunk_lr_mult"] == 0.1
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    train.main(args_for(coco, tmp_path / "run", "--trunk-lr-mult", "0.1", "--resume", checkpoint))
    resumed = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert resumed["epoch"] == 3 and len(resumed["optimizer"]["param_groups"]) == 2
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit, match="--trunk-lr-mult is a share of --lr"):
            train.main(args_for(coco, tmp_path / "bad", "--trunk-lr-mult", bad))


def test_click_encoding_disk_is_the_networks_and_its_training_crops(coco, tmp_path):
    """--click-encoding disk: the checkpoint's config records it, so the predictor (and --init) encode clicks as
    the network was trained; the training samples' planes are disks; a checkpoint without it is "distance"."""
    args = args_for(coco, tmp_path / "run", "--max-steps", "1", "--click-encoding", "disk")
    train_set, _ = train.build_datasets(args, train.model_config(args))
    planes = train_set[0]["planes"].numpy()
    assert set(np.unique(planes[:2])) <= {0.0, 1.0} and planes[0].sum() > 0
    train.main(args)
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert model.config.click_encoding == "disk"
    old = {k: v for k, v in model.config.to_dict().items() if k != "click_encoding"}
    assert DeepCropConfig.from_dict(old).click_encoding == "distance"


def test_a_first_click_network_of_the_initial_checkpoint_is_kept_through_training_and_resume(coco, tmp_path):
    """--init a checkpoint with a first-click network (the bundled one): training changes the main network only, and
    every checkpoint of the run, resumed or not, carries the first-click network unchanged."""
    from napari_deepcrop.checkpoint import load_first_click_model

    torch.manual_seed(0)
    first = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk")).eval()
    init = save_checkpoint(tmp_path / "two.pt", DeepCropV2(DeepCropConfig(input_size=64)), first_click_model=first)
    run = tmp_path / "run"
    train.main(args_for(coco, run, "--init", str(init), "--max-steps", "1"))
    train.main(args_for(coco, run, "--max-steps", "2", "--resume", str(run / "checkpoint.pt")))
    payload = read_checkpoint(run / "checkpoint.pt")
    assert payload["step"] == 2
    kept = load_first_click_model(payload)
    assert kept.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), kept.state_dict().values(), strict=True))
    assert load_first_click_model(read_checkpoint(init)) is not None


def _twelve_bit_disk(size=96, seed=0):
    """A microscope's 12-bit frame stored in uint16: a bright disk (~3,000) on a dim background (~200)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2) ** 2 + (xx - size / 2.5) ** 2 < (size / 4) ** 2
    image = np.where(mask, 3000.0, 200.0) + rng.normal(0, 40, (size, size))
    return np.clip(image, 0, 4095).astype(np.uint16), mask.astype(np.uint16)


def test_training_sees_an_exported_12_bit_image_as_the_predictor_does(tmp_path):
    """The widget exports a microscope's uint16 pixels as they are; training must scale them as the predictor
    scales the same array (its percentiles), not as 8-bit readers do (values / 256: a black image)."""
    from napari_deepcrop.coco import CocoEntry, write_coco_dataset
    from napari_deepcrop.predictor import ImageSource
    from napari_deepcrop.training.data import CocoObjects, CocoSource

    image, labels = _twelve_bit_disk()
    json_path = write_coco_dataset(tmp_path, [CocoEntry(image, labels)])
    data = CocoObjects([CocoSource.from_paths(json_path)], DeepCropConfig(input_size=64), False, 100)
    seen = ImageSource.from_array(image).to_float(image) * 255
    assert data.images[0].dtype == np.uint8 and data.images[0].shape == (96, 96, 3)
    assert np.abs(data.images[0] - seen).max() <= 0.5 + 1e-4
    inside, outside = data.images[0][labels > 0].mean(), data.images[0][labels == 0].mean()
    assert inside > 200 and outside < 40
    sample = data[(0, 0)]  # the crop the network trains on keeps that contrast
    crop, mask = sample["image"].mean(0), sample["mask"][0] > 0.5
    assert crop[mask].mean() > 0.8 and crop[~mask].mean() < 0.2


@pytest.mark.parametrize("channels", [3, 1])
def test_training_reads_8_bit_images_unchanged(tmp_path, channels):
    """8-bit pixels reach training as stored (a gray image in all three channels), as before the predictor's
    scaling was shared: the bundled model's recipe trains on exactly the pixels it always did."""
    from napari_deepcrop.training.data import CocoObjects, CocoSource

    path = write_synthetic_coco(tmp_path, n_images=2)
    rgb = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    stored = rgb if channels == 3 else rgb[..., 0]
    cv2.imwrite(str(tmp_path / "img1.png"), stored[..., ::-1] if channels == 3 else stored)
    data = CocoObjects([CocoSource.from_paths(path)], DeepCropConfig(input_size=64), False, 100)
    expected = rgb if channels == 3 else np.repeat(rgb[..., :1], 3, axis=-1)
    assert np.array_equal(data.images[0], expected)


def test_training_names_an_unreadable_or_missing_image(tmp_path):
    from napari_deepcrop.training.data import CocoObjects, CocoSource

    path = write_synthetic_coco(tmp_path, n_images=2)
    (tmp_path / "img2.png").write_bytes(b"not a png")
    with pytest.raises(FileNotFoundError, match="cannot read image .*img2.png"):
        CocoObjects([CocoSource.from_paths(path)], DeepCropConfig(input_size=64), False, 100)
    (tmp_path / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match="img2.png"):
        CocoObjects([CocoSource.from_paths(path)], DeepCropConfig(input_size=64), False, 100)


def test_drop_first_click_network_leaves_it_out_of_the_runs_checkpoints(coco, tmp_path):
    """--drop-first-click-network: the run's checkpoints, resumed or not, hold the trained network alone."""
    from napari_deepcrop.checkpoint import load_first_click_model

    torch.manual_seed(0)
    first = DeepCropV2(DeepCropConfig(input_size=64, click_encoding="disk")).eval()
    init = save_checkpoint(tmp_path / "two.pt", DeepCropV2(DeepCropConfig(input_size=64)), first_click_model=first)
    run = tmp_path / "run"
    train.main(args_for(coco, run, "--init", str(init), "--max-steps", "1", "--drop-first-click-network"))
    assert load_first_click_model(read_checkpoint(run / "checkpoint.pt")) is None
    train.main(args_for(coco, run, "--max-steps", "2", "--resume", str(run / "checkpoint.pt")))
    payload = read_checkpoint(run / "checkpoint.pt")
    assert payload["step"] == 2 and load_first_click_model(payload) is None
