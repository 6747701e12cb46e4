"""Review decisions over real HTTP (uvicorn in a thread) on SQLite and PostgreSQL: a
cytologist's call on a scan and its cells, stored beside the AI's result; the history;
the worklist's `reviewed` flag and filter in the API and `papscan results`.

The hand-made rows live in April 2002 with fresh fingerprints, and every check reads
only its own rows, since the PostgreSQL database is shared by the whole test session.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import delete, func, select
from typer.testing import CliRunner

from tests.worker.conftest import one_sentence, serve_app
from worker.cli.main import app as cli_app
from worker.db.models import Cell, CellReview, Roi, Scan, Slide, SlideResult, SlideReview
from worker.db.session import Database
from worker.pipeline.slide_call import UNSATISFACTORY

APRIL = datetime(2002, 4, 1, tzinfo=UTC)


@dataclass
class Served:
    url: str
    db: Database
    token_name: str
    client: httpx.Client


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory) -> Iterator[Served]:
    from worker.api import create_app
    from worker.api.tokens import create_token

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('reviews') / 'results.db'}"
        db = Database(url)
        db.create_schema()
    else:
        url = request.getfixturevalue("pg_url")
        db = request.getfixturevalue("pg_db")
    name = f"dr-{uuid.uuid4().hex[:8]}"
    with db.transaction() as s:
        token = create_token(s, name)
    base, server, thread = serve_app(create_app(db, broker_url="redis://127.0.0.1:1/0"))
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        yield Served(url, db, name, client)
    server.should_exit = True
    thread.join(10)
    if request.param == "sqlite":
        db.dispose()


def _slide_with_scan(
    db: Database, status: str = "done", *, day: int = 1, category: str = "HSIL"
) -> tuple[int, list[int]]:
    """A new slide with one scan (with a result and two cells when done): (scan, cells)."""
    tag = uuid.uuid4().hex[:10]
    when = APRIL + timedelta(days=day - 1, hours=6)
    with db.transaction() as s:
        slide = Slide(
            fingerprint=f"review-{tag}",
            path=f"/slides/review-{tag}.svs",
            vendor="aperio",
            width=4096,
            height=4096,
            mpp_x=0.25,
            mpp_y=0.25,
        )
        s.add(slide)
        s.flush()
        done = status == "done"
        scan = Scan(
            slide_id=slide.id,
            status=status,
            model_versions={"cell_detector": 1},
            created_at=when - timedelta(hours=1),
            finished_at=when if done else None,
        )
        s.add(scan)
        s.flush()
        cells: list[int] = []
        if done:
            s.add(
                SlideResult(
                    scan_id=scan.id,
                    category=category,
                    score=0.9,
                    cell_count=2,
                    roi_count=1,
                    class_counts={"HSIL": 2},
                    adequacy="satisfactory",
                )
            )
            roi = Roi(scan_id=scan.id, index=0, x=0, y=0, w=512, h=512, label="x", probs={},
                      cell_count=2)  # fmt: skip
            s.add(roi)
            s.flush()
            for i in range(2):
                cell = Cell(scan_id=scan.id, roi_id=roi.id, x=10 * i, y=10, w=48, h=48,
                            detection_score=0.9, label="HSIL", score=0.8, suspicion=0.95,
                            probs={"HSIL": 0.8}, attention=0.5, review_rank=i + 1)  # fmt: skip
                s.add(cell)
                s.flush()
                cells.append(cell.id)
        return scan.id, cells


# --- decisions on a scan ----------------------------------------------------------------


def test_a_decision_is_stored_beside_the_ai_result_and_kept_in_history(served: Served) -> None:
    scan_id, _ = _slide_with_scan(served.db)
    before = served.client.get(f"/api/scans/{scan_id}").json()

    first = served.client.post(
        f"/api/scans/{scan_id}/review",
        json={"agrees": False, "category": "lsil", "note": "Koilocytes, no HSIL cells."},
    )
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["scan_id"] == scan_id and body["reviewer"] == served.token_name
    assert (body["agrees"], body["category"], body["note"]) == (
        False,
        "LSIL",
        "Koilocytes, no HSIL cells.",
    )
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None

    second = served.client.post(f"/api/scans/{scan_id}/review", json={"agrees": True})
    assert second.status_code == 201, second.text
    unsat = served.client.post(
        f"/api/scans/{scan_id}/review",
        json={"agrees": False, "category": "Unsatisfactory"},
    )
    assert unsat.json()["category"] == UNSATISFACTORY

    history = served.client.get(f"/api/scans/{scan_id}/reviews")
    assert history.status_code == 200
    h = history.json()
    ids = [r["id"] for r in h["reviews"]]
    assert ids == [unsat.json()["id"], second.json()["id"], body["id"]]  # newest first
    assert h["current"]["id"] == unsat.json()["id"]
    assert h["cell_reviews"] == []

    # The AI's result is untouched, in the API and in the database.
    after = served.client.get(f"/api/scans/{scan_id}").json()
    assert (after["category"], after["score"]) == (before["category"], before["score"])
    assert after["category"] == "HSIL"
    with served.db.session() as s:
        assert s.get(SlideResult, scan_id).category == "HSIL"
        assert s.scalar(select(func.count()).where(SlideReview.scan_id == scan_id)) == 3


def test_a_scan_without_reviews_has_an_empty_history(served: Served) -> None:
    scan_id, _ = _slide_with_scan(served.db)
    h = served.client.get(f"/api/scans/{scan_id}/reviews").json()
    assert h == {"scan_id": scan_id, "current": None, "reviews": [], "cell_reviews": []}


def test_bad_decisions_are_refused_inone_sentence(served: Served) -> None:
    scan_id, _ = _slide_with_scan(served.db)
    queued, _ = _slide_with_scan(served.db, "queued")
    missing = 2**31 - 1
    assert "does not exist" in one_sentence(
        served.client.post(f"/api/scans/{missing}/review", json={"agrees": True}), 404
    )
    one_sentence(served.client.get(f"/api/scans/{missing}/reviews"), 404)
    assert "not done" in one_sentence(
        served.client.post(f"/api/scans/{queued}/review", json={"agrees": True}), 409
    )
    for body in (
        {"agrees": True, "category": "CIN2"},
        {"agrees": True, "category": ""},
        {"category": "HSIL"},
        {"agrees": "perhaps"},
        {"agrees": True, "extra": 1},
        {"agrees": True, "note": "x" * 10_001},
    ):
        one_sentence(served.client.post(f"/api/scans/{scan_id}/review", json=body), 422)
    one_sentence(served.client.post(f"/api/scans/{scan_id}/review", content=b"{"), 422)
    one_sentence(served.client.post("/api/scans/0/review", json={"agrees": True}), 422)
    with served.db.session() as s:
        assert s.scalar(select(func.count()).where(SlideReview.scan_id == scan_id)) == 0
        assert s.scalar(select(func.count()).where(SlideReview.scan_id == queued)) == 0


def test_review_routes_need_a_token(served: Served) -> None:
    scan_id, cells = _slide_with_scan(served.db)
    base = str(served.client.base_url)
    for method, route, body in (
        ("POST", f"/api/scans/{scan_id}/review", {"agrees": True}),
        ("GET", f"/api/scans/{scan_id}/reviews", None),
        ("POST", f"/api/scans/{scan_id}/cells/{cells[0]}/review", {"verdict": "true_positive"}),
    ):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = httpx.request(method, base.rstrip("/") + route, json=body, headers=headers)
            one_sentence(r, 401)
    with served.db.session() as s:
        assert s.scalar(select(func.count()).where(SlideReview.scan_id == scan_id)) == 0


def test_openapi_lists_the_review_routes(served: Served) -> None:
    paths = served.client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/api/scans/{scan_id}/review"]
    assert "get" in paths["/api/scans/{scan_id}/reviews"]
    assert "post" in paths["/api/scans/{scan_id}/cells/{cell_id}/review"]


# --- verdicts on cells ------------------------------------------------------------------


def test_cells_are_marked_true_or_false_positive(served: Served) -> None:
    scan_id, cells = _slide_with_scan(served.db)
    other_scan, other_cells = _slide_with_scan(served.db)
    tp = served.client.post(
        f"/api/scans/{scan_id}/cells/{cells[0]}/review", json={"verdict": "true_positive"}
    )
    assert tp.status_code == 201, tp.text
    assert tp.json()["reviewer"] == served.token_name
    assert (tp.json()["cell_id"], tp.json()["scan_id"]) == (cells[0], scan_id)
    fp = served.client.post(
        f"/api/scans/{scan_id}/cells/{cells[1]}/review", json={"verdict": "false_positive"}
    )
    assert fp.status_code == 201, fp.text

    h = served.client.get(f"/api/scans/{scan_id}/reviews").json()
    assert [(c["cell_id"], c["verdict"]) for c in h["cell_reviews"]] == [
        (cells[1], "false_positive"),
        (cells[0], "true_positive"),
    ]
    assert h["reviews"] == []  # a cell verdict is not a decision on the slide

    # A cell of another scan, or none at all, is not found; bad verdicts are a 422.
    assert "has no cell" in one_sentence(
        served.client.post(
            f"/api/scans/{scan_id}/cells/{other_cells[0]}/review",
            json={"verdict": "true_positive"},
        ),
        404,
    )
    one_sentence(
        served.client.post(
            f"/api/scans/{scan_id}/cells/{2**62}/review", json={"verdict": "true_positive"}
        ),
        404,
    )
    one_sentence(
        served.client.post(
            f"/api/scans/{2**31 - 1}/cells/{cells[0]}/review", json={"verdict": "true_positive"}
        ),
        404,
    )
    for body in ({"verdict": "maybe"}, {}, {"verdict": "true_positive", "x": 1}):
        one_sentence(
            served.client.post(f"/api/scans/{scan_id}/cells/{cells[0]}/review", json=body), 422
        )
    with served.db.session() as s:
        assert s.scalar(select(func.count()).where(CellReview.scan_id == other_scan)) == 0
        assert s.scalar(select(func.count()).where(CellReview.scan_id == scan_id)) == 2
        assert s.get(Cell, cells[1]).label == "HSIL"  # the AI's call is kept


def test_deleting_a_scan_deletes_its_reviews(served: Served) -> None:
    from worker.db import reviews

    scan_id, cells = _slide_with_scan(served.db)
    with served.db.transaction() as s:
        reviews.add_slide_review(s, scan_id, "dr-a", agrees=True)
        reviews.add_cell_review(s, scan_id, cells[0], "dr-a", "true_positive")
    with served.db.transaction() as s:
        s.execute(delete(Scan).where(Scan.id == scan_id))
    with served.db.session() as s:
        assert s.scalar(select(func.count()).where(SlideReview.scan_id == scan_id)) == 0
        assert s.scalar(select(func.count()).where(CellReview.scan_id == scan_id)) == 0


def test_the_db_functions_check_their_inputs(served: Served) -> None:
    from worker.db import reviews

    scan_id, cells = _slide_with_scan(served.db)
    with served.db.session() as s:
        with pytest.raises(ValueError, match="category"):
            reviews.add_slide_review(s, scan_id, "dr-a", agrees=False, category="hsil")
        with pytest.raises(ValueError, match="reviewer"):
            reviews.add_slide_review(s, scan_id, "  ", agrees=True)
        with pytest.raises(ValueError, match="verdict"):
            reviews.add_cell_review(s, scan_id, cells[0], "dr-a", "unsure")
        with pytest.raises(reviews.ScanNotFoundError):
            reviews.slide_reviews(s, 2**31 - 1)
        s.rollback()


# --- the worklist -----------------------------------------------------------------------


def _window(day: int) -> tuple[str, str]:
    start = (APRIL + timedelta(days=day - 1)).date().isoformat()
    return start, start


def test_the_worklist_says_which_slides_are_reviewed_and_filters_on_it(served: Served) -> None:
    day = 10
    reviewed, _ = _slide_with_scan(served.db, day=day)
    open_, _ = _slide_with_scan(served.db, day=day, category="NILM")
    queued, _ = _slide_with_scan(served.db, "queued", day=day)
    # A slide reviewed on an older scan, then scanned again: its newest scan is not reviewed.
    rescanned, _ = _slide_with_scan(served.db, day=day)
    with served.db.transaction() as s:
        slide_id = s.get(Scan, rescanned).slide_id
        s.add(
            Scan(
                slide_id=slide_id,
                status="queued",
                model_versions={},
                created_at=APRIL + timedelta(days=day - 1, hours=7),
            )
        )
    ours = {reviewed: "reviewed", open_: "open", queued: "queued"}
    for scan_id in (reviewed, rescanned):
        r = served.client.post(f"/api/scans/{scan_id}/review", json={"agrees": True})
        assert r.status_code == 201, r.text
    with served.db.session() as s:
        newest = s.scalar(select(func.max(Scan.id)).where(Scan.slide_id == slide_id))
    ours[newest] = "rescanned"

    since, until = _window(day)
    window = {"since": since, "until": until}

    def api(**params) -> dict[str, bool]:
        r = served.client.get("/api/worklist", params={**window, **params})
        assert r.status_code == 200, r.text
        return {ours[row["scan_id"]]: row["reviewed"] for row in r.json() if row["scan_id"] in ours}

    assert api() == {"reviewed": True, "open": False, "queued": False, "rescanned": False}
    assert api(reviewed="true") == {"reviewed": True}
    assert api(reviewed="false") == {"open": False, "queued": False, "rescanned": False}
    one_sentence(served.client.get("/api/worklist", params={"reviewed": "perhaps"}), 422)

    def cli(*args: str) -> str:
        result = CliRunner().invoke(
            cli_app,
            ["results", "--db", served.url, "--since", since, "--until", until, *args],
        )
        assert result.exit_code == 0, result.output
        return result.output

    def cli_json(*args: str) -> dict[str, bool]:
        rows = json.loads(cli("--json", *args))
        return {ours[r["scan_id"]]: r["reviewed"] for r in rows if r["scan_id"] in ours}

    assert cli_json() == api()
    assert cli_json("--reviewed") == {"reviewed": True}
    assert cli_json("--not-reviewed") == {"open": False, "queued": False, "rescanned": False}
    reader = csv.DictReader(io.StringIO(cli("--csv", "--reviewed")))
    assert "reviewed" in reader.fieldnames
    got = {ours[int(r["scan_id"])]: r["reviewed"] for r in reader if int(r["scan_id"]) in ours}
    assert got == {"reviewed": "True"}


def test_the_cli_table_shows_the_reviewed_column(served: Served, monkeypatch) -> None:
    from worker.cli import console

    # The console's width was fixed when it was made; a wide one shows every column.
    monkeypatch.setattr(console.out, "_width", 250)
    scan_id, _ = _slide_with_scan(served.db, day=25)
    assert served.client.post(f"/api/scans/{scan_id}/review", json={"agrees": True}).is_success
    result = CliRunner().invoke(
        cli_app, ["results", "--db", served.url, "--since", "2002-04-25", "--until",
                  "2002-04-25", "--reviewed"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.split()[:1] == [str(scan_id)]]
    assert "reviewed" in result.output and len(lines) == 1 and "yes" in lines[0]


def test_the_filter_is_refused_with_one_slide(served: Served) -> None:
    scan_id, _ = _slide_with_scan(served.db)
    for flag in ("--reviewed", "--not-reviewed"):
        result = CliRunner().invoke(cli_app, ["results", "--db", served.url, str(scan_id), flag])
        assert result.exit_code != 0
        assert flag in result.output
