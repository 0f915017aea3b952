"""AnnotationDataset: a folder or COCO file stepped through image by image, labels kept, one export of the set."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_deepcrop import coco
from napari_deepcrop.dataset import AnnotationDataset, PackedLabels, image_source


def picture(seed: int, shape=(30, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def objects(shape=(30, 40), boxes=((2, 2, 10, 10),), first=1) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, (r0, c0, r1, c1) in enumerate(boxes, start=first):
        labels[r0:r1, c0:c1] = label
    return labels


def masks_by_category(path, file_name: str) -> dict[str, list[np.ndarray]]:
    """Each category's object masks in one image of a COCO file, read back with pycocotools."""
    loaded = COCO(str(path))
    (image_id,) = [i for i, record in loaded.imgs.items() if record["file_name"] == file_name]
    found: dict[str, list[np.ndarray]] = {}
    for ann in loaded.imgToAnns[image_id]:
        found.setdefault(loaded.cats[ann["category_id"]]["name"], []).append(loaded.annToMask(ann).astype(bool))
    return found


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, seed in (("b.png", 1), ("a.png", 0), ("c.jpg", 2)):
        iio.imwrite(folder / name, picture(seed))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_is_stepped_through_in_name_order(folder):
    dataset = AnnotationDataset.open(folder)
    assert [item.file_name for item in dataset.items] == ["a.png", "b.png", "c.jpg"]
    assert dataset.title == "image 1 / 3: a.png"
    np.testing.assert_array_equal(dataset.image(), picture(0))
    assert not dataset.go(-1) and dataset.index == 0  # clamped at the first image
    assert dataset.go(1) and dataset.title == "image 2 / 3: b.png"
    assert dataset.go(99) and dataset.index == 2 and not dataset.go(3)
    labels, features = dataset.labels()
    assert labels.shape == (30, 40) and not labels.any() and features == {}


def test_stored_labels_come_back_per_image_and_only_shown_images_export(folder, tmp_path):
    dataset = AnnotationDataset.open(folder)
    first = objects(boxes=[(2, 2, 10, 10), (15, 20, 25, 35)])
    dataset.store(first, {"label": [1, 2], "category": ["cat", "dog"], "index": [1, 2]})
    dataset.go(1)
    dataset.store(objects(boxes=[]), {})  # looked at, nothing in it
    dataset.go(2)  # c.jpg: shown but never stored (the widget stores when leaving)
    dataset.go(0)
    labels, features = dataset.labels()
    np.testing.assert_array_equal(labels, first)
    assert features["category"] == ["cat", "dog"]
    assert dataset.annotated() == [0, 1]
    json_path = dataset.export(tmp_path / "out")
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["a.png", "annotations.json", "b.png"]
    found = masks_by_category(json_path, "a.png")
    np.testing.assert_array_equal(found["cat"][0], first == 1)
    np.testing.assert_array_equal(found["dog"][0], first == 2)
    assert masks_by_category(json_path, "b.png") == {}  # an empty image is an image with no objects
    assert (json_path.parent / "a.png").read_bytes() == (folder / "a.png").read_bytes()  # copied as is


def test_coco_file_keeps_its_annotations_ids_and_categories(folder, tmp_path):
    """Images never shown keep the file's annotations; edits replace one image's; ids survive the export."""
    categories = [{"id": 7, "name": "cat", "supercategory": "animal"}, {"id": 9, "name": "dog"}]
    entries = [
        coco.CocoEntry(folder / "a.png", objects(), {"label": [1], "category": ["dog"]}, record={"id": 40}),
        coco.CocoEntry(folder / "b.png", objects(boxes=[(5, 5, 20, 20)]), {"label": [1], "category": ["cat"]},
                       record={"id": 41}),
    ]  # fmt: skip
    source = coco.write_coco_dataset(tmp_path / "source", entries, categories=categories)
    dataset = AnnotationDataset.open(source)
    assert [item.record["id"] for item in dataset.items] == [40, 41]
    labels, features = dataset.labels(1)
    np.testing.assert_array_equal(labels > 0, objects(boxes=[(5, 5, 20, 20)]) > 0)
    assert features["category"] == ["cat"]
    edited = objects(boxes=[(0, 30, 8, 38)])
    dataset.store(edited, {"label": [1], "category": ["dog"]}, index=0)
    json_path = dataset.export(tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["categories"] == categories
    assert [image["id"] for image in saved["images"]] == [40, 41]
    np.testing.assert_array_equal(masks_by_category(json_path, "a.png")["dog"][0], edited == 1)
    np.testing.assert_array_equal(masks_by_category(json_path, "b.png")["cat"][0], labels == 1)


def test_folder_with_an_earlier_export_reopens_it_and_adds_new_images(folder, tmp_path):
    dataset = AnnotationDataset.open(folder)
    dataset.go(1)
    dataset.store(objects(), {"label": [1], "category": ["cat"]})
    dataset.export(folder)  # into the images' own folder: they are already there
    iio.imwrite(folder / "0_new.png", picture(3))
    reopened = AnnotationDataset.open(folder)
    assert [item.file_name for item in reopened.items] == ["b.png", "0_new.png", "a.png", "c.jpg"]
    assert reopened.annotated() == [0]
    labels, features = reopened.labels(0)
    np.testing.assert_array_equal(labels, objects())
    assert features["category"] == ["cat"]


def test_snapshot_is_not_changed_by_later_edits(folder, tmp_path):
    dataset = AnnotationDataset.open(folder)
    dataset.store(objects(), {"label": [1], "category": ["cat"]})
    snapshot = dataset.snapshot()
    dataset.store(objects(boxes=[]), {})
    dataset.go(1)
    dataset.store(objects(), {})
    assert snapshot.annotated() == [0] and snapshot.index == 0
    np.testing.assert_array_equal(snapshot.labels(0)[0], objects())


def test_export_stops_with_nothing_written(folder, tmp_path):
    dataset = AnnotationDataset.open(folder)
    with pytest.raises(ValueError, match="no image has been annotated"):
        dataset.export(tmp_path / "out")
    for index in range(3):
        dataset.store(objects(), {}, index=index)

    def cancel_at_second(done, total):
        assert total == 3
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dataset.export(tmp_path / "out", on_image=cancel_at_second)
    assert not (tmp_path / "out").exists()
    dataset.export(tmp_path / "out")
    with pytest.raises(FileExistsError):
        dataset.export(tmp_path / "out")
    assert dataset.export(tmp_path / "out", overwrite=True).is_file()


def test_single_image_from_pixels_exports_as_png(tmp_path):
    pixels = picture(5, (30, 40))
    kept = {"categories": [{"id": 3, "name": "cell"}], "info": {"description": "mine"}}
    dataset = AnnotationDataset.single(pixels, "my_image.png", objects(), {"label": [1], "category": ["cell"]},
                                       kept=kept)  # fmt: skip
    json_path = dataset.export(tmp_path)
    np.testing.assert_array_equal(iio.imread(tmp_path / "my_image.png"), pixels)
    saved = json.loads(json_path.read_text())
    assert saved["info"] == {"description": "mine"} and saved["categories"] == kept["categories"]
    np.testing.assert_array_equal(masks_by_category(json_path, "my_image.png")["cell"][0], objects() == 1)


def test_errors_name_the_problem(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        AnnotationDataset.open(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a folder"):
        AnnotationDataset.open(folder / "a.png")
    iio.imwrite(folder / "stack.tif", np.zeros((4, 30, 40), np.uint8))
    dataset = AnnotationDataset.open(folder)
    with pytest.raises(ValueError, match="not a 2D grayscale or RGB"):
        dataset.image(dataset.items.index(next(i for i in dataset.items if i.file_name == "stack.tif")))
    with pytest.raises(ValueError, match="must be 2D"):
        dataset.store(np.zeros((2, 30, 40), np.int32))


def test_packed_labels_round_trip_and_image_source(folder):
    labels = objects(boxes=[(0, 0, 5, 5), (10, 10, 30, 40)]).astype(np.uint32) * 70_000
    packed = PackedLabels.pack(labels)
    assert len(packed.data) < labels.nbytes / 20
    unpacked = packed.unpack()
    assert unpacked.dtype == np.uint32 and unpacked.flags.writeable
    np.testing.assert_array_equal(unpacked, labels)
    assert image_source(folder / "a.png", (30, 40, 3)) == folder / "a.png"
    assert image_source(folder / "a.png", (30, 40)) is None  # the layer holds other pixels than the file
    assert image_source(folder / "notes.txt", (30, 40, 3)) is None
    assert image_source(None, (30, 40, 3)) is None
