"""The scan row as a job: claims, fenced writes, requeues (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tests.worker.conftest import queued_scan
from worker.db import jobs, queries
from worker.db.models import Scan, utc_now
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
    return queued_scan(db, versions)


def _chunk(index: int) -> tuple[list[RoiResult], list[CellResult]]:
    probs = {"NILM": 0.9, "LSIL": 0.05, "HSIL": 0.05}
    roi = RoiResult(index, 512 * index, 0, 512, 512, "NILM", probs, 1)
    cell = CellResult(index, 512 * index + 10, 10, 30, 30, 0.9, "NILM", 0.9, probs, 0.1, 1.0)
    return [roi], [cell]


def _write(db: Database, scan_id: int, attempt: int, index: int) -> None:
    with db.transaction() as s:  # as the lifecycle writes a chunk
        jobs.hold_scan(s, scan_id, attempt)
        queries.write_chunk(s, scan_id, *_chunk(index))


LEASE_S = 60.0


def _after_lease() -> datetime:
    return utc_now() + timedelta(seconds=LEASE_S + 1)


def _rows(db: Database, scan_id: int) -> int:
    with db.session() as s:
        return len(list(queries.iter_cells(s, scan_id)))


def test_a_second_claim_fences_off_the_first_and_clears_its_rows(db: Database) -> None:
    _, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        first = jobs.claim_scan(s, scan_id, "w1", LEASE_S)
    _write(db, scan_id, first.attempt, 0)
    with db.session() as s, s.begin():  # delivered again while w1's lease is live: held
        assert isinstance(jobs.claim_scan(s, scan_id, "w2", LEASE_S), jobs.Held)
    assert _rows(db, scan_id) == 1
    with db.session() as s, s.begin():  # delivered again after w1 stopped renewing
        second = jobs.claim_scan(s, scan_id, "w2", LEASE_S, now=_after_lease())
    assert (first.attempt, second.attempt) == (1, 2)
    assert _rows(db, scan_id) == 0  # the first attempt's partial rows are gone
    with pytest.raises(ScanSupersededError, match="claimed by w2"):
        _write(db, scan_id, first.attempt, 1)
    _write(db, scan_id, second.attempt, 0)
    assert _rows(db, scan_id) == 1


def test_finished_or_cancelled_scans_are_not_claimed(db: Database) -> None:
    _, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        claim = jobs.claim_scan(s, scan_id, "w1", LEASE_S)
    with db.session() as s, s.begin():
        queries.cancel_scan(s, scan_id)
    with pytest.raises(ScanSupersededError, match="cancelled"):
        _write(db, scan_id, claim.attempt, 0)
    with db.session() as s, s.begin():
        assert jobs.claim_scan(s, scan_id, "w2", LEASE_S) is None
        assert jobs.claim_scan(s, 10**9, "w2", LEASE_S) is None


def test_requeue_and_equivalent_scans(db: Database) -> None:
    slide_id, scan_id = _queued_scan(db)
    with db.session() as s, s.begin():
        assert jobs.find_equivalent_scan(s, slide_id, VERSIONS).id == scan_id
        assert jobs.find_equivalent_scan(s, slide_id, {**VERSIONS, "cell_detector": 2}) is None
        claim = jobs.claim_scan(s, scan_id, "w1", LEASE_S)
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
        claim = jobs.claim_scan(s, scan_id, "w1", LEASE_S)
        jobs.plan_scan(s, scan_id, claim.attempt, 4)
    _write(db, scan_id, claim.attempt, 0)
    with db.session() as s:
        running = [r for r in jobs.running_scans(s) if r.scan_id == scan_id]
        scan = s.get(Scan, scan_id)
    assert running and running[0].progress == 0.25 and running[0].worker == "w1"
    assert running[0].eta_s is not None and running[0].eta_s >= 0
    assert scan.rois_done == 1


def test_a_worker_takes_back_its_own_lease_only_when_it_is_not_running_the_scan(
    db: Database,
) -> None:
    _, scan_id = _queued_scan(db)
    with db.transaction() as s:
        first = jobs.claim_scan(s, scan_id, "w1", LEASE_S)
    with db.transaction() as s:  # a retry reaching w1 while w1 runs the scan: held
        assert isinstance(
            jobs.claim_scan(s, scan_id, "w1", LEASE_S, running_here={scan_id}), jobs.Held
        )
    with db.transaction() as s:  # w1's own retry after a transient error: taken back
        again = jobs.claim_scan(s, scan_id, "w1", LEASE_S, running_here=set())
    assert again.attempt == first.attempt + 1


def test_chunk_writes_renew_the_lease_and_the_reaper_requeues_only_expired_ones(
    db: Database,
) -> None:
    _, live = _queued_scan(db)
    _, dead = _queued_scan(db)
    with db.transaction() as s:
        live_claim = jobs.claim_scan(s, live, "w1", 1.0)
        jobs.claim_scan(s, dead, "w2", 1.0)
    with db.transaction() as s:
        jobs.hold_scan(s, live, live_claim.attempt, lease_s=LEASE_S)  # a chunk renews it
    with db.transaction() as s:
        reaped = [i for i, _ in jobs.reap_expired_leases(s, now=utc_now() + timedelta(seconds=2))]
    assert dead in reaped and live not in reaped
    with db.session() as s:
        assert s.get(Scan, dead).status == "queued" and s.get(Scan, live).status == "running"
    with pytest.raises(ScanSupersededError):  # the dead worker's late write is fenced off
        _write(db, dead, 1, 0)


def test_two_reapers_at_once_requeue_each_scan_exactly_once(db: Database) -> None:
    expired = []
    for _ in range(6):
        _, scan_id = _queued_scan(db)
        with db.transaction() as s:
            jobs.claim_scan(s, scan_id, "gone", 1.0)
        expired.append(scan_id)
    later = utc_now() + timedelta(seconds=2)
    results: list[list[int]] = []
    barrier = threading.Barrier(3)

    def reaper() -> None:
        barrier.wait()
        with db.transaction() as s:
            results.append([i for i, _ in jobs.reap_expired_leases(s, now=later)])

    threads = [threading.Thread(target=reaper) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    mine = sorted(i for r in results for i in r if i in expired)
    assert mine == expired


def test_a_fenced_off_writer_is_superseded_never_transient(db: Database) -> None:
    """Real threads: a worker writing chunks while its scan is claimed again beneath it.

    On SQLite, a deferred transaction that read the row before the new claim committed
    would fail "database is locked" (its snapshot is stale) and be retried as transient;
    with `BEGIN IMMEDIATE` the writer waits, reads the new attempt, and stops superseded.
    """
    for _ in range(5):
        _, scan_id = _queued_scan(db)
        with db.transaction() as s:
            claim = jobs.claim_scan(s, scan_id, "w1", 0.5)
        outcome: list[BaseException] = []
        started = threading.Event()

        def writer(
            scan_id=scan_id, attempt=claim.attempt, outcome=outcome, started=started
        ) -> None:
            try:
                for index in range(10_000):
                    _write(db, scan_id, attempt, index)
                    started.set()
            except BaseException as exc:
                outcome.append(exc)
            started.set()

        thread = threading.Thread(target=writer)
        thread.start()
        started.wait(30)
        with db.transaction() as s:
            second = jobs.claim_scan(s, scan_id, "w2", LEASE_S, now=_after_lease())
        thread.join(timeout=60)
        assert second is not None and second.attempt == 2
        assert len(outcome) == 1 and isinstance(outcome[0], ScanSupersededError), outcome
        assert _rows(db, scan_id) == 0


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
    from worker.lifecycle import ScanRuntime
    from worker.pipeline.scan import ScanOptions

    return ScanRuntime(db, models, ScanOptions(chunk_rois=2), "here", soft_limit_s)


def _submitted(
    db: Database, path: Path, fingerprint: str | None = None, mpp: float | None = None
) -> int:
    from worker.wsi.slide import open_slide

    with open_slide(path, mpp=mpp) as slide, db.session() as s, s.begin():
        info = slide.info
        if fingerprint is not None:
            info = dataclasses.replace(info, fingerprint=fingerprint)
        row = queries.record_slide(s, info)
        return queries.create_scan(s, row.id, VERSIONS).id


def test_a_delivery_scans_and_a_duplicate_delivery_is_skipped(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.lifecycle import Outcome, run_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide)
    assert run_scan(_runtime(db, models), scan_id).outcome is Outcome.DONE
    assert run_scan(_runtime(db, models), scan_id).outcome is Outcome.SKIPPED
    with db.session() as s:
        scan = s.get(Scan, scan_id)
        assert (scan.status, scan.attempt, scan.worker) == ("done", 1, "here")
        assert scan.rois_done == scan.rois_planned > 0
        assert scan.model_versions == models.versions()


def test_the_soft_time_limit_fails_the_scan_without_rows(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.lifecycle import Outcome, run_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide)
    assert run_scan(_runtime(db, models, soft_limit_s=0.0), scan_id).outcome is Outcome.FAILED
    with db.session() as s:
        scan = s.get(Scan, scan_id)
        assert scan.status == "failed" and "soft time limit" in scan.error
    assert _rows(db, scan_id) == 0


def test_a_file_replaced_after_submit_fails_its_scan(
    tmp_path: Path, models, small_slide: Path
) -> None:
    from worker.lifecycle import Outcome, run_scan

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, small_slide, fingerprint="another file's fingerprint")
    assert run_scan(_runtime(db, models), scan_id).outcome is Outcome.FAILED
    with db.session() as s:
        assert "fingerprint changed" in s.get(Scan, scan_id).error


def test_a_queued_slide_without_mpp_is_scanned_at_the_mpp_it_was_submitted_with(
    tmp_path: Path, models, small_slide: Path
) -> None:
    import tifffile

    from worker.lifecycle import Outcome, run_scan
    from worker.wsi.slide import open_slide

    with open_slide(small_slide) as slide:
        rgb = np.asarray(slide.osr.read_region((0, 0), 0, (1024, 1024)).convert("RGB"))
    bare = tmp_path / "no-mpp.tiff"
    tifffile.imwrite(bare, rgb, tile=(256, 256), compression="jpeg", photometric="rgb")
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    scan_id = _submitted(db, bare, mpp=0.5)  # `papscan submit --mpp 0.5`
    run = run_scan(_runtime(db, models), scan_id)
    assert run.outcome is Outcome.DONE, run.error
    assert run.result.summary.cell_count > 0


# --- model identity: the weights' sha256 ----------------------------------------------


def test_equivalent_scans_compare_weights_not_only_version_numbers(db: Database) -> None:
    hashes = {"cell_detector": "a" * 64, "cell_classifier": "b" * 64, "roi_classifier": "c" * 64}
    slide_id, scan_id = queued_scan(db, VERSIONS, model_sha256=hashes)
    with db.transaction() as s:
        retrained = {**hashes, "cell_classifier": "d" * 64}  # version 1 rewritten
        assert jobs.find_equivalent_scan(s, slide_id, VERSIONS, hashes).id == scan_id
        assert jobs.find_equivalent_scan(s, slide_id, VERSIONS, retrained) is None
        assert jobs.scans_using_weights(s, "cell_classifier", "b" * 64) >= 1


def test_a_version_folder_that_scans_used_is_not_overwritten(tmp_path: Path) -> None:
    from engines.hashing import file_sha256

    version_dir = tmp_path / "repo" / "cell_classifier" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(b"weights that a scan ran")
    sha = file_sha256(version_dir / "model.onnx")
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    jobs.refuse_overwrite_of_scanned_weights(db, version_dir, "cell_classifier", sha)  # no schema
    db.create_schema()
    jobs.refuse_overwrite_of_scanned_weights(db, version_dir, "cell_classifier", sha)  # unused
    _, scan_id = _queued_scan(db)
    with db.transaction() as s:
        s.get(Scan, scan_id).model_sha256 = {"cell_classifier": sha}
    with pytest.raises(jobs.VersionInUseError, match=r"1 scan\(s\)"):
        jobs.refuse_overwrite_of_scanned_weights(db, version_dir, "cell_classifier", sha)


def test_the_cli_guards_train_and_export_against_overwriting_scanned_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.cli.main  # noqa: F401  (installs the guard, as `papscan` does)
    from train.export.guards import check_overwrite

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    _, scan_id = _queued_scan(db)
    with db.transaction() as s:
        s.get(Scan, scan_id).model_sha256 = {"cell_detector": "e" * 64}
    monkeypatch.setenv("PAPSCAN_DB_URL", str(db.url))
    check_overwrite(tmp_path, "cell_detector", "f" * 64)  # other weights: fine
    with pytest.raises(jobs.VersionInUseError):
        check_overwrite(tmp_path, "cell_detector", "e" * 64)


def test_status_shows_stale_scans_their_dead_workers_and_recent_calls(tmp_path: Path) -> None:
    from rich.console import Console

    from worker.db.models import SlideResult
    from worker.queue.status import collect_status, render_status

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    _, stale = _queued_scan(db)
    _, done = _queued_scan(db)
    with db.transaction() as s:
        jobs.claim_scan(s, stale, "gone@host", 1.0, now=utc_now() - timedelta(seconds=60))
        scan = s.get(Scan, done)
        scan.status, scan.finished_at = "done", utc_now()
        s.add(
            SlideResult(
                scan_id=done,
                category="Unsatisfactory for evaluation",
                score=0.01,
                cell_count=40,
                roi_count=3,
                class_counts={"NILM": 40},
                adequacy="unsatisfactory",
                notes=[
                    "scant cellularity: about 40 cells, under the 5000 a liquid-based slide needs."
                ],
            )
        )
    status = collect_status(db, "redis://127.0.0.1:1/0")
    assert status.dead_workers == ["gone@host"]
    assert [r.stale for r in status.running if r.scan_id == stale] == [True]
    assert status.results[0].category == "Unsatisfactory for evaluation"
    console = Console(record=True, width=200)
    console.print(render_status(status))
    text = console.export_text()
    assert "dead or stuck workers: gone@host" in text and "scant cellularity" in text
