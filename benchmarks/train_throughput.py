"""Training throughput: samples/s of each trunk and head, with data loading measured apart from compute.

Which trunk a CPU-only user can afford to train, and whether data or compute limits it. Data = the real
``CocoObjects`` samples (crop, click, augmentation) over shared/data/tiny_coco, or synthetic disks when that is
absent, in this one process. Compute = forward + loss + backward + optimizer step on batches already in memory,
as ``train_one_epoch`` does them. Not included: the corrective-click passes that ``--iterative-prob`` adds to
some batches (1-3 extra forwards in eval mode), so real training is slower than the compute column.

    python benchmarks/train_throughput.py --quick                  # resnet18, both heads, a few steps
    python benchmarks/train_throughput.py --trunks resnet18 resnet50 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from napari_deepcrop.model import HEADS, TRUNKS, DeepCropConfig, DeepCropV2
from napari_deepcrop.training.data import CocoObjects, CocoSource, EpochSampler, make_sample
from napari_deepcrop.training.engine import TrainOptions, optimizer_step
from napari_deepcrop.training.train import parse_args as parse_train_args

TINY_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"


def default_recipe() -> argparse.Namespace:
    """The bundled model's training recipe (input size, batch size), read as the trainer reads it."""
    return parse_train_args(["--config", str(files("napari_deepcrop.training") / "configs" / "default.toml")])


class SyntheticDisks(Dataset):
    """Bright disks on noise, cut by the same ``make_sample``: the data path when no COCO data is at hand."""

    def __init__(self, config: DeepCropConfig, n: int = 10_000) -> None:
        self.config, self.n = config, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        radius = rng.uniform(12, 60)
        center = rng.uniform(radius, 256 - radius, size=2)
        rr, cc = np.mgrid[:256, :256]
        mask = (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2
        image = rng.integers(30, 110, (256, 256, 3), dtype=np.uint8)
        image[mask] += 110
        return make_sample(image, mask, self.config, rng, train=True)


def build_dataset(config: DeepCropConfig, annotations: Path) -> tuple[Dataset, str, float]:
    """(dataset, its description, seconds to build it: CocoObjects decodes every image up front)."""
    tic = time.perf_counter()
    if annotations.is_file():
        dataset = CocoObjects([CocoSource.from_paths(annotations)], config, train=True)
        name = f"CocoObjects({annotations.parent.parent.name}: {len(dataset.images)} images, {len(dataset)} objects)"
    else:
        dataset, name = SyntheticDisks(config), f"synthetic disks ({annotations} not found)"
    return dataset, name, time.perf_counter() - tic


def load_batches(dataset: Dataset, batch_size: int, n_batches: int) -> tuple[list[dict], list[float]]:
    """The batches, and seconds per batch, from a DataLoader in this process (num_workers=0)."""
    sampler = EpochSampler(len(dataset), batch_size * n_batches, seed=0)
    batches, seconds = [], []
    tic = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0):
        seconds.append(time.perf_counter() - tic)
        batches.append(batch)
        tic = time.perf_counter()
    return batches, seconds


def train_step_seconds(
    config: DeepCropConfig, batches: list[dict], steps: int, device: torch.device, amp: bool
) -> list[float]:
    """Seconds per step of forward + loss + backward + clipped AdamW step, after two warm-up steps."""
    torch.manual_seed(0)
    model = DeepCropV2(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    options = TrainOptions()
    on_device = [{k: batch[k].to(device) for k in ("image", "planes", "mask", "outside")} for batch in batches]
    seconds = []
    for step in range(steps + 2):
        batch = on_device[step % len(on_device)]
        tic = time.perf_counter()
        optimizer_step(model, batch, batch["planes"], optimizer, scaler, options, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            seconds.append(time.perf_counter() - tic)
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    recipe = default_recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="timed steps per model (default 20; 3 with --quick)")
    parser.add_argument("--batch-size", type=int, help=f"default: the recipe's {recipe.batch_size}; 4 with --quick")
    parser.add_argument("--input-size", type=int, default=recipe.input_size, help="default: the recipe's")
    parser.add_argument("--trunks", nargs="+", choices=sorted(TRUNKS), help="default: all; resnet18 with --quick")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="all: CPU + any CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--data-path", type=Path, default=TINY_COCO / "annotations" / "instances_train2017.json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: resnet18, batch 4, 3 steps")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    args.batch_size = args.batch_size or (4 if args.quick else recipe.batch_size)
    args.trunks = args.trunks or (["resnet18"] if args.quick else sorted(TRUNKS))
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    args.devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not args.devices:
        parser.error("--device cuda: PyTorch sees no CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py does on the CPU
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"# {cpu}, torch {torch.__version__} on {torch.get_num_threads()} threads, CUDA: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; input {args.input_size}², "
        f"batch {args.batch_size}, median of {args.steps} steps after 2 warm-up steps"
    )

    config = DeepCropConfig(input_size=args.input_size)  # the data depend on the input size, not on the model
    dataset, name, build_s = build_dataset(config, args.data_path)
    batches, seconds = load_batches(dataset, args.batch_size, max(2, min(args.steps, 8)))
    data_rate = args.batch_size / statistics.median(seconds)
    print(
        f"# data: {name}, built in {build_s:.1f} s; {data_rate:.1f} samples/s in one process "
        f"(median of {len(seconds)} batches; the trainer's --workers add processes)"
    )

    rows = []
    print(f"{'trunk':<9} {'head':<9} {'device':<10} {'params M':>8} {'ms/step':>9} {'samples/s':>10}")
    for device in args.devices:
        for amp in (False, True) if device.type == "cuda" else (False,):
            for trunk in args.trunks:
                for head in args.heads:
                    model_config = DeepCropConfig(trunk=trunk, head=head, input_size=args.input_size)
                    params = sum(p.numel() for p in DeepCropV2(model_config).parameters()) / 1e6
                    step_s = statistics.median(train_step_seconds(model_config, batches, args.steps, device, amp))
                    label = device.type + ("+amp" if amp else "")
                    row = {
                        "trunk": trunk,
                        "head": head,
                        "device": label,
                        "params_m": round(params, 2),
                        "ms_per_step": 1e3 * step_s,
                        "samples_per_s": args.batch_size / step_s,
                        "data_samples_per_s": data_rate,
                    }
                    rows.append(row)
                    print(
                        f"{trunk:<9} {head:<9} {label:<10} {params:8.1f} {1e3 * step_s:9.0f} "
                        f"{row['samples_per_s']:10.1f}",
                        flush=True,
                    )
    return rows


if __name__ == "__main__":
    main()
