"""bench/api_speed.py at a tiny size on the real PostgreSQL: the rows it loads, and one whole
run (papscan serve, HTTP, the direct-SQL baseline, DeepZoom tiles) whose table has every
row. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from rich.console import Console

from tests.conftest import PG_URL, postgres_missing

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_api_speed():
    # Loaded from its file: bench/ is not a package, and tests/bench must not shadow it.
    spec = importlib.util.spec_from_file_location("papscan_bench_api_speed", BENCH / "api_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


api_speed = _load_api_speed()


@pytest.fixture(scope="module")
def server_url() -> str:
    """PG_URL, once its server answers (skipped where it does not; failed under CI)."""
    try:
        psycopg.connect(api_speed._dsn(PG_URL), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        postgres_missing(exc)
    return PG_URL


def _name() -> str:
    return f"papscan_test_{uuid.uuid4().hex[:12]}"


def test_loading_writes_the_slides_scans_results_and_cells(server_url: str) -> None:
    with api_speed.bench_database(server_url, _name()) as url:
        api_speed.create_schema(url)
        loaded = api_speed.load_slides(url, 50)
        api_speed.load_cells(url, loaded, 5000)
        with psycopg.connect(api_speed._dsn(url)) as conn:

            def count(sql: str) -> int:
                return conn.execute(sql).fetchone()[0]

            assert count("SELECT count(*) FROM slides") == loaded.slides == 50
            assert count("SELECT count(DISTINCT slide_id) FROM scans") == 50
            assert count("SELECT count(*) FROM scans") == loaded.scans >= 50
            done = count("SELECT count(*) FROM scans WHERE status = 'done'")
            assert count("SELECT count(*) FROM slide_results") == loaded.results == done
            assert count("SELECT count(*) FROM slide_reviews") == loaded.reviews
            assert count("SELECT count(*) FROM slide_results WHERE qc_flags IS NULL") == 0
            assert count("SELECT count(*) FROM cells") == loaded.cells == 5000
            assert sum(loaded.cell_scans.values()) == 5000
            assert loaded.cell_scans[loaded.big_scan_id] == 1000  # a fifth
            # Every cell's ROI belongs to the cell's scan; ranks 1..100 once per scan.
            assert count("SELECT count(*) FROM cells c JOIN rois r ON r.id = c.roi_id") == 5000
            assert count("SELECT count(*) FROM cells c JOIN rois r ON r.id = c.roi_id"
                         " WHERE r.scan_id <> c.scan_id") == 0  # fmt: skip
            ranks = conn.execute(
                "SELECT scan_id, count(*), min(review_rank), max(review_rank) FROM cells"
                " WHERE review_rank IS NOT NULL GROUP BY scan_id"
            ).fetchall()
            assert {r[0] for r in ranks} == set(loaded.cell_scans)
            assert all(r[1:] == (100, 1, 100) for r in ranks)
            # The next ids follow the loaded ones (the API can still add rows).
            assert count("SELECT nextval(pg_get_serial_sequence('scans', 'id'))") > loaded.scans
    with psycopg.connect(api_speed._dsn(server_url)) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (url.rsplit("/", 1)[1],)
        ).fetchone() == (0,)  # dropped


def test_a_tiny_run_prints_a_row_for_every_query(server_url: str, monkeypatch) -> None:
    console = Console(record=True, width=200)
    monkeypatch.setattr(api_speed, "console", console)
    result = api_speed.run(server_url, 50, 5000, 2, tiles=4, tile_slide_px=1024, db_name=_name())
    text = console.export_text()
    assert result.loaded.slides == 50 and result.loaded.cells == 5000
    queries = api_speed.worklist_queries(result.loaded) + api_speed.cell_queries(result.loaded)
    assert [t.query.name for t in result.timings] == [q.name for q in queries]
    for t in result.timings:
        assert f"{t.query.group}: {t.query.name}" in text
        assert len(t.api_ms) == len(t.sql_ms) == 2 and t.rows >= 0
    # The second baseline (before migration 0007) for every query.
    assert all(t.before_ms for t in result.timings)
    worklist = {t.query.name: t.rows for t in result.timings if t.query.group == "worklist"}
    assert worklist["first page (default 500)"] == 51  # and the DeepZoom slide
    assert worklist["page 3 (offset 1000)"] == 0
    assert worklist["top 100"] == 51
    assert result.tiles is not None and result.tiles.tiles == 4
    assert "deepzoom: tile, first touch" in text
    assert "deepzoom: tile, cached (2nd request)" in text
    for header in api_speed.ROW_HEADERS:
        assert header in text
