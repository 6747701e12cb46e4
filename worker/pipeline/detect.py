"""Detections mapped from an ROI image to level-0 slide pixels, de-duplicated across ROIs.

Neighbouring ROIs overlap, so a cell near a core border is detected by two ROIs (four at a
corner), each with a slightly different box. `l0_boxes_in_core` is the core rule alone;
`CrossRoiDedup`, which the scan uses, also matches boxes across neighbouring ROIs so that
a cell whose boxes fall on either side of a core border is still kept exactly once.
"""

from __future__ import annotations

import numpy as np

from engines.postprocess import Detections, pairwise_iou
from worker.pipeline.plan import Roi, RoiPlan

# Two boxes from neighbouring ROIs are one cell when their IoU exceeds this. The two views
# of one cell differ by a few pixels (IoU > 0.55 even for a 20 px nucleus shifted 3 px
# in both x and y), while distinct cells that touch barely overlap; where distinct cells
# overlap heavily, each box goes to its best match, not to any match.
SAME_CELL_IOU = 0.5


def l0_boxes_in_core(
    det: Detections,
    l0_origin: tuple[int, int],
    l0_per_px: float,
    l0_core: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map an ROI's detections to level 0 and keep those whose centre lies in the ROI's core.

    The core rule alone, without cross-ROI state: exact for a cell every ROI sees with the
    same box, but a cell whose boxes from two ROIs have their centres on either side of a
    core border is kept twice or not at all (`CrossRoiDedup` resolves those).

    Args:
        det: detections in ROI-image pixels.
        l0_origin: `(x, y)` of the ROI image's top-left corner in level-0 pixels.
        l0_per_px: level-0 pixels per ROI-image pixel (target mpp / level-0 mpp).
        l0_core: `(x, y, w, h)` of the ROI's core in level-0 pixels.

    Returns:
        `(l0_boxes, scores, kept)`: `[K, 4]` int64 `(x, y, w, h)` level-0 boxes, their
        scores, and the indices into `det` that were kept (to find their crops).
    """
    l0 = _to_l0(det, l0_origin, l0_per_px)
    kept = np.flatnonzero(_centre_in(l0, l0_core))
    return _xywh(l0[kept]), det.scores[kept], kept


class CrossRoiDedup:
    """Keeps each cell once across overlapping ROIs; fed one ROI at a time, in plan order.

    The core rule, amended where a cell's boxes from overlapping ROIs differ: a box is kept
    where its centre lies in this ROI's core, or in the core of an earlier ROI that saw the
    cell there but left it (its own box put the centre across a border), and never when an
    earlier ROI took the cell (kept it). "Saw the cell" is matched: a box that overlaps an
    earlier neighbouring ROI's image goes to the box of best IoU there, if above
    `iou_threshold` (best, so that where distinct cells overlap a box goes to its own).

    A cell every ROI sees in the same core is kept by that core's ROI, as by the core rule
    alone; one seen on different sides of a border, by exactly one of the ROIs that see it
    (the first whose view puts the centre in its own core or in an earlier one's).

    Each decision is final when made (the scan writes an ROI's cells with it). Only boxes a
    later ROI can see are remembered, and only for the grid rows a later ROI can still
    neighbour (the previous and the current row when the overlap is under half an ROI),
    so memory stays bounded by a couple of grid rows' border boxes.

    Args:
        plan: the slide's ROI plan.
        iou_threshold: IoU above which two boxes from neighbouring ROIs are one cell.
    """

    def __init__(self, plan: RoiPlan, iou_threshold: float = SAME_CELL_IOU) -> None:
        self._grid = {(r.row, r.col): r for r in plan.rois}
        # How many grid steps apart two ROIs can be and still overlap.
        self._reach = (plan.roi_px - 1) // (plan.roi_px - plan.overlap_px)
        self._iou_threshold = iou_threshold
        # (row, col) -> (level-0 xyxy boxes a later ROI can see, whether each is taken).
        self._border: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._last_index = -1

    def select(
        self, roi: Roi, det: Detections, l0_per_px: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map one ROI's detections to level 0 and keep those this ROI owns.

        Args:
            roi: the ROI, after every ROI before it in the plan that was given at all.
            det: its detections in ROI-image pixels.
            l0_per_px: level-0 pixels per ROI-image pixel.

        Returns:
            As `l0_boxes_in_core`.

        Raises:
            ValueError: `roi` comes before an ROI already given.
        """
        if roi.index <= self._last_index:
            raise ValueError(f"ROI {roi.index} given after ROI {self._last_index}")
        self._last_index = roi.index
        for key in [k for k in self._border if k[0] < roi.row - self._reach]:
            del self._border[key]
        l0 = _to_l0(det, (roi.l0_x, roi.l0_y), l0_per_px)
        keep = _centre_in(l0, roi.l0_core)
        earlier, later = self._neighbours(roi)
        seen = [
            (n.l0_core, *self._border[(n.row, n.col)])
            for n in earlier
            if (n.row, n.col) in self._border
        ]
        check = np.flatnonzero(_touches(l0, [n.l0_box for n in earlier]))
        left_to_us = np.zeros(len(check), dtype=bool)  # an earlier core's ROI saw it, left it
        already_taken = np.zeros(len(check), dtype=bool)
        for core, boxes, taken_there in seen:
            iou = pairwise_iou(l0[check], boxes)
            best = iou.argmax(axis=1)
            hit = iou[np.arange(len(check)), best] > self._iou_threshold
            already_taken |= hit & taken_there[best]
            left_to_us |= hit & ~taken_there[best] & _centre_in(l0[check], core)
        keep[check] = (keep[check] | left_to_us) & ~already_taken
        taken = keep.copy()
        taken[check[already_taken]] = True
        remember = _touches(l0, [n.l0_box for n in later])
        if remember.any():
            self._border[(roi.row, roi.col)] = (l0[remember], taken[remember])
        kept = np.flatnonzero(keep)
        return _xywh(l0[kept]), det.scores[kept], kept

    def _neighbours(self, roi: Roi) -> tuple[list[Roi], list[Roi]]:
        """The planned ROIs whose images overlap `roi`'s: those before it, those after."""
        earlier, later = [], []
        k = self._reach
        for row in range(roi.row - k, roi.row + k + 1):
            for col in range(roi.col - k, roi.col + k + 1):
                other = self._grid.get((row, col))
                if other is None or other is roi or not _touches_box(other.l0_box, roi.l0_box):
                    continue
                (earlier if other.index < roi.index else later).append(other)
        return earlier, later


def _to_l0(det: Detections, l0_origin: tuple[int, int], l0_per_px: float) -> np.ndarray:
    """`[N, 4]` float64 level-0 `(x1, y1, x2, y2)` of ROI-image boxes."""
    ox, oy = l0_origin
    return det.boxes * l0_per_px + np.array([ox, oy, ox, oy], dtype=np.float64)


def _centre_in(l0: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Whether each box's centre lies in `rect` `(x, y, w, h)`, half-open like the cores."""
    cx = (l0[:, 0] + l0[:, 2]) / 2
    cy = (l0[:, 1] + l0[:, 3]) / 2
    x, y, w, h = rect
    return (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)


def _touches(l0: np.ndarray, rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Whether each box overlaps any of `rects` `(x, y, w, h)`."""
    hit = np.zeros(len(l0), dtype=bool)
    for x, y, w, h in rects:
        hit |= (l0[:, 0] < x + w) & (l0[:, 2] > x) & (l0[:, 1] < y + h) & (l0[:, 3] > y)
    return hit


def _touches_box(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _xywh(l0: np.ndarray) -> np.ndarray:
    """`[K, 4]` int64 `(x, y, w, h)` of level-0 `(x1, y1, x2, y2)` boxes, at least 1 px wide."""
    xy = np.round(l0[:, :2])
    wh = np.maximum(np.round(l0[:, 2:] - l0[:, :2]), 1)
    return np.concatenate([xy, wh], axis=1).astype(np.int64)
