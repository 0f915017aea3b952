"""Turn a training checkpoint into the bundled default: model only, float16, with its provenance and numbers.

    python scripts/ship_checkpoint.py runs/default/ladder/checkpoint.pt --metrics grabcut.json --note "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_deepcrop.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=default_checkpoint_path())
    parser.add_argument("--metrics", type=Path, action="append", default=[], help="JSON files of measured numbers")
    parser.add_argument("--note", help="anything else the file should say about where it came from")
    args = parser.parse_args()
    model, payload = load_checkpoint(args.checkpoint)
    meta = dict(payload.get("meta", {}))
    init = meta.get("args", {}).get("init")
    if init and Path(init).exists():  # a fine-tune: keep where its starting point came from (read before overwriting)
        meta["init_meta"] = load_checkpoint(init)[1].get("meta", {})
    if args.note:
        meta["note"] = args.note
    meta.update(
        source_checkpoint=args.checkpoint.name,
        trained_steps=payload.get("step"),
        trained_epochs=payload.get("epoch"),
        best_validation_mean_iou=payload.get("best"),
        metrics={p.stem: json.loads(p.read_text()) for p in args.metrics},
    )
    path = save_checkpoint(args.output, model, half=True, meta=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
