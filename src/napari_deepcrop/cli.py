"""The ``napari-deepcrop`` command: segment, export, coco-info, train, eval; thin over the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _click(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a click is ROW,COL in image pixels, got {text!r}") from None
    return row, col


def segment(args: argparse.Namespace) -> None:
    import imageio.v3 as iio
    import numpy as np

    from .predictor import DeepCropPredictor

    if not args.click:
        raise SystemExit("give at least one --click ROW,COL")
    image = iio.imread(args.image)
    predictor = DeepCropPredictor.from_checkpoint(args.checkpoint, args.device, snap_edges=not args.no_snap)
    predictor.set_image(image)
    points = np.array(args.click + args.negative, float)
    labels = np.array([1] * len(args.click) + [0] * len(args.negative))
    mask, score = predictor.predict(points, labels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.output, (mask * 255).astype(np.uint8))
    print(f"{args.output}: {int(mask.sum())} object pixels, predicted IoU {score:.3f} ({predictor.device})")


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
        "--click", type=_click, action="append", default=[], metavar="ROW,COL", help="positive click"
    )
    p.add_argument(
        "--negative", type=_click, action="append", default=[], metavar="ROW,COL", help="negative click"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="mask image to write (PNG)")
    p.add_argument("--checkpoint", type=Path, help="default: the bundled model")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--no-snap", action="store_true", help="the network's mask as it is, not snapped to edges")
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
