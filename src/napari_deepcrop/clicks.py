"""The one click encoding, used by training and inference alike.

The report's full-image inference failed because the distance plane was normalised one way in training and
another at inference. Here the planes are always computed in network-input pixels of a crop, by this function
only, and normalised by the input size: what the network sees does not depend on the size of the image.
"""

from __future__ import annotations

import numpy as np

from .model import DeepCropConfig

# a disk's radius (click_encoding="disk") as a share of the crop's input size: 4 px at 128, 8 at 256 (RITM draws
# disks of radius 5 on inputs of 320-480 px; relative to the input, as the distance plane is, so that what the
# network sees does not depend on the image's size)
DISK_RADIUS = 1 / 32


def encode_clicks(
    points: np.ndarray,
    labels: np.ndarray,
    config: DeepCropConfig,
    prev_mask: np.ndarray | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Turn clicks in network-input pixels into the model's click planes, shape (config.click_planes, S, S).

    ``size``: S, the crop's input size (None: ``config.input_size``; refinement crops use
    ``config.refinement_size``).

    ``points``: (N, 2) (row, col) in input pixels (they may lie outside the crop); ``labels``: (N,) 1 positive,
    0 negative. Each click kind has one plane: with ``config.click_encoding == "distance"`` (the report's) the
    distance to the nearest click of that kind divided by half the input size, clipped to [0, 1] (1 where there
    is no click of that kind); with ``"disk"`` (RITM's) 1 within ``DISK_RADIUS`` x S of a click of that kind, 0
    elsewhere. ``prev_mask``: (S, S) mask of the current object in the crop, or None (zeros).
    """
    size = size or config.input_size
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    planes = []
    if config.positive_clicks:
        planes.append(_click_plane(points[labels == 1], size, config.click_encoding))
    if config.negative_clicks:
        planes.append(_click_plane(points[labels == 0], size, config.click_encoding))
    if config.prev_mask:
        if prev_mask is None:
            planes.append(np.zeros((size, size), np.float32))
        else:
            if prev_mask.shape != (size, size):
                raise ValueError(f"prev_mask must be {size}x{size}, got {prev_mask.shape}")
            planes.append(prev_mask.astype(np.float32))
    return np.stack(planes) if planes else np.zeros((0, size, size), np.float32)


def _click_plane(points: np.ndarray, size: int, encoding: str) -> np.ndarray:
    disk = encoding == "disk"
    if len(points) == 0:
        return np.full((size, size), 0.0 if disk else 1.0, np.float32)
    grid = np.arange(size, dtype=np.float32)
    d2_rows = (grid[None, :] - points[:, :1]) ** 2  # (N, S)
    d2_cols = (grid[None, :] - points[:, 1:]) ** 2
    d2 = (d2_rows[:, :, None] + d2_cols[:, None, :]).min(axis=0)
    if disk:
        return (d2 <= (DISK_RADIUS * size) ** 2).astype(np.float32)
    return np.minimum(np.sqrt(d2) / (size / 2), 1.0).astype(np.float32)
