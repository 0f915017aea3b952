"""The Qt-free annotation session: masks as crops, refinement inputs, commit indices, label ids."""

from __future__ import annotations

import numpy as np
import pytest

from napari_deepcrop.predictor import DeepCropPredictor
from napari_deepcrop.session import (
    AnnotationSession,
    ObjectMask,
    commit_indices,
    load_predictor,
    next_label_id,
    predict_object,
)


class SquarePredictor:
    """Predicts a 5x5 square around the first positive click, as a crop (its alternatives 1 and 2: 7x7, 9x9);
    records what it was given."""

    def set_image(self, image, contrast_limits=None, channels=None):
        self.image_shape, self.contrast_limits = image.shape[:2], contrast_limits

    def alternatives(self):
        return 3

    def predict(self, points, labels, prev_mask=None, return_crop=False, alternative=0):
        assert prev_mask is None or alternative == 0, "the real predictor refuses this"
        self.points, self.labels, self.alternative = points, labels, alternative
        self.prev_mask = prev_mask.full() if prev_mask is not None else None  # the session passes a PlacedMask
        row, col = points[labels == 1][0].astype(int)
        half = 2 + alternative
        return np.ones((2 * half + 1,) * 2, bool), (row - half, col - half), 0.9


def square(row0: int, col0: int, side: int = 5, shape=(20, 20)) -> ObjectMask:
    return ObjectMask(np.ones((side, side), bool), (row0, col0), shape, 1.0)


def test_object_mask_full_and_bbox():
    mask = ObjectMask(np.array([[True, False], [True, True]]), (3, 4), (6, 8))
    assert mask.bbox == (slice(3, 5), slice(4, 6))
    full = mask.full()
    assert full.shape == (6, 8) and full.sum() == 3 and full[3, 4] and not full[3, 5]


def test_predict_object_passes_clicks_labels_and_previous_mask():
    predictor, prev = SquarePredictor(), square(0, 0)
    image = np.zeros((20, 30, 3), np.uint8)
    mask = predict_object(predictor, image, ((10, 12, 1), (3, 4, 0)), prev, contrast_limits=(0, 255))
    np.testing.assert_array_equal(predictor.points, [[10, 12], [3, 4]])
    np.testing.assert_array_equal(predictor.labels, [1, 0])
    np.testing.assert_array_equal(predictor.prev_mask, prev.full())
    assert predictor.contrast_limits == (0, 255) and predictor.image_shape == (20, 30)
    assert mask.origin == (8, 10) and mask.shape == (20, 30) and mask.crop.dtype == bool and mask.score == 0.9


def test_predict_object_cycles_the_first_clicks_alternatives_and_ignores_them_when_refining():
    predictor, image = SquarePredictor(), np.zeros((20, 30, 3), np.uint8)
    sides = []
    for alternative in range(4):
        mask = predict_object(predictor, image, ((10, 12, 1),), alternative=alternative)
        assert (mask.alternative, mask.alternatives) == (alternative % 3, 3) == (predictor.alternative, 3)
        sides.append(mask.crop.shape[0])
    assert sides == [5, 7, 9, 5]  # counting up cycles back to the network's choice
    refined = predict_object(predictor, image, ((10, 12, 1), (3, 4, 0)), prev=mask, alternative=2)
    assert (refined.alternative, refined.alternatives, predictor.alternative) == (0, 1, 0)
    np.testing.assert_array_equal(predictor.prev_mask, mask.full())


def test_commit_indices_keeps_other_objects_unless_overwrite():
    labels = np.zeros((20, 20), np.int32)
    labels[0:3, 0:3] = 7
    mask = square(1, 1, side=4)
    rows, cols = commit_indices(labels, mask)
    assert len(rows) == 16 - 4 and not (labels[rows, cols]).any()
    rows, cols = commit_indices(labels, mask, overwrite=True)
    assert len(rows) == 16 and set(zip(rows.tolist(), cols.tolist(), strict=True)) == {
        (r, c) for r in range(1, 5) for c in range(1, 5)
    }


def test_commit_indices_on_a_stack_slice():
    labels = np.zeros((3, 4, 20, 20), np.uint16)
    indices = commit_indices(labels, square(2, 3), plane=(1, 2))
    labels[indices] = 5
    assert labels[1, 2].sum() == 25 * 5 and labels.sum() == 25 * 5


def test_next_label_id():
    assert next_label_id(np.zeros((4, 4), np.int32)) == 1
    assert next_label_id(np.array([[0, 3], [9, 0]], np.int32)) == 10
    with pytest.raises(ValueError, match="no free label"):
        next_label_id(np.full((2, 2), 255, np.uint8))


def test_session_refines_from_the_longest_known_prefix():
    session = AnnotationSession()
    a, b, c = (5, 5, 1), (6, 6, 0), (7, 7, 1)
    mask_a, mask_ab, mask_abc = square(3, 3), square(4, 4), square(5, 5)
    assert session.prev_mask((a,)) is None
    session.remember((a,), mask_a)
    session.remember((a, b), mask_ab)
    session.remember((a, b, c), mask_abc)
    assert session.prev_mask((a, b, c, (1, 1, 1))) is mask_abc  # a new click refines the current mask
    assert session.prev_mask((a, c)) is mask_a  # b removed: refine from what a alone gave
    assert session.prev_mask((a, b)) is mask_a  # c removed: predicted again as when b was added
    first = session.object_id
    session.reset()
    assert session.object_id == first + 1 and session.prev_mask((a, b)) is None and session.clicks == ()


def test_load_predictor_falls_back_to_cpu_without_cuda():
    predictor, warning = load_predictor(None, "cpu")
    assert isinstance(predictor, DeepCropPredictor) and predictor.device.type == "cpu" and warning is None
    predictor, warning = load_predictor(None, "cuda")
    if predictor.device.type == "cpu":  # on a machine without a GPU
        assert "CPU" in warning


def test_a_propagated_objects_writes_follow_its_masks_and_keep_other_objects():
    """From old masks to new ones: pixels the object leaves are cleared (its own only), new ones written
    without taking other objects' pixels; a click corrects a slice only near the object's mask there."""
    from napari_deepcrop.session import PropagatedObject
    from napari_deepcrop.volume import VolumeObject

    labels = np.zeros((3, 10, 10), np.int32)
    labels[1, 4:6, 6:8] = 9  # another object
    old, new = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    old[2:5, 2:5] = True
    new[3:6, 3:8] = True
    volume = VolumeObject((1,), 0, 3, masks={1: ObjectMask.from_full(new)}, sources={1: 1})
    propagated = PropagatedObject(4, volume)
    labels[1][old] = 4
    for indices, value in propagated.writes(labels, {1: ObjectMask.from_full(old)}, {1}):
        labels[indices] = value
    np.testing.assert_array_equal(labels[1] == 4, new & ~(labels[1] == 9))
    assert (labels[1] == 9).sum() == 4 and not labels[[0, 2]].any()
    for indices, value in propagated.writes(labels, {1: volume.masks[1]}, {1}, overwrite=True):
        labels[indices] = value
    np.testing.assert_array_equal(labels[1] == 4, new)
    assert propagated.slice_at(labels, (1,), (4, 5)) == 1
    assert propagated.slice_at(labels, (1,), (8, 9)) == 1  # within half the mask's side (5) of its box 3:6, 3:8
    assert propagated.slice_at(labels, (1,), (9, 9)) is None  # beyond it
    assert propagated.slice_at(labels, (0,), (4, 5)) is None  # no mask of it there
    labels[1][new] = 0  # undone: not a correction any more
    assert propagated.slice_at(labels, (1,), (4, 5)) is None
