"""Detections into level-0 cells, each kept by exactly one of the ROIs that see it."""

from __future__ import annotations

import numpy as np

from engines.postprocess import Detections
from worker.pipeline.detect import l0_boxes_in_core


def test_core_keeps_each_cell_once_across_overlapping_rois() -> None:
    """Two ROIs overlapping by 128 px see the same cell; exactly one keeps it."""
    cell_l0 = np.array([[500.0, 300.0, 520.0, 320.0]])  # centre (510, 310)
    roi_a = dict(origin=(0, 0), core=(0, 0, 448, 512))  # stride 384: cores split at 448
    roi_b = dict(origin=(384, 0), core=(448, 0, 384, 512))
    kept = 0
    for roi in (roi_a, roi_b):
        ox, oy = roi["origin"]
        local = cell_l0 - [ox, oy, ox, oy]
        det = Detections(local.astype(np.float32), np.array([0.9], np.float32))
        boxes, scores, idx = l0_boxes_in_core(det, roi["origin"], 1.0, roi["core"])
        if len(boxes):
            np.testing.assert_array_equal(boxes[0], [500, 300, 20, 20])
        kept += len(boxes)
    assert kept == 1


def test_core_maps_scaled_rois_to_level0() -> None:
    det = Detections(np.array([[10.0, 20.0, 30.0, 40.0]], np.float32), np.array([0.5], np.float32))
    boxes, _, _ = l0_boxes_in_core(det, (1000, 2000), 2.0, (1000, 2000, 1024, 1024))
    np.testing.assert_array_equal(boxes, [[1020, 2040, 40, 40]])
