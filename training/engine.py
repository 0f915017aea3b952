"""One epoch of training, and validation on patches: the loop, the losses, the simulated corrective clicks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from napari_deepcrop.clicks import encode_clicks
from napari_deepcrop.model import DeepCropConfig

from .data import at_size
from .evaluate import evaluate_patches, next_click


@dataclass
class TrainOptions:
    max_norm: float = 1.0
    iterative_prob: float = (
        0.5  # share of batches trained on the model's own previous mask plus a corrective click
    )
    max_iterations: int = 3
    score_weight: float = 0.5
    seed: int = 0
    frozen: tuple[str, ...] = ()  # modules of the model not trained: kept in eval mode (batch norm statistics)
    mask_loss: str = "bce"  # the pixel term of the mask loss, one of MASK_LOSSES


# the pixel term of the mask loss: "bce", the report's logistic loss; "nfl", RITM's normalized focal loss
MASK_LOSSES = ("bce", "nfl")


def normalized_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5, eps: float = 1e-8
) -> torch.Tensor:
    """RITM's normalized focal loss (Sofiiuk et al. 2022; isegm's ``NormalizedFocalLossSigmoid`` with its
    defaults): the focal loss, its weights (1 - p_t)^gamma rescaled in each sample to average 1 (the scale
    detached). Unlike the focal loss it does not fade as a mask gets good: the pixels still wrong, where NoC@90
    is decided, keep the whole sample's weight."""
    positive = target > 0.5
    prob = torch.sigmoid(logits)
    pt = torch.where(positive, prob, 1 - prob)
    beta = (1 - pt) ** gamma
    pixels = beta[0].numel()
    scale = (pixels / (beta.flatten(1).sum(1) + eps)).detach().view(-1, *([1] * (beta.dim() - 1)))
    log_pt = torch.where(positive, F.logsigmoid(logits), F.logsigmoid(-logits))
    loss = -torch.where(positive, alpha, 1 - alpha) * beta * scale * log_pt
    return loss.flatten(1).mean(1).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """The report's logistic (soft-margin) loss, or with ``kind="nfl"`` RITM's normalized focal loss, plus a
    Dice term that keeps small objects from vanishing."""
    if kind not in MASK_LOSSES:
        raise ValueError(f"mask loss must be one of {MASK_LOSSES}, got {kind!r}")
    if kind == "bce":
        pixel = F.binary_cross_entropy_with_logits(logits, target)
    else:
        pixel = normalized_focal_loss(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return pixel + dice.mean()


def full_iou(logits: torch.Tensor, target: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """IoU of the hard mask with the whole object: object pixels outside the crop count as missed.

    This is what the score head learns to predict, so that the predictor's choice of crop scale by score
    prefers crops that hold the whole object.
    """
    pred = (logits.detach() > 0).float().flatten(1)
    target = target.flatten(1)
    inter = (pred * target).sum(1)
    union = pred.sum(1) + target.sum(1) - inter + outside
    return torch.where(union > 0, inter / union.clamp(min=1e-6), torch.ones_like(inter))


def _batch_clicks(clicks: torch.Tensor) -> list[list[tuple[float, float, int]]]:
    return [[(r, c, int(lab)) for r, c, lab in sample.tolist() if lab >= 0] for sample in clicks]


@torch.no_grad()
def corrective_iterations(
    model: nn.Module,
    config: DeepCropConfig,
    batch: dict[str, torch.Tensor],
    iterations: int,
    device: torch.device,
) -> torch.Tensor:
    """Run the model ``iterations`` times, each time adding the protocol's next click and its own mask.

    Returns the click planes for the final, trained-on step (RITM's iterative training).
    """
    modes = [(module, module.training) for module in model.modules()]  # frozen parts stay in eval mode
    model.eval()
    planes = batch["planes"]
    clicks = _batch_clicks(batch["clicks"])
    gts = batch["mask"][:, 0].numpy().astype(bool)
    for _ in range(iterations):
        logits, _ = model(batch["image"].to(device), planes.to(device))
        preds = (logits[:, 0] > 0).cpu().numpy()
        new_planes = []
        for pred, gt, sample_clicks in zip(preds, gts, clicks, strict=True):
            size = gt.shape[0]
            done = [
                (round(r), round(c))
                for r, c, _ in sample_clicks
                if 0 <= round(r) < size and 0 <= round(c) < size
            ]
            click = next_click(pred, gt, clicked=done) if len(sample_clicks) < 20 else None
            if click is not None:
                sample_clicks.append((float(click[0]), float(click[1]), int(click[2])))
            pts = np.array([(r, c) for r, c, _ in sample_clicks], np.float32)
            labels = np.array([lab for _, _, lab in sample_clicks])
            new_planes.append(encode_clicks(pts, labels, config, pred if config.prev_mask else None, size))
        planes = torch.from_numpy(np.stack(new_planes))
    for module, training in modes:
        module.training = training
    return planes


def optimizer_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    planes: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    options: TrainOptions,
    device: torch.device,
) -> tuple[float, float]:
    """Forward, mask + score loss, backward, clipped step (AMP when the scaler is on); returns (loss, mean IoU)."""
    image, target = batch["image"].to(device), batch["mask"].to(device)
    with torch.autocast(device.type, enabled=scaler.is_enabled()):
        mask_logits, score_logits = model(image, planes.to(device))
    mask_logits, score_logits = mask_logits.float(), score_logits.float()
    iou = full_iou(mask_logits, target, batch["outside"].to(device))
    score_loss = F.binary_cross_entropy_with_logits(score_logits, iou)
    loss = mask_loss(mask_logits, target, options.mask_loss) + options.score_weight * score_loss
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), options.max_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), iou.mean().item()


def train_one_epoch(
    model: nn.Module,
    config: DeepCropConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    epoch: int,
    start_step: int,
    options: TrainOptions,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    show_progress: bool = True,
) -> tuple[float, int]:
    """Train for one pass over ``loader``; returns (mean loss, global step after the epoch).

    ``on_step(global_step)`` runs after every optimizer step (the caller checks for interrupts there).
    """
    model.train()
    for name in options.frozen:
        getattr(getattr(model, "module", model), name).eval()
    step, total, count = start_step, 0.0, 0
    corrective = config.positive_clicks and (config.negative_clicks or config.prev_mask)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True)
    tic = time.perf_counter()
    for batch in bar:
        if max_steps is not None and step >= max_steps:
            break
        rng = np.random.default_rng([options.seed, step])
        if corrective and rng.random() < options.iterative_prob:
            # corrective clicks are refinements: at the refinement crops' input size, as the predictor runs them
            iterations = int(rng.integers(1, options.max_iterations + 1))
            planes = corrective_iterations(model, config, batch, iterations, device)
        else:  # a first click: at the first-click crops' input size
            batch = at_size(batch, config.input_size, config)
            planes = batch["planes"]
        try:
            loss, iou = optimizer_step(model, batch, planes, optimizer, scaler, options, device)
        except FloatingPointError as exc:
            raise FloatingPointError(
                f"{exc} at epoch {epoch}, step {step}: lower --lr, or check the data (the last good checkpoint is kept)"
            ) from None
        scheduler.step()
        step += 1
        total += loss
        count += 1
        rate = count * len(planes) / (time.perf_counter() - tic)
        bar.set_postfix(loss=f"{total / count:.4f}", iou=f"{iou:.3f}", samples_s=f"{rate:.1f}")
        if on_step is not None:
            on_step(step)
    return (total / count if count else math.nan), step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, float]:
    """The report's Table 1 metrics on validation patches (first click only): mean / median IoU, IoU@0.7."""
    model.eval()

    def pairs():
        for batch in tqdm(
            loader, desc="validate", disable=not show_progress, dynamic_ncols=True, leave=False
        ):
            logits, _ = model(batch["image"].to(device), batch["planes"].to(device))
            yield (logits[:, 0] > 0).cpu().numpy(), batch["mask"][:, 0].numpy() > 0.5

    return evaluate_patches(pairs())
