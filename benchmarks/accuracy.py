"""DeepCropV2 against classical click segmenters on the GrabCut benchmark: NoC, failures, mIoU@k, s/click.

Every method goes through ``evaluate.run_protocol`` on the same images with the same click rules (RITM's
protocol), so the rows differ only in the segmenter. Seconds per click depend on the machine and on what else
runs on it, so the machine is printed with the table and stored in the JSON.

    python benchmarks/accuracy.py                      # all methods, ../shared/data/GrabCut, 20 clicks
    python benchmarks/accuracy.py --methods grabcut random_walker --limit 10 --output accuracy.json
    python benchmarks/accuracy.py --first-click inside   # the first click anywhere inside, not at the centre
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_deepcrop.training.baselines import GrabCutClicks, MagicWand, RandomWalkerClicks
from napari_deepcrop.training.evaluate import (
    COCO_SMALL_AREA,
    ClickSegmenter,
    add_first_click_option,
    evaluate_dataset,
    format_table,
    load_dataset,
    summarize,
)

DEFAULT_DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "GrabCut"
BASELINES = {"magic_wand": MagicWand, "grabcut": GrabCutClicks, "random_walker": RandomWalkerClicks}
# deepcrop: the predictor as the widget runs it (mask snapped to edges); deepcrop_no_snap: the network's own mask
DEEPCROP = {
    "deepcrop": {"snap_edges": True},
    "deepcrop_no_snap": {"snap_edges": False},
    # the first click without its zoom-in pass (DeepCropPredictor(zoom_in=False)): what that pass is worth
    "deepcrop_no_zoom": {"snap_edges": True, "zoom_in": False},
    "deepcrop_no_snap_no_zoom": {"snap_edges": False, "zoom_in": False},
}
METHODS = (*DEEPCROP, *BASELINES)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="GrabCut layout, img/+gt/ or COCO")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--checkpoint", default=None, help="DeepCropV2 checkpoint (default: the bundled one)")
    parser.add_argument(
        "--first-click-network", default=None,
        help="a checkpoint whose network reads first clicks (their scales and zoom-in), --checkpoint's every later "
        "click (default: the first-click network --checkpoint holds, if any, else its own)",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="device of the model (default: cuda if available)")
    parser.add_argument(
        "--refine-size", type=int, default=None,
        help="run the model's refinement crops at this input size instead of its own (an ablation of the focus crop)",
    )  # fmt: skip
    parser.add_argument(
        "--refine-factors", type=float, nargs="+", default=None,
        help="the refinement crops of a further click (the mask's box filling REFINE_RATIO of the first, each "
        "factor times that side; the best by score), instead of the predictor's (1.0,)",
    )  # fmt: skip
    parser.add_argument(
        "--focus-ratio", type=float, default=None,
        help="a further click's focus crop around it, the object's extent this many times its side, instead of the "
        "predictor's FOCUS_RATIO; 0: no focus crop",
    )  # fmt: skip
    parser.add_argument(
        "--zoom-in-passes", type=int, default=None,
        help="the first click's zoom-in passes (the first by the first-click network, later ones by the refining "
        "one) instead of the predictor's ZOOM_IN_PASSES",
    )  # fmt: skip
    parser.add_argument(
        "--no-flip-average", action="store_true",
        help="run the refining network's crops alone, not averaged with their mirror images (an ablation)",
    )
    parser.add_argument(
        "--progressive-merge-from", type=int, default=None,
        help="merge a further click's mask into the previous one progressively (FocalClick's) from this many "
        "clicks on, instead of the predictor's PROGRESSIVE_MERGE_FROM; 0: never",
    )  # fmt: skip
    parser.add_argument(
        "--snap-min-side", type=float, default=None,
        help="snap a mask to edges only if its box is at least this many pixels on its longer side, instead of the "
        "predictor's SNAP_MIN_SIDE; 0: every mask",
    )  # fmt: skip
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument(
        "--alternatives", type=int, default=1,
        help="DeepCrop only: the simulated user looks at up to this many of the first click's masks (the widget's "
        "N) and keeps the best, as SAM's multi-mask results are scored (its oracle); 1: the network's choice",
    )  # fmt: skip
    add_first_click_option(parser)
    parser.add_argument("--limit", type=int, default=None, help="a fixed-seed random subset of N images")
    parser.add_argument(
        "--min-area", type=float, default=COCO_SMALL_AREA,
        help=f"COCO datasets: objects larger than this many pixels (default {COCO_SMALL_AREA}, COCO's 'small' limit; "
        "0 for all, e.g. cell nuclei)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="write summaries and IoU curves as JSON")
    return parser


def make_segmenter(name: str, args: argparse.Namespace) -> ClickSegmenter:
    if name in DEEPCROP:
        from napari_deepcrop.checkpoint import load_checkpoint, load_first_click_model
        from napari_deepcrop.predictor import DeepCropPredictor

        model, payload = load_checkpoint(args.checkpoint)
        if args.first_click_network is not None:
            first_click_model = load_checkpoint(args.first_click_network)[0]
        else:
            first_click_model = load_first_click_model(payload, args.checkpoint or "the bundled checkpoint")
        if args.refine_size is not None:
            model = model.with_refine_size(args.refine_size)
        predictor = DeepCropPredictor(model, args.device, first_click_model=first_click_model, **DEEPCROP[name])
        if args.refine_factors is not None:
            predictor.refine_factors = tuple(args.refine_factors)
        if args.focus_ratio is not None:
            predictor.focus_ratio = args.focus_ratio or None
        if args.zoom_in_passes is not None:
            predictor.zoom_in_passes = args.zoom_in_passes
        if args.progressive_merge_from is not None:
            predictor.progressive_merge_from = args.progressive_merge_from or None
        if args.snap_min_side is not None:
            predictor.snap_min_side = args.snap_min_side
        predictor.flip_average = not args.no_flip_average
        return predictor
    return BASELINES[name]()


def machine() -> dict[str, Any]:
    """What the seconds per click were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.alternatives < 1:
        parser.error(f"--alternatives must be at least 1, got {args.alternatives}")
    samples = list(load_dataset(args.dataset, max_instances=args.limit, min_area=args.min_area))
    report: dict[str, Any] = {
        "machine": machine(),
        "dataset": str(args.dataset.resolve()),
        "objects": len(samples),
        "min_area": args.min_area,
        "max_clicks": args.max_clicks,
        "checkpoint": args.checkpoint or "bundled",
        "first_click_network": args.first_click_network,
        "refine_size": args.refine_size,
        "refine_factors": args.refine_factors,
        "focus_ratio": args.focus_ratio,
        "zoom_in_passes": args.zoom_in_passes,
        "flip_average": not args.no_flip_average,
        "snap_min_side": args.snap_min_side,
        "alternatives": args.alternatives,
        "first_click": args.first_click,
        "methods": {},
    }
    for name in args.methods:
        segmenter = make_segmenter(name, args)
        if name in DEEPCROP:
            report["machine"]["model_device"] = str(segmenter.device)
        alternatives = args.alternatives if name in DEEPCROP else 1
        results = evaluate_dataset(
            segmenter, samples, args.max_clicks, progress=True, alternatives=alternatives, first_click=args.first_click
        )
        report["methods"][name] = {
            "summary": summarize(results.values()),
            "per_sample": {sample: result.to_dict() for sample, result in results.items()},
        }
    info = report["machine"]
    shown = f", DeepCrop's best of {args.alternatives} first masks" if args.alternatives > 1 else ""
    shown += ", the first click anywhere inside the object" if args.first_click == "inside" else ""
    print(f"{args.dataset.name}: {len(samples)} objects, up to {args.max_clicks} clicks{shown}")
    cuda = f"CUDA {info['cuda']}" if info["cuda"] else "no CUDA"
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, {cuda}")
    print(format_table({name: method["summary"] for name, method in report["methods"].items()}))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
