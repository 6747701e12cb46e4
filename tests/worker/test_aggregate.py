"""Slide-level aggregation."""

from __future__ import annotations

from worker.pipeline.aggregate import SlideAggregator
from worker.pipeline.records import CellResult, RoiResult

LABELS = ("NILM", "LSIL", "HSIL")


def cell(label: str, score: float, suspicion: float, x: int = 0) -> CellResult:
    probs = {name: 0.0 for name in LABELS} | {label: score}
    return CellResult(0, x, 0, 10, 10, 0.9, label, score, probs, suspicion, 0.1)


def roi(index: int, label: str = "NILM", p: float = 1.0, n: int = 1) -> RoiResult:
    probs = {name: (1 - p) / 2 for name in LABELS} | {label: p}
    return RoiResult(index, 0, 0, 512, 512, label, probs, n)


def test_normal_slide_stays_nilm_with_few_suspicious_cells() -> None:
    agg = SlideAggregator(LABELS, min_cells=3)
    agg.add_roi(roi(0), [cell("NILM", 0.99, 0.01, x=i) for i in range(50)])
    agg.add_roi(roi(1), [cell("HSIL", 0.95, 0.97), cell("LSIL", 0.9, 0.9)])
    s = agg.summary()
    assert s.category == "NILM"
    assert s.cell_count == 52
    assert s.class_counts == {"NILM": 50, "LSIL": 1, "HSIL": 1}


def test_worse_classes_add_up_to_the_category() -> None:
    agg = SlideAggregator(LABELS, min_cells=3)
    agg.add_roi(roi(0), [cell("HSIL", 0.95, 0.97), cell("LSIL", 0.9, 0.9), cell("LSIL", 0.9, 0.9)])
    assert agg.summary().category == "LSIL"
    agg.add_roi(roi(1), [cell("HSIL", 0.95, 0.97), cell("HSIL", 0.95, 0.97)])
    assert agg.summary().category == "HSIL"


def test_confident_roi_sets_category() -> None:
    agg = SlideAggregator(LABELS)
    agg.add_roi(roi(0, "HSIL", 0.95, n=4), [cell("NILM", 0.6, 0.4)])
    assert agg.summary().category == "HSIL"


def test_top_k_ranks_most_suspicious_first() -> None:
    agg = SlideAggregator(LABELS, top_k=3)
    for i, s in enumerate([0.1, 0.9, 0.5, 0.95, 0.2]):
        agg.add_roi(roi(i), [cell("NILM", 0.5, s, x=i)])
    top = agg.summary().top_cells
    assert [c.suspicion for c in top] == [0.95, 0.9, 0.5]
    assert [c.review_rank for c in top] == [1, 2, 3]


def test_score_rises_with_abnormality() -> None:
    normal, abnormal = SlideAggregator(LABELS), SlideAggregator(LABELS)
    normal.add_roi(roi(0), [cell("NILM", 0.99, 0.01)])
    abnormal.add_roi(roi(0, "HSIL", 0.9), [cell("HSIL", 0.9, 0.95)])
    assert 0 <= normal.summary().score < abnormal.summary().score <= 1
