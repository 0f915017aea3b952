"""First clicks off an object's centre: the first mask's IoU on scikit-image's coins, 24 like objects side by side.

The standard protocol clicks first at the object's deepest point; people click wherever the object is. Here each
coin (truth: scikit-image's watershed of the Sobel map, as in its coins tutorial) gets one first click at its
centroid and four at a fraction of its radius from it (right, left, down, up), each on its own, and the table
gives the mean first-mask IoU and how many masks spill over the coin (more than 3x its area: a group of coins).

    python benchmarks/off_centre.py [--checkpoint A.pt B.pt ...] [--offsets 0 0.3 0.6]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi
from skimage import data, filters, measure, morphology, segmentation

from napari_deepcrop.predictor import DeepCropPredictor
from napari_deepcrop.training.evaluate import mask_iou

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def coins() -> tuple[np.ndarray, np.ndarray]:
    """The coins image and its labelled coins (scikit-image's watershed on the Sobel map)."""
    image = data.coins()
    markers = np.zeros_like(image)
    markers[image < 30], markers[image > 150] = 1, 2
    coins = ndi.binary_fill_holes(segmentation.watershed(filters.sobel(image), markers) == 2)
    return image, measure.label(morphology.remove_small_objects(coins, max_size=200))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", default=[None], help="checkpoints (default: the bundled one)")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.3, 0.6], help="fractions of the radius")
    args = parser.parse_args(argv)
    image, labels = coins()
    regions = measure.regionprops(labels)
    print(f"# coins: {len(regions)} objects; one first click each at the centroid, or 4 at offset x radius from it")
    print(f"{'checkpoint':<32} {'snapped':<8} {'offset':>6} {'clicks':>6} {'mean IoU':>9} {'masks > 3x':>10}")
    for checkpoint in args.checkpoint:
        for snap in (True, False):
            predictor = DeepCropPredictor.from_checkpoint(checkpoint, device="cpu", snap_edges=snap)
            predictor.set_image(image)
            for offset in args.offsets:
                ious, spilled = [], 0
                for region in regions:
                    truth = labels == region.label
                    radius = np.sqrt(region.area / np.pi)
                    for dy, dx in DIRECTIONS if offset else ((0, 0),):
                        row = int(region.centroid[0] + offset * radius * dy)
                        col = int(region.centroid[1] + offset * radius * dx)
                        if not truth[row, col]:
                            continue
                        mask, _ = predictor.predict(np.array([[row, col]]), np.array([1]))
                        ious.append(mask_iou(mask, truth))
                        spilled += int(mask.sum() > 3 * truth.sum())
                name = str(checkpoint or "bundled")[-32:]
                print(f"{name:<32} {snap!s:<8} {offset:6.1f} {len(ious):6d} {np.mean(ious):9.3f} {spilled:10d}")


if __name__ == "__main__":
    main()
