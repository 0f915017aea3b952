"""How well does a click segmenter work? Patch metrics and the standard interactive click protocol.

Two measurements, as in ARCHITECTURE.md ("Evaluation"):

* Patch metrics (the report's Table 1): mean IoU, median IoU and IoU@0.7 recall over sampled validation
  objects.
* The interactive protocol of RITM / f-BRS / SimpleClick, so that our numbers compare with the literature: a
  simulated user clicks the error region deepest inside, the segmenter refines, for at most 20 clicks;
  NoC@85/90, failures and mIoU after k clicks summarise the IoU curves. A variant puts the first click anywhere
  inside the object instead of at its deepest point (``first_click="inside"``), as people click.

Anything with ``set_image(image)`` and ``predict(points, labels, prev_mask) -> (mask, score)`` is a
:class:`ClickSegmenter`: the DeepCropPredictor and the classical baselines in ``baselines.py`` alike, so all
are measured with the same code, images and click rules.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
COCO_SMALL_AREA = (
    32**2
)  # COCO's own limit for "small" objects: below it a click tool is not the right instrument
GRABCUT_IGNORE = 128  # GrabCut / RITM convention: 0 background, 128 unknown band, 255 object


class ClickSegmenter(Protocol):
    """What the protocol needs: the DeepCropPredictor's shape, so that baselines plug in beside it."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self, points: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]: ...


@dataclass
class Sample:
    """One object to segment: the image, its object mask and the pixels that count for nothing (or None)."""

    name: str
    image: np.ndarray
    gt: np.ndarray
    ignore: np.ndarray | None = None


@dataclass
class ProtocolResult:
    """The IoU after each click (``max_clicks`` long), the seconds each ``predict`` took, and the clicks made.

    ``clicks`` are (row, col, is_positive); kept so that a bad curve can be replayed and looked at.
    """

    ious: np.ndarray
    seconds: np.ndarray
    clicks: list[tuple[int, int, bool]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ious": [round(float(v), 5) for v in self.ious],
            "seconds": [round(float(v), 5) for v in self.seconds],
            "clicks": [list(c) for c in self.clicks],
        }


# --- metrics ------------------------------------------------------------------------------------------------


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two masks, leaving out ``ignore`` pixels; 1.0 when both are empty (nothing to get wrong)."""
    valid = np.ones(gt.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.count_nonzero((pred | gt) & valid)
    return np.count_nonzero(pred & gt & valid) / union if union else 1.0


def patch_metrics(ious: Iterable[float]) -> dict[str, float]:
    """The report's Table 1 numbers from per-object IoUs: mean, median and the fraction with IoU >= 0.7."""
    values = np.asarray(list(ious), float)
    if values.size == 0:
        raise ValueError("patch_metrics needs at least one IoU")
    return {
        "mean_iou": float(values.mean()),
        "median_iou": float(np.median(values)),
        "iou@0.7": float(np.mean(values >= 0.7)),
        "n": int(values.size),
    }


def evaluate_patches(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Patch metrics from (prediction, ground truth) mask pairs, each (H, W) or a batch (B, H, W).

    Takes an iterable so that validation patches can stream from the data loader without being held in memory.
    """
    ious = []
    for pred, gt in pairs:
        pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
        batch_shape = (-1, *gt.shape[-2:])
        ious.extend(
            mask_iou(p, g) for p, g in zip(pred.reshape(batch_shape), gt.reshape(batch_shape), strict=True)
        )
    return patch_metrics(ious)


# --- the interactive protocol -------------------------------------------------------------------------------


def _depth(region: np.ndarray, clicked: Sequence[tuple[int, int]]) -> np.ndarray:
    """Distance of each region pixel to the region's boundary, the image border counting as boundary.

    Padding with zeros before the distance transform is what RITM's ``get_next_points`` does; without it a
    region touching the border would pull clicks onto the border. Pixels already clicked get 0 so that a click
    is never repeated (RITM's ``not_clicked_map``).
    """
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    for row, col in clicked:
        depth[row, col] = 0
    return depth


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    clicked: Sequence[tuple[int, int]] = (),
) -> tuple[int, int, bool] | None:
    """Where the simulated user clicks next: (row, col, is_positive), or None when nothing is left to correct.

    The larger error region is the one reaching deeper from its boundary (RITM's rule: the maxima of the
    distance transforms are compared, not the pixel counts); the click goes to its deepest pixel, positive if
    the region is missed object, negative if it is false object (ties go to negative, as in RITM). With an
    empty ``pred`` this is the first click: the object's interior point farthest from its boundary.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    valid = np.ones(gt.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    missed = _depth(gt & ~pred & valid, clicked)
    false = _depth(~gt & pred & valid, clicked)
    is_positive = missed.max() > false.max()
    depth = missed if is_positive else false
    if depth.max() == 0:
        return None
    row, col = np.unravel_index(np.argmax(depth), depth.shape)
    return int(row), int(col), bool(is_positive)


FIRST_CLICKS = ("deepest", "inside")
INSIDE_DEPTH = 0.25  # an "inside" first click is at least this share of the object's deepest depth from its edge


def inside_click(gt: np.ndarray, ignore: np.ndarray | None, seed: int | str) -> tuple[int, int, bool]:
    """A first click anywhere inside the object, as a person may click it: drawn uniformly over the object's
    pixels at least ``INSIDE_DEPTH`` of its deepest point's depth from its boundary (off the edge, not
    necessarily near the centre). ``seed``: an int, or a sample's name (the same click for every method)."""
    valid = np.ones(gt.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    depth = _depth(np.asarray(gt, bool) & valid, ())
    if depth.max() == 0:
        raise ValueError("the ground truth has no object pixel outside the ignore region")
    candidates = np.flatnonzero(depth >= INSIDE_DEPTH * depth.max())  # > 0: object pixels only
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    flat = int(np.random.default_rng(seed).choice(candidates))
    row, col = np.unravel_index(flat, gt.shape)
    return int(row), int(col), True


def run_protocol(
    segmenter: ClickSegmenter,
    image: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    max_clicks: int = 20,
    alternatives: int = 1,
    first_click: str = "deepest",
    seed: int | str = 0,
) -> ProtocolResult:
    """Simulate one user annotating one object, passing the previous mask back as RITM does.

    When no error pixel is left the user stops; the IoU curve is then held at its last value up to
    ``max_clicks`` so that every curve has the same length. With ``alternatives`` > 1 the user looks at up to
    that many of the first click's masks (the predictor's ``alternative``, best by score first) and keeps the
    best, as SAM's multi-mask output is scored against its "oracle" choice; the click's seconds are those of
    all the masks looked at. ``first_click``: "deepest", the standard protocol's (the object's deepest point),
    or "inside", anywhere inside it (:func:`inside_click` with ``seed``); later clicks follow the protocol.
    """
    if first_click not in FIRST_CLICKS:
        raise ValueError(f"first_click must be one of {FIRST_CLICKS}, got {first_click!r}")
    gt = np.asarray(gt, bool)
    segmenter.set_image(image)
    pred, prev_mask = np.zeros_like(gt), None
    clicks: list[tuple[int, int, bool]] = []
    ious, seconds = [], []
    for _ in range(max_clicks):
        if not clicks and first_click == "inside":
            click = inside_click(gt, ignore, seed)
        else:
            click = next_click(pred, gt, ignore, clicked=[c[:2] for c in clicks])
        if click is None:
            break
        clicks.append(click)
        points = np.array([c[:2] for c in clicks], float)
        labels = np.array([int(c[2]) for c in clicks])
        start = time.perf_counter()
        if prev_mask is None and alternatives > 1:
            count = min(alternatives, segmenter.alternatives())
            masks = [segmenter.predict(points, labels, None, alternative=k)[0] for k in range(count)]
            mask = max(masks, key=lambda m: mask_iou(np.asarray(m, bool), gt, ignore))
        else:
            mask, _ = segmenter.predict(points, labels, prev_mask)
        seconds.append(time.perf_counter() - start)
        pred = prev_mask = np.asarray(mask, bool)
        ious.append(mask_iou(pred, gt, ignore))
    if not ious:
        raise ValueError("the ground truth has no object pixel outside the ignore region")
    curve = np.pad(np.asarray(ious), (0, max_clicks - len(ious)), mode="edge")
    return ProtocolResult(curve, np.asarray(seconds), clicks)


def evaluate_dataset(
    segmenter: ClickSegmenter,
    samples: Iterable[Sample],
    max_clicks: int = 20,
    progress: bool = False,
    alternatives: int = 1,
    first_click: str = "deepest",
) -> dict[str, ProtocolResult]:
    """Run the protocol on every sample, keyed by sample name (``alternatives``, ``first_click``: see
    :func:`run_protocol`; an "inside" first click is seeded by the sample's name)."""
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, unit="object")
    return {
        s.name: run_protocol(segmenter, s.image, s.gt, s.ignore, max_clicks, alternatives, first_click, s.name)
        for s in samples
    }


def summarize(
    results: Iterable[ProtocolResult],
    thresholds: Sequence[float] = (0.85, 0.9),
    after_clicks: Sequence[int] = (1, 3, 5),
) -> dict[str, float]:
    """NoC@t (clicks to reach IoU t, ``max_clicks`` when never), failures@t (never reached), mIoU@k, s/click.

    Failures count curves that never reach t. RITM counts NoC == max_clicks instead, which also counts an
    object reached exactly at the last click; the difference is at most a few objects.
    """
    results = list(results)
    ious = np.stack([r.ious for r in results])
    max_clicks = ious.shape[1]
    summary: dict[str, float] = {"n": len(results)}
    for threshold in thresholds:
        reached = ious >= threshold
        noc = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, max_clicks)
        key = round(threshold * 100)
        summary[f"noc@{key}"] = float(noc.mean())
        summary[f"failures@{key}"] = int(np.count_nonzero(~reached.any(axis=1)))
    for k in after_clicks:
        if k <= max_clicks:
            summary[f"miou@{k}"] = float(ious[:, k - 1].mean())
    summary["sec_per_click"] = float(np.concatenate([r.seconds for r in results]).mean())
    return summary


TABLE_COLUMNS = {
    "noc@85": ("NoC@85", "{:.2f}"),
    "noc@90": ("NoC@90", "{:.2f}"),
    "failures@85": ("fail@85", "{:d}"),
    "failures@90": ("fail@90", "{:d}"),
    "miou@1": ("mIoU@1", "{:.3f}"),
    "miou@3": ("mIoU@3", "{:.3f}"),
    "miou@5": ("mIoU@5", "{:.3f}"),
    "sec_per_click": ("s/click", "{:.3f}"),
    "n": ("n", "{:d}"),
}


def format_table(summaries: Mapping[str, Mapping[str, float]]) -> str:
    """One row per method, fixed-width columns, for terminals and for pasting into a report."""
    keys = [k for k in TABLE_COLUMNS if any(k in s for s in summaries.values())]
    width = max(len("method"), *(len(name) for name in summaries))
    lines = ["  ".join([f"{'method':<{width}}", *(f"{TABLE_COLUMNS[k][0]:>8}" for k in keys)])]
    for name, summary in summaries.items():
        cells = [
            f"{TABLE_COLUMNS[k][1].format(summary[k]):>8}" if k in summary else f"{'-':>8}" for k in keys
        ]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


# --- datasets -----------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as stored (grayscale (H, W) or (H, W, C)); segmenters normalise it themselves."""
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


def _files_by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {p.stem: p for p in files}


def _subset(items: Sequence, max_instances: int | None, seed: int) -> list:
    """A fixed-seed random subset in the original order, so that quick runs are repeatable and comparable."""
    if max_instances is None or max_instances >= len(items):
        return list(items)
    chosen = np.random.default_rng(seed).choice(len(items), size=max_instances, replace=False)
    return [items[i] for i in sorted(chosen)]


def _load_folder(
    images: Path, masks: Path, ignore_value: int | None, max_instances: int | None, seed: int
) -> Iterator[Sample]:
    """Image/mask pairs matched by file stem; a missing mask is an error, not a silently smaller benchmark."""
    mask_files = _files_by_stem(masks)
    image_files = _files_by_stem(images)
    missing = sorted(set(image_files) - set(mask_files))
    if missing:
        raise FileNotFoundError(
            f"no mask in {masks} for images {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    for stem in _subset(list(image_files), max_instances, seed):
        mask = read_image(mask_files[stem])
        mask = mask[..., 0] if mask.ndim == 3 else mask
        if ignore_value is None:
            yield Sample(stem, read_image(image_files[stem]), mask > 0)
        else:
            yield Sample(stem, read_image(image_files[stem]), mask > ignore_value, mask == ignore_value)


def load_grabcut_folder(
    root: str | Path, max_instances: int | None = None, seed: int = 0
) -> Iterator[Sample]:
    """The GrabCut layout of f-BRS and RITM: ``data_GT/`` images, ``boundary_GT/`` masks (128 = ignore)."""
    root = Path(root)
    return _load_folder(root / "data_GT", root / "boundary_GT", GRABCUT_IGNORE, max_instances, seed)


def load_image_mask_folder(
    root: str | Path, max_instances: int | None = None, seed: int = 0
) -> Iterator[Sample]:
    """A plain ``img/`` + ``gt/`` layout: one object per image, any nonzero mask pixel is object."""
    root = Path(root)
    return _load_folder(root / "img", root / "gt", None, max_instances, seed)


def coco_sample_name(file_name: str, annotation_id: int) -> str:
    """A COCO object's sample name: its image's file stem and its annotation id (``000000397133#1768``)."""
    return f"{Path(file_name).stem}#{annotation_id}"


def load_coco(
    annotation_file: str | Path,
    images_dir: str | Path | None = None,
    min_area: float = COCO_SMALL_AREA,
    max_instances: int | None = None,
    seed: int = 0,
) -> Iterator[Sample]:
    """Every non-crowd COCO object above ``min_area`` pixels is one sample, read through pycocotools.

    Samples come grouped by image so that each image is read once. Images are looked for in ``images_dir``, else
    as :func:`napari_deepcrop.coco.read_coco_dataset` does (beside the json: the plugin's exports; COCO's own
    layout).
    """
    from pycocotools.coco import COCO

    from napari_deepcrop.coco import find_images

    annotation_file = Path(annotation_file)
    # pycocotools prints its progress to stdout, where our table goes
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
    ann_ids = [a for a in sorted(coco.getAnnIds(iscrowd=False)) if coco.anns[a]["area"] > min_area]
    anns = sorted(
        (coco.anns[a] for a in _subset(ann_ids, max_instances, seed)), key=lambda a: (a["image_id"], a["id"])
    )
    # looked for as everywhere else in the package (beside the json, or COCO's own layout); a missing one is named
    files = find_images(annotation_file, [coco.imgs[i] for i in dict.fromkeys(a["image_id"] for a in anns)], images_dir)
    image_id, image = None, None
    for ann in anns:
        info = coco.imgs[ann["image_id"]]
        if ann["image_id"] != image_id:
            image_id, image = ann["image_id"], read_image(files[ann["image_id"]])
        yield Sample(coco_sample_name(info["file_name"], ann["id"]), image, coco.annToMask(ann).astype(bool))


def load_dataset(
    path: str | Path,
    images_dir: str | Path | None = None,
    max_instances: int | None = None,
    min_area: float = COCO_SMALL_AREA,
    seed: int = 0,
) -> Iterator[Sample]:
    """Pick the loader from what ``path`` is: a COCO JSON, a GrabCut-layout or an ``img/``+``gt/`` folder."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return load_coco(path, images_dir, min_area, max_instances, seed)
    if (path / "data_GT").is_dir() and (path / "boundary_GT").is_dir():
        return load_grabcut_folder(path, max_instances, seed)
    if (path / "img").is_dir() and (path / "gt").is_dir():
        return load_image_mask_folder(path, max_instances, seed)
    raise ValueError(f"{path} is neither a COCO JSON nor a folder with data_GT/+boundary_GT/ or img/+gt/")


# --- command line -------------------------------------------------------------------------------------------


def add_first_click_option(parser: argparse.ArgumentParser) -> None:
    """``--first-click``, for ``napari-deepcrop eval`` and ``benchmarks/accuracy.py`` alike."""
    parser.add_argument(
        "--first-click", choices=FIRST_CLICKS, default="deepest",
        help="where the first click goes: the object's deepest point (the standard protocol, comparable with the "
        "literature) or anywhere inside it, off its edge, as people click (seeded by the object's name: every run "
        "and method gets the same click)",
    )  # fmt: skip


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``napari-deepcrop eval`` arguments; ``add_help=False`` lets cli.py use it as a parent parser."""
    parser = argparse.ArgumentParser(
        description="Interactive click protocol (NoC@85/90) of a DeepCropV2 checkpoint on a dataset",
        add_help=add_help,
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: the bundled weights)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--dataset", required=True, type=Path, help="GrabCut-layout or img/+gt/ folder, or COCO JSON"
    )
    parser.add_argument(
        "--images-dir", type=Path, default=None, help="COCO image folder (default: beside the JSON)"
    )
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument(
        "--max-instances", type=int, default=None, help="a fixed-seed random subset of objects"
    )
    parser.add_argument(
        "--min-area", type=float, default=COCO_SMALL_AREA, help="COCO objects at least this large"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-instances subset")
    parser.add_argument("--no-snap", action="store_true", help="the network's own masks, not snapped to edges")
    add_first_click_option(parser)
    parser.add_argument(
        "--output", type=Path, default=Path("results.json"), help="JSON with summary and curves"
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a checkpoint as ``args`` says, print the table, write the JSON report and return it."""
    from napari_deepcrop.predictor import DeepCropPredictor

    samples = load_dataset(args.dataset, args.images_dir, args.max_instances, args.min_area, args.seed)
    predictor = DeepCropPredictor.from_checkpoint(args.checkpoint, device=args.device, snap_edges=not args.no_snap)
    results = evaluate_dataset(predictor, samples, args.max_clicks, progress=True, first_click=args.first_click)
    summary = summarize(results.values())
    print(format_table({"deepcrop": summary}))
    report = {
        "dataset": str(args.dataset),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "bundled",
        "max_clicks": args.max_clicks,
        "first_click": args.first_click,
        "summary": summary,
        "per_sample": {name: r.to_dict() for name, r in results.items()},
    }
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``napari-deepcrop eval``."""
    return run(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
