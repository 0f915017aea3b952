"""Label images <-> COCO instance annotations, with pycocotools doing every encoding.

A label image holds one object per non-zero id; the object's category lives in a features table (napari's
``Labels.features``): columns ``"label"`` (int; napari's ``"index"`` if there is no ``"label"``) and
``"category"`` (str), optionally ``"iscrowd"``. Objects missing from the table are of category ``"object"``.

Export is linear in the number of pixels and objects: one ``scipy.ndimage.find_objects`` pass, then each
object is touched only inside its bounding box. Its runs are found in the crop and shifted into the full
image's column-major frame (COCO runs go down the columns); pycocotools compresses them (``frPyObjects``) and
measures ``area`` and ``bbox`` from them. Tests check this is exactly ``pycocotools.mask.encode`` of the full
mask.

Polygons (``segmentation="polygon"``) follow the pixel edges, which pycocotools rasterises back exactly. COCO
polygons of one annotation are united, so a hole cannot be its own polygon: each hole is joined to its part's
outer ring by a zero-width bridge walked there and back, which the even-odd fill of pycocotools (and the
non-zero fill of other tools, as holes run the other way round) leaves empty. Each 4-connected part is one
polygon. With ``tolerance=0`` polygons are lossless; a positive tolerance simplifies them (Douglas-Peucker).

COCO objects may overlap; a label image cannot. Reading, later annotations of an image win where they overlap,
and objects left with no pixel are dropped from the features table.
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import imageio.v3 as iio
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage as ndi

DEFAULT_CATEGORY = "object"
ANNOTATIONS_JSON = "annotations.json"
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# A features table: a dict of columns or a pandas DataFrame (both do ``"label" in t`` and ``t["label"]``).
FeaturesLike = Mapping[str, Any]
ImageRef = str | os.PathLike | Mapping[str, Any]  # a file name or a COCO image record
LabelsRef = np.ndarray | str | os.PathLike  # a label image or its file
Segmentation = Literal["rle", "polygon"]

_STEPS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])  # (dx, dy) of edge directions right, down, left, up


# --- features tables <-> categories ---


def features_to_categories(features: FeaturesLike | None) -> dict[int, str]:
    """Label id -> category name from a features table; rows without a usable label or name are skipped."""
    return {
        label: name for label, name in _feature_rows(features, "category") if isinstance(name, str) and name
    }


def categories_to_features(categories: Mapping[int, str]) -> dict[str, list]:
    """A features table (``label``, ``category`` columns) for napari's ``Labels.features``."""
    return {"label": [int(label) for label in categories], "category": [str(c) for c in categories.values()]}


def coco_categories(names: Sequence[str], base: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """COCO ``categories``: ``base`` as is (so its ids survive), then each new name under the next free id."""
    categories = [dict(c) for c in base or []]
    known = {c["name"] for c in categories}
    next_id = max((int(c["id"]) for c in categories), default=0) + 1
    for name in dict.fromkeys(names):
        if name not in known:
            categories.append({"id": next_id, "name": name, "supercategory": DEFAULT_CATEGORY})
            known.add(name)
            next_id += 1
    return categories


def _feature_rows(features: FeaturesLike | None, column: str) -> Iterator[tuple[int, Any]]:
    """(label, value) rows; the label from "label", else from napari's own "index" column."""
    key = next((k for k in ("label", "index") if features is not None and k in features), None)
    if key is None or column not in features:
        return
    for label, value in zip(features[key], features[column], strict=True):
        with contextlib.suppress(TypeError, ValueError):  # NaN or None labels: rows napari padded
            yield int(label), value


# --- label image -> COCO ---


def labels_to_coco(
    images: ImageRef | Sequence[ImageRef],
    labels: LabelsRef | Sequence[LabelsRef],
    categories: FeaturesLike | None | Sequence[FeaturesLike | None] = None,
    *,
    category_list: Sequence[Mapping[str, Any]] | None = None,
    segmentation: Segmentation = "rle",
    tolerance: float = 0.0,
    info: Mapping[str, Any] | None = None,
    licenses: Sequence[Mapping[str, Any]] | None = None,
) -> dict:
    """A COCO dataset dict for one label image (an array) or many (a sequence of arrays or label image files).

    ``images``: per label image, its file name (of a path, the name only) or its COCO image record (kept,
    so ids and licenses survive; height and width must match the label image). ``categories``: per label
    image, its features table. ``category_list``: COCO categories whose ids must be kept; other names get the
    next free ids. Annotations are ``iscrowd: 0`` unless the table's ``iscrowd`` column says 1 (crowd regions
    read from COCO stay crowd).
    Label images are loaded one at a time, so many files need not fit in memory together.
    """
    if isinstance(labels, np.ndarray | str | os.PathLike):
        images, labels, categories = [images], [labels], [categories]
    categories = [None] * len(labels) if categories is None else list(categories)
    if not len(images) == len(labels) == len(categories):
        raise ValueError(f"got {len(images)} images, {len(labels)} label images, {len(categories)} tables")
    if segmentation not in ("rle", "polygon"):
        raise ValueError(f"segmentation must be 'rle' or 'polygon', not {segmentation!r}")
    records = _image_records(images)
    objects = []
    for record, source, table in zip(records, labels, categories, strict=True):
        label_image = load_labels(source)
        _set_size(record, label_image.shape)
        names = features_to_categories(table)
        crowd = {label for label, flag in _feature_rows(table, "iscrowd") if flag == 1}
        for label, segm, rle in _encode_objects(label_image, crowd, segmentation, tolerance):
            objects.append((record["id"], names.get(label, DEFAULT_CATEGORY), label in crowd, segm, rle))
    used = [name for _, name, *_ in objects] or ([] if category_list else [DEFAULT_CATEGORY])
    category_table = coco_categories(used, category_list)
    category_ids = {c["name"]: int(c["id"]) for c in category_table}
    return {
        "info": dict(info) if info else {"description": "exported by napari-deepcrop"},
        "licenses": [dict(lic) for lic in licenses or []],
        "images": records,
        "annotations": [
            _annotation(ann_id, image_id, category_ids[name], crowd, segm, rle)
            for ann_id, (image_id, name, crowd, segm, rle) in enumerate(objects, start=1)
        ],
        "categories": category_table,
    }


def load_labels(source: LabelsRef) -> np.ndarray:
    """A 2D integer label image from an array or an image file (bool masks become 0/1)."""
    labels = iio.imread(source) if isinstance(source, str | os.PathLike) else np.asarray(source)
    if labels.ndim != 2:
        raise ValueError(f"a label image must be 2D (height, width), got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"a label image must hold integers, got dtype {labels.dtype}")
    return labels


def _image_records(images: Sequence[ImageRef]) -> list[dict]:
    """COCO image records; given ids are kept, the others numbered from 1 past them."""
    records = [dict(ref) if isinstance(ref, Mapping) else {"file_name": Path(ref).name} for ref in images]
    next_id = max((int(r["id"]) for r in records if "id" in r), default=0) + 1
    for record in records:
        if "id" not in record:
            record["id"] = next_id
            next_id += 1
    duplicated = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if duplicated:
        raise ValueError(f"image ids must be unique; repeated: {duplicated}")
    return records


def _set_size(record: dict, shape: tuple[int, ...]) -> None:
    height, width = (int(n) for n in shape)
    if record.setdefault("height", height) != height or record.setdefault("width", width) != width:
        raise ValueError(
            f"the label image of {record.get('file_name')} is {height}x{width}, "
            f"its image is {record['height']}x{record['width']}"
        )


def _annotation(ann_id: int, image_id: int, category_id: int, crowd: bool, segm: Any, rle: dict) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segm,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(crowd),
    }


def _encode_objects(
    labels: np.ndarray, crowd: set[int], segmentation: Segmentation, tolerance: float
) -> Iterator[tuple[int, Any, dict]]:
    """(label, COCO segmentation, compressed RLE of what a reader will decode) per object, in label order."""
    height, width = labels.shape
    objects = list(_objects(labels))
    uncompressed = [
        {"size": [height, width], "counts": _crop_counts(mask, sl, labels.shape)} for _, sl, mask in objects
    ]
    rles = mask_utils.frPyObjects(uncompressed, height, width) if objects else []
    for (label, sl, mask), rle in zip(objects, rles, strict=True):
        if segmentation == "polygon" and label not in crowd:
            polygons = _polygons(mask, sl, tolerance)
            yield label, polygons, mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        else:
            yield label, {"size": [height, width], "counts": rle["counts"].decode("ascii")}, rle


def _objects(labels: np.ndarray) -> Iterator[tuple[int, tuple[slice, slice], np.ndarray]]:
    """(label, bounding box, mask within it) per object: one find_objects pass, then bounding boxes only."""
    index_image, ids = _index_image(labels)
    for index, box in enumerate(ndi.find_objects(index_image), start=1):
        if box is not None:
            yield int(ids[index - 1]), box, index_image[box] == index


def _index_image(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An image find_objects can take (ids 1..n, 0 background) and the label of each index.

    Small non-negative labels are their own index; negative or huge ones (uint64 hashes) are renumbered, since
    find_objects allocates one entry per id up to the largest.
    """
    if labels.size == 0:
        return labels, np.empty(0, labels.dtype)
    if labels.min() >= 0 and labels.max() <= labels.size:
        return labels, np.arange(1, int(labels.max()) + 1)
    ids, inverse = np.unique(labels, return_inverse=True)
    index = np.arange(1, ids.size + 1)
    index[ids == 0] = 0
    return index[inverse.reshape(labels.shape)], ids


def _crop_counts(mask: np.ndarray, box: tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
    """Uncompressed COCO counts of the full image that is ``mask`` at ``box`` and zero elsewhere.

    A zero row above and below the crop keeps runs of one crop column from joining the next; a run's start or
    end at flat crop position p lands at (left + column) * height + top + row in the image.
    """
    rows, cols = mask.shape
    height, width = shape
    padded = np.zeros((rows + 2, cols), np.int8)
    padded[1:-1] = mask
    steps = np.diff(padded.ravel(order="F"))
    starts, ends = (_to_frame(np.flatnonzero(steps == s) + 1, rows + 2, box, height) for s in (1, -1))
    joined = ends[:-1] == starts[1:]  # a run down one column continuing at the top of the next
    starts, ends = starts[np.r_[True, ~joined]], ends[np.r_[~joined, True]]
    counts = np.diff(np.column_stack([starts, ends]).ravel(), prepend=0, append=height * width)
    return counts if counts[-1] else counts[:-1]  # like pycocotools: no trailing empty run


def _to_frame(positions: np.ndarray, padded_rows: int, box: tuple[slice, slice], height: int) -> np.ndarray:
    column, row = np.divmod(positions, padded_rows)
    return (box[1].start + column) * height + box[0].start + row - 1


def _polygons(mask: np.ndarray, box: tuple[slice, slice], tolerance: float) -> list[list[float]]:
    """One COCO polygon per 4-connected part: its outer ring with each hole bridged in."""
    parts, _ = ndi.label(mask)
    polygons = []
    for index, part_box in enumerate(ndi.find_objects(parts), start=1):
        rings = [_simplify(ring, tolerance) for ring in _trace_rings(parts[part_box] == index)]
        outer = max(range(len(rings)), key=lambda i: _signed_area(rings[i]))
        anchor = rings[outer][:1]
        holes = [np.concatenate([anchor, ring, ring[:1]]) for i, ring in enumerate(rings) if i != outer]
        ring = np.concatenate([rings[outer], *holes, anchor] if holes else [rings[outer]])
        offset = (box[1].start + part_box[1].start, box[0].start + part_box[0].start)
        polygons.append((ring + offset).astype(float).ravel().tolist())
    return polygons


def _trace_rings(part: np.ndarray) -> list[np.ndarray]:
    """Closed rings of pixel-edge corners (x, y) around a mask, foreground on the right when walking.

    Outer rings come out with positive signed area, holes negative. Where two pixels touch only at a corner
    the walk turns right, towards the foreground, so 4-connected parts stay apart.
    """
    starts, directions = _boundary_edges(part)
    width = part.shape[1] + 1
    keys = (starts[:, 1] * width + starts[:, 0]) * 4 + directions
    order = np.argsort(keys)
    keys = keys[order]
    ends = starts + _STEPS[directions]
    following = np.full(len(keys), -1)
    for turn in (3, 0, 1):  # left, straight, right: the last one written (right) wins at a corner
        wanted = (ends[:, 1] * width + ends[:, 0]) * 4 + (directions + turn) % 4
        found = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        hit = keys[found] == wanted
        following[hit] = order[found[hit]]
    return [_corners(starts[cycle], directions[cycle]) for cycle in _cycles(following)]


def _boundary_edges(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start corner (x, y) and direction (0 right, 1 down, 2 left, 3 up) of each boundary edge."""
    padded = np.pad(part, 1)
    inner = padded[1:-1, 1:-1]
    # the pixel above, right, below, left; the edge on that side starts at this corner, walking clockwise
    neighbours = (padded[:-2, 1:-1], padded[1:-1, 2:], padded[2:, 1:-1], padded[1:-1, :-2])
    corner_of = ((0, 0), (1, 0), (1, 1), (0, 1))
    starts, directions = [], []
    for direction, (neighbour, (dx, dy)) in enumerate(zip(neighbours, corner_of, strict=True)):
        y, x = np.nonzero(inner & ~neighbour)
        starts.append(np.column_stack([x + dx, y + dy]))
        directions.append(np.full(len(x), direction))
    return np.concatenate(starts), np.concatenate(directions)


def _cycles(following: np.ndarray) -> Iterator[np.ndarray]:
    seen = np.zeros(len(following), bool)
    for first in range(len(following)):
        cycle = []
        edge = first
        while not seen[edge]:
            seen[edge] = True
            cycle.append(edge)
            edge = following[edge]
        if cycle:
            yield np.array(cycle)


def _corners(starts: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The ring's vertices: the starts of edges that turn."""
    return starts[directions != np.roll(directions, 1)]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring; the ring itself when simplifying would lose half its area or more."""
    if tolerance <= 0 or len(ring) <= 4:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    keep = np.zeros(len(ring), bool)
    keep[[0, far]] = True
    pending = [(0, far), (far, len(ring))]
    while pending:
        first, last = pending.pop()
        if last - first < 2:
            continue
        distances = _segment_distances(ring[first + 1 : last], ring[first], ring[last % len(ring)])
        worst = int(np.argmax(distances))
        if distances[worst] > tolerance:
            keep[first + 1 + worst] = True
            pending += [(first, first + 1 + worst), (first + 1 + worst, last)]
    simple = ring[keep]
    return simple if abs(_signed_area(simple)) > abs(_signed_area(ring)) / 2 else ring


def _segment_distances(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = (b - a).astype(float)
    t = np.clip((points - a) @ ab / max(ab @ ab, 1e-12), 0, 1)
    return np.hypot(*(points - a - t[:, None] * ab).T)


# --- COCO -> label image ---


def load_coco(path: str | os.PathLike, dataset: Mapping[str, Any] | None = None) -> COCO:
    """pycocotools' COCO for a file (or its parsed ``dataset``), quietly; a clear error if it is not COCO."""
    if dataset is None:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    missing = [
        k
        for k in ("images", "annotations", "categories")
        if not isinstance(dataset, Mapping) or k not in dataset
    ]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: missing {', '.join(missing)}")
    return _as_coco(dataset)


def _as_coco(coco: COCO | Mapping[str, Any]) -> COCO:
    if isinstance(coco, COCO):
        return coco
    loaded = COCO()
    loaded.dataset = dict(coco)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        loaded.createIndex()
    return loaded


def coco_to_labels(coco: COCO | Mapping[str, Any], image_id: int) -> tuple[np.ndarray, dict[str, list]]:
    """The label image (uint32, objects numbered 1.. in annotation order) and features table of one image.

    Polygons, uncompressed (crowd) and compressed RLE all load, through ``COCO.annToRLE``; box-only
    annotations (empty segmentation) have no pixels. Where annotations overlap the later one wins; an object
    left without pixels is not in the table. The table has ``label``, ``category`` and ``iscrowd`` columns.
    """
    coco = _as_coco(coco)
    if image_id not in coco.imgs:
        raise ValueError(f"no image with id {image_id} in this COCO dataset")
    record = coco.imgs[image_id]
    labels = np.zeros((record["height"], record["width"]), np.uint32)
    annotations = coco.imgToAnns.get(image_id, [])
    for label, annotation in enumerate(annotations, start=1):
        if annotation.get("segmentation"):
            labels[_decode(coco.annToRLE(annotation), record)] = label
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(annotations) + 1)[1:]) + 1
    kept = [annotations[i - 1] for i in present]
    unknown = {ann["category_id"] for ann in kept} - coco.cats.keys()
    if unknown:
        raise ValueError(
            f"annotations of image {image_id} have categories {sorted(unknown)} not in 'categories'"
        )
    features = categories_to_features(
        {int(i): coco.cats[a["category_id"]]["name"] for i, a in zip(present, kept, strict=True)}
    )
    features["iscrowd"] = [int(ann.get("iscrowd", 0)) for ann in kept]
    return labels, features


def _decode(rle: Mapping[str, Any], record: Mapping[str, Any]) -> np.ndarray:
    """The object's mask (H, W) bool, decoded by pycocotools, after checking it has the image's size."""
    if list(rle["size"]) != [record["height"], record["width"]]:
        raise ValueError(
            f"an annotation of image {record['id']} has size {rle['size']}, the image is "
            f"{record['height']}x{record['width']}"
        )
    return mask_utils.decode(rle).astype(bool)


# --- datasets on disk ---


@dataclass
class CocoEntry:
    """One image of a dataset on disk.

    ``image``: the image file (copied into the dataset), its pixels (saved as PNG), or None to write only the
    annotations, pointing at ``file_name`` kept elsewhere. ``labels``: the label image or its file.
    ``categories``: its features table. ``file_name``: the name in the dataset, relative to its directory.
    ``record``: a COCO image record to keep (id, license, urls), as read from another dataset.
    """

    image: str | os.PathLike | np.ndarray | None
    labels: LabelsRef
    categories: FeaturesLike | None = None
    file_name: str | None = None
    record: Mapping[str, Any] | None = None


@dataclass
class CocoDataset:
    """A dataset read from disk: entries (image paths) and what ``write_coco_dataset`` should keep of it."""

    entries: list[CocoEntry]
    categories: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    licenses: list[dict] = field(default_factory=list)


@dataclass
class _PlannedImage:
    file_name: str
    source: Path | np.ndarray | None  # None: nothing to write (no pixels, or the file is already there)
    record: dict


def write_coco_dataset(
    out_dir: str | os.PathLike,
    entries: Sequence[CocoEntry],
    overwrite: bool = False,
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
    licenses: Sequence[Mapping[str, Any]] | None = None,
    segmentation: Segmentation = "rle",
    tolerance: float = 0.0,
    json_name: str = ANNOTATIONS_JSON,
) -> Path:
    """Write ``json_name`` and the images into ``out_dir``; return the json's path.

    Everything is checked and encoded before the first byte is written, so a bad entry (missing image file, a
    label image larger than its image, a name used twice) raises with nothing written. Files are written to a
    temporary name and renamed, so a crash leaves no half file. ``overwrite`` concerns the json only: an
    existing image file is reused when it holds the same pixels, and never replaced when it does not.
    ``categories``, ``info``, ``licenses``: to keep from a dataset read earlier (category ids stay the same).
    """
    out_dir = Path(out_dir)
    json_path = out_dir / json_name
    if json_path.exists() and not overwrite:
        raise FileExistsError(f"{json_path} exists; pass overwrite=True to replace it")
    planned = [_plan_image(entry, index, out_dir) for index, entry in enumerate(entries)]
    repeated = [name for name, n in Counter(p.file_name for p in planned).items() if n > 1]
    if repeated:
        raise ValueError(f"two images would share the file name(s) {repeated}; give the entries a file_name")
    dataset = labels_to_coco(
        [p.record for p in planned],
        [entry.labels for entry in entries],
        [entry.categories for entry in entries],
        category_list=categories,
        segmentation=segmentation,
        tolerance=tolerance,
        info=info,
        licenses=licenses,
    )
    payload = json.dumps(dataset).encode()
    written: list[Path] = []
    try:
        for plan in planned:
            if plan.source is not None:
                _write_image(out_dir / plan.file_name, plan.source)
                written.append(out_dir / plan.file_name)
        _atomic_write(json_path, lambda f: f.write(payload))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return json_path


def _plan_image(entry: CocoEntry, index: int, out_dir: Path) -> _PlannedImage:
    """Check one entry (image present, sizes agree, a safe relative file name) and decide what to write."""
    if isinstance(entry.image, np.ndarray):
        source, shape = _png_pixels(entry.image), entry.image.shape
        file_name = entry.file_name or f"image_{index:06d}.png"
    elif entry.image is not None:
        source = Path(entry.image)
        if not source.is_file():
            raise FileNotFoundError(f"image file {source} (entry {index}) does not exist")
        shape = iio.improps(source).shape
        file_name = entry.file_name or source.name
    elif entry.file_name:
        source, shape, file_name = None, None, entry.file_name
    else:
        raise ValueError(f"entry {index} has neither an image nor a file_name")
    _check_file_name(file_name, source)
    label_shape = _labels_shape(entry.labels)
    if shape is not None and tuple(shape[:2]) != label_shape:
        relation = (
            "bigger than" if label_shape[0] * label_shape[1] > shape[0] * shape[1] else "not the size of"
        )
        raise ValueError(
            f"the label image of {file_name} ({label_shape[0]}x{label_shape[1]}) is {relation} its "
            f"image ({shape[0]}x{shape[1]})"
        )
    if source is not None and _already_there(out_dir / file_name, source):
        source = None
    return _PlannedImage(file_name, source, {**(entry.record or {}), "file_name": file_name})


def _check_file_name(file_name: str, source: Path | np.ndarray | None) -> None:
    name = Path(file_name)
    if name.is_absolute() or ".." in name.parts:
        raise ValueError(f"file_name {file_name!r} must be relative to the dataset directory, without '..'")
    expected = ".png" if isinstance(source, np.ndarray) else source.suffix if source else name.suffix
    if name.suffix.lower() != expected.lower():
        raise ValueError(f"file_name {file_name!r} must end in {expected!r}, like the image written there")


def _labels_shape(labels: LabelsRef) -> tuple[int, int]:
    shape = iio.improps(labels).shape if isinstance(labels, str | os.PathLike) else np.shape(labels)
    if len(shape) != 2:
        raise ValueError(f"a label image must be 2D (height, width), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _png_pixels(image: np.ndarray) -> np.ndarray:
    """The image as uint8 or uint16, which PNG stores; refuse anything that would change a value."""
    if not (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (3, 4)):
        raise ValueError(f"an image must be (height, width) or (height, width, 3 or 4), got {image.shape}")
    for dtype in (np.uint8, np.uint16):
        cast = image.astype(dtype)
        if np.array_equal(cast, image):
            return cast
    raise ValueError(
        f"a {image.dtype} image whose values are not all integers in 0..65535 cannot be stored as PNG "
        "without loss; save it as a file first and give its path"
    )


def _already_there(target: Path, source: Path | np.ndarray) -> bool:
    """True if ``target`` holds this image already; an existing different file is an error, never replaced."""
    if not target.exists():
        return False
    if isinstance(source, Path):
        same = target.samefile(source) or filecmp.cmp(target, source, shallow=False)
    else:
        try:
            same = np.array_equal(iio.imread(target), source)
        except (OSError, ValueError):  # not an image we can read: not ours either
            same = False
    if not same:
        raise FileExistsError(f"{target} exists and holds another image; remove it or write elsewhere")
    return True


def _write_image(target: Path, source: Path | np.ndarray) -> None:
    if isinstance(source, Path):
        _atomic_write(target, lambda f: f.write(source.read_bytes()))
    else:
        _atomic_write(target, lambda f: iio.imwrite(f, source, extension=".png"))


def _atomic_write(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a temporary file next to ``target``, then rename it: nobody ever sees half a file.

    The temporary file is made like any other (``open(..., "xb")``), so the result gets the usual permissions.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_coco_dataset(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, dataset: Mapping | None = None
) -> CocoDataset:
    """Every image of a COCO file with its label image and features table (see ``coco_to_labels``).

    Images are looked for in ``image_dir``, else next to the json, else, for COCO's own layout
    (``annotations/instances_val2017.json``), in ``../val2017`` and ``..``. A missing image is an error that
    names it. ``dataset``: the already parsed json, to spare parsing a large file twice.
    """
    coco = load_coco(path, dataset)
    found = find_images(path, coco.imgs.values(), image_dir)
    entries = [
        CocoEntry(
            image, *coco_to_labels(coco, image_id), coco.imgs[image_id]["file_name"], coco.imgs[image_id]
        )
        for image_id, image in found.items()
    ]
    dataset = coco.dataset
    return CocoDataset(entries, dataset["categories"], dataset.get("info", {}), dataset.get("licenses", []))


def find_images(
    path: str | os.PathLike, records: Iterable[Mapping[str, Any]], image_dir: str | os.PathLike | None = None
) -> dict[int, Path]:
    """Image id -> file of each COCO image record of the json at ``path``, looked for as ``read_coco_dataset``
    does; a missing file is an error that names it (and the first few others)."""
    records = list(records)
    roots = _image_roots(Path(path), image_dir)
    found = {record["id"]: _find_image(record["file_name"], roots) for record in records}
    missing = [record["file_name"] for record in records if found[record["id"]] is None]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of {path} not found in {[str(r) for r in roots]}: "
            f"{missing[:10]}; pass image_dir"
        )
    return found


def _image_roots(json_path: Path, image_dir: str | os.PathLike | None) -> list[Path]:
    if image_dir is not None:
        return [Path(image_dir)]
    folder = json_path.parent
    roots = [folder]
    if folder.name == "annotations":
        roots += [folder.parent / json_path.stem.rsplit("_", 1)[-1], folder.parent]
    return roots


def _find_image(file_name: str, roots: Sequence[Path]) -> Path | None:
    return next((root / file_name for root in roots if (root / file_name).is_file()), None)


def export_label_folders(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """A COCO dataset in ``out_dir`` from label image files matched to images by file stem; the json's path.

    Each label image in ``labels_dir`` needs an image of the same stem in ``images_dir``; images without a
    label image are left out (unlabelled is not the same as empty). Every object is of category "object".
    """
    images, labels = _files_by_stem(images_dir, IMAGE_SUFFIXES), _files_by_stem(labels_dir, LABEL_SUFFIXES)
    if not labels:
        raise FileNotFoundError(f"no label images ({', '.join(LABEL_SUFFIXES)}) in {labels_dir}")
    unmatched = sorted(set(labels) - set(images))
    if unmatched:
        raise FileNotFoundError(f"no image in {images_dir} for the label images {unmatched[:10]}")
    entries = [CocoEntry(images[stem], labels[stem]) for stem in sorted(labels)]
    return write_coco_dataset(out_dir, entries, overwrite)


def _files_by_stem(folder: str | os.PathLike, suffixes: Sequence[str]) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    repeated = [stem for stem, n in Counter(p.stem for p in files).items() if n > 1]
    if repeated:
        raise ValueError(f"several files in {folder} share the stem(s) {repeated[:10]}: which one is meant?")
    return {p.stem: p for p in files}


# --- checking a COCO file ---


def describe_coco(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> str:
    """A summary of a COCO file (images, annotations per category); ValueError listing every problem found.

    Checked: the keys, unique ids, annotations pointing at known images and categories, boxes and RLE sizes
    within their image, image files present (looked for as ``read_coco_dataset`` does).
    """
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    problems = _coco_problems(dataset, _image_roots(Path(path), image_dir))
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ValueError(
            f"{path} is not a valid COCO instances file; {len(problems)} problem(s):\n{listed}{more}"
        )
    return _coco_summary(dataset, path)


_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation", "bbox"),
    "categories": ("id", "name"),
}


def _coco_problems(dataset: Any, roots: Sequence[Path]) -> list[str]:
    if not isinstance(dataset, dict):
        return ["the top level is not a JSON object"]
    problems = [f"missing key {key!r}" for key in _REQUIRED if not isinstance(dataset.get(key), list)]
    if problems:
        return problems
    for key, fields in _REQUIRED.items():
        problems += _table_problems(key, dataset[key], fields)
    if problems:
        return problems
    images = {image["id"]: image for image in dataset["images"]}
    category_ids = {category["id"] for category in dataset["categories"]}
    for ann in dataset["annotations"]:
        problems += _annotation_problems(ann, images, category_ids)
    missing = [
        image["file_name"] for image in dataset["images"] if _find_image(image["file_name"], roots) is None
    ]
    problems += [f"image file {name} not found in {[str(r) for r in roots]}" for name in missing]
    return problems


def _table_problems(key: str, rows: list, fields: Sequence[str]) -> list[str]:
    lacking = [[f for f in fields if not isinstance(row, dict) or f not in row] for row in rows]
    problems = [f"{key}[{i}] lacks {absent}" for i, absent in enumerate(lacking) if absent]
    if not problems:
        repeated = [i for i, n in Counter(row["id"] for row in rows).items() if n > 1]
        problems += [f"{key} ids are not unique: {repeated[:10]}"] if repeated else []
    return problems


def _annotation_problems(ann: dict, images: Mapping[Any, dict], category_ids: set) -> list[str]:
    where = f"annotation {ann['id']}"
    if ann["image_id"] not in images:
        return [f"{where} points at unknown image {ann['image_id']}"]
    problems = (
        [] if ann["category_id"] in category_ids else [f"{where} has unknown category {ann['category_id']}"]
    )
    image = images[ann["image_id"]]
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
        problems.append(f"{where}: bbox {box} is not [x, y, width, height]")
    elif box[0] < 0 or box[1] < 0 or box[0] + box[2] > image["width"] or box[1] + box[3] > image["height"]:
        problems.append(
            f"{where}: bbox {ann['bbox']} outside image {image['id']} ({image['width']}x{image['height']})"
        )
    segm = ann["segmentation"]
    if isinstance(segm, dict) and list(segm.get("size", [])) != [image["height"], image["width"]]:
        problems.append(
            f"{where}: RLE size {segm.get('size')} is not its image's {[image['height'], image['width']]}"
        )
    return problems


def _coco_summary(dataset: dict, path: str | os.PathLike) -> str:
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    annotations = Counter(names[a["category_id"]] for a in dataset["annotations"])
    images = Counter(
        name for name, _ in {(names[a["category_id"]], a["image_id"]) for a in dataset["annotations"]}
    )
    crowd = sum(bool(a.get("iscrowd")) for a in dataset["annotations"])
    width = max([len("category"), *map(len, annotations)])
    lines = [
        f"{path}",
        f"{len(dataset['images'])} images, {len(dataset['annotations'])} annotations ({crowd} crowd), "
        f"{len(names)} categories ({len(names) - len(annotations)} unused)",
        f"{'category':<{width}}  annotations  images",
        *(f"{name:<{width}}  {n:>11}  {images[name]:>6}" for name, n in annotations.most_common()),
    ]
    lines += [
        f"note: no {key!r} key (pycocotools does not need it)"
        for key in ("info", "licenses")
        if key not in dataset
    ]
    return "\n".join(lines)
