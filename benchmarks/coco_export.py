"""COCO export time: does it stay linear in the number of objects, and how fast is a realistic dataset?

Prints a table (median of --repeats runs) for a 4096 x 4096 label image with 2,500 / 5,000 / 10,000 objects
(RLE and polygons), 1,000 images of 1024 x 1024 with 20 objects each, and, for scale, what encoding each
object as a full-size mask with ``pycocotools.mask.encode`` would cost.

    python benchmarks/coco_export.py            # about a minute on 2 CPU cores
    python benchmarks/coco_export.py --quick    # 100 small images, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from pycocotools import mask as mask_utils

from napari_deepcrop.coco import labels_to_coco


def grid_of_blobs(size: int, n_objects: int, seed: int = 0) -> np.ndarray:
    """``n_objects`` ellipses of random size and shape on a grid, ids shuffled (uint32, 0 background)."""
    rng = np.random.default_rng(seed)
    per_row = int(np.ceil(np.sqrt(n_objects)))
    cell = size // per_row
    rows, cols = np.mgrid[:size, :size]
    cell_index = np.minimum(rows // cell, per_row - 1) * per_row + np.minimum(cols // cell, per_row - 1)
    radius_r, radius_c = (rng.uniform(0.15, 0.5, per_row**2) * cell for _ in range(2))
    inside = ((rows % cell - cell / 2) / radius_r[cell_index]) ** 2 + (
        (cols % cell - cell / 2) / radius_c[cell_index]
    ) ** 2 <= 1
    ids = np.zeros(per_row**2 + 1, np.uint32)
    ids[:n_objects] = rng.permutation(n_objects) + 1
    return np.where(inside, ids[cell_index], 0).astype(np.uint32)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def full_frame_seconds_per_object(labels: np.ndarray, n: int = 20) -> float:
    """The naive way, for comparison: one full-size Fortran mask and encode per object."""
    start = time.perf_counter()
    for label in range(1, n + 1):
        mask_utils.encode(np.asfortranarray(labels == label, dtype=np.uint8))
    return (time.perf_counter() - start) / n


def print_row(case: str, n_objects: int, seconds: float) -> None:
    print(f"{case:<44} {n_objects:>8} {seconds:>8.2f} {1e6 * seconds / n_objects:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 images instead of 1,000, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 3, 2 with --quick)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    n_images = 100 if args.quick else 1000

    print(f"{'case':<44} {'objects':>8} {'seconds':>8} {'us/object':>10}")
    for n_objects in (2_500, 5_000, 10_000):
        big = grid_of_blobs(4096, n_objects)
        for mode in ("rle", "polygon"):
            seconds = median_seconds(
                lambda b=big, m=mode: labels_to_coco("big.png", b, segmentation=m), repeats
            )
            print_row(f"4096x4096, {mode}", n_objects, seconds)

    pool = [grid_of_blobs(1024, 20, seed) for seed in range(10)]  # reused: 1,000 distinct images need 4 GB
    images = [f"img{i:04d}.png" for i in range(n_images)]
    labels = [pool[i % len(pool)] for i in range(n_images)]
    seconds = median_seconds(lambda: labels_to_coco(images, labels), repeats)
    print_row(f"{n_images} images 1024x1024, 20 objects each, rle", 20 * n_images, seconds)
    print_row(
        "naive full-frame encode, 4096x4096 (est.)", 10_000, 10_000 * full_frame_seconds_per_object(big)
    )


if __name__ == "__main__":
    main()
