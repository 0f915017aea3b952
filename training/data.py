"""COCO-format training data: objects, clicks and crops exactly as the predictor will see them.

Each sample is one object, one click inside it (random interior points, weighted away from the boundary, and the
evaluation protocol's first click), and a square crop around the click at a random scale relative to the
object, cut and resampled by :func:`napari_deepcrop.crops.read_crop` and encoded by
:func:`napari_deepcrop.clicks.encode_clicks`: the same functions the predictor uses. Every random draw comes
from a generator seeded by (seed, epoch, position), so a run is reproducible and resumable whatever the
number of workers or processes.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from scipy import ndimage
from torch.utils.data import Dataset, Sampler

from napari_deepcrop.clicks import encode_clicks
from napari_deepcrop.coco import find_images
from napari_deepcrop.crops import Crop, PlacedMask, read_crop
from napari_deepcrop.model import DeepCropConfig
from napari_deepcrop.predictor import ImageSource, first_click_sides

from .evaluate import Sample, coco_sample_name, read_image

MAX_CLICKS = 24
# object extent / crop side, drawn log-uniformly: wider than the predictor's scale steps, so that the score head
# also learns what a too-small or too-large crop looks like
RATIO_RANGE = (0.3, 1.4)
# a focus sample (the predictor's focus crop, FocalClick's): a crop on the object's boundary, the object's extent
# this many times its side (the predictor's FOCUS_RATIO is 2.0)
FOCUS_RATIO_RANGE = (1.5, 3.0)
VAL_RATIO_RANGE = (0.45, 0.9)
# copy-paste (Ghiasi et al. 2021): the object pasted onto another training image, scaled by a factor drawn
# log-uniformly in this range (and down to fit), its border feathered by a Gaussian of this sigma in pixels
PASTE_SCALE_RANGE = (0.75, 1.33)
PASTE_FEATHER = 1.0
# training clicks are drawn with weight (distance to the object's boundary) ** CLICK_POWER (train --click-power)
CLICK_POWER = 2.0


@dataclass(frozen=True)
class CocoSource:
    """One COCO annotation file and the folder its ``file_name`` entries are relative to (None: looked for as
    :func:`napari_deepcrop.coco.read_coco_dataset` does, beside the json or in COCO's own layout)."""

    annotation_file: Path
    images_dir: Path | None = None

    @classmethod
    def from_paths(cls, annotation_file: str | Path, images_dir: str | Path | None = None) -> CocoSource:
        return cls(Path(annotation_file), None if images_dir is None else Path(images_dir))


@dataclass(frozen=True)
class ObjectRef:
    image_index: int
    source_index: int
    annotation: dict


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        return COCO(str(path))


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as the predictor sees it, stored as RGB uint8: read as stored, then scaled by the predictor's
    own rule (:class:`~napari_deepcrop.predictor.ImageSource`: 8-bit as it is, other types such as a
    microscope's 12- or 16-bit by their 0.5 and 99.5 percentiles; one channel repeated in all three)."""
    try:
        image = read_image(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot read image {path}: {error}") from error
    try:
        rgb = ImageSource.from_array(image).to_float(image)
    except ValueError as error:
        raise ValueError(f"image {path}: {error}") from error
    return (rgb * 255.0 + 0.5).astype(np.uint8)


class CocoObjects(Dataset):
    """Objects of one or more COCO datasets, de-duplicated by image file name (the first source wins).

    Images are decoded once, up front, and shared with data-loader workers by fork: no per-sample JSON parsing or
    JPEG decoding. ``exclude`` drops images by file name (e.g. validation images from a training set).
    ``ladder_prob`` is the share of training crops cut at one of the predictor's first-click scales
    (:func:`~napari_deepcrop.predictor.first_click_sides`) rather than at a scale relative to the object;
    ``focus_prob`` the share cut as the predictor's focus crops (see :func:`make_sample`); ``paste_prob`` the share
    of training objects pasted onto another of the images first (:func:`paste_object`); ``click_power`` how far
    from the object's centre its training clicks fall (see :func:`make_sample`).
    """

    def __init__(
        self,
        sources: Sequence[CocoSource],
        config: DeepCropConfig,
        train: bool = True,
        min_area: float = 400.0,
        exclude: set[str] | frozenset[str] = frozenset(),
        only: set[str] | None = None,
        ladder_prob: float = 0.0,
        focus_prob: float = 0.0,
        paste_prob: float = 0.0,
        click_power: float = CLICK_POWER,
    ) -> None:
        self.config, self.train, self.ladder_prob, self.focus_prob = config, train, ladder_prob, focus_prob
        self.paste_prob, self.click_power = paste_prob, click_power
        self.cocos = [_load_coco(s.annotation_file) for s in sources]
        self.images: list[np.ndarray] = []
        self.file_names: list[str] = []
        self.objects: list[ObjectRef] = []
        seen: set[str] = set(exclude)
        for source_index, (source, coco) in enumerate(zip(sources, self.cocos, strict=True)):
            wanted: list[tuple[int, str, list[dict]]] = []
            for image_id in sorted(coco.getImgIds()):
                info = coco.imgs[image_id]
                name = Path(info["file_name"]).name
                if name in seen or (only is not None and name not in only):
                    continue
                anns = [
                    a
                    for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
                    if a.get("area", 0) >= min_area and min(a["bbox"][2:]) >= 8
                ]
                if not anns:
                    continue
                seen.add(name)
                wanted.append((image_id, name, anns))
            # every file looked for before the first is decoded: a missing one is named at once, with the others
            files = find_images(source.annotation_file, [coco.imgs[i] for i, _, _ in wanted], source.images_dir)
            for image_id, name, anns in wanted:
                image_index = len(self.images)
                self.images.append(_read_rgb(files[image_id]))
                self.file_names.append(name)
                self.objects.extend(ObjectRef(image_index, source_index, a) for a in anns)
        if not self.objects:
            raise ValueError(
                f"no usable objects (non-crowd, area >= {min_area}) in {[str(s.annotation_file) for s in sources]}"
            )

    def __len__(self) -> int:
        return len(self.objects)

    def samples(self) -> Iterator[Sample]:
        """The objects as samples of the interactive protocol (:mod:`.evaluate`): the whole image, as training
        and the predictor see it, and the object's mask."""
        for obj in self.objects:
            mask = self.cocos[obj.source_index].annToMask(obj.annotation).astype(bool)
            name = coco_sample_name(self.file_names[obj.image_index], obj.annotation["id"])
            yield Sample(name, self.images[obj.image_index], mask)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        obj = self.objects[index]
        image = self.images[obj.image_index]
        mask = self.cocos[obj.source_index].annToMask(obj.annotation).astype(bool)
        if self.train and self.paste_prob > 0 and len(self.images) > 1 and rng.random() < self.paste_prob:
            other = int(rng.integers(len(self.images) - 1))
            other += other >= obj.image_index  # any image but the object's own
            image, mask = paste_object(image, mask, self.images[other], rng)
        return make_sample(
            image, mask, self.config, rng, self.train, self.ladder_prob, self.focus_prob, self.click_power
        )


def make_sample(
    image: np.ndarray,
    mask: np.ndarray,
    config: DeepCropConfig,
    rng: np.random.Generator,
    train: bool,
    ladder_prob: float = 0.0,
    focus_prob: float = 0.0,
    click_power: float = CLICK_POWER,
) -> dict[str, torch.Tensor]:
    """One training (or validation) sample of an object ``mask`` in an RGB uint8 ``image``.

    The click is the object's deepest point (the protocol's first click; every validation sample, 35 % of the
    training ones) or an interior point drawn with weight (distance to the boundary) ** ``click_power``: 2 keeps
    it near the centre, 0 draws it uniformly over the object, as people click.

    The crop's side is drawn relative to the object (``RATIO_RANGE``), or, with probability ``ladder_prob``,
    among the sides a first click tries on this image, however small or large the object is in them: what the
    score head has to rank at inference. With probability ``focus_prob`` it is a focus crop, as the predictor
    cuts around a further click: centred near a point of the object's boundary, the object's extent
    ``FOCUS_RATIO_RANGE`` times its side, its positive click inside the object within the crop (a corrective batch
    adds the further clicks at its errors, and its previous mask, as for any other crop).

    Training samples are cut at ``config.refinement_size`` (the input size of refinement crops; the engine
    resamples the batches it trains on first clicks to ``config.input_size`` with :func:`at_size`), validation
    samples at ``config.input_size``.
    """
    size = config.refinement_size if train else config.input_size
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if train and focus_prob > 0 and rng.random() < focus_prob:
        crop, click = _focus_crop(mask, extent, rng)
    else:
        click = _sample_click(mask, rng, protocol_click=not train or rng.random() < 0.35, power=click_power)
        low, high = RATIO_RANGE if train else VAL_RATIO_RANGE
        if train and ladder_prob > 0 and rng.random() < ladder_prob:
            side = float(rng.choice(first_click_sides(mask.shape)))
        else:
            side = max(extent / _log_uniform(rng, low, high), 16.0)
        center = np.asarray(click, float)
        if train:
            center = center + rng.uniform(-0.1, 0.1, size=2) * side
        crop = Crop.centered(tuple(center), side)
    rgb = read_crop(image, crop, size, lambda r: r.astype(np.float32) / 255.0)
    gt = read_crop(mask, crop, size, lambda m: m.astype(np.float32)) > 0.5
    points = crop.to_input(np.array([click]), size)
    labels = np.array([1])
    if train:
        rgb = _color_jitter(rgb, rng)
        points, labels = _add_random_negatives(points, labels, gt, rng)
        if rng.random() < 0.5:
            rgb, gt = rgb[:, ::-1], gt[:, ::-1]
            points = points * [1, -1] + [0, size - 1]
    outside = max(0.0, float(mask.sum()) * (size / crop.side) ** 2 - float(gt.sum()))
    clicks = np.full((MAX_CLICKS, 3), -1.0, np.float32)
    clicks[: len(points), :2], clicks[: len(points), 2] = points, labels
    return {
        "image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
        "planes": torch.from_numpy(encode_clicks(points, labels, config, size=size)),
        "mask": torch.from_numpy(np.ascontiguousarray(gt[None])).float(),
        "clicks": torch.from_numpy(clicks),
        "outside": torch.tensor(outside, dtype=torch.float32),
    }


def paste_object(
    image: np.ndarray, mask: np.ndarray, background: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The object ``mask`` of ``image`` pasted onto a copy of ``background`` (RGB uint8) at a random place and
    scale (``PASTE_SCALE_RANGE``, smaller where it would not fit): (new image, the pasted object's mask).

    The object's pixels are blended in with its mask feathered by ``PASTE_FEATHER``, so that its outline is not a
    one-pixel seam; whatever the background holds under it is covered, as an occluder would cover it.
    """
    placed = PlacedMask.from_full(mask)  # the object's bounding box
    obj, obj_mask = image[placed.bbox], placed.crop.astype(np.float32)
    h, w = obj_mask.shape
    bh, bw = background.shape[:2]
    scale = min(_log_uniform(rng, *PASTE_SCALE_RANGE), bh / h, bw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        obj = cv2.resize(obj, (nw, nh), interpolation=cv2.INTER_LINEAR)
        obj_mask = cv2.resize(obj_mask, (nw, nh), interpolation=cv2.INTER_LINEAR)
    new_mask = obj_mask > 0.5
    if not new_mask.any():  # a sliver scaled away: keep the object where it was
        return image, mask
    alpha = cv2.GaussianBlur(new_mask.astype(np.float32), (0, 0), PASTE_FEATHER)[..., None]
    r0, c0 = int(rng.integers(bh - nh + 1)), int(rng.integers(bw - nw + 1))
    out = background.copy()
    region = out[r0 : r0 + nh, c0 : c0 + nw].astype(np.float32)
    out[r0 : r0 + nh, c0 : c0 + nw] = np.clip(alpha * obj + (1 - alpha) * region + 0.5, 0, 255).astype(np.uint8)
    full = np.zeros((bh, bw), bool)
    full[r0 : r0 + nh, c0 : c0 + nw] = new_mask
    return out, full


def at_size(batch: dict[str, torch.Tensor], size: int, config: DeepCropConfig) -> dict[str, torch.Tensor]:
    """A batch of first-click samples (:func:`make_sample`) resampled to ``size`` input pixels: the image
    bilinearly and the mask by the same rule as :func:`read_crop` (> 0.5), the clicks mapped by the pixel-centre
    convention of :meth:`Crop.to_input` and encoded again. The batch itself when it has that size already."""
    now = batch["image"].shape[-1]
    if now == size:
        return batch
    scale = size / now
    clicks = batch["clicks"].clone()
    valid = clicks[..., 2] >= 0
    clicks[..., :2] = torch.where(valid[..., None], (clicks[..., :2] + 0.5) * scale - 0.5, clicks[..., :2])
    planes = [
        encode_clicks(c[v, :2].numpy(), c[v, 2].numpy().astype(np.int64), config, size=size)
        for c, v in zip(clicks, valid, strict=True)
    ]
    resize = {"size": (size, size), "mode": "bilinear", "align_corners": False}
    return {
        "image": F.interpolate(batch["image"], **resize).clamp(0, 1),
        "planes": torch.from_numpy(np.stack(planes)),
        "mask": (F.interpolate(batch["mask"], **resize) > 0.5).float(),
        "clicks": clicks,
        "outside": batch["outside"] * scale**2,
    }


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _focus_crop(mask: np.ndarray, extent: int, rng: np.random.Generator) -> tuple[Crop, tuple[int, int]]:
    """A focus crop of ``mask`` (centred near a boundary point, the extent FOCUS_RATIO_RANGE times its side) and a
    positive click in the part of the object it holds."""
    side = max(extent / _log_uniform(rng, *FOCUS_RATIO_RANGE), 16.0)
    boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0))
    center = boundary[rng.integers(len(boundary))] + rng.uniform(-0.15, 0.15, size=2) * side
    crop = Crop.centered(tuple(center), side)
    r0, r1, c0, c1 = crop.bounds(mask.shape)
    held = np.zeros_like(mask)
    held[r0:r1, c0:c1] = mask[r0:r1, c0:c1]
    return crop, _sample_click(held if held.any() else mask, rng, protocol_click=False)


def _sample_click(
    mask: np.ndarray, rng: np.random.Generator, protocol_click: bool, power: float = CLICK_POWER
) -> tuple[int, int]:
    """An interior point, drawn with weight (distance to boundary) ** power, or the deepest one (the protocol's)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    sub = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    depth = ndimage.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]
    if protocol_click:
        flat = int(np.argmax(depth))
    else:
        weights = (depth.ravel() ** power) * (depth.ravel() > 0)  # outside the object: none, also at power 0
        flat = int(rng.choice(weights.size, p=weights / weights.sum()))
    r, c = np.unravel_index(flat, depth.shape)
    return int(r + rows[0]), int(c + cols[0])


def _color_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gray = rgb.mean(axis=2, keepdims=True)
    if rng.random() < 0.1:
        rgb = np.repeat(gray, 3, axis=2)
    else:
        rgb = gray + (rgb - gray) * rng.uniform(0.6, 1.4)
    mean = rgb.mean()
    rgb = mean + (rgb - mean) * rng.uniform(0.7, 1.3)
    rgb = rgb * rng.uniform(0.75, 1.25)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def _add_random_negatives(
    points: np.ndarray, labels: np.ndarray, gt: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sometimes add 1-2 negative clicks on background near the object, as users do to fence it off."""
    if rng.random() >= 0.15:
        return points, labels
    distance = ndimage.distance_transform_edt(~gt)
    band = np.argwhere((distance > 4) & (distance < gt.shape[0] / 4))
    if len(band) == 0:
        return points, labels
    chosen = band[rng.choice(len(band), size=int(rng.integers(1, 3)))].astype(np.float32)
    return np.concatenate([points, chosen]), np.concatenate([labels, np.zeros(len(chosen), labels.dtype)])


class EpochSampler(Sampler):
    """Yields (object index, sample seed) for one epoch, sharded across processes like DistributedSampler.

    The order and the seeds depend only on (seed, epoch), so a run resumed mid-epoch (``skip`` samples already
    done) continues with exactly the samples an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        n: int,
        samples_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.n, self.samples_per_epoch, self.seed = n, samples_per_epoch, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            reps = math.ceil(self.samples_per_epoch / self.n)
            order = np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: self.samples_per_epoch]
        else:
            order = np.arange(self.samples_per_epoch) % self.n
        seeds = rng.integers(0, 2**62, size=len(order)) if self.shuffle else order + self.seed * 1_000_003
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._order()
        mine = range(self.rank, len(order), self.world_size)
        for position in list(mine)[self.skip :]:
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self.samples_per_epoch, self.world_size)) - self.skip)
