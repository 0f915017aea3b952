"""Checkpoints: a format version, the model config as a plain dict, the weights, and provenance.

A checkpoint may also hold a second network for first clicks (``first_click``: its own config and weights; see
:class:`~napari_deepcrop.predictor.DeepCropPredictor`): the predictor then reads a first click with it and every
click with a previous mask with the main one.

Plain dicts and tensors only, so every file loads with ``torch.load(weights_only=True)``: opening a checkpoint
someone sent you runs no code. Training adds its own state (optimizer, scheduler, RNG) under other keys.
"""

from __future__ import annotations

import os
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from .model import DeepCropConfig, DeepCropV2

FORMAT = "napari-deepcrop"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = "deepcrop_default.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, or not a napari-deepcrop checkpoint."""


def default_checkpoint_path() -> Path:
    """The checkpoint bundled inside the package."""
    return Path(str(files("napari_deepcrop") / "weights" / DEFAULT_CHECKPOINT))


def _weights(model: DeepCropV2, half: bool) -> dict[str, torch.Tensor]:
    return {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: DeepCropV2,
    half: bool = False,
    first_click_model: DeepCropV2 | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` (and any ``extra`` plain-data entries) atomically: a crash never leaves half a file.

    ``half=True`` stores floating-point weights as float16, halving the file (for the bundled checkpoint).
    ``first_click_model``: a second network for first clicks, stored under ``first_click``.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": _weights(model, half),
        **extra,
    }
    if first_click_model is not None:
        payload["first_click"] = {
            "config": first_click_model.config.to_dict(),
            "model": _weights(first_click_model, half),
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint file's contents (on the CPU), with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a napari-deepcrop checkpoint (no '{FORMAT}' format tag)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload['format_version']}; this napari-deepcrop reads up to "
            f"{FORMAT_VERSION}: upgrade napari-deepcrop"
        )
    for key in ("config", "model"):
        if key not in payload:
            raise CheckpointError(f"{path} has no '{key}' entry")
    return payload


def load_checkpoint(path: str | os.PathLike | None = None) -> tuple[DeepCropV2, dict[str, Any]]:
    """Rebuild the model from a checkpoint (None: the bundled default); returns (model in eval mode, payload)."""
    path = default_checkpoint_path() if path is None else Path(path)
    payload = read_checkpoint(path)
    try:
        config = DeepCropConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from exc
    return _build(path, config, payload["model"]), payload


def load_first_click_model(payload: dict[str, Any], path: str | os.PathLike = "checkpoint") -> DeepCropV2 | None:
    """The checkpoint's network for first clicks (``first_click``), in eval mode, or None when it has none."""
    entry = payload.get("first_click")
    if entry is None:
        return None
    if not isinstance(entry, dict) or not {"config", "model"} <= set(entry):
        raise CheckpointError(f"{path}: its 'first_click' entry needs a 'config' and a 'model'")
    try:
        config = DeepCropConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid config for its first-click network: {exc}") from exc
    return _build(path, config, entry["model"], "first-click network's ")


def _build(path, config: DeepCropConfig, weights: dict[str, torch.Tensor], which: str = "") -> DeepCropV2:
    model = DeepCropV2(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the {which}weights do not match the architecture in its own config: {exc}"
        ) from exc
    return model.eval()
