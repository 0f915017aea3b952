"""Turn a training checkpoint into the bundled default: model only, float16, with its provenance and numbers.

    python scripts/ship_checkpoint.py runs/default/focus256/checkpoint.pt --metrics grabcut.json --note "..."

A stage that started from another's weights (``--init``, as each stage of a recipe does) records that stage's
``meta`` under ``init_meta``, and so on down to the first: the file says how every stage was trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_deepcrop.checkpoint import default_checkpoint_path, load_checkpoint, read_checkpoint, save_checkpoint


def with_init_meta(meta: dict, seen: frozenset[Path] = frozenset()) -> dict:
    """``meta`` with the ``meta`` of the checkpoint it started from (``args.init``) under ``init_meta``, recursively,
    while those files exist (a stage shipped before keeps the ``init_meta`` it was shipped with)."""
    meta = dict(meta)
    init = meta.get("args", {}).get("init")
    if init and Path(init).is_file() and Path(init).resolve() not in seen:
        parent = read_checkpoint(init).get("meta", {})
        meta["init_meta"] = with_init_meta(parent, seen | {Path(init).resolve()})
    return meta


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=default_checkpoint_path())
    parser.add_argument("--metrics", type=Path, action="append", default=[], help="JSON files of measured numbers")
    parser.add_argument("--note", help="anything else the file should say about where it came from")
    parser.add_argument(
        "--first-click-network", type=Path,
        help="a checkpoint whose network the file keeps for first clicks (the predictor's first_click_model)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    model, payload = load_checkpoint(args.checkpoint)
    meta = with_init_meta(payload.get("meta", {}))  # read before the output may overwrite a stage's init
    first_click_model = None
    if args.first_click_network is not None:
        first_click_model, first_payload = load_checkpoint(args.first_click_network)
        meta["first_click_meta"] = with_init_meta(first_payload.get("meta", {}))
    if args.note:
        meta["note"] = args.note
    meta.update(
        source_checkpoint=args.checkpoint.name,
        trained_steps=payload.get("step"),
        trained_epochs=payload.get("epoch"),
        best_validation_mean_iou=payload.get("best"),
        metrics={p.stem: json.loads(p.read_text()) for p in args.metrics},
    )
    path = save_checkpoint(args.output, model, half=True, first_click_model=first_click_model, meta=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
