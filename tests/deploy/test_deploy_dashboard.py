"""The Grafana dashboard for the night is well formed, its PromQL parses (promql-parser),
and every metric it reads is one a papscan worker exposes (`worker.metrics.metric_names`)."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.deploy_files import DASHBOARD

# Grafana's own variables, replaced by a value of the same kind before parsing.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def _promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def _selectors(expr: str):
    """(metric name, {label: (op, value)}) of every vector selector in `expr`."""
    import promql_parser

    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (str(m.op), m.value) for m in node.matchers.matchers}
            name = node.name or matchers.pop("__name__", (None, None))[1]
            found.append((name, matchers))

    promql_parser.walk(promql_parser.parse(_promql(expr)), visit)
    return found


def test_dashboard_is_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        assert panel["description"], panel["title"]


@pytest.mark.parametrize("title, expr", _exprs(), ids=[e for _, e in _exprs()])
def test_every_expression_parses_and_reads_only_metrics_that_exist(title, expr):
    from worker.metrics import metric_names

    names = metric_names()
    selectors = _selectors(expr)
    assert selectors, f"{title}: no metric in {expr}"
    for name, matchers in selectors:
        assert name in names, f"{title}: {name} is not a metric papscan exposes"
        if "outcome" in matchers:
            assert matchers["outcome"][1] in {"done", "failed"}, (title, matchers)
        if "status" in matchers:
            from worker.db.models import SCAN_STATUSES

            assert matchers["status"][1] in SCAN_STATUSES, (title, matchers)


def test_the_check_catches_a_metric_that_does_not_exist():
    from worker.metrics import metric_names

    (name, _), *_ = _selectors("sum(rate(papscan_slide_total[$__rate_interval]))")
    assert name not in metric_names()


def test_the_night_is_on_the_dashboard():
    """What the issue asks the dashboard to show, each by the metric that answers it."""
    titles = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels()}

    def panel_reading(pattern: str) -> list[str]:
        return [t for t, exprs in titles.items() if re.search(pattern, exprs)]

    assert panel_reading(r"papscan_queue_depth"), "queue depth"
    assert panel_reading(r"papscan_slides_total\{outcome=\"done\"\}.*\[1h\]"), "slides per hour"
    assert any("ETA" in t for t in panel_reading(r"papscan_outstanding_scans.*/")), "ETA"
    assert panel_reading(r"outcome=\"failed\""), "failures"
    assert panel_reading(r"by \(instance\).*papscan_slides_total"), "per-worker throughput"
    assert panel_reading(r"by \(stage\).*papscan_stage_seconds_sum"), "stage breakdown"
