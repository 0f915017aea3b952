"""npe2 reader: a COCO instances json opens as an image layer and a labels layer per image.

The labels layer's ``features`` hold each object's category; its ``metadata["coco"]`` keeps the image record,
categories, info and licenses, so saving it again with our writer keeps image and category ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import imageio.v3 as iio

from .coco import read_coco_dataset

LayerData = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Our reader if ``path`` is a json with COCO's ``images`` and ``annotations``, else None.

    (napari then asks other readers). The json is parsed here and handed on: a large file is parsed once.
    """
    if not isinstance(path, str) or not path.lower().endswith(".json"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(dataset, dict) or not {"images", "annotations"} <= dataset.keys():
        return None
    return partial(read_coco, dataset=dataset)


def read_coco(path: str, dataset: dict | None = None) -> list[LayerData]:
    """Image and labels layers, image by image; names are the image file stems."""
    coco = read_coco_dataset(path, dataset=dataset)
    kept = {"categories": coco.categories, "info": coco.info, "licenses": coco.licenses}
    layers: list[LayerData] = []
    for entry in coco.entries:
        name = Path(entry.file_name).stem
        image_meta = {"name": name, "metadata": {"coco": {"path": str(entry.image)}}}
        features = {
            **entry.categories,
            "index": entry.categories["label"],
        }  # napari finds a label's row by index
        labels_meta = {
            "name": f"{name} labels",
            "features": features,
            "metadata": {"coco": {"image": dict(entry.record), **kept}},
        }
        layers += [(iio.imread(entry.image), image_meta, "image"), (entry.labels, labels_meta, "labels")]
    return layers
