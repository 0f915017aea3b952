"""npe2 writer: a Labels layer (with its image, if selected) saved as a COCO json, the image next to it.

napari's Save Layers dialog has already asked before replacing an existing json (Qt's file dialog does), and
napari's own writers replace files, so the json is replaced; it is written to a temporary file and renamed, so
there is never half a file. An image file already next to it is reused when it holds the same pixels and never
replaced when it does not (see ``write_coco_dataset``).

Saved alone, a Labels layer has no pixels to write: the json then names its image ``<labels layer name>.png``
(or the file it was read from), expecting the image to be put there, and says so in its ``info``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .coco import CocoEntry, write_coco_dataset

LayerData = tuple[Any, dict, str]

NO_IMAGE_NOTE = "saved without its image: put the image named in 'images' next to this file"


def write_coco(path: str, layer_data: list[LayerData]) -> list[str]:
    """Write one Labels layer (and the image of its size, if one is among the layers) as COCO at ``path``."""
    labels = [layer for layer in layer_data if layer[2] == "labels"]
    if len(labels) != 1:
        raise ValueError(f"select exactly one Labels layer to save as COCO (got {len(labels)})")
    data, meta, _ = labels[0]
    image = _image_of_size(np.shape(data), [layer for layer in layer_data if layer[2] == "image"])
    kept = meta.get("metadata", {}).get("coco", {})
    entry = _entry(data, meta, kept.get("image"), image)
    info = {**kept.get("info", {}), "note": NO_IMAGE_NOTE} if image is None else kept.get("info")
    json_path = write_coco_dataset(
        Path(path).parent,
        [entry],
        overwrite=True,
        categories=kept.get("categories"),
        info=info,
        licenses=kept.get("licenses"),
        json_name=Path(path).name,
    )
    images = [] if image is None else [str(json_path.parent / entry.file_name)]
    return [str(json_path), *images]


def _image_of_size(shape: tuple[int, ...], images: list[LayerData]) -> LayerData | None:
    matching = [layer for layer in images if np.shape(layer[0])[:2] == shape]
    if images and len(matching) != 1:
        names = [layer[1].get("name") for layer in images]
        raise ValueError(
            f"of the image layers {names}, {len(matching)} have the labels' size {shape}; need one"
        )
    return matching[0] if matching else None


def _entry(labels: Any, meta: dict, record: dict | None, image: LayerData | None) -> CocoEntry:
    """The dataset entry: the image's own file when it was read from one, else its pixels as PNG."""
    features = meta.get("features")
    if image is None:
        file_name = record["file_name"] if record else f"{_file_stem(meta['name'])}.png"
        return CocoEntry(None, np.asarray(labels), features, file_name, record)
    pixels, image_meta, _ = image
    source = image_meta.get("metadata", {}).get("coco", {}).get("path")
    if source and Path(source).is_file():
        return CocoEntry(source, np.asarray(labels), features, Path(source).name, record)
    return CocoEntry(
        np.asarray(pixels), np.asarray(labels), features, f"{_file_stem(image_meta['name'])}.png", record
    )


def _file_stem(layer_name: str) -> str:
    """A layer name made safe as a file name."""
    return re.sub(r"[^\w.-]+", "_", layer_name).strip("._") or "image"
