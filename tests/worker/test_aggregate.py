"""Slide-level aggregation and the slide call: Bethesda categories, adequacy, the score."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.errors import ModelConfigError
from engines.repository import default_repository_path
from worker.pipeline.aggregate import SlideAggregator
from worker.pipeline.records import CellResult, RoiResult
from worker.pipeline.slide_call import (
    OPERATING_POINT_FILE,
    UNSATISFACTORY,
    OperatingPoint,
)

LABELS = ("NILM", "LSIL", "HSIL")
SHIPPED = OperatingPoint.for_repository(default_repository_path())


def cell(label: str, score: float, suspicion: float, x: int = 0) -> CellResult:
    probs = {name: (1 - score) / 2 for name in LABELS} | {label: score}
    return CellResult(0, x, 0, 10, 10, 0.9, label, score, probs, suspicion, 0.1)


def roi(index: int, label: str = "NILM", p: float = 1.0, n: int = 1) -> RoiResult:
    probs = {name: (1 - p) / 2 for name in LABELS} | {label: p}
    return RoiResult(index, 0, 0, 512, 512, label, probs, n)


def normal_slide(cells: int, op: OperatingPoint = SHIPPED, **kw) -> SlideAggregator:
    """A slide of normal cells, 50 to an ROI, the way a scan adds them."""
    agg = SlideAggregator(LABELS, operating_point=op, **({"preparation": "liquid-based"} | kw))
    for i in range(0, cells, 50):
        n = min(50, cells - i)
        agg.add_roi(
            roi(i // 50, "NILM", 0.97, n), [cell("NILM", 0.97, 0.03, x=j) for j in range(n)]
        )
    return agg


def test_the_shipped_repository_has_a_fitted_operating_point() -> None:
    assert SHIPPED.version != "unfitted" and SHIPPED.fitted_on["part"] == "val"
    assert set(SHIPPED.rules) == {"liquid-based", "conventional"}
    for rule in SHIPPED.rules.values():
        assert rule.fitted_on["abnormal"] > 0 and 0 < rule.abnormal_threshold < 1
        assert all(c >= 0 for c in rule.coef)  # more evidence never lowers the score


def test_a_blank_slide_is_unsatisfactory_never_nilm() -> None:
    s = normal_slide(0).summary()
    assert s.category == UNSATISFACTORY and not s.call.abnormal
    assert "no cellular area" in s.call.notes[0]
    agg = normal_slide(0)
    agg.add_roi(roi(0, n=0), [])
    assert agg.summary().category == UNSATISFACTORY
    assert "no cells were found" in agg.summary().call.notes[0]


def test_a_scant_normal_slide_is_unsatisfactory_with_its_count() -> None:
    s = normal_slide(40).summary()
    assert s.category == UNSATISFACTORY
    assert s.call.adequacy.squamous_estimate == 40 and s.call.adequacy.minimum == 5000
    assert "about 40 cells" in s.call.notes[0]
    conventional = normal_slide(6000, preparation="conventional").summary()
    assert conventional.category == UNSATISFACTORY and conventional.call.adequacy.minimum == 8000


def test_a_normal_slide_of_thousands_of_cells_is_satisfactory_nilm() -> None:
    s = normal_slide(6000).summary()
    assert s.category == "NILM" and s.call.adequacy.satisfactory
    assert s.score < SHIPPED.rules["liquid-based"].abnormal_threshold
    assert s.call.operating_point == SHIPPED.version and s.call.notes == []
    unknown = normal_slide(6000, preparation=None).summary()
    assert unknown.category == "NILM" and unknown.call.adequacy.preparation == "liquid-based"
    assert unknown.call.notes == ["the preparation was not given: liquid-based assumed."]


def test_one_false_positive_cell_among_thousands_does_not_make_a_slide_hsil() -> None:
    agg = normal_slide(6000)
    agg.add_roi(roi(999, "HSIL", 0.99, n=3), [cell("HSIL", 0.99, 0.99)])
    s = agg.summary()
    assert s.category == "NILM" and s.class_counts["HSIL"] == 1


def test_a_scant_slide_with_abnormal_cells_reports_them_with_its_cellularity() -> None:
    agg = normal_slide(30)
    agg.add_roi(roi(9, "HSIL", 0.98, n=10), [cell("HSIL", 0.97, 0.98, x=j) for j in range(10)])
    s = agg.summary()
    assert s.category == "HSIL" and s.call.abnormal  # never unsatisfactory with abnormal cells
    assert not s.call.adequacy.satisfactory and "scant cellularity" in s.call.notes[0]


def test_abnormal_slides_short_of_grading_evidence_are_atypical() -> None:
    op = OperatingPoint(min_cells={"LSIL": 50, "HSIL": 50})
    agg = normal_slide(6000, op)
    for k in range(200):
        agg.add_roi(
            roi(1000 + k, "LSIL", 0.95, n=5), [cell("LSIL", 0.7, 0.9, x=j) for j in range(5)]
        )
    s = agg.summary()
    assert s.call.abnormal and s.category == "ASC-US"
    agg = normal_slide(6000, op)
    for k in range(200):
        agg.add_roi(
            roi(1000 + k, "HSIL", 0.95, n=5), [cell("HSIL", 0.7, 0.9, x=j) for j in range(5)]
        )
    assert agg.summary().category == "ASC-H"


def test_top_k_ranks_most_suspicious_first() -> None:
    agg = SlideAggregator(LABELS, top_k=3)
    for i, s in enumerate([0.1, 0.9, 0.5, 0.95, 0.2]):
        agg.add_roi(roi(i), [cell("NILM", 0.5, s, x=i)])
    top = agg.summary().top_cells
    assert [c.suspicion for c in top] == [0.95, 0.9, 0.5]
    assert [c.review_rank for c in top] == [1, 2, 3]


def test_the_operating_point_file_round_trips_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / OPERATING_POINT_FILE
    path.write_text(SHIPPED.to_yaml())
    assert OperatingPoint.load(path) == SHIPPED
    path.write_text("version: x\nrules: {liquid-based: {coef: [1], intercept: 0}}\n")
    with pytest.raises(ModelConfigError, match="not a valid operating point|needs a rule"):
        OperatingPoint.load(path)
