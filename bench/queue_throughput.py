"""Queue throughput: slides per hour through Redis + Celery workers + PostgreSQL, against
scanning the same slides in one process, and the database writer's rows per second.

    python bench/queue_throughput.py [--slides 8] [--size 4096] [--cells 240]
                                     [--overhead-jobs 5] [--rows 200000] [--row-by-row 5000]

1. Baseline: `scan_file` over the slides one after another in this process, as
   `papscan scan` runs (it loads the models for each slide; a worker loads them once).
2. One `papscan worker` process, then two, each scanning all the slides submitted at
   once; slides/h is slides over the time from submit to the last scan done. On a
   machine with C cores each of K workers runs C/K inference threads.
3. Queue overhead per job: single slides submitted one at a time to an idle worker;
   overhead = the scan claimed by a worker − the scan recorded by submit (commit, send,
   Redis, Celery dispatch, claim), against the slide's own scan time.
4. Cell rows/s into PostgreSQL: the bulk writer (`queries.write_chunk`: COPY, in chunks
   as a scan writes them) against a multi-row INSERT executemany and one INSERT per row,
   all in transactions of one chunk each; then PostgreSQL's own ceiling (COPY of text
   formatted beforehand) and the bulk writer without the redundant `cells.scan_id`
   foreign key, to show what the schema's per-row checks cost.

Needs the machine's PostgreSQL (PAPSCAN_BENCH_PG_URL, default the `test` server; a
database of its own is created and dropped) and Redis (PAPSCAN_BENCH_REDIS_URL, default
db 14, flushed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import insert, select, text
from sqlalchemy.engine import make_url

from engines.repository import ModelRepository, default_repository_path
from train.synth import write_synthetic_slide
from worker.db import queries
from worker.db.models import Cell, Scan
from worker.db.session import Database
from worker.lifecycle import scan_file
from worker.pipeline.records import CellResult, RoiResult

console = Console()
REPO_ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("PAPSCAN_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PAPSCAN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


# --- a database and a queue of the bench's own ----------------------------------------


class Scratch:
    """A fresh PostgreSQL database and an empty Redis db for one measurement."""

    def __init__(self) -> None:
        import psycopg

        self.name = f"papscan_bench_{uuid.uuid4().hex[:10]}"
        self._admin = make_url(PG_URL).set(drivername="postgresql")
        with psycopg.connect(self._admin.render_as_string(False), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.db_url = make_url(PG_URL).set(database=self.name).render_as_string(False)
        self.db = Database(self.db_url)
        self.db.create_schema()
        _redis().flushdb()

    def close(self) -> None:
        import psycopg

        self.db.dispose()
        with psycopg.connect(self._admin.render_as_string(False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        _redis().flushdb()


def _redis():
    import redis

    return redis.Redis.from_url(REDIS_URL)


def _env(db_url: str, threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PAPSCAN_DB_URL": db_url,
        "PAPSCAN_BROKER_URL": REDIS_URL,
        "PAPSCAN_INTRA_OP_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def start_workers(count: int, db_url: str, logdir: Path) -> list[subprocess.Popen]:
    threads = max(1, (os.cpu_count() or 1) // count)
    procs, logs = [], []
    for k in range(count):
        log = logdir / f"bench-worker-{count}-{k}.log"
        with log.open("w") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "worker", "--name", f"bench{k}@{count}"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=_env(db_url, threads),
                    cwd=REPO_ROOT,
                )
            )
        logs.append(log)
    deadline = time.monotonic() + 180
    while not all("ready, consuming" in log.read_text() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            stop(procs)
            raise SystemExit(f"workers did not start; see {logdir}")
        time.sleep(0.2)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def submit(db: Database, paths: list[Path], force: bool = True) -> list[int]:
    """Submit in this process (the same code as `papscan submit`), return scan ids."""
    from worker.queue.submit import SlideRequest, check_slides, model_versions, submit_slides

    checked = check_slides([SlideRequest(p) for p in paths])
    versions = model_versions(ModelRepository(default_repository_path()))
    report = submit_slides(db, REDIS_URL, checked, versions, force=force)
    return [q.scan_id for q in report.queued]


def wait_done(db: Database, ids: list[int], timeout: float = 3600) -> list[Scan]:
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as s:
            scans = list(s.scalars(select(Scan).where(Scan.id.in_(ids))))
        if all(sc.status in ("done", "failed", "cancelled") for sc in scans):
            bad = [sc for sc in scans if sc.status != "done"]
            if bad:
                raise SystemExit(f"scan {bad[0].id} ended {bad[0].status}: {bad[0].error}")
            return scans
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the scans")
        time.sleep(0.1)


# --- measurements ---------------------------------------------------------------------


def in_process(paths: list[Path], workdir: Path) -> float:
    """Seconds to scan every slide one after another in this process (SQLite)."""
    db = Database(f"sqlite:///{workdir / 'inprocess.db'}")
    repo = ModelRepository(default_repository_path())
    scan_file(paths[0], db, repo)  # warm the file cache and the runtimes
    start = time.perf_counter()
    for path in paths:
        scan_file(path, db, repo)
    seconds = time.perf_counter() - start
    db.dispose()
    return seconds


def through_queue(paths: list[Path], workers: int, workdir: Path) -> float:
    """Seconds from submitting every slide at once to the last one done."""
    scratch = Scratch()
    procs = start_workers(workers, scratch.db_url, workdir)
    try:
        start = time.perf_counter()
        ids = submit(scratch.db, paths)
        wait_done(scratch.db, ids)
        return time.perf_counter() - start
    finally:
        stop(procs)
        scratch.close()


def queue_overhead(path: Path, jobs: int, workdir: Path) -> tuple[list[float], list[float]]:
    """(overhead s, scan s) per job, one job at a time to an idle worker."""
    scratch = Scratch()
    procs = start_workers(1, scratch.db_url, workdir)
    overheads, scans = [], []
    try:
        for _ in range(jobs):
            (scan_id,) = submit(scratch.db, [path])
            (scan,) = wait_done(scratch.db, [scan_id])
            overheads.append((scan.started_at - scan.created_at).total_seconds())
            scans.append((scan.finished_at - scan.started_at).total_seconds())
    finally:
        stop(procs)
        scratch.close()
    return overheads, scans


def _chunks(total: int, per_chunk_rois: int = 32, cells_per_roi: int = 100):
    probs = {"NILM": 0.8, "LSIL": 0.15, "HSIL": 0.05}
    roi_index = 0
    written = 0
    while written < total:
        rois, cells = [], []
        for _ in range(per_chunk_rois):
            rois.append(RoiResult(roi_index, roi_index * 512, 0, 512, 512, "NILM", probs, 100))
            for j in range(cells_per_roi):
                cells.append(
                    CellResult(
                        roi_index, roi_index * 512 + j, j, 24, 24, 0.9, "NILM", 0.8, probs,
                        0.2, 0.01, None,
                    )
                )  # fmt: skip
            roi_index += 1
        written += len(cells)
        yield rois, cells


def _new_scan(db: Database) -> int:
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s,
            fingerprint=uuid.uuid4().hex,
            path="/bench.svs",
            vendor="bench",
            width=1,
            height=1,
            mpp_x=0.5,
            mpp_y=0.5,
        )
        scan = queries.create_scan(s, slide.id, {})
        return scan.id


def rows_per_second(rows: int, row_by_row: int) -> dict[str, float]:
    """Cell rows/s: papscan's bulk writer, a plain executemany, one INSERT per row."""
    scratch = Scratch()
    db = scratch.db
    rates: dict[str, float] = {}
    try:
        scan_id = _new_scan(db)
        for rois, cells in _chunks(3200):  # warm the connection and the plans
            with db.session() as s, s.begin():
                queries.write_chunk(s, scan_id, rois, cells)

        def timed(name: str, total: int, write_chunk) -> None:
            scan_id = _new_scan(db)
            n = 0
            start = time.perf_counter()
            for rois, cells in _chunks(total):
                with db.session() as s, s.begin():
                    write_chunk(s, scan_id, rois, cells)
                n += len(cells)
            rates[name] = n / (time.perf_counter() - start)

        def executemany(s, scan_id, rois, cells) -> None:
            queries.write_chunk(s, scan_id, rois, [])  # ROIs and their ids
            roi_ids = dict(
                s.execute(
                    select(queries.Roi.index, queries.Roi.id).where(queries.Roi.scan_id == scan_id)
                ).all()
            )
            s.execute(insert(Cell), queries.cell_row_dicts(scan_id, roi_ids, cells))

        def one_by_one(s, scan_id, rois, cells) -> None:
            queries.write_chunk(s, scan_id, rois, [])
            roi_ids = dict(
                s.execute(
                    select(queries.Roi.index, queries.Roi.id).where(queries.Roi.scan_id == scan_id)
                ).all()
            )
            for row in queries.cell_row_dicts(scan_id, roi_ids, cells):
                s.execute(insert(Cell).values(**row))

        timed("bulk writer (write_chunk)", rows, queries.write_chunk)
        timed("multi-row INSERT executemany", rows, executemany)
        timed("one INSERT per row", row_by_row, one_by_one)
        rates["PostgreSQL alone: COPY of pre-formatted rows"] = copy_ceiling(db, rows)
        # What the schema costs: each cell's two foreign keys are checked row by row.
        # cells.scan_id's is redundant (scans -> rois -> cells cascade already).
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE cells DROP CONSTRAINT fk_cells_scan_id_scans"))
        timed("bulk writer, without the cells.scan_id FK", rows, queries.write_chunk)
    finally:
        scratch.close()
    return rates


def copy_ceiling(db: Database, rows: int) -> float:
    """Rows/s of COPY from text built beforehand: what PostgreSQL itself sustains."""
    scan_id = _new_scan(db)
    rois, cells = next(_chunks(3200))
    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, rois, [])
        roi_id = s.scalar(select(queries.Roi.id).where(queries.Roi.scan_id == scan_id))
    line = (
        f"{scan_id}\t{roi_id}\t1\t2\t24\t24\t0.9\tNILM\t0.8\t0.2\t"
        '{"NILM": 0.8, "LSIL": 0.15, "HSIL": 0.05}\t0.01\t\\N\n'
    )
    data = (line * len(cells)).encode()
    chunks = max(1, rows // len(cells))
    raw = db.engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.cursor() as cursor:
            start = time.perf_counter()
            for _ in range(chunks):
                with cursor.copy(queries._COPY_CELLS) as copy:
                    copy.write(data)
                conn.commit()
            return chunks * len(cells) / (time.perf_counter() - start)
    finally:
        raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096, help="slide side, px")
    parser.add_argument("--cells", type=int, default=240)
    parser.add_argument("--overhead-jobs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--row-by-row", type=int, default=5_000)
    parser.add_argument("--skip-queue", action="store_true", help="only the database part")
    args = parser.parse_args()
    # Jobs this process submits go to the bench's Redis db (Celery reads the setting when
    # it first needs its configuration, after this line).
    os.environ["PAPSCAN_BROKER_URL"] = REDIS_URL

    workdir = Path(tempfile.mkdtemp(prefix="papscan-queue-bench-"))
    console.print(f"[bold]queue throughput[/] ({os.cpu_count()} cores; logs in {workdir})")
    rates = rows_per_second(args.rows, args.row_by_row)
    table = Table(title="cell rows/s into PostgreSQL", header_style="bold")
    table.add_column("writer")
    table.add_column("rows/s", justify="right")
    table.add_column("× one INSERT per row", justify="right")
    per_row = rates["one INSERT per row"]
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}", f"{rate / per_row:.1f}")
    console.print(table)
    bulk = rates["bulk writer (write_chunk)"]
    console.print(
        f"bulk writer {bulk:,.0f} rows/s: target 100,000 rows/s "
        f"{'met' if bulk >= 100_000 else 'NOT met'}"
    )
    if args.skip_queue:
        return

    paths = []
    for seed in range(args.slides):
        path = workdir / f"slide-{seed}.tiff"
        write_synthetic_slide(
            path, width=args.size, height=args.size, mpp=0.5, seed=100 + seed, cells=args.cells
        )
        paths.append(path)
    console.print(f"{args.slides} synthetic slides of {args.size} px, {args.cells} cells each")

    baseline_s = in_process(paths, workdir)
    one_s = through_queue(paths, 1, workdir)
    two_s = through_queue(paths, 2, workdir)
    table = Table(title="slides per hour", header_style="bold")
    for column in ("how", "seconds", "slides/h", "× in-process"):
        table.add_column(column, justify="left" if column == "how" else "right")
    for name, seconds in (
        ("in-process, one after another", baseline_s),
        ("1 worker process", one_s),
        ("2 worker processes", two_s),
    ):
        per_hour = args.slides / seconds * 3600
        table.add_row(name, f"{seconds:.1f}", f"{per_hour:,.0f}", f"{baseline_s / seconds:.2f}")
    console.print(table)
    console.print(f"2 workers / 1 worker: {one_s / two_s:.2f}× the slides per hour")

    overheads, scans = queue_overhead(paths[0], args.overhead_jobs, workdir)
    mean_overhead = sum(overheads) / len(overheads)
    mean_scan = sum(scans) / len(scans)
    console.print(
        f"queue overhead per job (recorded → claimed by an idle worker): mean "
        f"{mean_overhead * 1000:.0f} ms (min {min(overheads) * 1000:.0f}, max "
        f"{max(overheads) * 1000:.0f}) against {mean_scan:.2f} s of scanning: "
        f"{mean_overhead / mean_scan:.1%} of a slide's time (target < 1 %)"
    )


if __name__ == "__main__":
    main()
