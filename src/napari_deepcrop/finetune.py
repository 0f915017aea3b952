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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import (
    default_checkpoint_path,
    load_checkpoint,
    load_first_click_model,
    read_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from .model import DeepCropV2
    from .training.evaluate import Sample

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
    # when the starting checkpoint has a first-click network: the first click's mean IoU on the held-out objects
    # (the network's own mask, whole images, as the predictor runs) with the fine-tuned network reading first clicks
    # ("fine-tuned") and with the starting checkpoint's first-click network reading them ("starting")
    first_click: dict[str, float] = field(default_factory=dict)

    @property
    def kept_first_click_network(self) -> bool:
        """Whether the fine-tuned file keeps the starting checkpoint's first-click network: only if it read the
        held-out objects' first clicks better."""
        return bool(self.first_click) and self.first_click["starting"] > self.first_click["fine-tuned"]

    @property
    def summary(self) -> str:
        text = (
            f"mean IoU on {self.held_out} held-out object(s): {self.before['mean_iou']:.3f} before, "
            f"{self.after['mean_iou']:.3f} after {self.steps} steps"
        )
        if self.first_click:
            ious = self.first_click["starting"], self.first_click["fine-tuned"]
            reader = "the starting model's first-click network" if self.kept_first_click_network else "the new network"
            text += f"; first clicks read by {reader} (first-click IoU {ious[0]:.3f} starting, {ious[1]:.3f} new)"
        return text


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
    one), after every training step and, while choosing the network for first clicks (below), before each held-out
    object; an exception raised there cancels the run, leaving no checkpoint.

    First clicks: ``init`` may hold a first-click network (the bundled file does, trained on photographs). The
    run trains the network to read first clicks too (ladder crops, that network left out of its checkpoints), then
    both are measured on the held-out objects' first clicks (:func:`first_click_iou`) and the fine-tuned file keeps
    the first-click network only where it read them better (:attr:`FinetuneResult.kept_first_click_network`). On
    cell nuclei the fine-tuned network reads first clicks far better (held out: 0.745 against 0.258; on other
    nuclei the first click's mean IoU 0.79 against 0.35); on photographs like the bundled networks' own data the
    bundled first-click network does (held out: 0.607 against 0.582; on other photographs 0.650 against 0.590):
    docs/measurements.md, "Fine-tuning on cell nuclei".
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
    except BaseException:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when the run left nothing in it
        raise
    try:
        model, payload = load_checkpoint(run_dir / "checkpoint.pt")
        starting_first = load_first_click_model(read_checkpoint(init), init)
        first_click = {}
        if starting_first is not None:
            _, held_out_set = train.build_datasets(train.parse_args(common), model.config)

            def held_out_samples() -> Iterator[Sample]:
                for sample in held_out_set.samples():
                    report("after", steps)  # between objects: a cancel is not kept waiting
                    yield sample

            first_click = {
                "fine-tuned": first_click_iou(model, None, held_out_samples(), device),
                "starting": first_click_iou(model, starting_first, held_out_samples(), device),
            }
    except BaseException:  # cancelled (or failed) after training: the run leaves nothing, as when cancelled before
        for name in ("checkpoint.pt", "best.pt", "log.csv"):
            (run_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        raise
    result = FinetuneResult(run_dir / CHECKPOINT, before, after, held_out, steps, first_click)
    meta = {**payload.get("meta", {}), "init": str(init), "before": before, "after": after}
    if first_click:
        meta["first_click"] = {**first_click, "kept": result.kept_first_click_network}
    kept = starting_first if result.kept_first_click_network else None
    save_checkpoint(result.checkpoint, model, first_click_model=kept, meta=meta)
    for name in ("checkpoint.pt", "best.pt"):  # training state (optimizer, RNG): not needed to use the model
        (run_dir / name).unlink(missing_ok=True)
    return result


def first_click_iou(
    model: DeepCropV2, first_click_model: DeepCropV2 | None, samples: Iterable[Sample], device: str = "auto"
) -> float:
    """Mean IoU of the first click's mask over ``samples`` (the protocol's click: the object's deepest point), the
    network's own mask (no edge snapping), whole images through the predictor; ``first_click_model`` (None: ``model``)
    reads the click and ``model`` refines it, as the predictor runs a checkpoint holding both."""
    from .predictor import DeepCropPredictor
    from .training.evaluate import evaluate_dataset, summarize

    predictor = DeepCropPredictor(model, device, snap_edges=False, first_click_model=first_click_model)
    return summarize(evaluate_dataset(predictor, samples, max_clicks=1).values(), after_clicks=(1,))["miou@1"]
