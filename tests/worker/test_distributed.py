"""The overnight queue with real processes: `papscan worker` subprocesses, the machine's
Redis and PostgreSQL (a database and a Redis db number of the test's own: see
tests/worker/conftest.py), small synthetic slides.

What it shows: slides submitted together are shared by two workers and each ends `done`
with the same cells as an in-process scan; a worker killed mid-slide loses nothing and
leaves no duplicate; a corrupt slide fails alone with its sentence; stat jobs go first;
a cancelled scan is skipped and can be retried; a database outage is retried through;
Redis restarted (append-only) while jobs wait loses none.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
from sqlalchemy import func, select

from engines.repository import ModelRepository, default_repository_path
from tests.conftest import in_ci
from tests.worker.conftest import Cluster, free_port, set_pg_connections, wait_for
from train.synth import write_synthetic_slide
from worker.db import queries
from worker.db.models import Cell
from worker.db.session import Database
from worker.lifecycle import scan_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six small synthetic slides (2048 px square, 60 cells: about a second each)."""
    folder = tmp_path_factory.mktemp("slides")
    paths = []
    for seed in range(1, 7):
        path = folder / f"slide-{seed}.tiff"
        write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=seed, cells=60)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096 px slide (about 90 ROIs): long enough to be caught in the middle."""
    path = tmp_path_factory.mktemp("big") / "big.tiff"
    write_synthetic_slide(path, width=4096, height=4096, mpp=0.5, seed=40, cells=240)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """`reference(path)`: the cells of an in-process scan of the file (cached per file)."""
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('ref') / 'reference.db'}")
    repository = ModelRepository(default_repository_path())
    cache: dict[Path, list[tuple]] = {}

    def cells(path: Path) -> list[tuple]:
        if path not in cache:
            report = scan_file(path, db, repository)
            with db.session() as s:
                cache[path] = _cell_keys(queries.iter_cells(s, report.scan_id))
        return cache[path]

    yield cells
    db.dispose()


def _cell_keys(rows) -> list[tuple]:
    """Cells as comparable tuples, sorted: ROI index, box, label, rounded scores."""
    return sorted(
        (
            r.roi_index,
            r.x,
            r.y,
            r.w,
            r.h,
            r.label,
            round(r.score, 3),
            round(r.detection_score, 3),
            r.review_rank,
        )
        for r in rows
    )


def _stored_cells(cluster: Cluster, scan_id: int) -> list[tuple]:
    with cluster.db.session() as s:
        return _cell_keys(queries.iter_cells(s, scan_id))


def _assert_one_complete_set(cluster: Cluster, scan_id: int, expected: list[tuple]) -> None:
    scan = cluster.scan(scan_id)
    assert scan.status == "done", scan.error
    assert scan.rois_done == scan.rois_planned
    rois, cells = cluster.row_counts(scan_id)
    assert rois == scan.rois_planned, "an ROI is missing or was written twice"
    with cluster.db.session() as s:
        distinct = s.scalar(
            select(func.count()).select_from(
                select(Cell.roi_id, Cell.x, Cell.y, Cell.w, Cell.h)
                .where(Cell.scan_id == scan_id)
                .distinct()
                .subquery()
            )
        )
    assert distinct == cells, "a cell was written twice"
    assert _stored_cells(cluster, scan_id) == expected


def corrupt_middle_tile(source: Path, target: Path) -> Path:
    """Copy a slide and garble one level-0 tile in its middle: it opens and passes the
    open-time checks (which probe each level's last tile), then fails when read."""
    shutil.copy(source, target)
    with tifffile.TiffFile(target) as tif:
        page = tif.pages[0]
        index = len(page.dataoffsets) // 2 + 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with target.open("r+b") as fh:
        fh.seek(offset + 20)
        fh.write(np.random.default_rng(0).bytes(count - 40))
    return target


# --- tests ----------------------------------------------------------------------------


def test_two_workers_scan_six_slides_like_an_in_process_scan(
    cluster: Cluster, slides: list[Path], reference
) -> None:
    port = free_port()
    workers = [
        cluster.start_worker("w1@test", "--metrics-port", str(port)),
        cluster.start_worker("w2@test"),
    ]
    report = cluster.submit(*map(str, slides))
    assert len(report["queued"]) == 6 and report["skipped"] == []
    ids = [q["scan_id"] for q in report["queued"]]
    scans = cluster.wait_scans_end(ids)
    # Both workers were idle in BRPOP when the jobs arrived, and each takes one job at
    # a time (prefetch 1), so both must have scanned.
    assert {s.worker for s in scans.values()} == {"w1@test", "w2@test"}
    for path, scan_id in zip(slides, ids, strict=True):
        assert scans[scan_id].attempt == 1
        _assert_one_complete_set(cluster, scan_id, reference(path))
    assert all(w.alive for w in workers)
    # w1 serves its engines' metrics: the slides it scanned went through its detector.
    w1_slides = sum(1 for s in scans.values() if s.worker == "w1@test")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    detector = 'nv_inference_request_success_total{model="cell_detector",version="1"}'
    (line,) = [x for x in text.splitlines() if x.startswith(detector)]
    assert float(line.split()[-1]) >= w1_slides > 0
    assert 'nv_inference_exec_count_total{model="cell_classifier",version="1"}' in text


def test_stat_jobs_are_taken_before_routine_ones(cluster: Cluster, slides: list[Path]) -> None:
    routine = cluster.submit(*map(str, slides[:3]))
    stat = cluster.submit(str(slides[3]), "--priority", "stat")
    status = cluster.papscan("status", "--json")
    assert status.returncode == 0, status.stderr
    depths = json.loads(status.stdout)["depths"]
    assert (depths["stat"], depths["routine"]) == (1, 3)
    cluster.start_worker("w1@test")  # one worker, started with all four waiting
    ids = [q["scan_id"] for q in routine["queued"] + stat["queued"]]
    scans = cluster.wait_scans_end(ids)
    assert all(s.status == "done" for s in scans.values())
    first = min(scans.values(), key=lambda s: s.started_at)
    assert first.id == stat["queued"][0]["scan_id"] and first.priority == "stat"


def test_a_worker_killed_mid_slide_loses_nothing_and_duplicates_nothing(
    cluster: Cluster, big_slide: Path, reference
) -> None:
    # Redis hands an unacknowledged job to another worker only after its visibility
    # timeout (hours in production, an hour here): the killed worker's lease, 4 s here,
    # runs out long before, and the rescuer's reaper queues the slide again. Small chunks
    # make "the middle of a slide" easy to catch.
    env = {
        "PAPSCAN_VISIBILITY_TIMEOUT_S": "3600",
        "PAPSCAN_SCAN_LEASE_S": "4",
        "PAPSCAN_REAPER_INTERVAL_S": "1",
        "PAPSCAN_DB_CHUNK_ROIS": "2",
    }
    first = cluster.start_worker("doomed@test", env=env)
    scan_id = cluster.submit(str(big_slide))["queued"][0]["scan_id"]

    def midway() -> bool:
        scan = cluster.scan(scan_id)
        return scan.status == "running" and (scan.rois_done or 0) >= 4

    wait_for(midway, 120, "the scan to be part-way", every=0.05)
    first.kill(signal.SIGKILL)
    killed = cluster.scan(scan_id)
    assert killed.status == "running" and killed.rois_done < killed.rois_planned
    assert cluster.row_counts(scan_id)[0] > 0  # partial rows were written

    rescuer = cluster.start_worker("rescuer@test", env=env)
    scan = cluster.wait_scans_end([scan_id], timeout=180)[scan_id]
    assert (scan.status, scan.worker, scan.attempt) == ("done", "rescuer@test", 2)
    assert "stopped renewing its lease" in rescuer.text()
    _assert_one_complete_set(cluster, scan_id, reference(big_slide))


def test_more_deliveries_while_the_first_worker_is_alive_restart_nothing(
    cluster: Cluster, big_slide: Path, reference
) -> None:
    from celery import Celery

    from worker.queue.app import SCAN_TASK

    env = {"PAPSCAN_DB_CHUNK_ROIS": "2", "PAPSCAN_SCAN_LEASE_S": "4"}
    scan_id = cluster.submit(str(big_slide))["queued"][0]["scan_id"]
    retried = cluster.papscan("retry", str(scan_id))  # a queued scan's job, sent again
    assert retried.returncode == 0, retried.stderr
    first = cluster.start_worker("first@test", env=env)
    wait_for(
        lambda: (s := cluster.scan(scan_id)).status == "running" and (s.rois_done or 0) >= 2,
        120,
        "the scan to be part-way",
        every=0.05,
    )
    second = cluster.start_worker("second@test", env=env)  # takes the retried job
    sender = Celery(broker=cluster.broker_url)
    sender.send_task(SCAN_TASK, args=[scan_id], queue="routine", routing_key="routine")
    scan = cluster.wait_scans_end([scan_id], timeout=180)[scan_id]
    assert (scan.status, scan.worker, scan.attempt) == ("done", "first@test", 1)
    wait_for(
        lambda: (
            second.text().count("dropped this delivery")
            + first.text().count("dropped this delivery")
            >= 2
        ),
        60,
        "both extra deliveries to be dropped",
    )
    _assert_one_complete_set(cluster, scan_id, reference(big_slide))


def test_a_corrupt_slide_fails_alone_with_its_sentence(
    cluster: Cluster, slides: list[Path], tmp_path: Path
) -> None:
    bad = corrupt_middle_tile(slides[0], tmp_path / "corrupt.tiff")
    worker = cluster.start_worker("w1@test")
    report = cluster.submit(str(slides[1]), str(bad), str(slides[2]))
    ids = [q["scan_id"] for q in report["queued"]]
    scans = cluster.wait_scans_end(ids)
    good, corrupt = [scans[ids[0]], scans[ids[2]]], scans[ids[1]]
    assert all(s.status == "done" for s in good)
    assert corrupt.status == "failed" and corrupt.attempt == 1  # not retried
    assert str(bad) in corrupt.error and "not valid JPEG" in corrupt.error
    assert "\n" not in corrupt.error and corrupt.error.endswith(".")
    assert cluster.row_counts(corrupt.id) == (0, 0)
    assert worker.alive
    status = cluster.papscan("status")
    assert status.returncode == 0 and "recent failures" in status.stdout

    retried = cluster.papscan("retry", "--failed")  # fails again, as a second attempt
    assert retried.returncode == 0, retried.stderr
    again = wait_for(
        lambda: (s := cluster.scan(corrupt.id)).status == "failed" and s.attempt == 2 and s,
        120,
        "the retried corrupt scan to fail again",
    )
    assert again.error == corrupt.error


def test_a_cancelled_scan_is_skipped_then_retried(cluster: Cluster, slides: list[Path]) -> None:
    report = cluster.submit(str(slides[4]), str(slides[5]))
    cancelled_id, other_id = (q["scan_id"] for q in report["queued"])
    result = cluster.papscan("cancel", str(cancelled_id))
    assert result.returncode == 0 and "cancelled" in result.stdout
    again = cluster.papscan("cancel", str(cancelled_id))
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    worker = cluster.start_worker("w1@test")
    cluster.wait_scans_end([other_id])
    wait_for(lambda: "nothing to do" in worker.text(), 60, "the cancelled job to be dropped")
    cancelled = cluster.scan(cancelled_id)
    assert (cancelled.status, cancelled.attempt) == ("cancelled", 0)
    assert cluster.row_counts(cancelled_id) == (0, 0)

    result = cluster.papscan("retry", str(cancelled_id))
    assert result.returncode == 0, result.stderr
    assert cluster.wait_scans_end([cancelled_id])[cancelled_id].status == "done"
    refused = cluster.papscan("retry", str(cancelled_id))
    assert refused.returncode == 1 and "submit --force" in refused.stderr


def test_a_database_outage_is_retried_with_backoff(cluster: Cluster, slides: list[Path]) -> None:
    from celery import Celery

    from worker.wsi.slide import open_slide

    env = {"PAPSCAN_RETRY_BACKOFF_S": "1", "PAPSCAN_TASK_MAX_RETRIES": "8"}
    worker = cluster.start_worker("w1@test", env=env)
    # A queued scan whose job will arrive while the database refuses connections.
    with open_slide(slides[0]) as slide, cluster.db.session() as s, s.begin():
        info = slide.info
        row = queries.record_slide(s, info)
        scan_id = queries.create_scan(s, row.id, {}).id
    cluster.db.dispose()
    set_pg_connections(cluster.db_url, allowed=False)
    try:
        sender = Celery(broker=cluster.broker_url)
        sender.send_task(
            "papscan.scan_slide", args=[scan_id], queue="routine", routing_key="routine"
        )
        sender.close()
        wait_for(lambda: "retry 1 of 8" in worker.text(), 60, "the first retry")
        status = cluster.papscan("status")
        assert status.returncode == 1 and "results database" in status.stderr
    finally:
        set_pg_connections(cluster.db_url, allowed=True)
    scan = cluster.wait_scans_end([scan_id], timeout=120)[scan_id]
    assert scan.status == "done" and scan.attempt == 1
    assert "cannot reach the results database" in worker.text()
    assert worker.alive


def test_restarting_redis_loses_no_queued_job(
    cluster: Cluster, slides: list[Path], big_slide: Path, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        cluster.processes.append(proc)
        wait_for(lambda: _ping(port), 20, "redis-server to accept connections")
        return proc

    if shutil.which("redis-server") is None:
        if in_ci():
            pytest.fail(
                "CI is set, so this fails instead of skipping: redis-server is not on PATH."
            )
        pytest.skip("redis-server is not on PATH")
    redis_proc = start_redis()
    broker = f"redis://127.0.0.1:{port}/0"
    cluster.env["PAPSCAN_BROKER_URL"] = broker
    worker = cluster.start_worker("w1@test", env={"PAPSCAN_DB_CHUNK_ROIS": "4"})
    # The big slide keeps the worker busy while the others wait in the queue.
    report = cluster.submit(str(big_slide), *map(str, slides[:4]))
    ids = [q["scan_id"] for q in report["queued"]]
    waiting = _llen(port, "routine")
    redis_proc.send_signal(signal.SIGTERM)  # a clean shutdown writes the append-only file
    redis_proc.wait(timeout=30)
    assert waiting >= 2, "the worker emptied the queue before Redis could be stopped"
    time.sleep(2)  # the worker, mid-slide, finds its broker gone
    start_redis()

    scans = cluster.wait_scans_end(ids, timeout=240)
    assert all(s.status == "done" for s in scans.values()), [s.error for s in scans.values()]
    assert worker.alive, "the worker did not survive the broker going away"


def _client(port: int):
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)


def _ping(port: int) -> bool:
    import redis

    try:
        return bool(_client(port).ping())
    except redis.RedisError:
        return False


def _llen(port: int, key: str) -> int:
    return int(_client(port).llen(key))
