"""Snap a mask to the image's edges: OpenCV GrabCut around the object, seeded by the network's mask.

The network sees an object at about 77 of its 128 input pixels, so on a large object its boundary is a few image
pixels off. GrabCut (Rother et al. 2004) on the object's neighbourhood, at up to :data:`EDGE_SIDE` pixels,
starts from the network's mask as "probably object / probably background", with the clicks as sure seeds, and
moves the boundary onto colour edges. This is the post-process of Xu et al. 2016, "Deep Interactive Object
Selection". When GrabCut disagrees wildly with the network (it leaked into the background, say), the
network's mask is kept. Where the network is sure of a pixel (:data:`SURE_LOGIT`), GrabCut takes it as a sure seed:
the snap moves the boundary only where the network is unsure of it, and cannot cut away a part of the object
that the network is sure of because its colours are the background's.
"""

from __future__ import annotations

import cv2
import numpy as np

# working resolution of the object's neighbourhood, and GrabCut iterations. Interactive NoC@90 with the bundled
# model (tiny_coco val2017, 100 objects / GrabCut, 50): 200 px, 1 iteration 13.66 / 5.32; 240 px, 2 iterations
# 13.71 / 5.32 at twice the time; 160 px: 6.0 on GrabCut (2 iterations) and 6.4 (1); 320 px: no better, slower.
# With the sure seeds (2026-12-06, stage 4, tiny_coco val2017's 192 objects, NoC@85 / NoC@90 / failures@90): 200 px,
# 1 iteration 6.83 / 10.88 / 59; 2 iterations 6.93 / 10.84 / 59; 256 px, 1 iteration 6.85 / 10.71 / 56, within what
# small changes move single objects by, for 1.6x GrabCut's pixels: 200 px and 1 iteration kept.
EDGE_SIDE = 200
ITERATIONS = 1
CLICK_RADIUS = 3  # sure-object / sure-background disk at each click, in working pixels
MIN_AGREEMENT = 0.5  # GrabCut's mask must have at least this IoU with the network's to replace it
# a pixel whose logit is above SURE_LOGIT (below -SURE_LOGIT) is a sure object (background) seed for GrabCut, the
# rest of the network's mask only "probable"; None: all of it probable. Bundled model, snapped, on the validation
# split: tiny_coco val2017's 192 objects (benchmarks/accuracy.py, COCO's polygons as truth), NoC@85 / NoC@90 /
# failures@90, and the same split's objects pasted into stacks (benchmarks/volume.py, edges exact by
# construction), one click on every slice, 3D IoU: None 8.16 / 12.61 / 76, 0.855; 3.0 6.83 / 10.88 / 59, 0.823;
# 2.0 6.61 / 10.70 / 57, 0.810; 1.0 6.51 / 10.41 / 54, 0.792; 0.5 6.72 / 10.46 / 62. Below 3.0 the clicks saved on
# COCO cost as much IoU on exact edges again for a quarter of the gain
SURE_LOGIT: float | None = 3.0


def snap_to_edges(
    rgb: np.ndarray,
    logits: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    iterations: int = ITERATIONS,
    sure_logit: float | None = SURE_LOGIT,
) -> np.ndarray:
    """GrabCut on ``rgb`` ((S, S, 3) float in [0, 1]) from the network's ``logits`` ((S, S), > 0 is object) and
    the clicks (``points`` (N, 2) in the same pixels, ``labels`` 1 / 0). Returns logits-like +1 / -1 (S, S).
    Pixels with ``|logits| > sure_logit`` are sure seeds (None: none are)."""
    prior = logits > 0
    if not prior.any() or prior.all():
        return logits
    seeds = np.where(prior, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    if sure_logit is not None:
        seeds[logits > sure_logit] = cv2.GC_FGD
        seeds[logits < -sure_logit] = cv2.GC_BGD
    seeds[[0, -1], :] = seeds[:, [0, -1]] = cv2.GC_BGD  # the crop's frame is background: a model for it
    size = seeds.shape[0]
    for (row, col), label in zip(np.round(points).astype(int), labels, strict=True):
        if 0 <= row < size and 0 <= col < size:
            cv2.circle(seeds, (int(col), int(row)), CLICK_RADIUS, int(cv2.GC_FGD if label else cv2.GC_BGD), -1)
    image = np.ascontiguousarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))
    models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
    cv2.setRNGSeed(0)  # GrabCut's k-means starts from OpenCV's (thread-local) RNG: the same clicks, the same mask
    try:
        cv2.grabCut(image, seeds, None, *models, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # e.g. no background pixel left to model: keep the network's mask
        return logits
    snapped = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    union = np.count_nonzero(snapped | prior)
    if not union or np.count_nonzero(snapped & prior) / union < MIN_AGREEMENT:
        return logits
    return np.where(snapped, 1.0, -1.0).astype(np.float32)
