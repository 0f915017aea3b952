"""Fixtures for the widget tests: a predictor with a known answer, a docked widget, captured notifications."""

from __future__ import annotations

import threading

import numpy as np
import pytest


class DiskPredictor:
    """Predicts a disk of ``radius`` around the first positive click, minus a disk around each negative click;
    a first click's alternatives 1 and 2 (the widget's N), disks of twice and three times ``radius``.

    Records every call; ``gate``, when set, makes ``predict`` wait until it is opened (to test superseding).
    """

    def __init__(self, radius: int = 6) -> None:
        self.radius = radius
        self.calls: list[dict] = []
        self.images: list[tuple] = []
        self.gate: threading.Event | None = None
        self.error: Exception | None = None

    def set_image(self, image, contrast_limits=None, channels=None) -> None:
        self.shape = image.shape[:2]
        self.images.append((image.shape, image.dtype, contrast_limits))

    def disk(self, center, radius: int | None = None) -> np.ndarray:
        rows, cols = np.ogrid[: self.shape[0], : self.shape[1]]
        return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= (radius or self.radius) ** 2

    def alternatives(self) -> int:
        return 3

    def predict(self, points, labels, prev_mask=None, return_crop=False, alternative=0):
        if prev_mask is not None and alternative:
            raise ValueError("alternative masks are a first click's (no prev_mask)")  # as the real one
        if prev_mask is not None and hasattr(prev_mask, "full"):  # a PlacedMask, as the widget passes it
            prev_mask = prev_mask.full()
        call = {"points": points.copy(), "labels": labels.copy(), "prev_mask": prev_mask, "alternative": alternative}
        self.calls.append(call)
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        mask = self.disk(points[labels == 1][0], self.radius * (alternative + 1))
        for point in points[labels == 0]:
            mask &= ~self.disk(point)
        if not return_crop:
            return mask, 0.8
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], (rows[0], cols[0]), 0.8


@pytest.fixture
def predictor() -> DiskPredictor:
    return DiskPredictor()


@pytest.fixture
def make_widget(make_napari_viewer, predictor):
    """make(*images) -> (viewer, widget): images are arrays or (array, kwargs); the widget is docked."""
    from napari_deepcrop._widget import DeepCropWidget

    def make(*images):
        viewer = make_napari_viewer()
        for image in images:
            data, kwargs = image if isinstance(image, tuple) else (image, {})
            viewer.add_image(data, **kwargs)
        widget = DeepCropWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.predictor = predictor
        return viewer, widget

    return make


@pytest.fixture
def notifications():
    """The messages of napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    messages: list[str] = []

    def record(notification):
        messages.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)
