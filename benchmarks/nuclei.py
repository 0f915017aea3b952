"""Cell nuclei, far from the photographs the model learnt on: the bundled model, the same fine-tuned on half of the
image as the widget's *Fine-tune* does, and the classical methods, by the interactive protocol of accuracy.py.

The data: the fluorescence image of nuclei and its masks that the stardist wheel carries
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``, 512², uint16; an image of the 2018 Data Science Bowl,
BBBC038, CC0; the wheel is BSD-3). The benchmark reads them from the wheel file, which this project does not
ship; fetch it from PyPI first:

    pip download --no-deps stardist==0.9.2 -d /tmp/stardist
    python benchmarks/nuclei.py --wheel /tmp/stardist/stardist-0.9.2-*.whl --output nuclei.json

The image is cut into its left and right halves, each written as a COCO dataset by the plugin's own export
(``coco.export_label_folders``; a nucleus the cut crosses is two objects). The left half's nuclei fine-tune the
bundled model through ``finetune.finetune`` (the widget's code path and defaults: 200 steps, a quarter of the
objects held out to measure before and after); the right half's nuclei measure every method, all of them (the
protocol's 32² lower limit for COCO objects would leave none: ``--min-area 0``). Nothing here was tuned on these
nuclei; the fine-tune's design (its network reads first clicks too) was chosen on them, which the record says.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (this folder's benchmark: the same protocol, table and JSON)

IMAGE, MASK = "stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"


def read_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """The nuclei image and its label image, as stored in the wheel."""
    import tifffile

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [n for n in (IMAGE, MASK) if n not in names]
        if missing:
            raise FileNotFoundError(f"{wheel} holds no {missing}: give a stardist wheel (0.9.2 has them)")
        return tuple(tifffile.imread(io.BytesIO(archive.read(n))) for n in (IMAGE, MASK))


def write_halves(image: np.ndarray, labels: np.ndarray, folder: Path) -> dict[str, Path]:
    """The left and right halves as two COCO datasets written by the plugin's export; their json paths."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    from napari_deepcrop.coco import export_label_folders

    half = image.shape[1] // 2
    paths = {}
    for name, cols in (("left", slice(None, half)), ("right", slice(half, None))):
        (folder / name / "images").mkdir(parents=True, exist_ok=True)
        (folder / name / "labels").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / name / "images" / f"{name}.tif", image[:, cols])
        tifffile.imwrite(folder / name / "labels" / f"{name}.tif", relabel_sequential(labels[:, cols])[0])
        paths[name] = export_label_folders(folder / name / "images", folder / name / "labels", folder / name / "coco")
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="a stardist wheel (pip download, see above)")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (the widget's default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the datasets and the model here")
    parser.add_argument("--baselines", nargs="*", default=["magic_wand", "grabcut"], choices=sorted(accuracy.BASELINES))
    parser.add_argument("--output", type=Path, default=None, help="every row's summary and IoU curves as JSON")
    args = parser.parse_args(argv)

    from napari_deepcrop.finetune import finetune
    from napari_deepcrop.training.evaluate import format_table

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nuclei-"))
    image, labels = read_wheel(args.wheel)
    halves = write_halves(image, labels, workdir)
    start = time.perf_counter()
    tuned = finetune(halves["left"], args.steps, output_dir=workdir / "finetune", device="cpu")
    minutes = (time.perf_counter() - start) / 60
    print(f"fine-tuned on the left half in {minutes:.1f} min: {tuned.summary}")

    common = ["--dataset", str(halves["right"]), "--min-area", "0"]
    runs = {
        "bundled": [*common, "--methods", "deepcrop", "deepcrop_no_snap"],
        "fine-tuned": [*common, "--methods", "deepcrop", "deepcrop_no_snap", "--checkpoint", str(tuned.checkpoint)],
    }
    if args.baselines:
        runs["classical"] = [*common, "--methods", *args.baselines]
    report = {
        "wheel": args.wheel.name,
        "steps": args.steps,
        "finetune_minutes": minutes,
        # held-out patch IoU before and after, and which network reads first clicks (measured on the held-out nuclei)
        "finetune": {"before": tuned.before, "after": tuned.after, "first_click": tuned.first_click,
                     "kept_first_click_network": tuned.kept_first_click_network},  # fmt: skip
        "rows": {},
    }
    for run, flags in runs.items():
        result = accuracy.main(flags)
        report["machine"] = result["machine"]
        for method, values in result["methods"].items():
            name = method if run == "classical" else f"{method} ({run})"
            report["rows"][name] = values
    print(f"\nright half: {result['objects']} nuclei, up to {result['max_clicks']} clicks; fine-tuned on the left half")
    print(format_table({name: row["summary"] for name, row in report["rows"].items()}))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
