"""Detections mapped from an ROI image to level-0 slide pixels, de-duplicated across ROIs."""

from __future__ import annotations

import numpy as np

from engines.postprocess import Detections


def l0_boxes_in_core(
    det: Detections,
    l0_origin: tuple[int, int],
    l0_per_px: float,
    l0_core: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map an ROI's detections to level 0 and keep those whose centre lies in the ROI's core.

    ROI cores partition the slide, so keeping a cell only where its centre falls in the core
    de-duplicates cells seen in two overlapping ROIs without any cross-ROI state.

    Args:
        det: detections in ROI-image pixels.
        l0_origin: `(x, y)` of the ROI image's top-left corner in level-0 pixels.
        l0_per_px: level-0 pixels per ROI-image pixel (target mpp / level-0 mpp).
        l0_core: `(x, y, w, h)` of the ROI's core in level-0 pixels.

    Returns:
        `(l0_boxes, scores, kept)`: `[K, 4]` int64 `(x, y, w, h)` level-0 boxes, their
        scores, and the indices into `det` that were kept (to find their crops).
    """
    ox, oy = l0_origin
    l0 = det.boxes * l0_per_px + np.array([ox, oy, ox, oy], dtype=np.float64)
    cx = (l0[:, 0] + l0[:, 2]) / 2
    cy = (l0[:, 1] + l0[:, 3]) / 2
    kx, ky, kw, kh = l0_core
    kept = np.flatnonzero((cx >= kx) & (cx < kx + kw) & (cy >= ky) & (cy < ky + kh))
    xy = np.round(l0[kept, :2])
    wh = np.maximum(np.round(l0[kept, 2:] - l0[kept, :2]), 1)
    return np.concatenate([xy, wh], axis=1).astype(np.int64), det.scores[kept], kept
