"""REST API speed on PostgreSQL: the worklist over 10,000 slides, a scan's cells over
1,000,000 cells, and DeepZoom tiles of a cached slide, over real HTTP.

    python bench/api_speed.py [--slides 10000] [--cells 1000000] [--repeat 40]
                              [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
                              [--quick] [--explain]

Creates a database of its own on the server at `--pg-url` (`papscan_bench_<pid>`,
dropped at the end), makes the schema with the project's migrations (so the indexes are
the real ones), and COPYs in `--slides` slides with their scans, slide results and some
review decisions (a lab's spread: mostly NILM, some failed, queued and re-scanned, a
third reviewed), then `--cells` cells over nine finished scans, the biggest holding a
fifth of them. `papscan serve` runs in a subprocess (as in production), and each query
is requested `--repeat` times with a bearer token after a warm-up:

* the worklist (`GET /api/worklist`), unfiltered and filtered (category, adequacy,
  reviewed, status, a date, limit=100): target p95 <= 100 ms;
* a scan's cells (`GET /api/scans/{id}/cells`) on the biggest scan by label, score,
  region (a random viewer field per request), review rank, and pages deep into it:
  target p95 <= 100 ms;
* DeepZoom (`GET /api/scans/{id}/deepzoom/{level}/{col}_{row}.jpeg`) of a synthetic
  slide (8,192 px square): a spread of tiles over the top four levels, first touch and
  again (cached): target p95 <= 50 ms cached; its baseline is the same tiles cut by
  OpenSlide's DeepZoomGenerator and JPEG-encoded in this process (no HTTP, no cache).

Baseline, in the same run: the same SQL the route runs (`worklist_statement`,
`cells_statement`, compiled by SQLAlchemy for PostgreSQL) executed directly with psycopg
and fetched, with the same parameters; the ratio API p95 / SQL p95 is the API's overhead
(token check, the scan and slide lookups, pydantic, JSON, HTTP). A second baseline runs
the SQL as it ran before migration 0007: the cells matched by `scan_id = s` and ordered by
`id`, without the index on `(scan_id, id)` (dropped inside a transaction that is rolled
back); the worklist with its QC flags read out of each slide's whole QC JSON
(`qc -> 'flags'`) instead of `qc_flags`. QC holds a sharpness per ROI, here 1,000 (a
20,480 px square slide has 1,756 ROIs). `--explain` prints each query's EXPLAIN ANALYZE.
`--quick`: 1,000 slides, 100,000 cells, 10 repeats. Exits non-zero only on an error,
never on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python bench/api_speed.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from worker.api.cells import CellFilter, cells_statement  # noqa: E402
from worker.api.routes import WORKLIST_PAGE  # noqa: E402
from worker.db.session import Database  # noqa: E402
from worker.db.worklist import WorklistFilter, worklist_statement  # noqa: E402

console = Console(width=160)

DEFAULT_PG_URL = os.environ.get(
    "PAPSCAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
WORKLIST_TARGET_MS = 100.0
CELLS_TARGET_MS = 100.0
TILE_TARGET_MS = 50.0

CATEGORIES = ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "Unsatisfactory for evaluation")
CATEGORY_P = (0.86, 0.04, 0.03, 0.01, 0.015, 0.002, 0.043)
STATUSES = ("done", "failed", "queued", "running", "cancelled")
STATUS_P = (0.92, 0.03, 0.035, 0.01, 0.005)
CELL_LABELS = ("NILM", "LSIL", "HSIL")
CELL_LABEL_P = (0.9, 0.06, 0.04)
REVIEW_CELLS = 100  # review ranks 1..100 per scan
RESCAN_FRACTION = 0.05
REVIEWED_FRACTION = 0.35
SLIDE_W, SLIDE_H = 100_000, 80_000  # level-0 px at 0.25 µm/px: 25 x 20 mm
ROI_PX = 1024
CELL_SCANS = 9  # scans that hold the cells; the biggest holds a fifth of them
QC_ROIS = 1000  # QC keeps a sharpness per ROI (1,756 ROIs on a 20,480 px square slide)
COPY_CHUNK = 50_000


# --- the database ------------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(pg_url: str, name: str | None = None) -> Iterator[str]:
    """A fresh database `name` (default papscan_bench_<pid>) on `pg_url`'s server; dropped after.

    Yields its SQLAlchemy URL (psycopg driver).
    """
    name = name or f"papscan_bench_{os.getpid()}"
    admin = _dsn(pg_url)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            make_url(pg_url)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _dsn(url: str) -> str:
    """A libpq URL for psycopg from a SQLAlchemy one."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _has_column(conn: psycopg.Connection, table: str, column: str) -> bool:
    sql = "SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = %s"
    return conn.execute(sql, (table, column)).fetchone() is not None


def create_schema(url: str) -> None:
    """The project's schema, by its own migrations (indexes included)."""
    db = Database(url)
    try:
        db.create_schema()
    finally:
        db.dispose()


# --- loading -------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What `load_slides` and `load_cells` wrote."""

    slides: int = 0
    scans: int = 0
    results: int = 0
    reviews: int = 0
    cells: int = 0
    rois: int = 0
    done_scan_ids: list[int] = field(default_factory=list)
    cell_scans: dict[int, int] = field(default_factory=dict)  # scan id -> cells
    big_scan_id: int = 0
    load_s: float = 0.0


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _copy(
    conn: psycopg.Connection,
    table: str,
    columns: Sequence[str],
    rows: Iterator[tuple] | list[tuple],
    advance: Callable[[int], None] | None = None,
) -> int:
    """COPY `rows` into `table` on `conn` (in its transaction); returns the row count."""
    n = 0
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)
            n += 1
            if advance is not None and n % 1000 == 0:
                advance(1000)
    if advance is not None:
        advance(n % 1000)
    return n


def load_slides(url: str, n_slides: int, seed: int = 0, progress: Progress | None = None) -> Loaded:
    """COPY `n_slides` slides, their scans (some re-scanned), results and reviews.

    Scan ids grow with time; a re-scan is newer than the slide's first scan. A finished
    scan has a slide result (category, calibrated score, adequacy, QC with a sharpness
    per ROI, as the pipeline writes); failed, queued, running and cancelled ones do not.
    """
    rng = np.random.default_rng(seed)
    out = Loaded()
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=30)
    rescans = rng.random(n_slides) < RESCAN_FRACTION
    n_scans = n_slides + int(rescans.sum())
    # Scans in time order: first scans of every slide, then the re-scans.
    scan_slide = np.concatenate([np.arange(1, n_slides + 1), np.flatnonzero(rescans) + 1])
    created_s = np.sort(rng.uniform(0, 30 * 86400 - 3600, n_scans))
    status = rng.choice(len(STATUSES), n_scans, p=STATUS_P)
    status[:n_slides][rescans] = rng.choice([0, 1], int(rescans.sum()), p=[0.3, 0.7])
    # The newest scans are still in the queue or running; old ones are finished.
    recent = created_s > created_s[-1] - 3600 * 6
    status[~recent & (status >= 2)] = 0
    category = rng.choice(len(CATEGORIES), n_scans, p=CATEGORY_P)
    score = np.where(category == 0, rng.beta(1.2, 12, n_scans), rng.beta(6, 2.5, n_scans))
    reviewed = rng.random(n_scans) < REVIEWED_FRACTION

    task = progress.add_task("slides", total=n_slides + n_scans * 2) if progress else None

    def advance(k: int) -> None:
        if progress is not None:
            progress.advance(task, k)

    with psycopg.connect(_dsn(url)) as conn:
        has_qc_flags = _has_column(conn, "slide_results", "qc_flags")  # migration 0007
        slide_rows = (
            (
                i,
                f"bench-{seed}-{i:08d}",
                f"/slides/2026-12/{i:08d}.svs",
                "aperio",
                SLIDE_W,
                SLIDE_H,
                0.25,
                0.25,
                f"PAP{i:08d}",
                "liquid-based",
                start,
            )
            for i in range(1, n_slides + 1)
        )
        cols = "id fingerprint path vendor width height mpp_x mpp_y barcode preparation created_at"
        out.slides = _copy(conn, "slides", cols.split(), slide_rows, advance)

        versions = json.dumps({"cell_detector": "1", "cell_classifier": "1", "roi_classifier": "1"})
        timings = json.dumps({"read": 41000.0, "detect": 52000.0, "classify": 23000.0})
        scan_rows = []
        for k in range(n_scans):
            st = STATUSES[status[k]]
            created = start + timedelta(seconds=float(created_s[k]))
            started = created + timedelta(seconds=30) if st != "queued" else None
            finished = created + timedelta(minutes=3) if st in ("done", "failed") else None
            scan_rows.append(
                (
                    k + 1,
                    int(scan_slide[k]),
                    st,
                    "routine",
                    versions,
                    timings if st == "done" else None,
                    4800 if st != "queued" else None,
                    4800 if st == "done" else (2000 if st != "queued" else 0),
                    1 if st != "queued" else 0,
                    "slide file is truncated at tile 1234 of level 0." if st == "failed" else None,
                    f"gpu-{k % 8}" if st != "queued" else None,
                    created,
                    started,
                    finished,
                )
            )
        cols = (
            "id slide_id status priority model_versions stage_timings_ms rois_planned"
            " rois_done attempt error worker created_at started_at finished_at"
        )
        out.scans = _copy(conn, "scans", cols.split(), scan_rows, advance)

        result_rows, review_rows = [], []
        for k in range(n_scans):
            if STATUSES[status[k]] != "done":
                advance(1)
                continue
            scan_id = k + 1
            out.done_scan_ids.append(scan_id)
            cat = CATEGORIES[category[k]]
            unsat = cat == CATEGORIES[-1]
            flags = (["low_cellularity"] if unsat else []) + (["focus"] if k % 41 == 0 else [])
            sharp = np.round(rng.uniform(20, 400, QC_ROIS), 1).tolist()
            qc = {"flags": flags, "focus_flag": "focus" in flags, "roi_sharpness": sharp}
            squamous = int(rng.integers(1000, 4000)) if unsat else int(rng.integers(6000, 60000))
            result_rows.append(
                (
                    scan_id,
                    cat,
                    float(score[k]),
                    squamous + int(rng.integers(0, 5000)),
                    4800,
                    json.dumps({"NILM": squamous, "LSIL": 40, "HSIL": 12}),
                    cat not in ("NILM", CATEGORIES[-1]),
                    "unsatisfactory" if unsat else "satisfactory",
                    squamous,
                    5000,
                    "liquid-based",
                    "default",
                    json.dumps([]),
                    json.dumps(qc),
                )
                + ((json.dumps(flags),) if has_qc_flags else ())
            )
            if reviewed[k]:
                review_rows.append((scan_id, "cytologist-1", bool(k % 7), None, None, created_s[k]))
            advance(1)
        cols = (
            "scan_id category score cell_count roi_count class_counts abnormal adequacy"
            " squamous_estimate adequacy_minimum preparation operating_point notes qc"
        ).split() + (["qc_flags"] if has_qc_flags else [])
        out.results = _copy(conn, "slide_results", cols, result_rows)
        review_rows = [
            (sid, who, agrees, cat, note, start + timedelta(seconds=float(t) + 20000))
            for sid, who, agrees, cat, note, t in review_rows
        ]
        cols = "scan_id reviewer agrees category note created_at"
        out.reviews = _copy(conn, "slide_reviews", cols.split(), review_rows)
        for table in ("slides", "scans"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT max(id) FROM {table}))"
            )
        conn.commit()
    return out


def cell_scan_sizes(n_cells: int, n_scans: int = CELL_SCANS) -> list[int]:
    """Cells per scan: one big scan of a fifth of `n_cells` in the middle, the rest even."""
    big = n_cells // 5
    rest = n_cells - big
    small = [rest // (n_scans - 1) + (i < rest % (n_scans - 1)) for i in range(n_scans - 1)]
    middle = (n_scans - 1) // 2
    return small[:middle] + [big] + small[middle:]


def load_cells(
    url: str, loaded: Loaded, n_cells: int, seed: int = 1, progress: Progress | None = None
) -> None:
    """COPY `n_cells` cells (and their ROIs) over `CELL_SCANS` finished scans.

    Cells are written ROI by ROI in plan order, as the pipeline does, so cell ids follow
    the ROI grid; the most suspicious cells of each scan get review ranks 1..100.
    """
    rng = np.random.default_rng(seed)
    sizes = cell_scan_sizes(n_cells, min(CELL_SCANS, len(loaded.done_scan_ids)))
    scan_ids = loaded.done_scan_ids[: len(sizes)]
    loaded.big_scan_id = scan_ids[int(np.argmax(sizes))]
    task = progress.add_task("cells", total=n_cells) if progress else None
    cols_x, cols_y = SLIDE_W // ROI_PX, SLIDE_H // ROI_PX
    roi_id = 0
    with psycopg.connect(_dsn(url)) as conn:
        for scan_id, size in zip(scan_ids, sizes, strict=True):
            n_rois = min(cols_x * cols_y, max(1, size // 40))
            roi_cells = np.bincount(rng.integers(0, n_rois, size), minlength=n_rois)
            roi_rows = []
            for index in range(n_rois):
                roi_id += 1
                x, y = (index % cols_x) * ROI_PX, (index // cols_x) * ROI_PX
                probs = '{"NILM": 0.9, "LSIL": 0.07, "HSIL": 0.03}'
                roi_rows.append(
                    (roi_id, scan_id, index, x, y, ROI_PX, ROI_PX, "NILM", probs, roi_cells[index])
                )
            cols = "id scan_id index x y w h label probs cell_count".split()
            loaded.rois += _copy(conn, "rois", cols, roi_rows)
            first_roi = roi_id - n_rois + 1
            # Per cell: its ROI (sorted: plan order), box, label, scores.
            roi_of = np.repeat(np.arange(n_rois), roi_cells)
            x = (roi_of % cols_x) * ROI_PX + rng.integers(0, ROI_PX - 40, size)
            y = (roi_of // cols_x) * ROI_PX + rng.integers(0, ROI_PX - 40, size)
            w = rng.integers(18, 40, size)
            h = rng.integers(18, 40, size)
            label = rng.choice(3, size, p=CELL_LABEL_P)
            p = rng.dirichlet((1.0, 1.0, 1.0), size) * 0.4
            p[np.arange(size), label] += 0.6
            score = p[np.arange(size), label]
            suspicion = 1.0 - p[:, 0]
            rank = np.full(size, -1)
            top = np.argsort(-suspicion)[:REVIEW_CELLS]
            rank[top] = np.arange(1, len(top) + 1)
            det = rng.uniform(0.25, 1.0, size)
            att = rng.random(size)
            columns = [
                (roi_of + first_roi).tolist(),
                x.tolist(),
                y.tolist(),
                w.tolist(),
                h.tolist(),
                det.tolist(),
                [CELL_LABELS[i] for i in label],
                score.tolist(),
                suspicion.tolist(),
                [f'{{"NILM": {a}, "LSIL": {b}, "HSIL": {c}}}' for a, b, c in p.tolist()],
                att.tolist(),
                [r if r > 0 else None for r in rank.tolist()],
            ]

            def rows(columns: list[list[Any]] = columns, scan_id: int = scan_id) -> Iterator:
                for row in zip(*columns, strict=True):
                    yield (scan_id, *row)

            cols = (
                "scan_id roi_id x y w h detection_score label score suspicion probs attention"
                " review_rank"
            ).split()
            advance = (lambda k: progress.advance(task, k)) if progress else None
            loaded.cells += _copy(conn, "cells", cols, rows(), advance)
            loaded.cell_scans[scan_id] = size
            conn.commit()
        conn.execute("SELECT setval(pg_get_serial_sequence('rois', 'id'), max(id)) FROM rois")
        conn.commit()


def settle(url: str) -> float:
    """VACUUM ANALYZE, as autovacuum would after a night's inserts; returns seconds."""
    t0 = time.perf_counter()
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return time.perf_counter() - t0


def make_token(url: str) -> str:
    from worker.api.tokens import create_token

    db = Database(url)
    try:
        with db.transaction() as s:
            return create_token(s, "bench")
    finally:
        db.dispose()


# --- the server ----------------------------------------------------------------------------


@contextlib.contextmanager
def serve(url: str, log: Path) -> Iterator[str]:
    """`papscan serve` in a subprocess on a free port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "worker", "serve", "--port", str(port), "--db", url]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"papscan serve exited ({proc.returncode}): {log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/api/queue", timeout=2).status_code in (200, 401):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"papscan serve did not start in 120 s: {log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Query:
    """One benchmarked request and the SQL its route runs; `params(i)` varies per repeat."""

    group: str
    name: str
    path: str
    params: Callable[[int], dict[str, Any]]
    sql: Callable[[int], Select] | None
    target_ms: float
    no_index: str | None = None  # before 0007: an index to drop for the baseline,
    before_sql: Callable[[str], str] | None = None  # and the SQL as it read
    server_cursor: bool = False  # fetched as the route does: 1,000 rows a round trip


@dataclass
class Timing:
    query: Query
    api_ms: list[float]
    sql_ms: list[float]
    before_ms: list[float]  # the SQL as before migration 0007
    rows: int

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")


def worklist_queries(loaded: Loaded) -> list[Query]:
    """The morning's worklist requests, each with its `WorklistFilter`."""
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    since_at = datetime.fromisoformat(since).replace(tzinfo=UTC)
    page = WORKLIST_PAGE  # the API's page unless `limit` is given
    cases: list[tuple[str, dict[str, Any], WorklistFilter]] = [
        (f"first page (default {page})", {}, WorklistFilter(limit=page)),
        (
            f"page 3 (offset {2 * page})",
            {"offset": 2 * page},
            WorklistFilter(limit=page, offset=2 * page),
        ),
        ("top 100", {"limit": 100}, WorklistFilter(limit=100)),
        ("category=HSIL", {"category": "HSIL"}, WorklistFilter(categories=("HSIL",), limit=page)),
        (
            "category=LSIL,HSIL limit=100",
            {"category": ["LSIL", "HSIL"], "limit": 100},
            WorklistFilter(categories=("LSIL", "HSIL"), limit=100),
        ),
        (
            "adequacy=unsatisfactory",
            {"adequacy": "unsatisfactory"},
            WorklistFilter(adequacy="unsatisfactory", limit=page),
        ),
        (
            "reviewed=false limit=100",
            {"reviewed": "false", "limit": 100},
            WorklistFilter(reviewed=False, limit=100),
        ),
        ("reviewed=true", {"reviewed": "true"}, WorklistFilter(reviewed=True, limit=page)),
        ("status=failed", {"status": "failed"}, WorklistFilter(status="failed", limit=page)),
        ("since=yesterday", {"since": since}, WorklistFilter(since=since_at, limit=page)),
    ]
    return [
        Query(
            "worklist",
            name,
            "/api/worklist",
            lambda i, p=params: p,
            lambda i, f=f: worklist_statement(f),
            WORKLIST_TARGET_MS,
            server_cursor=True,  # iter_worklist streams with yield_per=1000
            before_sql=flags_from_qc,
        )
        for name, params, f in cases
    ]


def flags_from_qc(sql: str) -> str:
    """The worklist's SQL as before migration 0007: its QC flags out of the whole QC JSON."""
    return sql.replace("slide_results.qc_flags", "slide_results.qc -> 'flags' AS qc_flags")


def cells_as_before(sql: str) -> str:
    """A scan's cells as their SQL read before migration 0007: `scan_id = s ORDER BY id`."""
    before = re.sub(r"= ANY\(ARRAY\[(%\(\w+\)s(?:::INTEGER)?)\]\)", r"= \1", sql)
    return before.replace("ORDER BY cells.scan_id, cells.id", "ORDER BY cells.id")


def cell_queries(loaded: Loaded, seed: int = 2) -> list[Query]:
    """A scan's cells as a viewer and a script ask for them, on the biggest scan."""
    sid = loaded.big_scan_id
    n = loaded.cell_scans[sid]
    rng = np.random.default_rng(seed)
    fields = rng.integers(0, [SLIDE_W // 2 - 2048, SLIDE_H // 2 - 2048], (1000, 2))
    wide = rng.integers(0, [SLIDE_W // 2 - 8192, SLIDE_H // 2 - 8192], (1000, 2))
    deep = max(0, min(n - 1000, n // 2) // 1000 * 1000)

    def box(xy: np.ndarray, side: int) -> tuple[int, int, int, int]:
        return int(xy[0]), int(xy[1]), side, side

    cases: list[tuple[str, Callable[[int], tuple[dict[str, Any], CellFilter, int, int]]]] = [
        ("page 1 (limit 1000)", lambda i: ({}, CellFilter(), 0, 1000)),
        (f"page at offset {deep:,}", lambda i: ({"offset": deep}, CellFilter(), deep, 1000)),
        ("label=HSIL", lambda i: ({"label": "HSIL"}, CellFilter(label="HSIL"), 0, 1000)),
        (
            "label=HSIL min_score=0.9",
            lambda i: (
                {"label": "HSIL", "min_score": 0.9},
                CellFilter(label="HSIL", min_score=0.9),
                0,
                1000,
            ),
        ),
        (
            "min_score=0.95",
            lambda i: ({"min_score": 0.95}, CellFilter(min_score=0.95), 0, 1000),
        ),
        (
            "region 2048² (a random field)",
            lambda i: (
                {"region": ",".join(map(str, box(fields[i % 1000], 2048)))},
                CellFilter(region=box(fields[i % 1000], 2048)),
                0,
                1000,
            ),
        ),
        (
            "label=LSIL region 8192²",
            lambda i: (
                {"label": "LSIL", "region": ",".join(map(str, box(wide[i % 1000], 8192)))},
                CellFilter(label="LSIL", region=box(wide[i % 1000], 8192)),
                0,
                1000,
            ),
        ),
        (
            "review_rank_max=50",
            lambda i: ({"review_rank_max": 50}, CellFilter(review_rank_max=50), 0, 1000),
        ),
        (
            "label=NILM limit=200 offset=2000",
            lambda i: (
                {"label": "NILM", "limit": 200, "offset": 2000},
                CellFilter(label="NILM"),
                2000,
                200,
            ),
        ),
    ]
    queries = []
    for name, make in cases:

        def params(i: int, make=make) -> dict[str, Any]:
            p, _, offset, limit = make(i)
            return {**p, "limit": limit} if "limit" not in p else p

        def sql(i: int, make=make) -> Select:
            _, f, offset, limit = make(i)
            return cells_statement(sid, f).offset(offset).limit(limit + 1)

        queries.append(
            Query(
                "cells",
                name,
                f"/api/scans/{sid}/cells",
                params,
                sql,
                CELLS_TARGET_MS,
                no_index=NO_INDEX_CELLS,
                before_sql=cells_as_before,
            )
        )
    return queries


NO_INDEX_CELLS = "ix_cells_scan_id_id"


def compile_sql(stmt: Select) -> tuple[str, dict[str, Any]]:
    """`stmt` as PostgreSQL text and parameters for psycopg (expanding IN lists)."""
    compiled = stmt.compile(
        dialect=postgresql.psycopg.dialect(), compile_kwargs={"render_postcompile": True}
    )
    return str(compiled), dict(compiled.params)


def time_api(client: httpx.Client, q: Query, repeat: int, warmup: int = 3) -> tuple[list, int]:
    """Milliseconds per request (the whole body read), and the rows of the last one."""
    body = None
    for i in range(warmup):
        r = client.get(q.path, params=q.params(i))
        r.raise_for_status()
    times = []
    for i in range(repeat):
        params = q.params(i)
        t0 = time.perf_counter()
        r = client.get(q.path, params=params)
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {q.path} {params}: {r.status_code} {r.text[:300]}")
        body = r.content
    data = json.loads(body)
    rows = len(data["cells"]) if isinstance(data, dict) else len(data)
    return times, rows


def time_sql(
    conn: psycopg.Connection, q: Query, repeat: int, warmup: int = 3, before: bool = False
) -> list[float]:
    """Milliseconds per execute + fetch of the route's SQL; with `before`, as it ran before
    migration 0007 (its index dropped inside a transaction that is rolled back, or its
    SQL as it read)."""
    times = []
    with conn.transaction(force_rollback=True):
        if before and q.no_index:
            conn.execute(f"DROP INDEX {q.no_index}")
        for i in range(-warmup, repeat):
            text, params = compile_sql(q.sql(max(i, 0)))
            if before and q.before_sql:
                text = q.before_sql(text)
            t0 = time.perf_counter()
            if q.server_cursor:
                with conn.cursor(name="bench") as cur:
                    cur.itersize = 1000
                    cur.execute(text, params)
                    for _ in cur:
                        pass
            else:
                conn.execute(text, params).fetchall()
            if i >= 0:
                times.append((time.perf_counter() - t0) * 1000)
    return times


def explain(conn: psycopg.Connection, q: Query, before: bool = False) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the query's SQL (first parameters); `before`: as
    `time_sql`."""
    text, params = compile_sql(q.sql(0))
    if before and q.before_sql:
        text = q.before_sql(text)
    with conn.transaction(force_rollback=True):
        if before and q.no_index:
            conn.execute(f"DROP INDEX {q.no_index}")
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + text, params).fetchall()
    return [r[0] for r in rows]


def index_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def measure(
    base: str,
    token: str,
    url: str,
    queries: list[Query],
    repeat: int,
    show_plans: bool = False,
    progress: Progress | None = None,
) -> list[Timing]:
    """Time every query over HTTP and as direct SQL (and without its index, if named)."""
    timings = []
    headers = {"Authorization": f"Bearer {token}"}
    task = progress.add_task("queries", total=len(queries)) if progress else None
    with (
        httpx.Client(base_url=base, headers=headers, timeout=60) as client,
        # prepare_threshold=None: planned for its parameters every time, never a generic plan
        psycopg.connect(_dsn(url), autocommit=True, prepare_threshold=None) as conn,
    ):
        has_qc_flags = _has_column(conn, "slide_results", "qc_flags")
        for q in queries:
            api_ms, rows = time_api(client, q, repeat)
            sql_ms = time_sql(conn, q, repeat) if q.sql else []
            before_ms: list[float] = []
            if q.sql and has_qc_flags and (q.no_index is None or index_exists(conn, q.no_index)):
                before_ms = time_sql(conn, q, max(3, repeat // 4), 1, before=True)
            timings.append(Timing(q, api_ms, sql_ms, before_ms, rows))
            if show_plans and q.sql:
                console.rule(f"{q.group}: {q.name}")
                console.print("\n".join(explain(conn, q)), highlight=False, soft_wrap=True)
                if before_ms:
                    console.print("-- before migration 0007:", highlight=False)
                    plan = explain(conn, q, before=True)
                    console.print("\n".join(plan), highlight=False, soft_wrap=True)
            if progress is not None:
                progress.advance(task)
    return timings


# --- DeepZoom ----------------------------------------------------------------------------


def register_slide(url: str, path: Path) -> int:
    """A slide + finished scan row for the slide file at `path` (its real fingerprint)."""
    from worker.db import queries
    from worker.wsi.slide import open_slide

    with open_slide(path) as opened:
        info = opened.info
    db = Database(url)
    try:
        with db.transaction() as s:
            slide = queries.upsert_slide(
                s,
                fingerprint=info.fingerprint,
                path=str(path),
                vendor=info.vendor,
                width=info.width,
                height=info.height,
                mpp_x=info.mpp_x,
                mpp_y=info.mpp_y,
            )
            scan = queries.create_scan(s, slide.id, {"cell_detector": "1"})
            scan.status = "done"
            scan.finished_at = datetime.now(UTC)
            return scan.id
    finally:
        db.dispose()


def tile_paths(client: httpx.Client, scan_id: int, n_tiles: int, seed: int = 3) -> list[tuple]:
    """(level, col, row) of `n_tiles` tiles: half at full resolution, the rest spread over
    the next three levels down, as a viewer zooming in asks for them."""
    r = client.get(f"/api/scans/{scan_id}/deepzoom")
    r.raise_for_status()
    dz = r.json()
    width, height, tile, levels = (int(dz[k]) for k in ("width", "height", "tile_size", "levels"))
    rng = np.random.default_rng(seed)
    quotas = [n_tiles - 3 * (n_tiles // 6)] + [n_tiles // 6] * 3
    picked = []
    for down, quota in enumerate(quotas):
        level = levels - 1 - down
        if level < 0:
            break
        scale = 2**down
        cols = math.ceil(math.ceil(width / scale) / tile)
        rows = math.ceil(math.ceil(height / scale) / tile)
        for k in rng.permutation(cols * rows)[:quota]:
            picked.append((level, int(k) % cols, int(k) // cols))
    return picked


@dataclass
class TileTiming:
    first_ms: list[float]
    cached_ms: list[float]
    direct_ms: list[float]  # OpenSlide DeepZoom tile + JPEG encode in-process, no HTTP
    tiles: int
    jpeg_bytes: int


def direct_tile_ms(path: Path, tiles: list[tuple]) -> list[float]:
    """The baseline: the same tiles cut and encoded in this process, without the API."""
    import io

    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from worker.api.slide_files import DEEPZOOM_OVERLAP, DEEPZOOM_TILE
    from worker.api.tiles import JPEG_QUALITY

    times = []
    with openslide.OpenSlide(path) as osr:
        dz = DeepZoomGenerator(
            osr, tile_size=DEEPZOOM_TILE, overlap=DEEPZOOM_OVERLAP, limit_bounds=False
        )
        for level, col, row in tiles:
            t0 = time.perf_counter()
            buffer = io.BytesIO()
            dz.get_tile(level, (col, row)).convert("RGB").save(
                buffer, format="JPEG", quality=JPEG_QUALITY
            )
            times.append((time.perf_counter() - t0) * 1000)
    return times


def measure_tiles(
    base: str, token: str, scan_id: int, path: Path, n_tiles: int
) -> TileTiming | None:
    """Each tile twice over HTTP (first touch, then cached), and once in-process; None
    where the API has no DeepZoom routes."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        probe = client.get(f"/api/scans/{scan_id}/deepzoom")
        if probe.status_code == 404 and "deepzoom" not in probe.text.lower():
            return None
        tiles = tile_paths(client, scan_id, n_tiles)
        first, cached, size = [], [], 0
        for rnd in (first, cached):
            for level, col, row in tiles:
                url = f"/api/scans/{scan_id}/deepzoom/{level}/{col}_{row}.jpeg"
                t0 = time.perf_counter()
                r = client.get(url)
                rnd.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200 or not r.content.startswith(b"\xff\xd8"):
                    raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
                size += len(r.content)
    direct = direct_tile_ms(path, tiles)
    return TileTiming(first, cached, direct, len(tiles), size // (2 * len(tiles)))


# --- report ------------------------------------------------------------------------------

ROW_HEADERS = (
    "query",
    "rows",
    "p50 ms",
    "p95 ms",
    "target",
    "pass",
    "SQL p50",
    "SQL p95",
    "API/SQL",
    "before p95",
    "before/SQL",
)


def _verdict(p95: float, target: float) -> str:
    return "[green]pass[/]" if p95 <= target else "[red]FAIL[/]"


def results_table(
    timings: list[Timing], tiles: TileTiming | None, title: str, no_tiles: str = "not measured"
) -> Table:
    """The figures: one row per query (and two for DeepZoom: first touch, cached)."""
    table = Table(title=title)
    for h in ROW_HEADERS:
        table.add_column(h, justify="left" if h == "query" else "right", no_wrap=True)
    pct = Timing.pct
    group = None
    for t in timings:
        if group is not None and t.query.group != group:
            table.add_section()
        group = t.query.group
        p95 = pct(t.api_ms, 95)
        sql95 = pct(t.sql_ms, 95)
        noix = pct(t.before_ms, 95) if t.before_ms else None
        table.add_row(
            f"{t.query.group}: {t.query.name}",
            f"{t.rows:,}",
            f"{pct(t.api_ms, 50):.1f}",
            f"{p95:.1f}",
            f"≤ {t.query.target_ms:.0f}",
            _verdict(p95, t.query.target_ms),
            f"{pct(t.sql_ms, 50):.1f}",
            f"{sql95:.1f}",
            f"{p95 / sql95:.2f}x",
            f"{noix:.1f}" if noix is not None else "-",
            f"{noix / sql95:.1f}x" if noix is not None else "-",
        )
    table.add_section()
    if tiles is None:
        table.add_row(f"deepzoom: tile ({no_tiles})", *["-"] * (len(ROW_HEADERS) - 1))
    else:
        d50, d95 = pct(tiles.direct_ms, 50), pct(tiles.direct_ms, 95)
        for name, ms, target in (
            ("first touch", tiles.first_ms, None),
            ("cached (2nd request)", tiles.cached_ms, TILE_TARGET_MS),
        ):
            p95 = pct(ms, 95)
            verdict = "-" if target is None else _verdict(p95, target)
            table.add_row(
                f"deepzoom: tile, {name}",
                f"{tiles.tiles:,}",
                f"{pct(ms, 50):.1f}",
                f"{p95:.1f}",
                "-" if target is None else f"≤ {target:.0f}",
                verdict,
                f"{d50:.1f}",
                f"{d95:.1f}",
                f"{p95 / d95:.2f}x",
                "-",
                "-",
            )
    return table


# --- main --------------------------------------------------------------------------------


@dataclass
class Run:
    loaded: Loaded
    timings: list[Timing]
    tiles: TileTiming | None
    table: Table


def run(
    pg_url: str,
    n_slides: int,
    n_cells: int,
    repeat: int,
    *,
    tiles: int = 60,
    tile_slide_px: int = 8192,
    show_plans: bool = False,
    db_name: str | None = None,
) -> Run:
    """Load, serve, measure, print; the database is dropped at the end."""
    with bench_database(pg_url, db_name) as url, tempfile.TemporaryDirectory() as tmp:
        create_schema(url)
        t0 = time.perf_counter()
        with _progress() as progress:
            loaded = load_slides(url, n_slides, progress=progress)
            load_cells(url, loaded, n_cells, progress=progress)
        loaded.load_s = time.perf_counter() - t0
        vacuum_s = settle(url)
        console.print(
            f"loaded {loaded.slides:,} slides, {loaded.scans:,} scans, {loaded.results:,} "
            f"results, {loaded.reviews:,} reviews, {loaded.cells:,} cells in {loaded.rois:,} "
            f"ROIs over {len(loaded.cell_scans)} scans (biggest: scan {loaded.big_scan_id}, "
            f"{loaded.cell_scans[loaded.big_scan_id]:,} cells) in {loaded.load_s:.1f} s "
            f"({loaded.cells / loaded.load_s:,.0f} cells/s incl. slides); VACUUM ANALYZE "
            f"{vacuum_s:.1f} s"
        )
        token = make_token(url)
        slide_scan = None
        if tiles:
            from train.synth import write_synthetic_slide

            slide_path = Path(tmp) / "deepzoom.tiff"
            write_synthetic_slide(
                slide_path,
                width=tile_slide_px,
                height=tile_slide_px,
                mpp=0.25,
                seed=5,
                cells=max(1, 400 * tile_slide_px**2 // 8192**2),
            )
            slide_scan = register_slide(url, slide_path)
        queries = worklist_queries(loaded) + cell_queries(loaded)
        with serve(url, Path(tmp) / "serve.log") as base:
            with _progress() as progress:
                timings = measure(base, token, url, queries, repeat, show_plans, progress)
            tile_timing = (
                measure_tiles(base, token, slide_scan, slide_path, tiles) if slide_scan else None
            )
    title = (
        f"papscan API on PostgreSQL: {loaded.slides:,} slides, {loaded.cells:,} cells, "
        f"{repeat} requests per query"
    )
    no_tiles = "no DeepZoom routes in this API" if tiles else "not asked: --tiles 0"
    table = results_table(timings, tile_timing, title, no_tiles)
    console.print(table)
    misses = [t.query.name for t in timings if Timing.pct(t.api_ms, 95) > t.query.target_ms] + (
        ["deepzoom cached"]
        if tile_timing and Timing.pct(tile_timing.cached_ms, 95) > TILE_TARGET_MS
        else []
    )
    console.print(
        "API/SQL: the API's p95 over the same SQL's p95 run directly with psycopg (token "
        "check, scan lookup, pydantic, JSON, HTTP). before: the SQL as it ran before migration "
        f"0007: the cells matched by scan_id = s and ordered by id, without {NO_INDEX_CELLS} "
        "(dropped in a rolled-back transaction); the worklist's QC flags out of the QC JSON. "
        "DeepZoom's "
        "SQL columns: the same tiles cut by OpenSlide and encoded in-process, no HTTP. "
        + ("Every target met." if not misses else f"Targets missed: {', '.join(misses)}.")
    )
    return Run(loaded, timings, tile_timing, table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40, help="timed requests per query")
    parser.add_argument("--tiles", type=int, default=60, help="DeepZoom tiles (0: none)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="a server to make a DB on")
    parser.add_argument("--quick", action="store_true", help="1,000 slides, 100,000 cells")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE")
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.cells, args.repeat = 1000, 100_000, 10
    if args.slides < CELL_SCANS * 2 or args.cells < CELL_SCANS * 1000:
        parser.error(f"--slides must be >= {CELL_SCANS * 2} and --cells >= {CELL_SCANS * 1000}")
    run(
        args.pg_url,
        args.slides,
        args.cells,
        args.repeat,
        tiles=args.tiles,
        show_plans=args.explain,
    )


if __name__ == "__main__":
    main()
