"""Results database: schema, queries and errors, on SQLite and on a real PostgreSQL.

PostgreSQL tests use the session's own database (see `pg_url` in tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text

from worker.db import queries
from worker.db.models import Base, Cell, Roi, Scan, Slide, SlideResult
from worker.db.session import Database
from worker.errors import DatabaseConfigError, DatabaseUnavailableError, TransientError
from worker.pipeline.records import CellResult, RoiResult, SlideSummary
from worker.pipeline.scan import ScanOptions
from worker.settings import SettingsError, get_settings

TABLES = {
    "slides",
    "scans",
    "rois",
    "cells",
    "slide_results",
    "api_tokens",
    "slide_reviews",
    "cell_reviews",
}


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database: a new SQLite file per test, or the session's PostgreSQL one."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_db")
        return
    database = Database(f"sqlite:///{tmp_path / 'sub' / 'papscan.db'}")
    database.create_schema()
    yield database
    database.dispose()


def _slide(db: Database, path: str = "/slides/a.svs", fingerprint: str | None = None) -> int:
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s,
            fingerprint=fingerprint or uuid.uuid4().hex,
            path=path,
            vendor="aperio",
            width=80_000,
            height=60_000,
            mpp_x=0.25,
            mpp_y=0.25,
        )
        return slide.id


def _scan(db: Database, slide_id: int, rois_planned: int = 4) -> int:
    with db.session() as s, s.begin():
        scan = queries.create_scan(s, slide_id, {"cell_detector": 1, "cell_classifier": 2})
        queries.start_scan(s, scan.id, rois_planned, worker="test")
        return scan.id


def _rois(indexes: range) -> list[RoiResult]:
    return [
        RoiResult(
            index=i,
            x=1024 * i,
            y=0,
            w=1024,
            h=1024,
            label="NILM",
            probs={"NILM": 0.9, "LSIL": 0.07, "HSIL": 0.03},
            cell_count=3,
        )
        for i in indexes
    ]


def _cells(indexes: range, per_roi: int = 3) -> list[CellResult]:
    cells = []
    for i in indexes:
        for k in range(per_roi):
            suspicion = round(0.1 * k + 0.01 * i, 4)
            cells.append(
                CellResult(
                    roi_index=i,
                    x=1024 * i + 40 * k,
                    y=100 + k,
                    w=30,
                    h=32,
                    detection_score=0.8,
                    label="HSIL" if k == per_roi - 1 else "NILM",
                    score=0.7,
                    probs={"NILM": 1 - suspicion, "LSIL": 0.0, "HSIL": suspicion},
                    suspicion=suspicion,
                    attention=1.0 / per_roi,
                )
            )
    return cells


def _count(db: Database, model: type, scan_id: int) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(model.scan_id == scan_id))


# --- schema ---------------------------------------------------------------------------


def test_schema_is_created_by_the_migration(db: Database) -> None:
    assert db.current_revision() == Database.head_revision() == "0007"
    db.create_schema()  # an up-to-date schema is left alone
    names = set(inspect(db.engine).get_table_names())
    assert names == TABLES | {"alembic_version"}
    cell_indexes = {ix["name"] for ix in inspect(db.engine).get_indexes("cells")}
    assert {
        "ix_cells_scan_id_review_rank",
        "ix_cells_scan_id_suspicion",
        "ix_cells_scan_id_label_x_y",
        "ix_cells_scan_id_id",
        "ix_cells_roi_id",
    } <= cell_indexes
    assert {ix["name"] for ix in inspect(db.engine).get_indexes("slide_results")} == {
        "ix_slide_results_score"
    }


def test_orm_metadata_matches_the_migration(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == []
    assert set(Base.metadata.tables) == TABLES


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test's own (no schema), on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    from tests.conftest import new_pg_database

    with new_pg_database() as url:
        yield url


def test_migration_0007_fills_qc_flags_from_qc_and_goes_back(empty_url: str) -> None:
    from alembic import command

    from worker.db.session import alembic_config

    db = Database(empty_url)
    with db.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0006")
        conn.execute(
            text(
                "INSERT INTO slides (id, fingerprint, path, vendor, width, height, mpp_x, mpp_y)"
                " VALUES (1, 'f', '/s.svs', 'aperio', 10, 10, 0.5, 0.5)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO scans (id, slide_id, status, priority, model_versions, rois_done)"
                " VALUES (1, 1, 'done', 'routine', '{}', 0), (2, 1, 'done', 'routine', '{}', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO slide_results (scan_id, category, score, cell_count, roi_count,"
                " class_counts, qc) VALUES"
                " (1, 'NILM', 0.1, 1, 1, '{}', :qc), (2, 'NILM', 0.1, 1, 1, '{}', NULL)"
            ),
            {"qc": '{"flags": ["focus", "colour"], "roi_sharpness": [1.5, 2.5]}'},
        )
    db.create_schema()
    with db.session() as s:
        flags = dict(s.execute(select(SlideResult.scan_id, SlideResult.qc_flags)).all())
    assert flags == {1: ["focus", "colour"], 2: None}
    assert "ix_cells_scan_id_id" in {ix["name"] for ix in inspect(db.engine).get_indexes("cells")}
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0006")
    columns = {c["name"] for c in inspect(db.engine).get_columns("slide_results")}
    assert "qc_flags" not in columns and "qc" in columns
    db.dispose()


def test_sqlite_runs_in_wal_with_foreign_keys_and_makes_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "papscan.db"
    db = Database(f"sqlite:///{path}")
    assert not path.parent.exists()  # nothing happens until first use
    db.check()
    assert path.parent.is_dir()
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()


# --- writes ---------------------------------------------------------------------------


def test_upsert_slide_is_idempotent(db: Database) -> None:
    fingerprint = uuid.uuid4().hex
    first = _slide(db, "/old/place.svs", fingerprint)
    with db.session() as s, s.begin():
        queries.upsert_slide(
            s, fingerprint=fingerprint, path="/old/place.svs", vendor="aperio",
            width=1, height=1, mpp_x=0.25, mpp_y=0.25, barcode="BC-1",
        )  # fmt: skip
    second = _slide(db, "/new/place.svs", fingerprint)
    assert first == second
    with db.session() as s:
        rows = s.scalars(select(Slide).where(Slide.fingerprint == fingerprint)).all()
    assert len(rows) == 1
    assert rows[0].path == "/new/place.svs"
    assert rows[0].barcode == "BC-1"  # kept when the new call gives none
    assert rows[0].width == 80_000  # the first record's fields stay


def test_write_chunk_inserts_rows_and_maps_rois(db: Database) -> None:
    scan_id = _scan(db, _slide(db))
    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, _rois(range(0, 2)), _cells(range(0, 2)))
    with db.session() as s, s.begin():
        # a chunk may carry cells of an ROI written by an earlier chunk
        late_cell = _cells(range(0, 1), per_roi=4)[-1]
        queries.write_chunk(s, scan_id, _rois(range(2, 4)), _cells(range(2, 4)) + [late_cell])
    assert _count(db, Roi, scan_id) == 4
    assert _count(db, Cell, scan_id) == 13
    with db.session() as s:
        assert queries.get_scan(s, scan_id).rois_done == 4
        pairs = s.execute(
            select(Roi.index, Cell.x)
            .join(Roi, Cell.roi_id == Roi.id)
            .where(Cell.scan_id == scan_id)
        ).all()
    assert all(x // 1024 == index for index, x in pairs)
    with pytest.raises(ValueError, match="ROI indexes \\[99\\]"), db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, [], [_cells(range(99, 100))[0]])
    assert _count(db, Cell, scan_id) == 13  # the failed chunk rolled back


def test_clear_scan_rows_then_rewrite_gives_no_duplicates(db: Database) -> None:
    scan_id = _scan(db, _slide(db))
    for _attempt in range(2):
        with db.session() as s, s.begin():
            queries.clear_scan_rows(s, scan_id)
            queries.clear_scan_rows(s, scan_id)  # idempotent
            queries.start_scan(s, scan_id, 3)
        with db.session() as s, s.begin():
            queries.write_chunk(s, scan_id, _rois(range(3)), _cells(range(3)))
    assert _count(db, Roi, scan_id) == 3
    assert _count(db, Cell, scan_id) == 9
    with db.session() as s:
        assert queries.get_scan(s, scan_id).rois_done == 3


def test_second_scan_of_a_slide_leaves_the_first_intact(db: Database) -> None:
    path = f"/slides/{uuid.uuid4().hex}.svs"
    slide_id = _slide(db, path)
    first = _scan(db, slide_id)
    with db.session() as s, s.begin():
        queries.write_chunk(s, first, _rois(range(4)), _cells(range(4)))
        queries.finish_scan(s, first, SlideSummary("NILM", 0.1, 12, {"NILM": 8, "HSIL": 4}, 4), {})
    second = _scan(db, slide_id)
    with db.session() as s, s.begin():
        assert queries.resolve_scan(s, path).id == first  # the newest *done* scan
        queries.clear_scan_rows(s, second)
        queries.write_chunk(s, second, _rois(range(2)), _cells(range(2)))
        assert queries.latest_scan_for_slide(s, slide_id).id == second
        assert queries.latest_scan_for_slide(s, path, status="done").id == first
    first_rows = (_count(db, Roi, first), _count(db, Cell, first), _count(db, SlideResult, first))
    assert first_rows == (4, 12, 1)
    assert (_count(db, Roi, second), _count(db, Cell, second)) == (2, 6)


def test_finish_scan_writes_result_and_review_ranks(db: Database) -> None:
    fingerprint = uuid.uuid4().hex
    scan_id = _scan(db, _slide(db, fingerprint=fingerprint))
    cells = _cells(range(3))
    top = sorted(cells, key=lambda c: c.suspicion, reverse=True)[:2]
    summary = SlideSummary("HSIL", 0.92, 9, {"NILM": 6, "HSIL": 3}, 3, top_cells=top)
    for _attempt in range(2):  # finishing again replaces the result and the ranks
        with db.session() as s, s.begin():
            queries.clear_scan_rows(s, scan_id)
            queries.write_chunk(s, scan_id, _rois(range(3)), cells)
            queries.finish_scan(
                s, scan_id, summary, {"detect": 12.5, "classify": 3.0}, reader="dali-cpu"
            )
    with db.session() as s:
        ranked = s.execute(
            select(Cell.review_rank, Cell.x, Cell.y)
            .where(Cell.scan_id == scan_id, Cell.review_rank.is_not(None))
            .order_by(Cell.review_rank)
        ).all()
        info = queries.scan_summary(s, scan_id)
        assert queries.resolve_scan(s, fingerprint).id == scan_id
        assert queries.resolve_scan(s, str(scan_id)).id == scan_id
    assert [tuple(r) for r in ranked] == [(1, top[0].x, top[0].y), (2, top[1].x, top[1].y)]
    assert info["status"] == "done" and info["progress"] == 1.0
    result = (info["category"], info["score"], info["cell_count"], info["roi_count"])
    assert result == ("HSIL", 0.92, 9, 3)
    assert info["class_counts"] == {"NILM": 6, "HSIL": 3}
    assert info["stage_timings_ms"] == {"detect": 12.5, "classify": 3.0}
    assert info["model_versions"] == {"cell_detector": 1, "cell_classifier": 2}
    assert info["finished_at"] is not None and info["error"] is None
    assert info["reader"] == "dali-cpu"

    stranger = dataclasses.replace(cells[0], x=-5)
    with pytest.raises(ValueError, match="not among the stored cells"), db.session() as s:
        with s.begin():
            queries.finish_scan(s, scan_id, SlideSummary("HSIL", 0.9, 9, {}, 3, [stranger]), {})


def test_fail_scan_records_the_error(db: Database) -> None:
    path = f"/slides/{uuid.uuid4().hex}.svs"
    scan_id = _scan(db, _slide(db, path))
    with db.session() as s, s.begin():
        queries.fail_scan(s, scan_id, "the slide has no mpp.")
    with db.session() as s:
        info = queries.scan_summary(s, scan_id)
        assert info["status"] == "failed" and info["error"] == "the slide has no mpp."
        assert info["category"] is None and info["finished_at"] is not None
        with pytest.raises(queries.ScanNotFoundError, match=f"latest scan {scan_id} is failed"):
            queries.resolve_scan(s, path)
        with pytest.raises(queries.ScanNotFoundError, match="no slide matches"):
            queries.resolve_scan(s, "/nowhere/at/all.svs")
        with pytest.raises(queries.ScanNotFoundError, match="does not exist"):
            queries.get_scan(s, 10**9)


def test_deleting_a_scan_cascades_to_its_rows(db: Database) -> None:
    scan_id = _scan(db, _slide(db))
    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, _rois(range(2)), _cells(range(2)))
    with db.session() as s, s.begin():
        s.execute(delete(Scan).where(Scan.id == scan_id))
    assert (_count(db, Roi, scan_id), _count(db, Cell, scan_id)) == (0, 0)


# --- reads ----------------------------------------------------------------------------


def test_iter_cells_streams_rows_in_a_stable_order(db: Database) -> None:
    scan_id = _scan(db, _slide(db))
    cells = _cells(range(5), per_roi=7)
    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, _rois(range(5)), cells)
    with db.session() as s, s.begin():
        rows = queries.iter_cells(s, scan_id, batch_rows=4)
        assert iter(rows) is rows  # a generator, not a list
        first = [r._asdict() for r in rows]
    with db.session() as s, s.begin():
        again = [r._asdict() for r in queries.iter_cells(s, scan_id)]
    assert first == again and len(first) == len(cells)
    assert tuple(first[0]) == queries.CELL_EXPORT_COLUMNS
    for row, cell in zip(first, cells, strict=True):
        assert (row["x"], row["y"], row["w"], row["h"]) == (cell.x, cell.y, cell.w, cell.h)
        assert row["roi_index"] == cell.roi_index and row["label"] == cell.label
        assert row["suspicion"] == pytest.approx(cell.suspicion)
        assert row["review_rank"] is None


# --- errors and settings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://postgres@127.0.0.1:5999/test",
            "postgresql+psycopg://postgres@127.0.0.1:5999/test",
        ),
        (
            "postgresql+psycopg://bob:s3cret@127.0.0.1:5999/test",
            "postgresql+psycopg://bob:***@127.0.0.1:5999/test",
        ),
    ],
    ids=["no-password", "password-hidden"],
)
def test_unreachable_database_is_one_sentence(url: str, shown: str) -> None:
    db = Database(url)
    for attempt in (db.check, db.create_schema):
        with pytest.raises(DatabaseUnavailableError) as info:
            attempt()
        message = str(info.value)
        assert message == f"cannot reach the results database {shown}: connection refused."
    with pytest.raises(DatabaseUnavailableError), db.session() as s:
        s.execute(text("SELECT 1"))
    assert isinstance(info.value, TransientError)


def test_unopenable_sqlite_file_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DatabaseUnavailableError) as info:
        Database(f"sqlite:///{blocker / 'papscan.db'}").check()
    message = str(info.value)
    assert message.startswith(f"cannot open the results database sqlite:///{blocker}")
    assert "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://u:pw@host/db"], ids=["syntax", "dialect"])
def test_bad_url_is_one_sentence_and_not_retried(url: str) -> None:
    with pytest.raises(DatabaseConfigError) as info:
        Database(url)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and "pw" not in message
    assert not isinstance(info.value, TransientError)


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    settings = get_settings({})
    assert settings.db_url.startswith("sqlite:///") and settings.db_url.endswith("/papscan.db")
    assert (settings.models_dir, settings.read_ahead, settings.db_chunk_rois) == (None, 4, 32)
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    custom = get_settings(
        {"PAPSCAN_DB_URL": "sqlite:///x.db", "PAPSCAN_MODELS": str(tmp_path),
         "PAPSCAN_READ_AHEAD": "8", "PAPSCAN_DB_CHUNK_ROIS": "2"}
    )  # fmt: skip
    assert (custom.db_url, custom.models_dir, custom.read_ahead) == ("sqlite:///x.db", tmp_path, 8)
    assert custom.db_chunk_rois == 2
    options = ScanOptions.from_settings(custom, reader="openslide")
    assert (options.read_ahead, options.chunk_rois, options.reader) == (8, 2, "openslide")
    with pytest.raises(SettingsError, match="PAPSCAN_READ_AHEAD must be an integer >= 1"):
        get_settings({"PAPSCAN_READ_AHEAD": "0"})
