"""Interactive latency: time to the first mask and per further click, 512² to 10,000² images and a 3D stack.

The architecture promises that time and memory depend on the crop, not on the image: this prints the numbers
that check it. "first" = set_image + one positive click (what a user waits for on a new image); "further" = a
second click with prev_mask = the first mask (a refinement). The "crop" path asks for ``return_crop=True``
(the mask of its bounding box only), the "full" path for an image-sized mask. Where segment_anything (and
mobile_sam) are importable, SAM's image embedding at 1024² is timed the same way, for scale.

    python benchmarks/latency.py --quick                # 512², 1024², a small stack, 3 repeats: a smoke run
    python benchmarks/latency.py --json latency.json    # the full table: minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_deepcrop.predictor import DeepCropPredictor

SIZES = (512, 1024, 4096, 10_000)
CROP_PATH_FROM = 4096  # the bbox path is timed beside the full-mask path from this image side on
SAM_SIZE = 1024
SAM_MODELS = (("SAM ViT-B", "segment_anything", "vit_b"), ("MobileSAM", "mobile_sam", "vit_t"))
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Row:
    case: str
    device: str
    path: str
    first_ms: list[float]
    further_ms: list[float]
    numpy_peak_mb: float | None = None
    rss_peak_mb: float | None = None
    note: str = ""


def machine() -> dict:
    cpuinfo = _read("/proc/cpuinfo").splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


class PeakRss:
    """Peak growth of this process's resident memory during a ``with`` block, in MB (``.mb``).

    On Linux the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the peak
    is exact. Elsewhere resource's ru_maxrss only grows past the process's earlier peak: a lower bound.
    """

    exact = CLEAR_REFS.exists()
    source = "VmHWM, reset via /proc/self/clear_refs" if exact else "resource ru_maxrss, a lower bound"

    def __enter__(self) -> PeakRss:
        if self.exact:
            self.base = _status_kb("VmRSS")
            CLEAR_REFS.write_text("5")
        else:
            self.base = _maxrss_kb()
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kb("VmHWM") if self.exact else _maxrss_kb()
        self.mb = max(0.0, (peak - self.base) / 1024)


def _status_kb(key: str) -> float:
    line = next(line for line in _read("/proc/self/status").splitlines() if line.startswith(key + ":"))
    return float(line.split()[1])


def _maxrss_kb() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS, kB on Linux


@dataclass
class Session:
    """What a user's clicks cost: ``first()``, then ``further(prepare(first()))``.

    ``prepare`` turns the first result into the further click's input, untimed: it is the caller's work
    (pasting into a Labels layer). ``notes`` collects what a reader of the row must know.
    """

    first: Callable[[], object]
    prepare: Callable[[object], object]
    further: Callable[[object], object]
    notes: set[str] = field(default_factory=set)


def measure(session: Session, repeats: int) -> tuple[list[float], list[float], float, float]:
    """(first ms, further ms, numpy peak MB, RSS peak MB): one warm-up, the timed runs, one measured run."""
    first, prepare, further = session.first, session.prepare, session.further
    further(prepare(first()))  # warm-up: lazy inits, allocator pools, first touch of the image's pages
    first_ms, further_ms = [], []
    for _ in range(repeats):
        tic = time.perf_counter()
        result = first()
        first_ms.append(1e3 * (time.perf_counter() - tic))
        state = prepare(result)
        tic = time.perf_counter()
        further(state)
        further_ms.append(1e3 * (time.perf_counter() - tic))
    gc.collect()
    with PeakRss() as rss:
        tracemalloc.start()
        further(prepare(first()))
        numpy_peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return first_ms, further_ms, numpy_peak, rss.mb


def object_image(shape: tuple[int, ...], dtype, center: tuple[int, int], radius: int) -> np.ndarray:
    """Noise with a brighter disk at ``center`` (row, col): an (H, W, 3) image or every slice of a (D, H, W)
    stack. Built in place, so a 10,000² image costs its own 300 MB and no more."""
    bright = 128 if dtype == np.uint8 else 2048  # uint16 as a 12-bit camera writes it
    image = np.random.default_rng(0).integers(0, bright, shape, dtype=dtype)
    inside = disk(radius)
    rows, cols = (slice(c - radius, c + radius + 1) for c in center)
    if shape[-1] == 3:
        image[rows, cols][inside] += dtype(bright)
    else:
        image[:, rows, cols][:, inside] += dtype(bright)
    return image


def click_session(predictor: DeepCropPredictor, image: np.ndarray, click, return_crop: bool) -> Session:
    """A user's clicks: set_image and a first click; the caller's mask of it; a second, refining click.

    An empty first mask (an untrained checkpoint) is replaced by a disk around the click, so that the further
    click is always a refinement; the row says so.
    """
    prev = np.zeros(image.shape[:2], bool)  # the caller's mask (napari's Labels layer) is image-sized anyway
    pasted = [(0, 0, 0, 0)]
    notes: set[str] = set()
    first_points = np.array([click], float)
    further_points = np.array([click, (click[0] + 8, click[1] + 8)], float)

    def first():
        predictor.set_image(image)
        return predictor.predict(first_points, np.array([1]), return_crop=return_crop)

    def prepare(result):
        crop, (r0, c0) = (result[0], (0, 0)) if not return_crop else result[:2]
        if not crop.any():
            notes.add("first mask empty: further clicks refine a 32 px disk")
            crop, (r0, c0) = disk(32), (click[0] - 32, click[1] - 32)
        elif not return_crop:
            return crop
        a, b, c, d = pasted[0]
        prev[a:b, c:d] = False
        prev[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
        pasted[0] = (r0, r0 + crop.shape[0], c0, c0 + crop.shape[1])
        return prev

    def further(mask):
        return predictor.predict(further_points, np.array([1, 1]), prev_mask=mask, return_crop=return_crop)

    return Session(first, prepare, further, notes)


def disk(radius: int) -> np.ndarray:
    rr, cc = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return rr**2 + cc**2 <= radius**2


def rgb_click(size: int) -> tuple[int, int]:
    """Where the RGB rows click (row, col), off the centre of a ``size`` x ``size`` image."""
    return size * 3 // 7, size * 4 // 7


def stack_click(height: int, width: int) -> tuple[int, int]:
    """Where the stack's row clicks (row, col) on its slice."""
    return height // 2, width // 3


def object_radius(args: argparse.Namespace, side: int) -> int:
    """The disk's radius in an image of this side: ``--radius``, or a tenth of the side within 12-200 px (so the
    object grows with the image up to 2,000², and a further click's crops with it)."""
    return args.radius if args.radius is not None else max(12, min(side // 10, 200))


def deepcrop_rows(args: argparse.Namespace, device: str) -> list[Row]:
    predictor = DeepCropPredictor.from_checkpoint(args.checkpoint, device=device, snap_edges=False)
    rows = []
    for size in args.sizes:
        click = rgb_click(size)
        image = object_image((size, size, 3), np.uint8, click, radius=object_radius(args, size))
        for path in ("crop", "full") if size >= CROP_PATH_FROM else ("full",):
            session = click_session(predictor, image, click, path == "crop")
            rows.append(run_case(f"{size}x{size} RGB uint8", device, path, session, args.repeats))
        # the default (predictor and widget): the mask snapped to the image's edges by GrabCut
        predictor.snap_edges = True
        session = click_session(predictor, image, click, size >= CROP_PATH_FROM)
        rows.append(run_case(f"{size}x{size} RGB uint8", device, "+snap", session, args.repeats))
        predictor.snap_edges = False
        del image
    if args.stack:
        depth, height, width = args.stack
        click = stack_click(height, width)
        stack = object_image(args.stack, np.uint16, click, radius=object_radius(args, height))
        one_slice = stack[depth // 2]  # napari hands over the displayed slice: a view, no copy
        for path in ("crop", "full"):
            session = click_session(predictor, one_slice, click, path == "crop")
            case = f"{depth}x{height}x{width} uint16 stack, 1 slice"
            rows.append(run_case(case, device, path, session, args.repeats))
        del stack, one_slice
    return rows


def sam_rows(args: argparse.Namespace, device: str) -> tuple[list[Row], list[str]]:
    """SAM ViT-B and MobileSAM with random weights: the image embedding costs what it does with real ones."""
    rows, not_measured = [], []
    image = object_image((SAM_SIZE, SAM_SIZE, 3), np.uint8, (400, 600), 100)
    for name, module, variant in SAM_MODELS:
        try:
            lib = importlib.import_module(module)
        except ImportError as exc:
            not_measured.append(f"{name} not measured: {module} is not importable ({exc})")
            continue
        predictor = lib.SamPredictor(lib.sam_model_registry[variant](checkpoint=None).to(device).eval())
        xy = np.array([[600.0, 400.0]])  # SAM takes (x, y)

        def first(p=predictor, xy=xy):
            p.set_image(image)  # the image embedding: what SAM pays for every new image
            return p.predict(point_coords=xy, point_labels=np.array([1]), multimask_output=True)

        def prepare(result):
            _, scores, low_res = result
            return low_res[int(np.argmax(scores))][None]

        def further(low_res, p=predictor, xy=xy):
            points = np.concatenate([xy, xy + 8])
            return p.predict(points, np.array([1, 1]), mask_input=low_res, multimask_output=False)

        case = f"{name} (random weights) {SAM_SIZE}x{SAM_SIZE}"
        rows.append(run_case(case, device, "embed+click", Session(first, prepare, further), args.repeats))
        del predictor
    return rows, not_measured


def run_case(case: str, device: str, path: str, session: Session, repeats: int) -> Row:
    try:
        first_ms, further_ms, numpy_mb, rss_mb = measure(session, repeats)
        row = Row(case, device, path, first_ms, further_ms, numpy_mb, rss_mb, "; ".join(sorted(session.notes)))
    except Exception as exc:  # a failing case is a result too: print it and measure the rest
        row = Row(case, device, path, [], [], note=f"FAILED: {type(exc).__name__}: {exc}")
    print_row(row)
    return row


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f})"


def print_header(info: dict, repeats: int, radius: int | None) -> None:
    print(
        f"# machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['torch_threads']} "
        f"threads, CUDA: {info['cuda'] or 'none'}; load average {info['load_average']}"
    )
    print(
        f"# ms: median (min-max) of {repeats} runs after one warm-up; first = set_image + 1 click, "
        "further = 2nd click with prev_mask"
    )
    shown = f"{radius} px in every image" if radius is not None else "a tenth of the image's side, 12-200 px"
    print(f"# the object: a bright disk on noise, its radius {shown}")
    print(
        "# memory, one more run of first + further: numpy MB = tracemalloc peak (numpy buffers; torch's "
        f"are not traced); RSS MB = peak resident growth ({PeakRss.source})"
    )
    head = f"{'case':<42} {'device':<6} {'path':<11}"
    print(f"{head} {'first ms':>20} {'further ms':>20} {'numpy MB':>9} {'RSS MB':>8}  note")


def print_row(row: Row) -> None:
    head = f"{row.case:<42} {row.device:<6} {row.path:<11}"
    if not row.first_ms:
        print(f"{head} {row.note}", flush=True)
        return
    times = f"{spread(row.first_ms):>20} {spread(row.further_ms):>20}"
    print(f"{head} {times} {row.numpy_peak_mb:9.1f} {row.rss_peak_mb:8.1f}  {row.note}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"square RGB image sides (default {SIZES})")
    parser.add_argument("--stack", help="DxHxW of the uint16 stack, or none (default 32x1024x1024)")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 10; 3 with --quick)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="all: CPU + any CUDA")
    parser.add_argument("--checkpoint", type=Path, help="default: the bundled checkpoint")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--radius", type=int,
        help="the object's radius in pixels in every image and the stack (default: a tenth of the side, 12-200 "
        "px); one radius times the image's size alone, e.g. --sizes 1024 10000 --radius 200",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="512² and 1024², an 8x512x512 stack, 3 repeats")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write rows and machine as JSON")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([512, 1024] if args.quick else list(SIZES))
    args.repeats = args.repeats or (3 if args.quick else 10)
    stack = args.stack or ("8x512x512" if args.quick else "32x1024x1024")
    args.stack = None if stack.lower() == "none" else tuple(int(v) for v in stack.lower().split("x"))
    if args.stack is not None and len(args.stack) != 3:
        parser.error(f"--stack must be DxHxW or none, got {stack}")
    if args.radius is not None:
        # the disk must fit around the click: below the click's distance to the nearest image border
        clicks = [(rgb_click(size), size, size) for size in args.sizes]
        if args.stack:
            clicks.append((stack_click(*args.stack[1:]), *args.stack[1:]))
        room = min(min(row, col, height - row, width - col) for (row, col), height, width in clicks)
        if not 1 <= args.radius < room:
            parser.error(f"--radius must be at least 1 and below {room} for these sizes, got {args.radius}")
    args.devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    args.devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    if not args.devices:
        parser.error("--device cuda: PyTorch sees no CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:  # on a busy machine, spinning OpenMP threads wait for each other: 1 thread can be faster
        torch.set_num_threads(args.threads)
    info = machine()
    print_header(info, args.repeats, args.radius)
    rows, not_measured = [], []
    for device in args.devices:
        rows += deepcrop_rows(args, device)
        sam, not_measured = sam_rows(args, device)
        rows += sam
    for line in not_measured:
        print(f"# {line}")
    result = {
        "machine": info,
        "repeats": args.repeats,
        "radius": args.radius,
        "rss": PeakRss.source,
        "not_measured": not_measured,
        "rows": [asdict(row) for row in rows],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
