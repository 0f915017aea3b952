"""Shared fixtures: synthetic images with a known object, and a small model trained on them in the session."""

from __future__ import annotations

import pytest
import torch
from synthetic import DiskObjects
from torch.utils.data import DataLoader


@pytest.fixture(scope="session")
def disk_model():
    """A small DeepCropV2 trained for a few hundred steps on synthetic disks (about a minute on 2 CPU cores)."""
    from napari_deepcrop.model import DeepCropConfig, DeepCropV2
    from napari_deepcrop.training.engine import TrainOptions, train_one_epoch

    torch.manual_seed(0)
    config = DeepCropConfig(input_size=64, decoder_width=16)
    model = DeepCropV2(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = DataLoader(DiskObjects(config, n=250 * 16), batch_size=16, shuffle=False)
    train_one_epoch(
        model,
        config,
        optimizer,
        scheduler,
        scaler,
        loader,
        torch.device("cpu"),
        0,
        0,
        TrainOptions(iterative_prob=0.3),
        show_progress=False,
    )
    return model.eval()
