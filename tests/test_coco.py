"""Label images <-> COCO: every mask must come back pixel for pixel through pycocotools' own reader."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from napari_deepcrop import coco

TINY_VAL = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "tiny_coco"
    / "annotations"
    / "instances_val2017.json"
)
needs_tiny_coco = pytest.mark.skipif(not TINY_VAL.is_file(), reason=f"real COCO data not found at {TINY_VAL}")

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def random_labels(seed: int, dtype=np.uint16, shape=(48, 64)) -> np.ndarray:
    """Objects with holes, several parts, touching neighbours, on the border, single pixels and random blobs,
    under ids scattered over the dtype's range (negative ones too for signed types)."""
    rng = np.random.default_rng(seed)
    height, width = shape
    parts = np.zeros(shape, np.int64)
    rr, cc = np.mgrid[:height, :width]
    ring = (rr - 20) ** 2 + (cc - 20) ** 2
    parts[(ring <= 100) & (ring > 16)] = 1  # a ring: one object with a hole
    parts[2:6, 40:44] = parts[10:14, 50:60] = 2  # two parts of one object
    parts[30:40, 30:38], parts[30:40, 38:45] = 3, 4  # touching objects
    parts[:, width - 2 :] = 5  # the full height at the border: runs continue from one column to the next
    parts[height - 3 :, :10] = 6  # a corner
    parts[0, 0], parts[height - 1, width - 3], parts[44, 20] = 7, 8, 9  # single pixels
    blobs = rng.random(shape) < 0.08
    parts[(parts == 0) & blobs] = 10 + rng.integers(0, 6, shape)[(parts == 0) & blobs]  # noisy blobs
    info = np.iinfo(dtype)
    ids = rng.choice(np.arange(1, min(int(info.max), 10**6)), size=16, replace=False).astype(np.int64)
    if info.min < 0:
        ids[::3] *= -1
    labels = np.zeros(shape, dtype)
    for part in range(1, 16):
        labels[parts == part] = ids[part]
    if dtype == np.uint64:
        labels[parts == 15] = np.uint64(2**64 - 1)  # ids beyond what find_objects could index
    return labels


def dump_and_load(dataset: dict, tmp_path: Path) -> COCO:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


def label_of(annotation_mask: np.ndarray, labels: np.ndarray) -> int:
    values = np.unique(labels[annotation_mask > 0])
    assert values.size == 1, f"an annotation covers several labels {values}"
    return values[0]


def boundary_length(mask: np.ndarray) -> int:
    padded = np.pad(mask, 1)
    return int((padded[1:] != padded[:-1]).sum() + (padded[:, 1:] != padded[:, :-1]).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_rle_round_trip_is_exact(dtype, seed, tmp_path):
    labels = random_labels(seed, dtype)
    loaded = dump_and_load(coco.labels_to_coco("image.png", labels), tmp_path)
    annotations = loaded.loadAnns(loaded.getAnnIds())
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    seen = []
    for ann in annotations:
        mask = loaded.annToMask(ann)
        label = label_of(mask, labels)
        seen.append(label)
        expected = labels == label
        np.testing.assert_array_equal(mask, expected)
        assert (
            ann["segmentation"]["counts"]
            == mask_utils.encode(np.asfortranarray(expected, np.uint8))["counts"].decode()
        )
        assert ann["area"] == expected.sum() and ann["iscrowd"] == 0
        rows, cols = np.nonzero(expected)
        assert ann["bbox"] == [
            cols.min(),
            rows.min(),
            cols.max() - cols.min() + 1,
            rows.max() - rows.min() + 1,
        ]
    assert sorted(seen) == sorted(set(np.unique(labels).tolist()) - {0})


def test_dataset_has_every_coco_key():
    dataset = coco.labels_to_coco("cells.png", random_labels(0))
    assert set(dataset) == {"info", "licenses", "images", "annotations", "categories"}
    assert dataset["images"] == [{"file_name": "cells.png", "id": 1, "height": 48, "width": 64}]
    assert dataset["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]


def test_several_images_number_images_and_annotations_from_one(tmp_path):
    labels = [random_labels(seed) for seed in range(3)]
    loaded = dump_and_load(coco.labels_to_coco(["a.png", "b.png", "c.png"], labels), tmp_path)
    assert sorted(loaded.imgs) == [1, 2, 3]
    for image_id, label_image in zip([1, 2, 3], labels, strict=True):
        for ann in loaded.loadAnns(loaded.getAnnIds(imgIds=image_id)):
            mask = loaded.annToMask(ann)
            np.testing.assert_array_equal(mask, label_image == label_of(mask, label_image))
    assert sorted(loaded.anns) == list(range(1, len(loaded.anns) + 1))


def test_empty_and_bool_label_images():
    empty = coco.labels_to_coco("empty.png", np.zeros((5, 7), np.uint8))
    assert empty["annotations"] == [] and empty["images"][0]["height"] == 5
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:4] = True
    (ann,) = coco.labels_to_coco("mask.png", mask)["annotations"]
    assert ann["area"] == 4 and ann["bbox"] == [2, 1, 2, 2]


def test_polygons_without_tolerance_are_exact(tmp_path):
    labels = random_labels(3, np.int32)
    loaded = dump_and_load(coco.labels_to_coco("image.png", labels, segmentation="polygon"), tmp_path)
    for ann in loaded.loadAnns(loaded.getAnnIds()):
        assert isinstance(ann["segmentation"], list)
        mask = loaded.annToMask(ann)
        np.testing.assert_array_equal(mask, labels == label_of(mask, labels))


@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_simplified_polygons_stay_within_tolerance(tolerance, tmp_path):
    """Bound: the pixels that differ lie within the tolerance of the boundary, so they number at most
    tolerance x boundary length; and objects keep a mean IoU of at least 0.85."""
    labels = np.zeros((120, 160), np.uint16)
    rr, cc = np.mgrid[:120, :160]
    for label, (row, col, radius) in enumerate([(30, 30, 20), (80, 50, 25), (60, 120, 30), (20, 100, 8)], 1):
        labels[(rr - row) ** 2 + ((cc - col) * 0.7) ** 2 <= radius**2] = label
    labels[55:65, 110:130] = 0  # a hole in object 3
    dataset = coco.labels_to_coco("image.png", labels, segmentation="polygon", tolerance=tolerance)
    loaded = dump_and_load(dataset, tmp_path)
    ious = []
    for ann, label in zip(loaded.loadAnns(loaded.getAnnIds()), [1, 2, 3, 4], strict=True):
        mask, expected = loaded.annToMask(ann).astype(bool), labels == label
        assert (mask ^ expected).sum() <= tolerance * boundary_length(expected)
        ious.append((mask & expected).sum() / (mask | expected).sum())
    assert np.mean(ious) >= 0.85
    assert sum(len(p) for a in dataset["annotations"] for p in a["segmentation"]) < sum(
        len(p)
        for a in coco.labels_to_coco("i.png", labels, segmentation="polygon")["annotations"]
        for p in a["segmentation"]
    )


def test_categories_come_from_the_features_table():
    pd = pytest.importorskip("pandas")
    labels = np.array([[1, 1, 0, 5], [0, 0, 0, 5], [7, 0, 9, 9]], np.uint8)
    features = pd.DataFrame({"label": [1, 5, 7, np.nan], "category": ["cell", "nucleus", None, "ghost"]})
    dataset = coco.labels_to_coco("i.png", labels, features, category_list=[{"id": 4, "name": "nucleus"}])
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    assert names == {4: "nucleus", 5: "cell", 6: "object"}
    per_object = {
        label_of(mask_utils.decode(a["segmentation"]), labels): names[a["category_id"]]
        for a in dataset["annotations"]
    }
    assert per_object == {1: "cell", 5: "nucleus", 7: "object", 9: "object"}


def test_features_helpers_round_trip():
    table = coco.categories_to_features({3: "cell", 8: "nucleus"})
    assert table == {"label": [3, 8], "category": ["cell", "nucleus"]}
    assert coco.features_to_categories(table) == {3: "cell", 8: "nucleus"}
    assert coco.features_to_categories(None) == {} and coco.features_to_categories({"label": [1]}) == {}
    assert coco.features_to_categories({"index": [0, 4], "category": [None, "cell"]}) == {
        4: "cell"
    }  # napari's


def overlapping_dataset() -> tuple[dict, np.ndarray, np.ndarray]:
    """A 6x6 image: a pixel later hidden, a box-only annotation, then two squares overlapping each other."""
    first, second, hidden = np.zeros((3, 6, 6), np.uint8)
    first[0:4, 0:4] = 1
    second[2:6, 2:6] = 1
    hidden[3, 3] = 1
    segmentations = [_rle(hidden), [], _rle(first), _rle(second)]
    anns = [
        {
            "id": i,
            "image_id": 7,
            "category_id": 1 + (i == 4),
            "iscrowd": 0,
            "segmentation": segm,
            "bbox": [0, 0, 1, 1],
        }
        for i, segm in enumerate(segmentations, start=1)
    ]
    dataset = {
        "images": [{"id": 7, "file_name": "x.png", "height": 6, "width": 6}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "dirt"}],
    }
    return dataset, first, second


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def test_coco_to_labels_later_annotations_win_and_hidden_ones_are_dropped():
    dataset, first, second = overlapping_dataset()
    labels, features = coco.coco_to_labels(dataset, 7)
    expected = np.zeros((6, 6), np.uint32)
    expected[first > 0] = 3
    expected[second > 0] = 4
    np.testing.assert_array_equal(labels, expected)
    assert features == {"label": [3, 4], "category": ["cell", "dirt"], "iscrowd": [0, 0]}


def test_coco_to_labels_unknown_category():
    dataset, _, _ = overlapping_dataset()
    dataset["annotations"][3]["category_id"] = 9
    with pytest.raises(ValueError, match=r"categories \[9\] not in 'categories'"):
        coco.coco_to_labels(dataset, 7)


def test_coco_to_labels_unknown_image():
    with pytest.raises(ValueError, match="no image with id 3"):
        coco.coco_to_labels({"images": [], "annotations": [], "categories": []}, 3)


@needs_tiny_coco
def test_real_coco_masks_match_pycocotools():
    """Polygons, compressed and uncompressed crowd RLE: the label image is annToMask painted in order."""
    loaded = coco.load_coco(TINY_VAL)
    crowd = 0
    for image_id in loaded.getImgIds():
        labels, features = coco.coco_to_labels(loaded, image_id)
        expected = np.zeros_like(labels)
        for label, ann in enumerate(loaded.imgToAnns[image_id], start=1):
            expected[loaded.annToMask(ann) > 0] = label
            crowd += ann["iscrowd"]
        np.testing.assert_array_equal(labels, expected)
        assert features["label"] == sorted(set(np.unique(labels).tolist()) - {0})
    assert crowd > 0  # the uncompressed crowd RLE path was exercised


@needs_tiny_coco
def test_real_coco_reexport_keeps_every_non_crowd_mask(tmp_path):
    """Read, write again, read with pycocotools: each mask is the original minus what later annotations of the
    same image cover (a label image holds one object per pixel); objects overlapping nothing are identical."""
    original = coco.load_coco(TINY_VAL)
    dataset = coco.read_coco_dataset(TINY_VAL)
    json_path = coco.write_coco_dataset(
        tmp_path, dataset.entries, categories=dataset.categories, info=dataset.info, licenses=dataset.licenses
    )
    again = COCO(str(json_path))
    assert again.dataset["categories"] == original.dataset["categories"]
    assert again.dataset["licenses"] == original.dataset["licenses"]
    assert {i: r["file_name"] for i, r in again.imgs.items()} == {
        i: r["file_name"] for i, r in original.imgs.items()
    }
    identical = 0
    for image_id in original.getImgIds():
        before = [a for a in original.imgToAnns[image_id]]
        after = iter(again.imgToAnns[image_id])
        for index, ann in enumerate(before):
            mask = original.annToMask(ann).astype(bool)
            covered_later = np.zeros_like(mask)
            for later in before[index + 1 :]:
                covered_later |= original.annToMask(later).astype(bool)
            expected = mask & ~covered_later
            if not expected.any():
                continue
            new = next(after)
            assert new["category_id"] == ann["category_id"] and new["iscrowd"] == ann["iscrowd"]
            if not ann["iscrowd"]:
                np.testing.assert_array_equal(again.annToMask(new).astype(bool), expected)
                identical += not covered_later[mask].any()
    assert (
        identical > 200
    )  # 232 of the 377 non-crowd objects overlap no later one: they come back as they were
    assert (tmp_path / "000000397133.jpg").read_bytes() == (
        TINY_VAL.parents[1] / "val2017" / "000000397133.jpg"
    ).read_bytes()


@needs_tiny_coco
def test_real_objects_as_polygons(tmp_path):
    """On real COCO objects: exact without tolerance; at tolerance 1 pixel, mean IoU at least 0.95 (0.956)."""
    loaded = coco.load_coco(TINY_VAL)
    labels = [coco.coco_to_labels(loaded, image_id)[0] for image_id in loaded.getImgIds()[:25]]
    names = [f"{i}.png" for i in range(len(labels))]
    for tolerance in (0.0, 1.0):
        dataset = coco.labels_to_coco(names, labels, segmentation="polygon", tolerance=tolerance)
        again = dump_and_load(dataset, tmp_path)
        ious = []
        for image_id, label_image in enumerate(labels, start=1):
            for ann, label in zip(again.imgToAnns[image_id], np.unique(label_image)[1:], strict=True):
                mask, expected = again.annToMask(ann).astype(bool), label_image == label
                ious.append((mask & expected).sum() / (mask | expected).sum())
        if tolerance == 0:
            assert min(ious) == 1.0
        else:
            assert np.mean(ious) >= 0.95


@needs_tiny_coco
def test_describe_real_coco():
    text = coco.describe_coco(TINY_VAL)
    assert "50 images, 382 annotations (5 crowd), 80 categories" in text
    assert any(line.split()[:2] == ["person", "127"] for line in text.splitlines())


def write_images(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        iio.imwrite(path, rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_dataset_copies_files_and_saves_pixels(tmp_path):
    (source,) = write_images(tmp_path / "src", 1)
    pixels = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    features = {"label": [random_labels(0)[0, 0]], "category": ["cell"]}  # the 1-pixel object in the corner
    entries = [coco.CocoEntry(source, random_labels(0), features), coco.CocoEntry(pixels, random_labels(1))]
    json_path = coco.write_coco_dataset(tmp_path / "out", entries)
    assert json_path == tmp_path / "out" / "annotations.json"
    (tmp_path / "probe").touch()
    assert (
        json_path.stat().st_mode == (tmp_path / "probe").stat().st_mode
    )  # usual permissions despite the rename
    assert (tmp_path / "out" / "img0.png").read_bytes() == source.read_bytes()
    np.testing.assert_array_equal(iio.imread(tmp_path / "out" / "image_000001.png"), pixels)
    read = coco.read_coco_dataset(json_path)
    assert [e.image for e in read.entries] == [
        tmp_path / "out" / "img0.png",
        tmp_path / "out" / "image_000001.png",
    ]
    for entry, labels in zip(read.entries, [random_labels(0), random_labels(1)], strict=True):
        relabelled = {new: labels[entry.labels == new][0] for new in np.unique(entry.labels) if new}
        np.testing.assert_array_equal(entry.labels > 0, labels != 0)
        for new, old in relabelled.items():
            np.testing.assert_array_equal(entry.labels == new, labels == old)
    assert {c["name"] for c in read.categories} == {"cell", "object"}
    names = coco.features_to_categories(read.entries[0].categories)
    assert names.pop(read.entries[0].labels[0, 0]) == "cell" and set(names.values()) == {"object"}


@pytest.mark.parametrize(
    ("make_entry", "error", "message"),
    [
        (lambda src: coco.CocoEntry(src / "nope.png", random_labels(0)), FileNotFoundError, "does not exist"),
        (
            lambda src: coco.CocoEntry(src / "img0.png", random_labels(0, shape=(50, 64))),
            ValueError,
            "bigger than",
        ),
        (
            lambda src: coco.CocoEntry(np.zeros((48, 64, 2)), random_labels(0)),
            ValueError,
            "height, width, 3 or 4",
        ),
        (lambda src: coco.CocoEntry(np.full((48, 64), 0.5), random_labels(0)), ValueError, "without loss"),
        (
            lambda src: coco.CocoEntry(src / "img0.png", random_labels(0), file_name="../x.png"),
            ValueError,
            "relative",
        ),
        (lambda src: coco.CocoEntry(src / "img0.png", np.zeros((48, 64, 3), int)), ValueError, "must be 2D"),
        (lambda src: coco.CocoEntry(None, random_labels(0)), ValueError, "neither an image nor a file_name"),
    ],
)
def test_bad_entries_write_nothing(make_entry, error, message, tmp_path):
    write_images(tmp_path / "src", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    good = coco.CocoEntry(tmp_path / "src" / "img0.png", random_labels(0))
    with pytest.raises(error, match=message):
        coco.write_coco_dataset(out, [good, make_entry(tmp_path / "src")])
    assert snapshot(out) == {"keep.txt": b"unrelated"}


def test_names_used_twice_write_nothing(tmp_path):
    paths = write_images(tmp_path / "a", 1) + write_images(tmp_path / "b", 1)
    with pytest.raises(ValueError, match="share the file name"):
        coco.write_coco_dataset(tmp_path / "out", [coco.CocoEntry(p, random_labels(0)) for p in paths])
    assert not (tmp_path / "out").exists()


def test_existing_json_is_kept_unless_overwrite(tmp_path):
    (source,) = write_images(tmp_path / "src", 1)
    entries = [coco.CocoEntry(source, random_labels(0))]
    json_path = coco.write_coco_dataset(tmp_path / "out", entries)
    before = snapshot(tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        coco.write_coco_dataset(tmp_path / "out", [coco.CocoEntry(source, random_labels(1))])
    assert snapshot(tmp_path / "out") == before
    coco.write_coco_dataset(tmp_path / "out", [coco.CocoEntry(source, random_labels(1))], overwrite=True)
    assert json_path.read_bytes() != before["annotations.json"]
    assert sorted(snapshot(tmp_path / "out")) == ["annotations.json", "img0.png"]


def test_an_existing_different_image_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    iio.imwrite(out / "image_000000.png", np.zeros((48, 64), np.uint8))
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="holds another image"):
        coco.write_coco_dataset(
            out, [coco.CocoEntry(np.ones((48, 64), np.uint8), random_labels(0))], overwrite=True
        )
    assert snapshot(out) == before
    coco.write_coco_dataset(
        out, [coco.CocoEntry(np.zeros((48, 64), np.uint8), random_labels(0))]
    )  # same pixels
    assert snapshot(out)["image_000000.png"] == before["image_000000.png"]


def test_a_failure_while_writing_removes_what_was_written(tmp_path, monkeypatch):
    (source,) = write_images(tmp_path / "src", 1)
    out = tmp_path / "out"
    atomic_write = coco._atomic_write

    def half_written(f):
        f.write(b"{half")
        raise OSError("disk full")

    def full_disk_at_the_json(target, write):
        atomic_write(target, half_written if target.suffix == ".json" else write)

    monkeypatch.setattr(coco, "_atomic_write", full_disk_at_the_json)
    with pytest.raises(OSError, match="disk full"):
        coco.write_coco_dataset(out, [coco.CocoEntry(source, random_labels(0))])
    assert snapshot(out) == {}  # neither the copied image, nor a temporary or half json


def test_export_label_folders(tmp_path):
    write_images(tmp_path / "images", 3)
    (tmp_path / "labels").mkdir()
    for i in range(2):  # img2 has no label image: left out
        iio.imwrite(tmp_path / "labels" / f"img{i}.png", random_labels(i, np.uint16))
    json_path = coco.export_label_folders(tmp_path / "images", tmp_path / "labels", tmp_path / "out")
    loaded = COCO(str(json_path))
    assert sorted(r["file_name"] for r in loaded.imgs.values()) == ["img0.png", "img1.png"]
    for image in loaded.imgs.values():
        labels = iio.imread(tmp_path / "labels" / image["file_name"])
        for ann in loaded.imgToAnns[image["id"]]:
            mask = loaded.annToMask(ann)
            np.testing.assert_array_equal(mask, labels == label_of(mask, labels))
    assert "2 images" in coco.describe_coco(json_path)


def test_export_label_folders_refuses_labels_without_image(tmp_path):
    write_images(tmp_path / "images", 1)
    (tmp_path / "labels").mkdir()
    iio.imwrite(tmp_path / "labels" / "other.png", random_labels(0, np.uint8))
    with pytest.raises(FileNotFoundError, match="other"):
        coco.export_label_folders(tmp_path / "images", tmp_path / "labels", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_coco_is_a_clear_error(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"theme": "dark"}))
    with pytest.raises(
        ValueError, match="not a COCO instances file: missing images, annotations, categories"
    ):
        coco.read_coco_dataset(path)
    with pytest.raises(ValueError, match="missing key 'images'"):
        coco.describe_coco(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        coco.describe_coco(tmp_path / "broken.json")


def test_describe_lists_every_problem(tmp_path):
    write_images(tmp_path, 1)
    dataset = coco.labels_to_coco(["img0.png", "gone.png"], [random_labels(0), random_labels(1)])
    dataset["annotations"][0]["bbox"] = [60.0, 0.0, 10.0, 5.0]
    dataset["annotations"][1]["image_id"] = 99
    dataset["annotations"][2]["category_id"] = 42
    dataset["annotations"][3]["id"] = dataset["annotations"][4]["id"]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="annotations ids are not unique"):
        coco.describe_coco(path)
    dataset["annotations"][3]["id"] = 1000
    dataset["annotations"][5]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError) as raised:
        coco.describe_coco(path)
    message = str(raised.value)
    assert "5 problem(s)" in message
    for part in [
        "bbox [60.0, 0.0, 10.0, 5.0] outside image 1",
        "unknown image 99",
        "unknown category 42",
        "image file gone.png not found",
        "bbox [1, 2, 3] is not [x, y, width, height]",
    ]:
        assert part in message


def test_read_finds_images_in_coco_layout_and_reports_missing_ones(tmp_path):
    write_images(tmp_path / "val2017", 1)
    (tmp_path / "annotations").mkdir()
    dataset = coco.labels_to_coco("img0.png", random_labels(0))
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))
    read = coco.read_coco_dataset(tmp_path / "annotations" / "instances_val2017.json")
    assert read.entries[0].image == tmp_path / "val2017" / "img0.png"
    (tmp_path / "val2017" / "img0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img0.png.*pass image_dir"):
        coco.read_coco_dataset(tmp_path / "annotations" / "instances_val2017.json")
