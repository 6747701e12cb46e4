"""The scorecard (bench/scorecard.py): its arithmetic on hand-made inputs, and one short run
of the whole thing on the real data with the shipped models (`--limit 2`)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.repository import default_repository_path
from train.loops.metrics import best_specificity_at_sensitivity, roc_auc
from worker.pipeline.slide_call import OPERATING_POINT_FILE, OperatingPoint

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_scorecard():
    # Loaded from its file: bench/ is not a package, and tests/bench must not shadow it.
    spec = importlib.util.spec_from_file_location("papscan_bench_scorecard", BENCH / "scorecard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scorecard = _load_scorecard()
sm = scorecard.sm


# --------------------------------------------------------------------------- matcher


def test_point_inside_the_margin_is_found_and_just_outside_is_not() -> None:
    box = np.array([[10.0, 10.0, 20.0, 20.0]])
    margin = 2.0 / 0.5  # 2 µm at 0.5 µm/px
    on_edge = np.array([[24.0, 15.0]])  # exactly at the enlarged edge: counts
    outside = np.array([[24.01, 15.0]])  # just past it
    corner_out = np.array([[23.0, 24.5]])  # inside in x, past the margin in y
    assert sm.match_points_to_boxes(on_edge, box, margin)[0].tolist() == [True]
    assert sm.match_points_to_boxes(outside, box, margin)[0].tolist() == [False]
    assert sm.match_points_to_boxes(corner_out, box, margin)[0].tolist() == [False]
    assert sm.match_points_to_boxes(outside, box, 0.0)[1].tolist() == [False]


def test_each_detection_is_matched_once_nearest_first() -> None:
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [30.0, 0.0, 40.0, 10.0]])
    # Two nuclei in the first box: only the one nearer its centre (5, 5) is found.
    points = np.array([[2.0, 2.0], [5.5, 5.0]])
    found, matched = sm.match_points_to_boxes(points, boxes, 0.0)
    assert found.tolist() == [False, True]
    assert matched.tolist() == [True, False]


def test_a_point_in_two_boxes_takes_the_one_left_free() -> None:
    # P0 lies in B0 and B1; P1 only in B0, and nearer its centre: P1-B0 first, then P0-B1.
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [8.0, 0.0, 18.0, 10.0]])
    points = np.array([[8.5, 5.0], [4.0, 5.0]])
    found, matched = sm.match_points_to_boxes(points, boxes, 0.0)
    assert found.tolist() == [True, True]
    assert matched.tolist() == [True, True]


def test_matching_is_greedy_by_distance_not_optimal() -> None:
    # P0 is nearer B0's centre (3.5) than P1 is (4.0), so P0 takes B0 and P1, which lies in
    # B0 only, is missed, though P0 could have taken B1 (4.5 away).
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [8.0, 0.0, 18.0, 10.0]])
    points = np.array([[8.5, 5.0], [1.0, 5.0]])
    found, matched = sm.match_points_to_boxes(points, boxes, 0.0)
    assert found.tolist() == [True, False]
    assert matched.tolist() == [True, False]


def test_matcher_takes_empty_inputs() -> None:
    found, matched = sm.match_points_to_boxes(np.zeros((0, 2)), np.zeros((3, 4)), 1.0)
    assert found.shape == (0,) and matched.tolist() == [False] * 3
    found, matched = sm.match_points_to_boxes(np.ones((2, 2)), np.zeros((0, 4)), 1.0)
    assert found.tolist() == [False, False] and matched.shape == (0,)


# --------------------------------------------------------------------------- thresholds, ROC

TRUTH = np.array([1, 1, 1, 1, 0, 0, 0], bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.75])


def test_fit_threshold_is_the_highest_reaching_the_sensitivity() -> None:
    t = sm.fit_threshold(TRUTH, SCORES, 0.75)
    assert t == 0.7
    at = sm.rates_at_threshold(TRUTH, SCORES, t)
    assert at.sensitivity == 0.75 and at.specificity == pytest.approx(2 / 3)
    assert sm.rates_at_threshold(TRUTH, SCORES, t + 1e-9).sensitivity < 0.75
    # 0.95 of 4 positives needs all 4: down to the lowest positive, costing specificity.
    assert sm.fit_threshold(TRUTH, SCORES, 0.95) == 0.2
    assert sm.rates_at_threshold(TRUTH, SCORES, 0.2).specificity == pytest.approx(1 / 3)
    # Exactly half of 4 positives is 2, not 3.
    assert sm.fit_threshold(TRUTH, SCORES, 0.5) == 0.8
    assert sm.fit_threshold(np.zeros(3, bool), np.ones(3), 0.95) is None


def test_roc_auc_and_best_specificity() -> None:
    assert roc_auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert roc_auc([0, 0, 1], [0.9, 0.8, 0.1]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5] * 4) == 0.5  # ties count half
    assert roc_auc([0, 0], [0.1, 0.2]) is None
    spec, thr = best_specificity_at_sensitivity(TRUTH, SCORES, 0.75)
    assert spec == pytest.approx(2 / 3) and thr == 0.7
    rates = sm.binary_rates([1, 1, 0, 0], [1, 0, 0, 0])
    assert (rates.sensitivity, rates.specificity, rates.accuracy) == (0.5, 1.0, 0.75)
    assert sm.binary_rates([0, 0], [1, 0]).sensitivity is None


def test_limit_interleaves_classes_least_severe_first() -> None:
    items = [("a", "HSIL"), ("b", "HSIL"), ("c", "NILM"), ("d", "NILM"), ("e", "LSIL")]
    order = {"NILM": 0, "LSIL": 1, "HSIL": 2}
    picked = sm.interleave_by(items, lambda i: i[1], 4, order.get)
    assert [i[0] for i in picked] == ["c", "e", "a", "d"]
    assert sm.interleave_by(items, lambda i: i[1], None) == items


# --------------------------------------------------------------------------- end to end


def test_fitting_the_operating_point_needs_the_val_part() -> None:
    with pytest.raises(SystemExit):
        scorecard.parse_args(["--fit-operating-point"])


def _figures_in_unit_range(section: dict, where: str) -> int:
    """Every figure of a section (not counts, not confusion) is None or in [0, 1]."""
    checked = 0
    for key, value in section.items():
        if key.startswith("n_") or key in ("confusion", "exhaustive"):
            continue
        if isinstance(value, dict):
            checked += _figures_in_unit_range(value, f"{where}.{key}")
        elif isinstance(value, float | int) and not isinstance(value, bool):
            assert 0.0 <= value <= 1.0 and not math.isnan(value), f"{where}.{key} = {value}"
            checked += 1
    return checked


@pytest.mark.slow
def test_scorecard_runs_end_to_end_on_the_real_data(shared_data: Path, tmp_path: Path) -> None:
    val_out, test_out = tmp_path / "val", tmp_path / "test"
    repo = tmp_path / "repo"  # the fit writes slide_call.yaml into the repository it scored
    shutil.copytree(default_repository_path(), repo)
    (repo / OPERATING_POINT_FILE).unlink(missing_ok=True)
    common = ["--data", str(shared_data), "--limit", "2", "--models", str(repo)]
    assert (
        scorecard.main([*common, "--part", "val", "--fit-operating-point", "--out", str(val_out)])
        == 0
    )
    val = json.loads((val_out / "scorecard.json").read_text())
    op = val["operating_point"]
    assert val["part"] == "val" and op["fitted_on"]["part"] == "val"
    assert set(op["abnormal_threshold"]) == {"liquid-based", "conventional"}
    for preparation, fit in op["fit"]["rules"].items():
        assert fit["abnormal"] >= 1 and 0.0 <= op["abnormal_threshold"][preparation] <= 1.0
    fitted = OperatingPoint.load(repo / OPERATING_POINT_FILE)
    assert fitted.version == op["version"]
    written = {p: r.abnormal_threshold for p, r in fitted.rules.items()}
    assert written == pytest.approx(op["abnormal_threshold"], rel=1e-5)  # 6 digits in YAML

    assert scorecard.main([*common, "--out", str(test_out)]) == 0
    report = json.loads((test_out / "scorecard.json").read_text())
    png = test_out / "roc.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report["part"] == "test" and report["limit"] == 2
    assert report["operating_point"]["version"] == op["version"]  # applied unchanged
    assert set(report["models"]) == {"cell_detector", "cell_classifier", "roi_classifier"}
    for model in report["models"].values():
        assert model["version"] >= 1 and len(model["card_sha256"]) == 64

    assert set(report["nuclei"]) == {"cric_fields", "isbi2014", "cervix93", "lbc_nuclei"}
    for name, f in report["nuclei"].items():
        assert f["n_fields"] == 2 and f["n_points"] > 0, name
        assert f["recall"] is not None
        assert (f["precision"] is not None) == (name != "cric_fields")
        _figures_in_unit_range(f, f"nuclei.{name}")
    assert set(report["cells"]) == {"cric_cells", "herlev"}
    for name, f in report["cells"].items():
        assert f["n_cells"] > 0 and f["n_abnormal"] > 0, name
        for key in ("accuracy", "sensitivity", "specificity", "auc", "grade_accuracy"):
            assert f[key] is not None, (name, key)
        counts = np.array(f["confusion"]["counts"])
        assert counts.shape == (3, 3) and counts.sum() == f["n_cells"]
        _figures_in_unit_range(f, f"cells.{name}")
    assert set(report["fields"]) == {"lbc", "cric_fields", "cervix93", "sipakmed_metaplastic"}
    for name, f in report["fields"].items():
        assert f["n_fields"] == 2 and f["specificity"] is not None, name
        _figures_in_unit_range(f, f"fields.{name}")
    assert report["fields"]["lbc"]["n_abnormal"] == 1  # --limit spreads over classes
    assert report["fields"]["sipakmed_metaplastic"]["n_abnormal"] == 0

    assert {"lbc", "cric_fields", "herlev", "isbi2014"} <= set(report["splits"])
    assert report["splits"]["isbi2014"]["test"] == ["EDF010", "EDF011"]
    assert len(report["per_field"]) == 12
    assert {"name", "grade", "category", "score", "cells"} <= set(report["per_field"][0])
    assert report["timings"]["total_s"] > 0
    rows = report["table"]
    assert {r["pass"] for r in rows if r["target"]} <= {True, False, None}
    assert any(r["set"] == "lbc" and r["key"] == "grade_accuracy" for r in rows)
