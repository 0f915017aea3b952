"""One object through a stack: 3D IoU after one click and after corrections, speed, and slice-by-slice clicking.

The data: synthetic moving-object sequences built from real images, so that every slice's ground truth is
exact. For each object, one COCO object (tiny_coco val2017, its mask and its pixels) is pasted onto another
val2017 image (resized and centre-cropped to --size²), moving and growing or shrinking smoothly (a smoothstep in
position and in scale) over --slices slices, with a little sensor noise per slice; the pasted mask is the
slice's ground truth. No frame is left without the object, and it never leaves the frame.

The protocol, per object (fixed seeds):
- **Propagation**: one click at the deepest ground-truth point of the middle slice (the interactive protocol's
  first click), then :func:`~napari_deepcrop.volume.segment_volume` through the stack. Each corrective click
  goes to the slice of worst IoU, at the deepest point of its larger error region (``evaluate.next_click``),
  refining that slice's mask as the widget does (the slice's propagation click first, then the user's) and
  re-propagating outwards with :func:`~napari_deepcrop.volume.correct_slice`. 3D IoU = voxels over the stack.
- **Slice by slice**: the same model, clicked on every slice by the standard protocol. "per-slice one-click" is
  the 3D IoU of one click at each slice's deepest point; "clicks for the same 3D IoU" is how many clicks in all
  a user needs, spending each next click on the slice of worst IoU (unclicked slices are empty), up to
  --max-slice-clicks per slice (">N" when never reached).
- **Speed**: slices/s of propagation at --size² (both directions, every slice predicted counted, the one that
  stopped the walk too), the median of --repeats runs; seconds per object of the whole propagation protocol.

    python benchmarks/volume.py                                   # 10 objects x 40 slices at 512², both settings
    python benchmarks/volume.py --objects 3 --slices 30 --output volume.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import machine  # noqa: E402

from napari_deepcrop.checkpoint import default_checkpoint_path  # noqa: E402
from napari_deepcrop.crops import PlacedMask  # noqa: E402
from napari_deepcrop.predictor import DeepCropPredictor  # noqa: E402
from napari_deepcrop.session import AnnotationSession, ObjectMask, predict_object  # noqa: E402
from napari_deepcrop.training.evaluate import load_coco, mask_iou, next_click  # noqa: E402
from napari_deepcrop.volume import VolumeObject, correct_slice, deepest_point, segment_volume  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tiny_coco"
ANNOTATIONS = DATA / "annotations" / "instances_val2017.json"
CONTRAST = (0.0, 255.0)  # uint8 RGB: the same limits for propagation and slice-by-slice clicks
MIN_AREA = 4000  # COCO objects big enough to carry texture at the sizes they are pasted at
CORRECTIONS = 3


@dataclass
class Sequence3D:
    name: str
    stack: np.ndarray  # (slices, size, size, 3) uint8
    truth: np.ndarray  # (slices, size, size) bool


@dataclass
class ObjectResult:
    name: str
    iou_3d: list[float]  # after 1 (the seed click), 2, ... clicks
    corrected_slices: list[int]
    per_slice_one_click_3d: float
    per_slice_one_click_mean: float
    slice_clicks_needed: list[int | None]  # for each of iou_3d; None: never within the per-slice limit
    slices_found: int  # by the propagation from the first click
    seconds_propagation: float  # seed click + propagation
    seconds_total: float  # + the corrections
    slices_per_s: float
    stops: dict[str, str] = field(default_factory=dict)  # why the first propagation ended, per direction


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=10)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--checkpoint", type=Path, help="default: the bundled model")
    p.add_argument("--snap", choices=["on", "off", "both"], default="both", help="snap masks to image edges")
    p.add_argument("--max-slice-clicks", type=int, default=3, help="slice-by-slice clicks per slice, at most")
    p.add_argument("--repeats", type=int, default=5, help="runs of the speed measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write the results as JSON")
    return p


# --- the sequences --------------------------------------------------------------------------------------------


def _background(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / min(h, w)
    resized = cv2.resize(image, (max(size, round(w * scale)), max(size, round(h * scale))), cv2.INTER_AREA)
    r0, c0 = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[r0 : r0 + size, c0 : c0 + size]


def _smoothstep(t: float) -> float:
    return t * t * (3 - 2 * t)


def make_sequence(name, pixels, mask, background, slices: int, size: int, rng) -> Sequence3D:
    """``pixels``/``mask``: the object's bounding-box crop; pasted moving and scaling over ``background``."""
    side = max(mask.shape)
    sides = rng.uniform(0.15, 0.4, 2) * size  # the object's longer side at the first and the last slice
    margin = sides.max() / 2 + 2
    centers = rng.uniform(margin, size - margin, (2, 2))
    noise = np.random.default_rng(rng.integers(1 << 31))
    stack = np.empty((slices, size, size, 3), np.uint8)
    truth = np.zeros((slices, size, size), bool)
    for z in range(slices):
        t = _smoothstep(z / max(1, slices - 1))
        scale = (sides[0] + t * (sides[1] - sides[0])) / side
        h, w = max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale))
        obj = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        obj_mask = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
        center = centers[0] + t * (centers[1] - centers[0])
        r0, c0 = int(round(center[0] - h / 2)), int(round(center[1] - w / 2))
        frame = background.astype(np.float32).copy()
        frame[r0 : r0 + h, c0 : c0 + w][obj_mask] = obj[obj_mask]
        frame += noise.normal(0, 3, frame.shape)
        stack[z] = np.clip(frame, 0, 255).astype(np.uint8)
        truth[z, r0 : r0 + h, c0 : c0 + w] = obj_mask
    return Sequence3D(name, stack, truth)


def make_sequences(count: int, slices: int, size: int, seed: int) -> list[Sequence3D]:
    samples = list(load_coco(ANNOTATIONS, min_area=MIN_AREA))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(count, len(samples)), replace=False)
    images = {s.name.split("#")[0]: s.image for s in samples}
    sequences = []
    for i in chosen:
        sample = samples[i]
        rows, cols = PlacedMask.from_full(sample.gt).bbox
        own = sample.name.split("#")[0]
        others = sorted(k for k in images if k != own)
        background = _background(images[others[rng.integers(len(others))]], size)
        pixels, mask = sample.image[rows, cols], sample.gt[rows, cols]
        sequences.append(make_sequence(sample.name, pixels, mask, background, slices, size, rng))
    return sequences


# --- the protocols --------------------------------------------------------------------------------------------


def volume_masks(volume: VolumeObject, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    for k, mask in volume.masks.items():
        out[k][mask.bbox] = mask.crop
    return out


def slice_ious(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    inter = (pred & truth).sum(axis=(1, 2))
    union = (pred | truth).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def correction(predictor, seq: Sequence3D, volume: VolumeObject, pred: np.ndarray) -> tuple[int, ObjectMask]:
    """The simulated user's next click: on the slice of worst IoU, at its deepest error point, refining the
    slice's mask the way the widget does (AnnotationSession.correct: its propagation click, then the user's)."""
    k = int(np.argmin(slice_ious(pred, seq.truth)))
    row, col, positive = next_click(pred[k], seq.truth[k])
    session = AnnotationSession()
    clicks = ((row, col, int(positive)),)
    base = volume.masks.get(k)
    if base is not None:
        session.correct(k, base, deepest_point(base))
    elif not positive:  # no mask there, so the larger error is missed object: cannot happen
        raise AssertionError("a negative click on a slice without a mask")
    mask = predict_object(
        predictor, seq.stack[k], session.base_clicks + clicks, session.prev_mask(clicks), CONTRAST
    )
    return k, mask


def timed_propagation(predictor, seq: Sequence3D, seed: ObjectMask) -> tuple[VolumeObject, float]:
    """The object from the middle slice's ``seed`` through the stack, and the slices predicted per second."""
    predicted = []
    start = time.perf_counter()
    volume = segment_volume(
        predictor, seq.stack, (len(seq.stack) // 2,), seed, contrast_limits=CONTRAST,
        on_slice=lambda k, mask: predicted.append(k),
    )  # fmt: skip
    return volume, len(predicted) / (time.perf_counter() - start)


def propagate_and_correct(predictor, seq: Sequence3D, corrections: int) -> dict[str, Any]:
    mid = len(seq.stack) // 2
    start = time.perf_counter()
    row, col, _ = next_click(np.zeros_like(seq.truth[mid]), seq.truth[mid])
    seed = predict_object(predictor, seq.stack[mid], ((row, col, 1),), contrast_limits=CONTRAST)
    volume, slices_per_s = timed_propagation(predictor, seq, seed)
    seconds_propagation = time.perf_counter() - start
    stops = {("after" if d > 0 else "before"): why for d, why in volume.stops.items()}
    slices_found = len(volume.masks)
    pred = volume_masks(volume, seq.truth.shape)
    ious, corrected = [mask_iou(pred, seq.truth)], []
    for _ in range(corrections):
        k, mask = correction(predictor, seq, volume, pred)
        correct_slice(predictor, seq.stack, volume, k, mask, contrast_limits=CONTRAST)
        pred = volume_masks(volume, seq.truth.shape)
        ious.append(mask_iou(pred, seq.truth))  # over voxels: it works in any dimension
        corrected.append(k)
    return {
        "iou_3d": ious,
        "corrected_slices": corrected,
        "slices_found": slices_found,
        "seconds_propagation": seconds_propagation,
        "seconds_total": time.perf_counter() - start,
        "slices_per_s": slices_per_s,
        "stops": stops,
    }


def slice_by_slice(predictor, seq: Sequence3D, max_clicks: int) -> tuple[np.ndarray, np.ndarray]:
    """(inter, union) with the ground truth per slice after 0..max_clicks protocol clicks: (slices, max_clicks+1)."""
    n = len(seq.stack)
    inter = np.zeros((n, max_clicks + 1), np.int64)
    union = np.zeros((n, max_clicks + 1), np.int64)
    for z in range(n):
        gt = seq.truth[z]
        pred, prev, clicks = np.zeros_like(gt), None, []
        union[z, 0] = gt.sum()
        for c in range(1, max_clicks + 1):
            click = next_click(pred, gt, clicked=[k[:2] for k in clicks])
            if click is not None:
                clicks.append(click)
                labelled = tuple((r, q, int(p)) for r, q, p in clicks)
                prev = predict_object(predictor, seq.stack[z], labelled, prev, CONTRAST)
                pred = prev.full()
            inter[z, c], union[z, c] = (pred & gt).sum(), (pred | gt).sum()
    return inter, union


def clicks_to_reach(inter: np.ndarray, union: np.ndarray, targets: Sequence[float]) -> list[int | None]:
    """Total clicks a slice-by-slice user needs for each 3D IoU target, each next click on the worst slice."""
    n, limit = inter.shape[0], inter.shape[1] - 1
    done = np.zeros(n, int)
    needed: list[int | None] = [None] * len(targets)
    for total in range(n * limit + 1):
        rows = np.arange(n)
        score = inter[rows, done].sum() / max(1, union[rows, done].sum())
        for i, target in enumerate(targets):
            if needed[i] is None and score >= target:
                needed[i] = total
        open_ = done < limit
        if all(v is not None for v in needed) or not open_.any():
            break
        ious = inter[rows, done] / np.maximum(union[rows, done], 1)
        # the worst slice still open; ties (unclicked slices) go to the largest object first
        order = np.lexsort((-union[rows, 0], ious))
        z = next(z for z in order if open_[z])
        done[z] += 1
    return needed


def run_object(predictor, seq: Sequence3D, args) -> ObjectResult:
    prop = propagate_and_correct(predictor, seq, CORRECTIONS)
    inter, union = slice_by_slice(predictor, seq, args.max_slice_clicks)
    one = inter[:, 1] / np.maximum(union[:, 1], 1)
    return ObjectResult(
        name=seq.name,
        per_slice_one_click_3d=float(inter[:, 1].sum() / union[:, 1].sum()),
        per_slice_one_click_mean=float(one.mean()),
        slice_clicks_needed=clicks_to_reach(inter, union, prop["iou_3d"]),
        **prop,
    )


def speed(predictor, seq: Sequence3D, repeats: int) -> list[float]:
    """slices/s of propagation from the middle slice's true mask, ``repeats`` runs after one warm-up."""
    seed = ObjectMask.from_full(seq.truth[len(seq.stack) // 2])
    return [timed_propagation(predictor, seq, seed)[1] for _ in range(repeats + 1)][1:]


# --- the table ------------------------------------------------------------------------------------------------


def _needed(values: list[int | None], limit: str) -> str:
    return "/".join(limit if v is None else str(v) for v in values)


def print_tables(info: dict, args, results: dict[str, dict]) -> None:
    print(
        f"# machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['torch_threads']} "
        f"threads, CUDA: {info['cuda'] or 'none'}; load average {info['load_average']}"
    )
    print(f"# model: {info['checkpoint']} (sha256 {info['checkpoint_sha256'][:12]})")
    print(
        f"# data: {args.objects} tiny_coco val2017 objects pasted moving/scaling over another val2017 image, "
        f"{args.slices} slices of {args.size}², seed {args.seed}; 3D IoU over voxels; 'clicks' = total clicks"
    )
    limit = f">{args.slices * args.max_slice_clicks}"
    for mode, result in results.items():
        print(f"\n## snap to edges: {mode}")
        head = f"{'object':<22} {'slices':>6} {'3D IoU after 1/2/3/4 clicks':>28} {'per-slice 1-click':>17}"
        print(f"{head} {'slice-by-slice clicks for the same':>34} {'s/object':>9}  stops")
        for o in result["objects"]:
            ious = "/".join(f"{v:.3f}" for v in o["iou_3d"])
            one = f"{o['per_slice_one_click_3d']:.3f}"
            needed = _needed(o["slice_clicks_needed"], limit)
            stops = "; ".join(f"{d}: {why}" for d, why in sorted(o["stops"].items()))
            print(f"{o['name']:<22} {o['slices_found']:>6} {ious:>28} {one:>17} {needed:>34} "
                  f"{o['seconds_total']:>9.2f}  {stops}")  # fmt: skip
        s = result["summary"]
        ious = "/".join(f"{v:.3f}" for v in s["iou_3d"])
        print(f"{'mean':<22} {'':>6} {ious:>28} {s['per_slice_one_click_3d']:>17.3f} "
              f"{_needed(s['slice_clicks_needed'], limit):>34} {s['seconds_total']:>9.2f}")  # fmt: skip
        print(
            f"# per-slice one click, mean of slice IoUs: {s['per_slice_one_click_mean']:.3f}; "
            f"slice-by-slice clicks: median over objects ({limit}: never within {args.max_slice_clicks} per slice)"
        )
        gap = s["iou_3d"][0] - s["per_slice_one_click_3d"]
        rates = result["slices_per_s"]
        print(
            f"# speed at {args.size}²: {statistics.median(rates):.1f} slices/s propagation (median of {len(rates)}, "
            f"{min(rates):.1f}-{max(rates):.1f}); seconds per object: {s['seconds_propagation']:.2f} for "
            f"the click and propagation, {s['seconds_total']:.2f} with {CORRECTIONS} corrections (median)"
        )
        print(
            f"# targets (reported, not asserted): >= 30 slices/s: "
            f"{'met' if statistics.median(rates) >= 30 else 'NOT met'}; 3D IoU after one click within 0.05 of "
            f"per-slice one-click: {gap:+.3f} ({'met' if gap >= -0.05 else 'NOT met'})"
        )


def summarize(objects: list[ObjectResult]) -> dict[str, Any]:
    def median_needed(i: int) -> int | None:
        values = [o.slice_clicks_needed[i] for o in objects]
        if sum(v is None for v in values) * 2 >= len(values):
            return None  # never reached for half the objects or more: the median is beyond the limit
        return int(statistics.median(v if v is not None else 10**9 for v in values))

    return {
        "iou_3d": [float(np.mean([o.iou_3d[i] for o in objects])) for i in range(CORRECTIONS + 1)],
        "per_slice_one_click_3d": float(np.mean([o.per_slice_one_click_3d for o in objects])),
        "per_slice_one_click_mean": float(np.mean([o.per_slice_one_click_mean for o in objects])),
        "slice_clicks_needed": [median_needed(i) for i in range(CORRECTIONS + 1)],
        "seconds_propagation": statistics.median(o.seconds_propagation for o in objects),
        "seconds_total": statistics.median(o.seconds_total for o in objects),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    checkpoint = args.checkpoint or default_checkpoint_path()
    info = {
        **machine(),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),
    }
    sequences = make_sequences(args.objects, args.slices, args.size, args.seed)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.snap]
    results: dict[str, dict] = {}
    for snap in modes:
        predictor = DeepCropPredictor.from_checkpoint(args.checkpoint, "cpu", snap_edges=snap)
        objects = []
        for seq in sequences:
            objects.append(run_object(predictor, seq, args))
            print(f"# {'snapped' if snap else 'not snapped'}: {seq.name} done", file=sys.stderr, flush=True)
        results["on" if snap else "off"] = {
            "objects": [asdict(o) for o in objects],
            "summary": summarize(objects),
            "slices_per_s": speed(predictor, sequences[0], args.repeats),
        }
    print_tables(info, args, results)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
