"""Take the README's screenshot: napari, the DeepCrop widget, an object segmented by clicks, under Xvfb.

    xvfb-run -a .venv/bin/python scripts/screenshot.py docs/screenshot.png [--checkpoint PT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_deepcrop._widget import DeepCropWidget


def wait_for(widget: DeepCropWidget, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (widget.busy or widget.session.mask is None) and time.time() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--sample", default="coins", choices=("coins", "coffee"))
    parser.add_argument("--click", type=float, nargs=2, action="append", default=None, metavar=("ROW", "COL"))
    args = parser.parse_args()
    viewer = napari.Viewer(title="napari-deepcrop")
    viewer.window.resize(1700, 850)
    viewer.open_sample("napari-deepcrop", args.sample)
    widget = DeepCropWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DeepCrop", area="right")
    if args.checkpoint is not None:
        widget._checkpoint.value = args.checkpoint
    widget._tool.value = True
    # coins: six committed, one in preview
    objects = args.click or [[45, 45], [45, 110], [45, 170], [45, 355], [115, 60], [180, 100], [255, 310]]
    for i, (row, col) in enumerate(objects):
        widget._add_click((row, col), positive=True)
        wait_for(widget)
        if i < len(objects) - 1:
            widget.commit()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    for _ in range(10):
        QApplication.processEvents()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.output), canvas_only=False)
    print(f"wrote {args.output}")
    viewer.close()


if __name__ == "__main__":
    main()
