"""Slide-level evidence from a stream of cells and ROIs, and the call made from it.

Classes are ordered least to most severe: the classifiers' declared `severity` order
(`NILM, LSIL, HSIL`), which the model contract checks at load. The aggregator keeps
counts, the review heap, and one float per cell and per ROI (4 bytes each: 0.4 MB for a
slide of 100,000 cells) for the top-share features; `summary()` turns them into `SlideEvidence` and
asks the operating point (`worker.pipeline.slide_call`) for the Bethesda category, the
calibrated score that sorts the morning worklist, and adequacy.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from worker.pipeline.records import CellResult, RoiResult, SlideSummary
from worker.pipeline.slide_call import OperatingPoint, SlideEvidence

SUSPICIOUS = 0.5  # a cell counts towards `suspicious_fraction` from this suspicion


@dataclass
class SlideAggregator:
    """Folds cells and ROIs into a `SlideSummary` without keeping them.

    Args:
        labels: class names, least to most severe; `labels[0]` is the normal class.
        top_k: cells to mark for review.
        operating_point: the rules of the slide call.
        preparation: the slide's preparation (its score rule and adequacy minimum); None
            when not given: liquid-based, with a note on the call.
        check_adequacy: False for an image that is not a whole slide (a field).
    """

    labels: tuple[str, ...]
    top_k: int = 20
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    preparation: str | None = None
    check_adequacy: bool = True
    _counts: Counter[str] = field(default_factory=Counter)
    _confident: Counter[str] = field(default_factory=Counter)
    _suspicious: int = 0
    _suspicions: array = field(default_factory=lambda: array("f"))  # 4 bytes a cell
    _roi_abnormal: array = field(default_factory=lambda: array("f"))
    _rois: int = 0
    _top: list[tuple[float, int, CellResult]] = field(default_factory=list)
    _seen: int = 0

    def add_roi(self, roi: RoiResult, cells: list[CellResult]) -> None:
        """Count one ROI and the cells kept in it."""
        op = self.operating_point
        self._rois += 1
        if roi.cell_count >= op.roi_min_cells:
            self._roi_abnormal.append(1.0 - roi.probs[self.labels[0]])
        keep = max(self.top_k, op.top_n)
        for cell in cells:
            self._counts[cell.label] += 1
            if cell.score >= op.cell_confidence:
                self._confident[cell.label] += 1
            self._suspicious += cell.suspicion >= SUSPICIOUS
            self._suspicions.append(cell.suspicion)
            self._seen += 1  # tie-breaker: earlier cells win equal suspicion, deterministically
            entry = (cell.suspicion, -self._seen, cell)
            if len(self._top) < keep:
                heapq.heappush(self._top, entry)
            elif entry[:2] > self._top[0][:2]:
                heapq.heapreplace(self._top, entry)

    def evidence(self) -> SlideEvidence:
        """What has been measured so far."""
        op = self.operating_point
        top = [e[2] for e in sorted(self._top, key=lambda e: e[:2], reverse=True)]
        best = top[: op.top_n]
        cells = sum(self._counts.values())
        return SlideEvidence(
            cell_count=cells,
            roi_count=self._rois,
            top_suspicion=_top_mean(self._suspicions, op.top_fraction, op.top_n),
            top_roi_abnormal=_top_mean(self._roi_abnormal, op.top_fraction, 1),
            suspicious_fraction=self._suspicious / cells if cells else 0.0,
            confident={label: self._confident[label] for label in self.labels},
            top_class_mass={
                label: sum(c.probs.get(label, 0.0) for c in best) / len(best) if best else 0.0
                for label in self.labels
            },
        )

    def summary(self) -> SlideSummary:
        """The slide-level result of everything added so far."""
        evidence = self.evidence()
        call = self.operating_point.call(
            evidence, self.labels, self.preparation, self.check_adequacy
        )
        top = sorted(self._top, key=lambda e: e[:2], reverse=True)[: self.top_k]
        top_cells = [replace(e[2], review_rank=rank) for rank, e in enumerate(top, start=1)]
        return SlideSummary(
            category=call.category,
            score=call.score,
            cell_count=evidence.cell_count,
            class_counts={label: self._counts[label] for label in self.labels},
            roi_count=self._rois,
            top_cells=top_cells,
            call=call,
            evidence=evidence,
        )


def _top_mean(values: array, fraction: float, at_least: int) -> float:
    """The mean of the largest `fraction` of values (at least `at_least` of them; 0: none).

    A share, not a fixed count: a whole slide is judged by its most suspicious 1 %, as a
    field is by its few most suspicious cells, so one stray cell among thousands weighs
    as little as it should.
    """
    if not values:
        return 0.0
    data = np.frombuffer(values, np.float32)
    k = min(len(data), max(at_least, math.ceil(fraction * len(data))))
    return float(np.partition(data, len(data) - k)[len(data) - k :].mean())
