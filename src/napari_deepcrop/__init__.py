"""Click-assisted object annotation for napari with DeepCropV2.

The compute (model, predictor, COCO, training) is importable without Qt or napari; only ``_widget`` imports them.
Public names are resolved lazily so that ``import napari_deepcrop`` stays cheap (napari imports every plugin's
package when it builds its menus).
"""

from importlib import import_module
from typing import Any

from . import _llvm_guard  # noqa: F401  (must run before torch is imported inside a napari process)

__version__ = "0.1.0"

_PUBLIC = {
    "DeepCropConfig": "model",
    "DeepCropV2": "model",
    "DeepCropPredictor": "predictor",
    "ChannelStack": "predictor",
    "encode_clicks": "clicks",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "labels_to_coco": "coco",
    "coco_to_labels": "coco",
    "write_coco_dataset": "coco",
    "read_coco_dataset": "coco",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
