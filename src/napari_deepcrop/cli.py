"""The ``napari-deepcrop`` command: segment, export, coco-info, train, eval; thin over the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

TIFF = (".tif", ".tiff")


def _click(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) < 2:
        raise argparse.ArgumentTypeError(
            f"a click is ROW,COL in image pixels (Z,ROW,COL in a stack), got {text!r}"
        ) from None
    return values


def _read_image(path: Path):
    """A TIFF stack memory-mapped when it can be (only the slices and rows used are read), else read whole."""
    import imageio.v3 as iio

    if path.suffix.lower() in TIFF:
        import tifffile

        try:
            return tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or tiled: not mappable
            return tifffile.imread(path)
    return iio.imread(path)


def segment(args: argparse.Namespace) -> None:
    import imageio.v3 as iio
    import numpy as np

    from .predictor import DeepCropPredictor
    from .session import predict_object
    from .volume import StopRules, contrast_around, segment_volume

    if not args.click:
        raise SystemExit("give at least one --click ROW,COL")
    image = _read_image(args.image)
    colour = image.ndim >= 3 and image.shape[-1] in (3, 4)  # as napari reads it: a last axis of 3 or 4 is RGB(A)
    spatial = image.shape[:-1] if colour else image.shape
    clicks = args.click + args.negative
    if any(len(c) != len(spatial) for c in clicks):
        form = {2: "ROW,COL", 3: "Z,ROW,COL", 4: "T,Z,ROW,COL"}.get(len(spatial), "one index per axis")
        raise ValueError(f"{args.image.name} has {len(spatial)} image axes {tuple(spatial)}: each click is {form}")
    if len(spatial) == 2 and args.propagate:
        raise ValueError(f"--propagate needs a stack (3D or time series); {args.image.name} is a 2D image")
    plane = tuple(int(c) for c in clicks[0][:-2])
    if any(tuple(int(v) for v in c[:-2]) != plane for c in clicks):
        raise ValueError("the clicks of one object must all be on one slice")
    if any(not 0 <= p < n for p, n in zip(plane, spatial, strict=False)):
        raise ValueError(f"click slice {plane} is outside the stack of shape {tuple(spatial)}")
    if plane and args.output.suffix.lower() not in TIFF:
        raise ValueError(f"a stack's mask is written as TIFF (-o MASK.tif), not {args.output.suffix or 'no suffix'}")
    predictor = DeepCropPredictor.from_checkpoint(args.checkpoint, args.device, snap_edges=not args.no_snap)
    pixels = image[plane]
    limits = contrast_around(pixels)
    labelled = tuple((r, c, 1) for *_, r, c in args.click) + tuple((r, c, 0) for *_, r, c in args.negative)
    seed = predict_object(predictor, pixels, labelled, contrast_limits=limits, alternative=args.alternative)
    if seed.alternative != args.alternative:  # predict_object cycles; here a K beyond the count is a mistake
        raise ValueError(f"--alternative must be in 0..{seed.alternatives - 1} on this image")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if len(spatial) == 2:
        mask = seed.full()
        iio.imwrite(args.output, (mask * 255).astype(np.uint8))
        which = f"mask {seed.alternative + 1} of {seed.alternatives}, " if seed.alternatives > 1 else ""
        pixels_note = f"{int(mask.sum())} object pixels, {which}predicted IoU {seed.score:.3f}"
        print(f"{args.output}: {pixels_note} ({predictor.device})")
        return
    axis = len(plane) - 1 if args.axis is None else args.axis
    if args.propagate:
        rules = StopRules(min_score=args.min_score, min_iou=args.min_iou)
        volume = segment_volume(predictor, image, plane, seed, axis, limits, rules)
        masks = {volume.plane_at(k): m for k, m in volume.masks.items()}
    else:
        masks = {plane: seed}
    _write_stack_mask(args.output, tuple(spatial), masks)
    span = sorted(p[axis] for p in masks)
    print(
        f"{args.output}: {sum(int(m.crop.sum()) for m in masks.values())} object voxels on {len(masks)} slice(s) "
        f"{span[0]}..{span[-1]} of axis {axis} ({predictor.device})"
    )


def _write_stack_mask(path: Path, shape: tuple[int, ...], masks: dict) -> None:
    """A uint8 (0/255) TIFF of the stack's shape written slice by slice into a memory map: memory of the object."""
    import numpy as np
    import tifffile

    out = tifffile.memmap(path, shape=shape, dtype=np.uint8)
    for plane, mask in masks.items():
        out[(*plane, *mask.bbox)] = mask.crop.astype(np.uint8) * 255
    out.flush()
    del out


def export(args: argparse.Namespace) -> None:
    from .coco import export_label_folders

    if (args.output / "annotations.json").exists() and not args.overwrite:
        raise FileExistsError(f"{args.output / 'annotations.json'} exists: pass --overwrite to replace it")
    path = export_label_folders(args.images, args.labels, args.output, overwrite=args.overwrite)
    print(f"wrote {path}")


def coco_info(args: argparse.Namespace) -> None:
    from .coco import describe_coco

    print(describe_coco(args.file))


def gui(args: argparse.Namespace) -> None:
    """Open napari with the DeepCrop widget docked, on IMAGE or the coffee sample."""
    import napari

    viewer = napari.Viewer(title="napari-deepcrop")
    if args.image is None:
        viewer.open_sample("napari-deepcrop", "coffee")
    else:
        viewer.open(args.image)
    viewer.window.add_plugin_dock_widget("napari-deepcrop", "DeepCrop click segmentation")
    napari.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-deepcrop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one object from clicks, headless")
    p.add_argument("image", type=Path)
    p.add_argument(
        "--click", type=_click, action="append", default=[], metavar="ROW,COL", help="positive click (Z,ROW,COL)"
    )
    p.add_argument(
        "--negative", type=_click, action="append", default=[], metavar="ROW,COL", help="negative click"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="mask to write (PNG; a stack's: TIFF)")
    p.add_argument(
        "--propagate", action="store_true", help="a stack: from the clicked slice through the object's slices"
    )
    p.add_argument("--axis", type=int, help="stack axis to propagate along (default: the one before the image's)")
    p.add_argument("--min-score", type=float, default=0.5, help="propagation stops below this predicted IoU")
    p.add_argument(
        "--min-iou", type=float, default=0.5, help="propagation stops when a slice overlaps the one before less"
    )
    p.add_argument("--checkpoint", type=Path, help="default: the bundled model")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--no-snap", action="store_true", help="the network's mask as it is, not snapped to edges")
    p.add_argument(
        "--alternative", type=int, default=0,
        help="the first click's K-th other mask, best by score first (0, the default: the network's choice; the "
        "widget's N)",
    )  # fmt: skip
    p.set_defaults(func=segment)

    p = sub.add_parser("gui", help="open napari with the DeepCrop widget on an image (default: a sample)")
    p.add_argument("image", type=Path, nargs="?")
    p.set_defaults(func=gui)

    p = sub.add_parser("export", help="label images on disk -> COCO dataset")
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument(
        "--labels", type=Path, required=True, help="folder of label images, matched to images by stem"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=export)

    p = sub.add_parser("coco-info", help="counts per category and a validity check of a COCO file")
    p.add_argument("file", type=Path)
    p.set_defaults(func=coco_info)

    sub.add_parser("train", help="train or fine-tune (see: napari-deepcrop train --help)", add_help=False)
    sub.add_parser("eval", help="interactive evaluation (see: napari-deepcrop eval --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .training.train import cli

        return cli(argv[1:])
    if argv and argv[0] == "eval":
        from .training.evaluate import main as evaluate_main

        evaluate_main(argv[1:])
        return None
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        raise SystemExit(f"napari-deepcrop {args.command}: error: {exc}") from None
    return None


if __name__ == "__main__":
    main()
