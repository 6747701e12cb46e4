"""Slide-level result from a stream of cells and ROIs, in constant memory.

Classes are ordered least to most severe: the classifiers' declared `severity` order
(`NILM, LSIL, HSIL`), which the model contract checks at load. The slide's category is the
most severe class that either at least `min_cells` confident cells reach (a single
confident cell could be a false positive; a few together are worth a pathologist's look)
or one ROI reaches with high probability.
The suspicion score, which sorts the morning worklist, blends the most abnormal ROI with
the mean suspicion of the slide's top cells.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field, replace

from worker.pipeline.records import CellResult, RoiResult, SlideSummary


@dataclass
class SlideAggregator:
    """Folds cells and ROIs into a `SlideSummary` without keeping them.

    Args:
        labels: class names, least to most severe; `labels[0]` is the normal class.
        top_k: cells to mark for review.
        min_cells: confident cells of a class (or worse) that make it the slide's category.
        cell_confidence: a cell counts towards the category only with `score` at least this.
        roi_confidence: an ROI labelled with a class at least this sure makes it the category.
    """

    labels: tuple[str, ...]
    top_k: int = 20
    min_cells: int = 3
    cell_confidence: float = 0.8
    roi_confidence: float = 0.9
    _counts: Counter[str] = field(default_factory=Counter)
    _confident: Counter[str] = field(default_factory=Counter)
    _roi_hits: set[str] = field(default_factory=set)
    _max_roi_abnormal: float = 0.0
    _rois: int = 0
    _top: list[tuple[float, int, CellResult]] = field(default_factory=list)
    _seen: int = 0

    def add_roi(self, roi: RoiResult, cells: list[CellResult]) -> None:
        """Count one ROI and the cells kept in it."""
        self._rois += 1
        if roi.cell_count:
            self._max_roi_abnormal = max(self._max_roi_abnormal, 1.0 - roi.probs[self.labels[0]])
            if roi.probs[roi.label] >= self.roi_confidence:
                self._roi_hits.add(roi.label)
        for cell in cells:
            self._counts[cell.label] += 1
            if cell.score >= self.cell_confidence:
                self._confident[cell.label] += 1
            self._seen += 1  # tie-breaker: earlier cells win equal suspicion, deterministically
            entry = (cell.suspicion, -self._seen, cell)
            if len(self._top) < self.top_k:
                heapq.heappush(self._top, entry)
            elif entry[:2] > self._top[0][:2]:
                heapq.heapreplace(self._top, entry)

    def summary(self) -> SlideSummary:
        """The slide-level result of everything added so far."""
        category = self.labels[0]
        at_least = 0
        for label in reversed(self.labels[1:]):
            at_least += self._confident[label]
            if at_least >= self.min_cells or label in self._roi_hits:
                category = label
                break
        top = sorted(self._top, key=lambda e: e[:2], reverse=True)
        top_cells = [replace(e[2], review_rank=rank) for rank, e in enumerate(top, start=1)]
        top_mean = sum(c.suspicion for c in top_cells) / len(top_cells) if top_cells else 0.0
        return SlideSummary(
            category=category,
            score=round(0.5 * self._max_roi_abnormal + 0.5 * top_mean, 6),
            cell_count=sum(self._counts.values()),
            class_counts={label: self._counts[label] for label in self.labels},
            roi_count=self._rois,
            top_cells=top_cells,
        )
