"""Found cells against ground truth: detection recall and precision, class accuracy.

A found box matches a true cell when its centre lies inside the cell's nucleus box or its
IoU with the nucleus or the cell box is at least 0.5; each true cell matches at most once
(strongest detections first, nearest free cell).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.spatial import cKDTree


class FoundCell(Protocol):
    x: int
    y: int
    w: int
    h: int
    label: str


class TrueCell(Protocol):
    x: int
    y: int
    w: int
    h: int
    nx: int
    ny: int
    nw: int
    nh: int
    label: str


@dataclass(frozen=True)
class CellMatch:
    """Matching figures; `confusion[(true, found)]` counts matched pairs by label."""

    truth: int
    found: int
    matched: int
    correct: int
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def recall(self) -> float:
        return self.matched / self.truth if self.truth else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.found if self.found else 1.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.matched if self.matched else 0.0


def match_cells(
    truth: Sequence[TrueCell], found: Iterable[FoundCell], neighbours: int = 8
) -> CellMatch:
    """Match found cells (level-0 boxes) to true cells; see the module docstring."""
    found = sorted(found, key=lambda c: -getattr(c, "detection_score", 0.0))
    if not truth or not found:
        return CellMatch(len(truth), len(found), 0, 0)
    nuclei = np.array([(t.nx, t.ny, t.nx + t.nw, t.ny + t.nh) for t in truth], dtype=np.float64)
    bodies = np.array([(t.x, t.y, t.x + t.w, t.y + t.h) for t in truth], dtype=np.float64)
    tree = cKDTree((nuclei[:, :2] + nuclei[:, 2:]) / 2)
    taken = np.zeros(len(truth), dtype=bool)
    matched = correct = 0
    confusion: dict[tuple[str, str], int] = {}
    for cell in found:
        box = np.array([cell.x, cell.y, cell.x + cell.w, cell.y + cell.h], dtype=np.float64)
        centre = (box[:2] + box[2:]) / 2
        _, idx = tree.query(centre, k=min(neighbours, len(truth)))
        for i in np.atleast_1d(idx):
            if taken[i] or not _matches(box, centre, nuclei[i], bodies[i]):
                continue
            taken[i] = True
            matched += 1
            correct += truth[i].label == cell.label
            key = (truth[i].label, cell.label)
            confusion[key] = confusion.get(key, 0) + 1
            break
    return CellMatch(len(truth), len(found), matched, correct, confusion)


def _matches(box: np.ndarray, centre: np.ndarray, nucleus: np.ndarray, body: np.ndarray) -> bool:
    inside = nucleus[0] <= centre[0] <= nucleus[2] and nucleus[1] <= centre[1] <= nucleus[3]
    return inside or _iou(box, nucleus) >= 0.5 or _iou(box, body) >= 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
