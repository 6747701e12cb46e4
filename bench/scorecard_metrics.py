"""The scorecard's arithmetic: point-to-box matching, rates, ROC, thresholds, targets.

Pure numpy, no models and no data, so each piece is unit-tested on hand-made inputs
(tests/bench/test_scorecard.py). A figure that cannot be computed (no positives, no
negatives, nothing detected) is None, never a made-up 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def match_points_to_boxes(
    points: np.ndarray, boxes: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Match annotated points to detection boxes, each detection at most once.

    A point can match a box when it lies inside the box enlarged by `margin` on every
    side (edges included). Candidate pairs are taken greedily, nearest first (distance
    from the point to the box's centre); a point and a box each take part in one match.

    Args:
        points: `[K, 2]` (x, y).
        boxes: `[D, 4]` (x0, y0, x1, y1), in the points' frame.
        margin: Enlargement of each box, in the same pixels.

    Returns:
        `(point_found [K] bool, box_matched [D] bool)`.
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    found = np.zeros(len(points), bool)
    matched = np.zeros(len(boxes), bool)
    if not len(points) or not len(boxes):
        return found, matched
    px, py = points[:, 0:1], points[:, 1:2]  # [K, 1] against [D]
    inside = (
        (px >= boxes[:, 0] - margin)
        & (px <= boxes[:, 2] + margin)
        & (py >= boxes[:, 1] - margin)
        & (py <= boxes[:, 3] + margin)
    )
    pi, bi = np.nonzero(inside)
    if not len(pi):
        return found, matched
    cx = (boxes[bi, 0] + boxes[bi, 2]) / 2
    cy = (boxes[bi, 1] + boxes[bi, 3]) / 2
    dist = np.hypot(points[pi, 0] - cx, points[pi, 1] - cy)
    for k in np.lexsort((bi, pi, dist)):  # nearest first; ties by point, then box index
        p, b = pi[k], bi[k]
        if not found[p] and not matched[b]:
            found[p] = matched[b] = True
    return found, matched


def ratio(num: int | float, den: int | float) -> float | None:
    """num / den, or None when den is 0."""
    return float(num) / float(den) if den else None


@dataclass(frozen=True)
class Rates:
    """Sensitivity and specificity of a binary call."""

    sensitivity: float | None
    specificity: float | None
    accuracy: float | None
    positives: int
    negatives: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "accuracy": self.accuracy,
            "n_positive": self.positives,
            "n_negative": self.negatives,
        }


def binary_rates(truth: np.ndarray, called: np.ndarray) -> Rates:
    """Sensitivity, specificity and accuracy of `called` (bool) against `truth` (bool)."""
    truth = np.asarray(truth, bool)
    called = np.asarray(called, bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    tp = int((truth & called).sum())
    tn = int((~truth & ~called).sum())
    return Rates(ratio(tp, pos), ratio(tn, neg), ratio(tp + tn, pos + neg), pos, neg)


def rates_at_threshold(truth: np.ndarray, scores: np.ndarray, threshold: float) -> Rates:
    """Rates of calling abnormal where `score >= threshold`."""
    return binary_rates(truth, np.asarray(scores, np.float64) >= threshold)


def fit_threshold(
    truth: np.ndarray, scores: np.ndarray, min_sensitivity: float = 0.95
) -> float | None:
    """The highest threshold whose call (`score >= threshold`) reaches `min_sensitivity`.

    The highest such threshold calls the fewest negatives abnormal, so it costs the least
    specificity. It is a positive's own score: the k-th highest, k = ceil(min_sens * P).

    Returns:
        The threshold, or None when there are no positives.
    """
    truth = np.asarray(truth, bool)
    pos_scores = np.sort(np.asarray(scores, np.float64)[truth])[::-1]
    if not len(pos_scores):
        return None
    k = max(1, math.ceil(min_sensitivity * len(pos_scores) - 1e-9))
    return float(pos_scores[k - 1])


@dataclass(frozen=True)
class Target:
    """A figure's target: `value >= minimum`."""

    minimum: float
    text: str = ""

    def passes(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return bool(value >= self.minimum - 1e-12)

    def describe(self) -> str:
        return self.text or f">= {self.minimum:.2f}"


def confusion(
    truth: list[str], predicted: list[str], rows: tuple[str, ...], columns: tuple[str, ...]
) -> list[list[int]]:
    """Counts `[row][column]` of truth (rows) against predictions (columns)."""
    out = [[0] * len(columns) for _ in rows]
    for t, p in zip(truth, predicted, strict=True):
        if t in rows and p in columns:
            out[rows.index(t)][columns.index(p)] += 1
    return out


def interleave_by(items: list, key, limit: int | None, rank=str) -> list:
    """The first `limit` items, taken round-robin over `key`'s values (in `rank` order), so
    a short run still sees every class; all items in their order when `limit` is None."""
    if limit is None:
        return list(items)
    queues: dict[object, list] = {}
    for item in items:
        queues.setdefault(key(item), []).append(item)
    order = [queues[k] for k in sorted(queues, key=rank)]
    out: list = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in order):
        for q in order:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out
