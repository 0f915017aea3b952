"""The widget's dataset navigator and COCO export, and the reader's one image of a multi-image file.

Objects are committed through the widget's own click path with the DiskPredictor (conftest), so what is
checked in the export is what the user made. Dialogs are never opened: folders are passed to the methods and
the overwrite question is replaced.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_deepcrop import coco
from napari_deepcrop._widget import DATASET_IMAGE, DATASET_LABELS, DeepCropWidget

GRAY = np.random.default_rng(0).integers(0, 255, (60, 80), dtype=np.uint8)
RGB = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
OTHER_GRAY = np.random.default_rng(2).integers(0, 255, (60, 80), dtype=np.uint8)


def annotate(widget, qtbot, position, category="object"):
    """Click an object, wait for its prediction, commit it under ``category``."""
    widget._category.native.setCurrentText(category)
    assert widget._add_click(position)
    qtbot.waitUntil(lambda: not widget.busy, timeout=5000)
    widget.commit()


def wait_for_task(widget, qtbot, timeout=30_000):
    qtbot.waitUntil(lambda: not widget.task_running, timeout=timeout)


def objects_in(json_path, file_name):
    """{category: [mask, ...]} of one image of an exported COCO file, read back with pycocotools."""
    loaded = COCO(str(json_path))
    (image_id,) = [i for i, r in loaded.imgs.items() if r["file_name"] == file_name]
    found = {}
    for ann in loaded.imgToAnns[image_id]:
        found.setdefault(loaded.cats[ann["category_id"]]["name"], []).append(loaded.annToMask(ann).astype(bool))
    return found


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, pixels in (("a.png", GRAY), ("b.png", RGB), ("c.png", OTHER_GRAY)):
        iio.imwrite(folder / name, pixels)
    return folder


@pytest.fixture
def navigator(make_widget, folder):
    viewer, widget = make_widget()
    assert widget.open_dataset(folder)
    return viewer, widget


def test_open_folder_shows_the_first_image_in_two_layers(navigator):
    viewer, widget = navigator
    assert [layer.name for layer in viewer.layers] == [DATASET_IMAGE, DATASET_LABELS]
    np.testing.assert_array_equal(viewer.layers[DATASET_IMAGE].data, GRAY)
    assert viewer.layers[DATASET_LABELS].data.shape == GRAY.shape and not viewer.layers[DATASET_LABELS].data.any()
    assert widget._image.value is viewer.layers[DATASET_IMAGE]
    assert widget._target.value is viewer.layers[DATASET_LABELS]
    assert widget._dataset_note.value == "image 1 / 3: a.png"


def test_stepping_keeps_each_images_objects(navigator, predictor, qtbot):
    viewer, widget = navigator
    annotate(widget, qtbot, (30, 40), "cell")
    labels = viewer.layers[DATASET_LABELS]
    first = labels.data.copy()
    assert widget.next_image()
    # an RGB image after a grayscale one: a new image layer, below the labels and the tool's layers
    assert viewer.layers[DATASET_IMAGE].rgb and viewer.layers.index(DATASET_IMAGE) == 0
    np.testing.assert_array_equal(viewer.layers[DATASET_IMAGE].data, RGB)
    assert viewer.layers[DATASET_LABELS] is labels and labels.data.shape == (50, 70) and not labels.data.any()
    labels.undo()  # the first image's commit is not undone onto this one
    assert not labels.data.any()
    annotate(widget, qtbot, (20, 20), "debris")
    assert predictor.images[-1][0] == RGB.shape  # the click predicted on the image shown
    assert widget.previous_image()
    np.testing.assert_array_equal(labels.data, first)
    assert labels.features[["label", "category"]].to_dict("list") == {"label": [1], "category": ["cell"]}
    assert list(labels.features["index"]) == [1]  # napari's hover finds the category
    assert widget._dataset_note.value == "image 1 / 3: a.png"
    assert not widget.previous_image()  # the first image: nothing changes
    assert widget.go_to_image(1)
    assert (labels.data == 1).sum() == predictor.disk((20, 20)).sum()


def test_export_of_the_set_holds_the_opened_images(navigator, predictor, qtbot, tmp_path, notifications):
    viewer, widget = navigator
    annotate(widget, qtbot, (30, 40), "cell")
    annotate(widget, qtbot, (10, 10), "debris")
    widget.next_image()  # looked at, left empty; c.png is never opened
    out = tmp_path / "export"
    assert widget.export_coco(out)
    wait_for_task(widget, qtbot)
    json_path = out / coco.ANNOTATIONS_JSON
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "annotations.json", "b.png"]
    found = objects_in(json_path, "a.png")
    np.testing.assert_array_equal(found["cell"][0], predictor.disk((30, 40)))
    np.testing.assert_array_equal(found["debris"][0], predictor.disk((10, 10)) & ~predictor.disk((30, 40)))
    assert objects_in(json_path, "b.png") == {}
    assert "exported 2 image(s)" in notifications[-1] and "1 never opened" in notifications[-1]
    assert (out / "a.png").read_bytes() == (widget.dataset.items[0].image).read_bytes()


def test_overwriting_an_export_asks_first(navigator, qtbot, tmp_path, monkeypatch):
    viewer, widget = navigator
    annotate(widget, qtbot, (30, 40))
    out = tmp_path / "export"
    assert widget.export_coco(out)
    wait_for_task(widget, qtbot)
    before = (out / "annotations.json").read_bytes()
    annotate(widget, qtbot, (10, 60))
    questions = []
    # on the class: magicgui's Container does not let monkeypatch delete an instance attribute afterwards
    monkeypatch.setattr(DeepCropWidget, "_ask_overwrite", lambda self, path: questions.append(path) or False)
    assert not widget.export_coco(out)
    assert questions == [out / "annotations.json"] and (out / "annotations.json").read_bytes() == before
    assert not widget.export_coco(out, overwrite=False) and len(questions) == 1  # told: no question
    monkeypatch.setattr(DeepCropWidget, "_ask_overwrite", lambda self, path: True)
    assert widget.export_coco(out)
    wait_for_task(widget, qtbot)
    assert len(objects_in(out / "annotations.json", "a.png")["object"]) == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left over


def test_export_without_a_dataset_writes_the_layer_as_png_or_copies_its_file(
    make_widget, predictor, qtbot, tmp_path, folder
):
    viewer, widget = make_widget((GRAY, {"name": "my image"}))
    assert not widget.export_coco(tmp_path / "none")  # nothing committed yet: no Labels layer
    annotate(widget, qtbot, (30, 40))
    assert widget.export_coco(tmp_path / "pixels")
    wait_for_task(widget, qtbot)
    np.testing.assert_array_equal(iio.imread(tmp_path / "pixels" / "my_image.png"), GRAY)
    found = objects_in(tmp_path / "pixels" / "annotations.json", "my_image.png")
    np.testing.assert_array_equal(found["object"][0], predictor.disk((30, 40)))

    viewer.layers.clear()
    (image,) = viewer.open(str(folder / "b.png"))  # an image with a file: the file is copied as it is
    widget._image.value = image
    annotate(widget, qtbot, (20, 20))
    assert widget.export_coco(tmp_path / "file")
    wait_for_task(widget, qtbot)
    assert (tmp_path / "file" / "b.png").read_bytes() == (folder / "b.png").read_bytes()


def test_navigator_on_a_coco_file_keeps_annotations_and_ids(make_widget, folder, qtbot, tmp_path):
    labels = np.zeros(GRAY.shape, np.int32)
    labels[5:20, 5:25] = 1
    entries = [
        coco.CocoEntry(folder / "a.png", labels, {"label": [1], "category": ["cell"]}, record={"id": 11}),
        coco.CocoEntry(folder / "c.png", labels * 0, None, record={"id": 12}),
    ]
    source = coco.write_coco_dataset(tmp_path / "source", entries)
    viewer, widget = make_widget()
    assert widget.open_dataset(source)
    shown = viewer.layers[DATASET_LABELS]
    np.testing.assert_array_equal(shown.data > 0, labels > 0)
    assert list(shown.features["category"]) == ["cell"] and "cell" in widget._category.choices
    assert widget.next_image()
    annotate(widget, qtbot, (40, 60), "cell")
    assert widget.export_coco(tmp_path / "out")
    wait_for_task(widget, qtbot)
    saved = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [image["id"] for image in saved["images"]] == [11, 12]
    assert len(objects_in(tmp_path / "out" / "annotations.json", "a.png")["cell"]) == 1
    assert len(objects_in(tmp_path / "out" / "annotations.json", "c.png")["cell"]) == 1


def test_navigator_errors_are_notifications(make_widget, tmp_path, notifications):
    viewer, widget = make_widget()
    assert not widget.next_image()
    assert "no dataset open" in notifications[-1]
    assert not widget.open_dataset(tmp_path / "missing.json")
    assert "cannot open" in notifications[-1] and widget.dataset is None and len(viewer.layers) == 0


def test_reader_opens_one_image_of_a_multi_image_file(make_napari_viewer, folder, tmp_path, notifications):
    entries = [coco.CocoEntry(folder / name, np.zeros(iio.improps(folder / name).shape[:2], np.int32),
                              record={"id": image_id})
               for image_id, name in ((5, "a.png"), (6, "b.png"), (7, "c.png"))]  # fmt: skip
    json_path = coco.write_coco_dataset(tmp_path / "set", entries)
    viewer = make_napari_viewer()
    layers = viewer.open(str(json_path), plugin="napari-deepcrop")
    assert [layer.name for layer in layers] == ["a", "a labels"]
    np.testing.assert_array_equal(layers[0].data, GRAY)
    assert any("holds 3 images" in m and "Open folder / COCO" in m for m in notifications)
    from napari_deepcrop._reader import read_coco

    (image, _, _), (_, meta, _) = read_coco(str(json_path), image_id=6)
    np.testing.assert_array_equal(image, RGB)
    assert meta["metadata"]["coco"]["image"]["id"] == 6
    with pytest.raises(ValueError, match="no image with id 99"):
        read_coco(str(json_path), image_id=99)


def test_widget_built_with_its_dialogs_unopened(make_napari_viewer):
    """The buttons exist where the user looks for them; clicking them would open dialogs, so tests call
    the methods behind them."""
    widget = DeepCropWidget(make_napari_viewer())
    texts = [w.text for w in widget.actions]
    assert texts == ["Export COCO…", "Fine-tune on these annotations…", "Cancel"]
    assert not widget.actions[2].enabled  # Cancel: only while a job runs
