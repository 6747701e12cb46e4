"""The scan row as a job: claims, fenced writes, requeues (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.db import jobs, queries
from worker.db.models import Scan
from worker.db.session import Database
from worker.errors import ScanStateError, ScanSupersededError
from worker.pipeline.records import CellResult, RoiResult

VERSIONS = {"cell_detector": 1, "cell_classifier": 1, "roi_classifier": 1}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_db")
        return
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.create_schema()
    yield database
    database.dispose()


def _queued_scan(db: Database, versions: dict = VERSIONS) -> tuple[int, int]:
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s,
            fingerprint=uuid.uuid4().hex,
            path="/slides/x.svs",
            vendor="aperio",
            width=4096,
            height=4096,
            mpp_x=0.5,
            mpp_y=0.5,
        )
        return slide.id, queries.create_scan(s, slide.id, versions).id


def _chunk(index: int) -> tuple[list[RoiResult], list[CellResult]]:
    probs = {"NILM": 0.9, "LSIL": 0.05, "HSIL": 0.05}
    roi = RoiResult(index, 512 * index, 0, 512, 512, "NILM", probs, 1)
    cell = CellResult(index, 512 * index + 10, 10, 30, 30, 0.9, "NILM", 0.9, probs, 0.1, 1.0)
    return [roi], [cell]


def _write(db: Database, scan_id: int, attempt: int, index: int) -> None:
    with db.session() as s, s.begin():
        jobs.hold_scan(s, scan_id, attempt)
        queries.write_chunk(s, scan_id, *_chunk(index))


def _rows(db: Database, scan_id: int) -> int:
    with db.session() as s:
        return len(list(queries.iter_cells(s, scan_id)))


def test_a_second_claim_fences_off_the_first_and_clears_its_rows(db: Database) -> None:
    _, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        first = jobs.claim_scan(s, scan_id, "w1")
    _write(db, scan_id, first.attempt, 0)
    with db.session() as s, s.begin():
        second = jobs.claim_scan(s, scan_id, "w2")  # the job delivered again
    assert (first.attempt, second.attempt) == (1, 2)
    assert _rows(db, scan_id) == 0  # the first attempt's partial rows are gone
    with pytest.raises(ScanSupersededError, match="claimed by w2"):
        _write(db, scan_id, first.attempt, 1)
    _write(db, scan_id, second.attempt, 0)
    assert _rows(db, scan_id) == 1


def test_finished_or_cancelled_scans_are_not_claimed(db: Database) -> None:
    _, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        claim = jobs.claim_scan(s, scan_id, "w1")
    with db.session() as s, s.begin():
        queries.cancel_scan(s, scan_id)
    with pytest.raises(ScanSupersededError, match="cancelled"):
        _write(db, scan_id, claim.attempt, 0)
    with db.session() as s, s.begin():
        assert jobs.claim_scan(s, scan_id, "w2") is None
        assert jobs.claim_scan(s, 10**9, "w2") is None


def test_requeue_and_equivalent_scans(db: Database) -> None:
    slide_id, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        assert jobs.find_equivalent_scan(s, slide_id, VERSIONS).id == scan_id
        assert jobs.find_equivalent_scan(s, slide_id, {**VERSIONS, "cell_detector": 2}) is None
        claim = jobs.claim_scan(s, scan_id, "w1")
        assert jobs.give_up_scan(s, scan_id, "the slide is corrupt.", claim.attempt)
        assert jobs.find_equivalent_scan(s, slide_id, VERSIONS) is None  # failed: resubmit
        scan = jobs.requeue_scan(s, scan_id)
        assert (scan.status, scan.error) == ("queued", None)
        scan.status = "done"
    with db.session() as s, s.begin(), pytest.raises(ScanStateError, match="submit --force"):
        jobs.requeue_scan(s, scan_id)


def test_running_scans_report_progress_and_eta(db: Database) -> None:
    _, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        claim = jobs.claim_scan(s, scan_id, "w1")
        jobs.plan_scan(s, scan_id, claim.attempt, 4)
    _write(db, scan_id, claim.attempt, 0)
    with db.session() as s:
        running = [r for r in jobs.running_scans(s) if r.scan_id == scan_id]
        scan = s.get(Scan, scan_id)
    assert running and running[0].progress == 0.25 and running[0].worker == "w1"
    assert running[0].eta_s is not None and running[0].eta_s >= 0
    assert scan.rois_done == 1


# --- one delivery of a job, in this process (real models, SQLite) ----------------------


@pytest.fixture(scope="module")
def models():
    from engines.repository import ModelRepository, default_repository_path
    from worker.pipeline.scan import ScanModels

    loaded = ScanModels.load(ModelRepository(default_repository_path()))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("slides") / "small.tiff"
    write_synthetic_slide(path, width=1024, height=1024, mpp=0.5, seed=5, cells=20)
    return path


def _runtime(db: Database, models, soft_limit_s: float = 3600.0):
    from worker.pipeline.scan import ScanOptions
    from worker.scan_job import ScanRuntime

    return ScanRuntime(db, models, ScanOptions(chunk_rois=2), "here", soft_limit_s)


def _submitted(db: Database, path: Path, fingerprint: str | None = None) -> int:
    from worker.wsi.slide import open_slide

    with open_slide(path) as slide, db.session() as s, s.begin():
        info = slide.info
        if fingerprint is not None:
            info = dataclasses.replace(info, fingerprint=fingerprint)
        row = queries.record_slide(s, info)
        return queries.create_scan(s, row.id, VERSIONS).id


def test_a_delivery_scans_and_a_duplicate_delivery_is_skipped(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.scan_job import Outcome, run_queued_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide)
    assert run_queued_scan(_runtime(db, models), scan_id) is Outcome.DONE
    assert run_queued_scan(_runtime(db, models), scan_id) is Outcome.SKIPPED
    with db.session() as s:
        scan = s.get(Scan, scan_id)
        assert (scan.status, scan.attempt, scan.worker) == ("done", 1, "here")
        assert scan.rois_done == scan.rois_planned > 0
        assert scan.model_versions == models.versions()


def test_the_soft_time_limit_fails_the_scan_without_rows(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.scan_job import Outcome, run_queued_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide)
    assert run_queued_scan(_runtime(db, models, soft_limit_s=0.0), scan_id) is Outcome.FAILED
    with db.session() as s:
        scan = s.get(Scan, scan_id)
        assert scan.status == "failed" and "soft time limit" in scan.error
    assert _rows(db, scan_id) == 0


def test_a_file_replaced_after_submit_fails_its_scan(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.scan_job import Outcome, run_queued_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide, fingerprint="another file's fingerprint")
    assert run_queued_scan(_runtime(db, models), scan_id) is Outcome.FAILED
    with db.session() as s:
        assert "fingerprint changed" in s.get(Scan, scan_id).error
