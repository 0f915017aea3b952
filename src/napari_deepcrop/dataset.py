"""A set of images annotated one at a time, exported as one COCO dataset: the widget's navigator, without Qt.

The napari widget shows one image of the set at a time in one image layer and one Labels layer; stepping to
another image stores what the Labels layer holds for the image it leaves (:meth:`AnnotationDataset.store`)
and loads the next one. Stored label images are kept compressed (zlib: label images are mostly runs), so a set
of many large images costs little memory. Images of a COCO file that were never shown keep their annotations,
decoded from the file only when needed.

"Unlabelled is not the same as empty": an export holds the images that were shown (annotated, or looked at and
left empty) and those that came annotated from a COCO file, never the images nobody opened.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from .coco import (
    ANNOTATIONS_JSON,
    IMAGE_SUFFIXES,
    CocoEntry,
    FeaturesLike,
    coco_to_labels,
    find_images,
    load_coco,
    write_coco_dataset,
)


@dataclass(frozen=True)
class PackedLabels:
    """A label image compressed in memory."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def pack(cls, labels: np.ndarray) -> PackedLabels:
        labels = np.ascontiguousarray(labels)
        return cls(zlib.compress(labels.tobytes(), 1), labels.shape, labels.dtype.str)

    def unpack(self) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self.data), self.dtype).reshape(self.shape).copy()


@dataclass
class ImageItem:
    """One image of the set and what is known of its objects."""

    image: Path | np.ndarray  # the image file, or its pixels (exported as PNG)
    file_name: str  # its name in an export, relative to the export folder
    record: dict | None = None  # its COCO image record (id, license), kept on export
    labels: PackedLabels | None = None  # stored by the navigator; None: never stored
    features: dict[str, list] | None = None


@dataclass
class AnnotationDataset:
    """Images, the labels stored for each, the current position; one export of the whole set.

    ``coco``: the pycocotools index of the COCO file the set was opened from, whose annotations serve the
    images not stored since. ``categories``, ``info``, ``licenses``: kept from that file on export.
    """

    items: list[ImageItem]
    name: str = "dataset"
    coco: Any = None
    categories: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    licenses: list[dict] = field(default_factory=list)
    index: int = 0

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"{self.name}: no images")

    # ----- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> AnnotationDataset:
        """A folder of images, or a COCO json (its images looked for as ``coco.read_coco_dataset`` does)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_folder(path)
        if path.suffix.lower() == ".json":
            return cls.from_coco(path)
        raise ValueError(f"{path} is neither a folder of images nor a COCO json")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> AnnotationDataset:
        """The images of ``folder`` by name; with an ``annotations.json`` there (an earlier export), its images
        come first with their annotations, then the images it does not list."""
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if (folder / ANNOTATIONS_JSON).is_file():
            dataset = cls.from_coco(folder / ANNOTATIONS_JSON)
            listed = {Path(item.image).resolve() for item in dataset.items}
            dataset.items += [ImageItem(p, p.name) for p in files if p.resolve() not in listed]
            dataset.name = folder.name
            return dataset
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        return cls([ImageItem(p, p.name) for p in files], name=folder.name)

    @classmethod
    def from_coco(cls, path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> AnnotationDataset:
        """Every image of a COCO file; labels are decoded image by image, when shown or exported."""
        coco = load_coco(path)
        found = find_images(path, coco.imgs.values(), image_dir)
        items = [ImageItem(found[i], record["file_name"], dict(record)) for i, record in coco.imgs.items()]
        dataset = coco.dataset
        return cls(
            items,
            Path(path).stem,
            coco,
            list(dataset["categories"]),
            dict(dataset.get("info", {})),
            list(dataset.get("licenses", [])),
        )

    @classmethod
    def single(
        cls,
        image: str | os.PathLike | np.ndarray,
        file_name: str,
        labels: np.ndarray,
        features: FeaturesLike | None = None,
        record: Mapping[str, Any] | None = None,
        kept: Mapping[str, Any] | None = None,
    ) -> AnnotationDataset:
        """A set of one annotated image (the widget's export without a navigator); ``kept``: the categories,
        info and licenses of the COCO file it was read from."""
        kept = kept or {}
        image = image if isinstance(image, np.ndarray) else Path(image)
        item = ImageItem(image, file_name, dict(record) if record else None)
        dataset = cls(
            [item],
            Path(file_name).stem,
            categories=list(kept.get("categories", [])),
            info=dict(kept.get("info", {})),
            licenses=list(kept.get("licenses", [])),
        )
        dataset.store(labels, features)
        return dataset

    # ----- moving ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def current(self) -> ImageItem:
        return self.items[self.index]

    @property
    def title(self) -> str:
        return f"image {self.index + 1} / {len(self)}: {self.current.file_name}"

    def go(self, index: int) -> bool:
        """Make ``index`` the current image (clamped to the set); False when that changes nothing."""
        index = min(max(int(index), 0), len(self) - 1)
        moved, self.index = index != self.index, index
        return moved

    # ----- pixels and labels -------------------------------------------------------------------------------
    def image(self, index: int | None = None) -> np.ndarray:
        """The pixels of an image (the current one by default): (H, W) or (H, W, 3 or 4)."""
        item = self.items[self.index if index is None else index]
        pixels = item.image if isinstance(item.image, np.ndarray) else iio.imread(item.image)
        if not (pixels.ndim == 2 or pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
            raise ValueError(f"{item.file_name} is not a 2D grayscale or RGB(A) image: shape {pixels.shape}")
        return pixels

    def labels(self, index: int | None = None) -> tuple[np.ndarray, dict[str, list]]:
        """The label image and features table of an image: as stored, else from the COCO file, else empty."""
        item = self.items[self.index if index is None else index]
        if item.labels is not None:
            return item.labels.unpack(), dict(item.features or {})
        if self._in_coco(item):
            return coco_to_labels(self.coco, item.record["id"])
        shape = item.image.shape if isinstance(item.image, np.ndarray) else iio.improps(item.image).shape
        return np.zeros(shape[:2], np.int32), {}

    def store(self, labels: np.ndarray, features: FeaturesLike | None = None, index: int | None = None) -> None:
        """Keep what the widget's Labels layer holds for an image (the current one by default)."""
        item = self.items[self.index if index is None else index]
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels of {item.file_name} must be 2D, got shape {labels.shape}")
        item.labels = PackedLabels.pack(labels)
        item.features = {str(k): list(v) for k, v in features.items()} if features is not None else None

    def annotated(self) -> list[int]:
        """Positions of the images an export holds: stored, or annotated in the COCO file opened."""
        return [i for i, item in enumerate(self.items) if item.labels is not None or self._in_coco(item)]

    def _in_coco(self, item: ImageItem) -> bool:
        return self.coco is not None and item.record is not None and item.record.get("id") in self.coco.imgs

    # ----- export ------------------------------------------------------------------------------------------
    def snapshot(self) -> AnnotationDataset:
        """A copy that later edits of this one do not change (stored labels are immutable, items are copied):
        what a worker thread exports while the user goes on annotating."""
        return replace(self, items=[replace(item) for item in self.items])

    def export(
        self,
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        on_image: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Write ``annotations.json`` and the annotated images into ``out_dir`` (see ``write_coco_dataset``:
        atomic, nothing written when anything is wrong); returns the json's path.

        ``on_image(done, total)`` runs before each image's labels are prepared; an exception raised there stops
        the export with nothing written.
        """
        chosen = self.annotated()
        if not chosen:
            raise ValueError(f"{self.name}: no image has been annotated yet")
        entries = []
        for done, index in enumerate(chosen):
            if on_image is not None:
                on_image(done, len(chosen))
            item = self.items[index]
            labels, features = self.labels(index)
            entries.append(CocoEntry(item.image, labels, features, item.file_name, item.record))
        return write_coco_dataset(
            out_dir,
            entries,
            overwrite,
            categories=self.categories,
            info=self.info or None,
            licenses=self.licenses,
        )


def image_source(path: str | os.PathLike | None, shape: Sequence[int]) -> Path | None:
    """``path`` if it is an image file (of a suffix COCO tools read) whose pixels have ``shape``, else None."""
    if not path or Path(path).suffix.lower() not in IMAGE_SUFFIXES or not Path(path).is_file():
        return None
    try:
        return Path(path) if tuple(iio.improps(path).shape) == tuple(shape) else None
    except (OSError, ValueError):
        return None
