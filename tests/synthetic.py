"""Synthetic images with a known object, for training and predictor tests (a module: conftest is not importable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def disk_image(size: int = 256, center=(128, 128), radius: float = 40, seed: int = 0, channels: int = 3):
    """A bright textured disk on darker noise: (image uint8 (H, W, C), mask bool (H, W))."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:size, :size]
    mask = (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2
    base = rng.normal(70, 25, (size, size, channels))
    base[mask] += 110
    return np.clip(base, 0, 255).astype(np.uint8), mask


class DiskObjects(Dataset):
    """Training samples of random disks, cut by the same make_sample as the COCO data."""

    def __init__(self, config, n: int = 10_000) -> None:
        self.config, self.n = config, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from napari_deepcrop.training.data import make_sample

        rng = np.random.default_rng(i)
        radius = rng.uniform(12, 60)
        center = rng.uniform(radius, 256 - radius, size=2)
        image, mask = disk_image(256, center, radius, seed=i)
        return make_sample(image, mask, self.config, rng, train=True)


class BrightNet(nn.Module):
    """A stand-in for DeepCropV2 without learned weights: foreground where the image, averaged over 5 x 5 input
    pixels, is brighter than ``level`` (of the network's [0, 1] input); the score falls with the share of the
    crop's border that is foreground (a crop that cuts the object is a worse one).

    The bright disks of :func:`disk_image` (mean 180 on noise of mean 70, sd 25, at contrast limits (0, 255))
    come out whole, and noise alone gives nothing. Tests of what runs around the network (the walk through a
    stack, its stops and corrections, the crops it reads) use it so that they give the same result on every
    machine: a network trained at test time differs with the CPU's float rounding, and its borderline masks
    then move a walk's stop by a slice.
    """

    def __init__(self, config, level: float = 0.5) -> None:
        super().__init__()
        self.config, self.level = config, level

    def forward(self, image: torch.Tensor, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bright = F.avg_pool2d(image.mean(1, keepdim=True), 5, stride=1, padding=2, count_include_pad=False)
        logits = (bright - self.level) * 50
        fg = logits[:, 0] > 0
        border = torch.cat([fg[:, 0], fg[:, -1], fg[:, :, 0], fg[:, :, -1]], dim=1).float().mean(1)
        score = (0.95 - 0.9 * border).clamp(0.01, 0.99)
        return logits, torch.logit(score)

    def folded(self, size: int) -> BrightNet:
        """What DeepCropPredictor runs at each input size (DeepCropV2.folded): nothing to fold here."""
        return self


DISK_CENTERS = ((24, 24), (24, 70), (70, 26), (70, 70))


def blocks_image(size: int = 120, block: int = 8, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 of random colour blocks: no clear object, so GrabCut's result depends on where its
    random k-means starts (what a determinism test needs; a clean disk converges the same from anywhere)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (size // block, size // block, 3), dtype=np.uint8)
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)


def disks(centers=DISK_CENTERS, radius: int = 12, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of bright textured disks on noise, and its label image (disk i is label i)."""
    rng = np.random.default_rng(0)
    image = rng.normal(70, 20, (size, size, 3))
    labels = np.zeros((size, size), np.int32)
    rows, cols = np.mgrid[:size, :size]
    for label, (r, c) in enumerate(centers, start=1):
        inside = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
        image[inside] += 110
        labels[inside] = label
    return np.clip(image, 0, 255).astype(np.uint8), labels
