"""npe2 reader: a COCO instances json opens as an image layer and a labels layer, of one image.

A file of many images opens its first one (or, from Python, ``read_coco(path, image_id=...)``) and says so in a
notification: hundreds of layers at once would swamp napari, and the DeepCrop widget's dataset navigator shows
the images one by one. Only that image's annotations are decoded.

The labels layer's ``features`` hold each object's category (and an ``index`` column equal to ``label``, which
napari's hover reads); its ``metadata["coco"]`` keeps the image record, categories, info and licenses, so saving
it again with our writer keeps image and category ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import imageio.v3 as iio
from napari.utils.notifications import show_info

from .coco import coco_to_labels, find_images, load_coco

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


def read_coco(path: str, dataset: dict | None = None, image_id: int | None = None) -> list[LayerData]:
    """The image and labels layers of one image (default: the file's first), named by the image's file stem."""
    coco = load_coco(path, dataset)
    if not coco.imgs:
        return []
    image_id = next(iter(coco.imgs)) if image_id is None else image_id
    if image_id not in coco.imgs:
        raise ValueError(f"{path} has no image with id {image_id}")
    record = coco.imgs[image_id]
    image_path = find_images(path, [record])[image_id]
    labels, features = coco_to_labels(coco, image_id)
    file = coco.dataset
    kept = {"categories": file["categories"], "info": file.get("info", {}), "licenses": file.get("licenses", [])}
    name = Path(record["file_name"]).stem
    if len(coco.imgs) > 1:
        show_info(
            f"{Path(path).name} holds {len(coco.imgs)} images; opened {record['file_name']} (id {image_id}). "
            "To annotate them all, open the file in the DeepCrop widget: Open folder / COCO…"
        )
    image_meta = {"name": name, "metadata": {"coco": {"path": str(image_path)}}}
    labels_meta = {
        "name": f"{name} labels",
        "features": {**features, "index": features["label"]},  # napari finds a label's row by index
        "metadata": {"coco": {"image": dict(record), **kept}},
    }
    return [(iio.imread(image_path), image_meta, "image"), (labels, labels_meta, "labels")]
