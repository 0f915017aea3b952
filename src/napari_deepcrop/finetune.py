"""Fine-tune a checkpoint on an exported COCO dataset, and measure it before and after on held-out objects.

This is the training command's own machinery (``training/train.py``: ``parse_args`` then ``main``), run twice
on the same split: ``--test-only`` with the starting checkpoint (before), then training from it (after). The
user's annotations are usually one image or a few, so a share of the *objects* is held out rather than of the
images (``--val-split-by objects``). Without Qt: the napari widget runs :func:`finetune` on a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint

RUN_DIR = "finetune"
CHECKPOINT = "finetuned.pt"
MIN_OBJECT_SIDE = 8  # as the training data: objects with a thinner box are skipped
# a share of the training crops cut at the first click's scales, as in the recipe's last stages, so that the
# fine-tuned network learns to rank them on the user's images: it reads first clicks too (see ``finetune``)
LADDER_PROB = 0.3


@dataclass(frozen=True)
class FinetuneResult:
    checkpoint: Path  # the fine-tuned model
    before: dict[str, float]  # validation metrics of the starting checkpoint on the held-out objects
    after: dict[str, float]  # the same, after fine-tuning
    held_out: int  # objects held out of training, on which both are measured
    steps: int

    @property
    def summary(self) -> str:
        return (
            f"mean IoU on {self.held_out} held-out object(s): {self.before['mean_iou']:.3f} before, "
            f"{self.after['mean_iou']:.3f} after {self.steps} steps"
        )


def usable_objects(data_path: str | os.PathLike, min_area: float) -> int:
    """Objects of a COCO file that training samples: not crowd, at least ``min_area`` pixels, box sides >= 8."""
    annotations = json.loads(Path(data_path).read_text(encoding="utf-8"))["annotations"]
    return sum(
        not ann.get("iscrowd") and ann.get("area", 0) >= min_area and min(ann["bbox"][2:]) >= MIN_OBJECT_SIDE
        for ann in annotations
    )


def next_run_dir(parent: str | os.PathLike) -> Path:
    """``finetune``, else ``finetune-2``, ...: a new folder each run, so a model in use is never replaced."""
    parent = Path(parent)
    for n in range(1, 10_000):
        candidate = parent / (RUN_DIR if n == 1 else f"{RUN_DIR}-{n}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"too many fine-tune runs in {parent}")


def finetune(
    data_path: str | os.PathLike,
    steps: int,
    init: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    val_split: float = 0.25,
    batch_size: int = 8,
    lr: float = 2e-4,
    min_area: float = 100.0,
    device: str = "auto",
    seed: int = 0,
    on_progress: Callable[[str, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``init`` (None: the bundled model) for ``steps`` optimizer steps on the COCO file ``data_path``.

    Writes ``finetuned.pt`` (the model alone, loadable by ``DeepCropPredictor.from_checkpoint``) and the training
    log into ``output_dir`` (default: a new ``finetune`` folder next to the json). ``on_progress(phase, step)``
    runs as each phase starts ("before": measuring the starting model, "training", "after": measuring the new
    one) and after every training step; an exception raised there cancels the run, leaving no checkpoint.

    The fine-tuned network reads every click, first clicks too: a first-click network of ``init`` (the bundled
    file has one, trained on photographs) is left out, having learnt nothing of the user's images. On cell nuclei
    the fine-tuned network alone took the first click's mean IoU from 0.31 to 0.79, where keeping the bundled
    first-click network left it at 0.35; on photographs like the bundled networks' own data it costs the first
    click (0.64 to 0.59 on half of tiny_coco val2017): docs/measurements.md, "Fine-tuning on cell nuclei".
    """
    from .training import train  # torch, cv2 and pycocotools' training side: only when fine-tuning

    data_path = Path(data_path)
    init = Path(init) if init is not None else default_checkpoint_path()
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    usable = usable_objects(data_path, min_area)
    held_out = train.held_out_count(usable, val_split)
    if held_out == 0 or usable - held_out == 0:
        raise ValueError(
            f"fine-tuning needs at least 2 objects of {min_area:g} pixels or more (one to train on, one held out "
            f"to measure); {data_path} has {usable}"
        )
    run_dir = Path(output_dir) if output_dir is not None else next_run_dir(data_path.parent)

    def report(phase: str, step: int = 0) -> None:
        if on_progress is not None:
            on_progress(phase, step)

    # fmt: off
    common = [
        "--data-path", str(data_path), "--init", str(init), "--output-dir", str(run_dir),
        "--val-split", str(val_split), "--val-split-by", "objects", "--min-area", str(min_area),
        "--batch-size", str(batch_size), "--workers", "0", "--device", device, "--seed", str(seed),
        "--no-progress",
    ]
    training = [
        "--epochs", "1", "--max-steps", str(steps), "--samples-per-epoch", str(steps * batch_size),
        "--lr", str(lr), "--warmup-steps", str(steps // 10), "--ladder-prob", str(LADDER_PROB),
        "--drop-first-click-network",
    ]
    # fmt: on
    try:
        report("before")
        before = train.main(train.parse_args([*common, "--test-only"]))
        report("training")
        # after the last step, main measures the fine-tuned model on the held-out objects
        after = train.main(
            train.parse_args(common + training),
            on_step=lambda step: report("training" if step < steps else "after", step),
        )
        model, payload = load_checkpoint(run_dir / "checkpoint.pt")
    except BaseException:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when the run left nothing in it
        raise
    meta = {**payload.get("meta", {}), "init": str(init), "before": before, "after": after}
    checkpoint = save_checkpoint(run_dir / CHECKPOINT, model, meta=meta)
    for name in ("checkpoint.pt", "best.pt"):  # training state (optimizer, RNG): not needed to use the model
        (run_dir / name).unlink(missing_ok=True)
    return FinetuneResult(checkpoint, before, after, held_out, steps)
