"""The COCO reader and writer, directly and through napari's own File > Open and Save Layers."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_deepcrop import coco
from napari_deepcrop._reader import get_reader
from napari_deepcrop._writer import NO_IMAGE_NOTE, write_coco

PLUGIN = "napari-deepcrop"
TINY_COCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "tiny_coco"


def cells() -> tuple[np.ndarray, np.ndarray, dict]:
    """An RGB image, its labels (a cell with a hole, a two-part one, one on the border) and categories."""
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15] = 3
    labels[8:11, 8:11] = 0
    labels[20:25, 0:4] = labels[30:35, 10:14] = 7
    labels[:, 45:] = 12
    return image, labels, {"label": [3, 7, 12], "category": ["cell", "cell", "debris"]}


def assert_same_objects(loaded: COCO, image_id: int, labels: np.ndarray, categories: dict[int, str]) -> None:
    """Each annotation is exactly one object of ``labels``, with its category, and every object is there."""
    found = {}
    for ann in loaded.imgToAnns[image_id]:
        mask = loaded.annToMask(ann).astype(bool)
        (label,) = np.unique(labels[mask])
        np.testing.assert_array_equal(mask, labels == label)
        found[int(label)] = loaded.cats[ann["category_id"]]["name"]
    assert found == categories


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def coco_file(tmp_path) -> Path:
    image, labels, features = cells()
    iio.imwrite(tmp_path / "cells.png", image)
    entry = coco.CocoEntry(tmp_path / "cells.png", labels, features)
    return coco.write_coco_dataset(tmp_path / "dataset", [entry])


def test_get_reader_declines_files_that_are_not_coco(tmp_path, coco_file):
    (tmp_path / "settings.json").write_text(json.dumps({"theme": "dark", "images": []}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name in ["settings.json", "broken.json", "list.json", "missing.json"]:
        assert get_reader(str(tmp_path / name)) is None
    assert get_reader(str(tmp_path / "cells.png")) is None
    assert get_reader([str(coco_file)]) is None
    assert callable(get_reader(str(coco_file)))


def test_reader_gives_image_and_labels_with_categories(coco_file):
    image, labels, _ = cells()
    (image_data, image_meta, image_type), (label_data, label_meta, label_type) = get_reader(str(coco_file))(
        str(coco_file)
    )
    assert (image_type, label_type) == ("image", "labels")
    assert image_meta["name"] == "cells" and label_meta["name"] == "cells labels"
    np.testing.assert_array_equal(image_data, image)
    names = coco.features_to_categories(label_meta["features"])
    for label, name in {3: "cell", 7: "cell", 12: "debris"}.items():
        (new,) = np.unique(label_data[labels == label])
        np.testing.assert_array_equal(label_data == new, labels == label)
        assert names[new] == name


def test_writer_needs_one_labels_layer_and_a_matching_image(tmp_path):
    image, labels, _ = cells()
    with pytest.raises(ValueError, match="exactly one Labels layer"):
        write_coco(str(tmp_path / "a.json"), [(image, {"name": "im"}, "image")])
    wrong = (np.zeros((41, 50), np.uint8), {"name": "other"}, "image")
    with pytest.raises(ValueError, match="0 have the labels' size"):
        write_coco(str(tmp_path / "a.json"), [(labels, {"name": "l"}, "labels"), wrong])
    assert list(tmp_path.iterdir()) == []


def test_open_in_napari(make_napari_viewer, coco_file):
    image, labels, _ = cells()
    viewer = make_napari_viewer()
    layers = viewer.open(str(coco_file), plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["cells", "cells labels"]
    np.testing.assert_array_equal(layers[0].data, image)
    assert layers[0].rgb
    table = layers[1].features
    assert list(table["category"]) == ["cell", "cell", "debris"]
    assert list(table["index"]) == list(table["label"])  # napari's hover finds each label's row
    np.testing.assert_array_equal(layers[1].data > 0, labels > 0)


def test_save_labels_and_image_from_napari(make_napari_viewer, tmp_path):
    image, labels, features = cells()
    viewer = make_napari_viewer()
    image_layer = viewer.add_image(image, name="cells")
    labels_layer = viewer.add_labels(labels, name="cells labels", features=features)
    viewer.add_image(np.zeros((40, 50)), name="not selected")
    viewer.layers.selection = {image_layer, labels_layer}
    out = tmp_path / "out"
    written = viewer.layers.save(str(out / "cells.json"), selected=True, plugin=PLUGIN)
    assert written == [str(out / "cells.json"), str(out / "cells.png")]
    assert sorted(snapshot(out)) == ["cells.json", "cells.png"]
    np.testing.assert_array_equal(iio.imread(out / "cells.png"), image)
    loaded = COCO(str(out / "cells.json"))
    assert loaded.imgs[1]["file_name"] == "cells.png"
    assert_same_objects(loaded, 1, labels, {3: "cell", 7: "cell", 12: "debris"})


def test_save_labels_alone_from_napari(make_napari_viewer, tmp_path):
    _, labels, _ = cells()
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name="cells labels")
    written = layer.save(str(tmp_path / "cells.json"), plugin=PLUGIN)
    assert written == [str(tmp_path / "cells.json")] and sorted(snapshot(tmp_path)) == ["cells.json"]
    loaded = COCO(written[0])
    assert loaded.imgs[1]["file_name"] == "cells_labels.png"
    assert loaded.dataset["info"]["note"] == NO_IMAGE_NOTE
    assert_same_objects(loaded, 1, labels, {3: "object", 7: "object", 12: "object"})


def test_saving_again_replaces_the_json_but_never_another_image(make_napari_viewer, tmp_path):
    """napari's Save dialog asks before replacing a file, napari's own writers replace: so do we, atomically.
    An image file of the same name but other pixels is not ours to replace: nothing is written then."""
    image, labels, features = cells()
    viewer = make_napari_viewer()
    image_layer = viewer.add_image(image, name="cells")
    labels_layer = viewer.add_labels(labels, name="cells labels", features=features)
    viewer.layers.selection = {image_layer, labels_layer}
    path = str(tmp_path / "cells.json")
    viewer.layers.save(path, selected=True, plugin=PLUGIN)
    labels_layer.data = np.where(labels == 12, 0, labels)
    viewer.layers.save(path, selected=True, plugin=PLUGIN)
    assert_same_objects(COCO(path), 1, labels_layer.data, {3: "cell", 7: "cell"})
    assert sorted(snapshot(tmp_path)) == ["cells.json", "cells.png"]  # no temporary files left
    before = snapshot(tmp_path)
    image_layer.data = image // 2
    with pytest.raises(FileExistsError, match="holds another image"):
        write_coco(path, [layer.as_layer_data_tuple() for layer in (labels_layer, image_layer)])
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not TINY_COCO.is_dir(), reason=f"real COCO data not found at {TINY_COCO}")
def test_real_coco_opens_and_saves_with_its_ids(make_napari_viewer, tmp_path):
    """Two real val2017 images in COCO's layout: open, save one back, and the image id, category ids and
    file are those of the original."""
    original = json.loads((TINY_COCO / "annotations" / "instances_val2017.json").read_text())
    keep = {image["id"] for image in original["images"][:2]}
    subset = {
        **original,
        "images": [image for image in original["images"] if image["id"] in keep],
        "annotations": [ann for ann in original["annotations"] if ann["image_id"] in keep],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").symlink_to(TINY_COCO / "val2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(subset))
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "annotations" / "instances_val2017.json"), plugin=PLUGIN)
    assert len(layers) == 2  # the first image only: the widget's navigator shows the others
    image_layer, labels_layer = layers
    viewer.layers.selection = {image_layer, labels_layer}
    out = tmp_path / "out" / "edited.json"
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    record = subset["images"][0]
    assert (out.parent / record["file_name"]).read_bytes() == (
        TINY_COCO / "val2017" / record["file_name"]
    ).read_bytes()
    saved = COCO(str(out))
    assert saved.dataset["categories"] == original["categories"]
    assert saved.imgs[record["id"]] == record
    names = coco.features_to_categories(labels_layer.features)
    assert_same_objects(saved, record["id"], labels_layer.data, names)
