"""KEDA scales the workers on the query papscan defines (`OUTSTANDING_SCANS_SQL`), and
that query, run as KEDA runs it (plain SQL over a libpq connection) on real PostgreSQL
with the real schema, counts queued and running scans and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import new_pg_database
from tests.deploy.deploy_files import k8s_doc
from worker.db.models import Scan, Slide
from worker.db.session import Database

SEEDED = {"queued": 3, "running": 2, "done": 4, "failed": 2, "cancelled": 1}


def _trigger_query() -> str:
    (trigger,) = k8s_doc("ScaledObject", "papscan-worker")["spec"]["triggers"]
    return trigger["metadata"]["query"]


def test_the_keda_trigger_runs_papscans_outstanding_scans_query():
    from worker.metrics import OUTSTANDING_SCANS_SQL

    assert _trigger_query() == OUTSTANDING_SCANS_SQL


@pytest.fixture(scope="module")
def scans_db() -> Iterator[str]:
    """A PostgreSQL database of this module's own, with papscan's schema and scans in
    every status; yields its libpq URL (what KEDA's scaler is given)."""
    with new_pg_database("papscan_keda") as url:
        db = Database(url)
        db.create_schema()
        with db.transaction() as s:
            slide_no = 0
            for status, count in SEEDED.items():
                for _ in range(count):
                    slide_no += 1
                    slide = Slide(
                        fingerprint=f"fp-{slide_no}",
                        path=f"/slides/{slide_no}.svs",
                        vendor="aperio",
                        width=1000,
                        height=1000,
                        mpp_x=0.25,
                        mpp_y=0.25,
                    )
                    s.add(slide)
                    s.flush()
                    s.add(Scan(slide_id=slide.id, status=status, model_versions={}))
        db.dispose()
        yield make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_the_trigger_query_counts_queued_and_running_scans(scans_db):
    import psycopg

    with psycopg.connect(scans_db) as conn:
        (row,) = conn.execute(_trigger_query()).fetchall()
    (value,) = row
    assert isinstance(value, int), "KEDA's postgresql scaler needs a number"
    assert value == SEEDED["queued"] + SEEDED["running"]


def test_a_finished_scan_leaves_the_count(scans_db):
    """The number falls as slides finish, which is what lets KEDA scale in, and only then."""
    import psycopg

    with psycopg.connect(scans_db) as conn:
        before = conn.execute(_trigger_query()).fetchone()[0]
        conn.execute(
            "UPDATE scans SET status = 'done' WHERE id = (SELECT min(id) FROM scans"
            " WHERE status = 'running')"
        )
        after = conn.execute(_trigger_query()).fetchone()[0]
        conn.rollback()
    assert after == before - 1
