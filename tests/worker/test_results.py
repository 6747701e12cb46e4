"""`papscan results`: the worklist's ranking and filters, its outputs, one slide in full.

The hand-made rows live in March 2001 with fresh fingerprints, and every check reads
only those, since the PostgreSQL database is shared by the whole test session.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from worker.cli.main import app
from worker.db.models import Scan, Slide, SlideResult
from worker.db.session import Database
from worker.db.worklist import WORKLIST_COLUMNS, WorklistFilter, iter_worklist, worklist_statement
from worker.pipeline.slide_call import UNSATISFACTORY

MARCH = datetime(2001, 3, 1, tzinfo=UTC)
WINDOW = ["--since", "2001-03-01", "--until", "2001-03-31"]
BLURRED = "Focus: 40% of the ROIs are blurred [focus]."

# name: (status, category, score, adequacy, QC flags, day of March the scan ended)
SLIDES = {
    "failed": ("failed", None, None, None, [], 2),
    "unsat": ("done", UNSATISFACTORY, 0.05, "unsatisfactory", [], 3),
    "hsil": ("done", "HSIL", 0.97, "satisfactory", [BLURRED], 4),
    "lsil": ("done", "LSIL", 0.71, "satisfactory", [], 5),
    "nilm": ("done", "NILM", 0.02, "satisfactory", [], 6),
    "rescanned": ("queued", None, None, None, [], 7),  # an older HSIL scan on 1 March
    "running": ("running", None, None, None, [], 8),
    "cancelled": ("cancelled", None, None, None, [], 9),
}
RANKED = ["unsat", "failed", "hsil", "lsil", "nilm", "cancelled", "running", "rescanned"]


@dataclass
class Made:
    """The hand-made rows of one database: scan and slide ids, paths, by name."""

    db: Database
    url: str
    scans: dict[str, int]
    paths: dict[str, str]
    older_scan: int  # the rescanned slide's finished HSIL scan

    def names(self, rows: list[dict]) -> list[str]:
        """The names of our rows, in order; rows of other tests are dropped."""
        by_id = {v: k for k, v in self.scans.items()}
        return [by_id[r["scan_id"]] for r in rows if r["scan_id"] in by_id]


def _add_scan(s, slide_id: int, status: str, day: int, result: tuple | None) -> int:
    when = MARCH + timedelta(days=day - 1, hours=6)
    ended = status in ("done", "failed", "cancelled")
    scan = Scan(
        slide_id=slide_id,
        status=status,
        model_versions={"cell_detector": 1},
        created_at=when - timedelta(hours=1),
        finished_at=when if ended else None,
        error="the slide file vanished." if status == "failed" else None,
    )
    s.add(scan)
    s.flush()
    if result is not None:
        category, score, adequacy, flags = result
        s.add(
            SlideResult(
                scan_id=scan.id,
                category=category,
                score=score,
                cell_count=6000,
                roi_count=40,
                class_counts={"NILM": 5900, "HSIL": 100},
                adequacy=adequacy,
                qc={"flags": flags, "roi_sharpness": [0.5] * 40},
            )
        )
    return scan.id


def _make(db: Database, url: str) -> Made:
    scans, paths = {}, {}
    with db.transaction() as s:
        for name, (status, category, score, adequacy, flags, day) in SLIDES.items():
            tag = uuid.uuid4().hex[:10]
            slide = Slide(
                fingerprint=f"{name}-{tag}",
                path=f"/slides/{name}-{tag}.svs",
                vendor="aperio",
                width=4096,
                height=4096,
                mpp_x=0.25,
                mpp_y=0.25,
                barcode="B-[1]" if name == "nilm" else None,
            )
            s.add(slide)
            s.flush()
            if name == "rescanned":
                older = _add_scan(s, slide.id, "done", 1, ("HSIL", 0.99, "satisfactory", []))
            result = (category, score, adequacy, flags) if category else None
            scans[name] = _add_scan(s, slide.id, status, day, result)
            paths[name] = slide.path
    return Made(db, url, scans, paths, older)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    if request.param == "postgresql":
        yield _make(request.getfixturevalue("pg_db"), request.getfixturevalue("pg_url"))
        return
    url = f"sqlite:///{tmp_path_factory.mktemp('results') / 'results.db'}"
    db = Database(url)
    db.create_schema()
    yield _make(db, url)
    db.dispose()


def _rows(made: Made, **filters) -> list[dict]:
    f = WorklistFilter(**{"since": MARCH, "until": MARCH + timedelta(31), **filters})
    with made.db.session() as s:
        return list(iter_worklist(s, f))


def _invoke(made: Made, *args: str):
    return CliRunner().invoke(app, ["results", "--db", made.url, *args])


# --- the query --------------------------------------------------------------------------


def test_failed_and_unsatisfactory_come_first_then_by_score_one_row_per_slide(made) -> None:
    rows = _rows(made)
    assert made.names(rows) == RANKED
    assert made.older_scan not in {r["scan_id"] for r in rows}  # only the newest scan
    by_name = dict(zip(made.names(rows), rows, strict=True))
    assert by_name["hsil"]["qc_flags"] == [BLURRED]
    assert by_name["nilm"]["barcode"] == "B-[1]" and by_name["nilm"]["qc_flags"] == []
    assert by_name["failed"]["error"] == "the slide file vanished."
    assert by_name["rescanned"]["category"] is None
    assert by_name["lsil"]["finished_at"] == datetime(2001, 3, 5, 6, tzinfo=UTC)
    assert set(rows[0]) == set(WORKLIST_COLUMNS)


FILTERS = {
    "since/until: days 4 to 6": (
        dict(since=MARCH + timedelta(3), until=MARCH + timedelta(6)),
        ["hsil", "lsil", "nilm"],
    ),
    "status failed": (dict(status="failed"), ["failed"]),
    "status queued": (dict(status="queued"), ["rescanned"]),
    "status done": (dict(status="done"), ["unsat", "hsil", "lsil", "nilm"]),
    "two categories": (dict(categories=("NILM", "LSIL")), ["lsil", "nilm"]),
    "unsatisfactory category": (dict(categories=(UNSATISFACTORY,)), ["unsat"]),
    "adequacy unsatisfactory": (dict(adequacy="unsatisfactory"), ["unsat"]),
    "adequacy satisfactory": (dict(adequacy="satisfactory"), ["hsil", "lsil", "nilm"]),
    "limit 3": (dict(limit=3), ["unsat", "failed", "hsil"]),
    "limit with a filter": (dict(status="done", limit=2), ["unsat", "hsil"]),
    "the second page": (dict(limit=2, offset=2), RANKED[2:4]),
    "a page past the end": (dict(limit=2, offset=len(RANKED)), []),
    "offset alone": (dict(offset=3), RANKED[3:]),
}


@pytest.mark.parametrize("case", FILTERS)
def test_each_filter_keeps_only_the_slides_it_names(made, case: str) -> None:
    filters, expected = FILTERS[case]
    assert made.names(_rows(made, **filters)) == expected


def test_sqlite_finds_each_slides_newest_scan_on_the_index(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'plan.db'}")
    db.create_schema()
    stmt = worklist_statement(WorklistFilter(limit=50))
    sql = str(stmt.compile(db.engine, compile_kwargs={"literal_binds": True}))
    with db.session() as s:
        plan = [row[-1] for row in s.execute(text(f"EXPLAIN QUERY PLAN {sql}"))]
    db.dispose()
    assert "SCAN scans USING COVERING INDEX ix_scans_slide_id_id" in plan, plan
    assert not [
        step
        for step in plan
        if step.startswith("SCAN")
        and "INDEX" not in step
        and step not in ("SCAN newest", "SCAN ranked")
    ], plan


# --- the command ------------------------------------------------------------------------


def test_the_worklist_table_shows_the_ranked_slides(made, monkeypatch) -> None:
    from worker.cli import console

    monkeypatch.setattr(console.out, "width", 300)
    result = _invoke(made, *WINDOW)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    ours = [lines[str(made.scans[n])] for n in RANKED]
    order = [result.stdout.index(line) for line in ours]
    assert order == sorted(order)
    assert "B-[1]" in lines[str(made.scans["nilm"])]  # user text is not markup
    assert BLURRED in lines[str(made.scans["hsil"])]
    assert "0.970" in lines[str(made.scans["hsil"])]
    assert "2001-03-05" in lines[str(made.scans["lsil"])]


def test_json_is_a_list_of_the_rows(made) -> None:
    result = _invoke(made, *WINDOW, "--json", "--category", "hsil", "--category", "Unsatisfactory")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert made.names(rows) == ["unsat", "hsil"]
    assert rows[-1]["score"] == 0.97 and rows[-1]["qc_flags"] == [BLURRED]
    assert rows[-1]["finished_at"] == "2001-03-04T06:00:00+00:00"


def test_csv_streams_a_header_and_one_row_per_slide(made) -> None:
    result = _invoke(made, *WINDOW, "--csv", "--status", "done", "--adequacy", "satisfactory")
    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert tuple(reader.fieldnames) == WORKLIST_COLUMNS
    rows = [{**r, "scan_id": int(r["scan_id"])} for r in reader]
    assert made.names(rows) == ["hsil", "lsil", "nilm"]
    assert rows[0]["qc_flags"] == BLURRED and rows[0]["score"] == "0.97"


def test_one_slide_resolves_a_path_to_its_newest_finished_scan(made) -> None:
    result = _invoke(made, made.paths["rescanned"], "--json")
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    assert (detail["scan_id"], detail["category"], detail["score"]) == (
        made.older_scan,
        "HSIL",
        0.99,
    )
    result = _invoke(made, str(made.scans["failed"]), "--json")
    detail = json.loads(result.stdout)
    assert (detail["status"], detail["error"]) == ("failed", "the slide file vanished.")
    assert detail["category"] is None and detail["top_cells"] == []


def test_one_slide_prints_its_result(made, monkeypatch) -> None:
    from worker.cli import console

    monkeypatch.setattr(console.out, "width", 300)
    result = _invoke(made, str(made.scans["hsil"]))
    assert result.exit_code == 0, result.output
    assert made.paths["hsil"] in result.stdout
    assert "category HSIL   P(abnormal) 0.970" in result.stdout
    assert f"QC: {BLURRED}" in result.stdout
    assert "cells per class" in result.stdout


@pytest.mark.parametrize(
    "args, sentence",
    [
        (["999999999"], "no scan or slide matches '999999999'"),
        (["/slides/nowhere.svs"], "no slide matches '/slides/nowhere.svs'"),
        (["--since", "last tuesday"], "--since takes YYYY-MM-DD"),
        (["--until", "2001-02-30"], "--until takes YYYY-MM-DD"),
        (["--since", "2001-03-05", "--until", "2001-03-01"], "is not before --until"),
        (["--category", "HSL"], "--category takes NILM, ASC-US"),
        (["--json", "--csv"], "give --json or --csv, not both"),
    ],
)
def test_mistakes_end_in_one_sentence(made, args: list[str], sentence: str) -> None:
    result = _invoke(made, *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("papscan: "), result.stderr
    assert sentence in lines[0]


def test_a_slide_without_a_finished_scan_or_with_filters_is_refused(made) -> None:
    for args, sentence in (
        ([made.paths["running"]], "has no finished scan (its latest scan"),
        ([made.paths["hsil"], "--status", "done"], "--status only works on the worklist"),
        ([made.paths["hsil"], "--csv"], "--csv only works on the worklist"),
    ):
        result = _invoke(made, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.stderr
        assert sentence in lines[0]


# --- a scanned slide --------------------------------------------------------------------


@pytest.mark.slow
def test_a_scanned_slide_in_the_worklist_and_in_full(tmp_path: Path, monkeypatch) -> None:
    from engines.repository import ModelRepository, default_repository_path
    from train.synth import write_synthetic_slide
    from worker.cli import console
    from worker.lifecycle import scan_file

    path = tmp_path / "small.tiff"
    write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=3, cells=60)
    url = f"sqlite:///{tmp_path / 'results.db'}"
    report = scan_file(path, Database(url), ModelRepository(default_repository_path()))
    summary = report.summary

    result = CliRunner().invoke(app, ["results", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["scan_id"], row["slide_path"], row["status"]) == (
        report.scan_id,
        report.path,
        "done",
    )
    assert (row["category"], row["score"]) == (summary.category, summary.score)
    assert row["qc_flags"] == summary.qc["flags"]

    result = CliRunner().invoke(app, ["results", "--db", url, str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["scan_id"] == report.scan_id and d["class_counts"] == summary.class_counts
    assert d["adequacy"] == (
        "satisfactory" if summary.call.adequacy.satisfactory else "unsatisfactory"
    )
    assert d["squamous_estimate"] == summary.call.adequacy.squamous_estimate
    assert d["notes"] == summary.call.notes
    assert d["operating_point"] == summary.call.operating_point
    assert d["qc"]["rois"] == summary.qc["rois"]
    assert d["model_versions"] == report.model_versions
    assert set(d["model_sha256"]) == set(report.model_versions)
    assert set(d["stage_timings_ms"]) >= {"plan", "detect", "total"}
    assert [(c["review_rank"], c["x"], c["y"], c["label"]) for c in d["top_cells"]] == [
        (c.review_rank or i, c.x, c.y, c.label) for i, c in enumerate(summary.top_cells, 1)
    ]

    monkeypatch.setattr(console.out, "width", 300)
    result = CliRunner().invoke(app, ["results", "--db", url, str(report.scan_id)])
    assert result.exit_code == 0, result.output
    assert f"category {summary.category}" in result.stdout
    assert "cells to review first" in result.stdout and "stage timings" in result.stdout
    assert d["model_sha256"]["cell_detector"] in result.stdout
