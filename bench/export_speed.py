"""GeoJSON export speed and memory: `papscan export --format geojson` of a 200,000-cell scan.

    python bench/export_speed.py [--cells 200000] [--repeats 3] [--db URL]

Hand-inserts one scan of `--cells` cells (`queries.write_chunk`: executemany on SQLite,
COPY on PostgreSQL) into a fresh SQLite file (default) or the database at `--db` (its
schema is created or upgraded; the bench scan's rows are deleted at the end), then
exports it to a file three ways, in the same run:

* stream: `worker.db.export.write_cells` (what the CLI runs);
* per-feature json.dumps: the export before this one (a dict and `json.dumps` per cell
  over `queries.iter_cells`), streaming too;
* in memory: the baseline that holds everything: every row fetched, the whole
  FeatureCollection built as dicts and written with one `json.dumps`.

Prints cells/s (median of `--repeats`, without tracemalloc, whose hooks slow Python
allocation several-fold) and the tracemalloc peak of one more run of each, and their
ratios. Target: >= 50,000 cells/s with a peak that does not grow with the cell count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import delete
from sqlalchemy.orm import Session

from worker.db import queries
from worker.db.export import write_cells
from worker.db.models import Scan, Slide
from worker.db.session import Database
from worker.pipeline.records import CellResult, RoiResult

console = Console(width=120)

LABELS = ("NILM",) * 8 + ("LSIL", "HSIL")
CELLS_PER_ROI = 200


def insert_scan(db: Database, n_cells: int) -> int:
    """One finished-looking scan of `n_cells` synthetic cells; returns its id."""
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s,
            fingerprint="bench-" + uuid.uuid4().hex,
            path="/nonexistent/bench.svs",
            vendor="aperio",
            width=100_000,
            height=100_000,
            mpp_x=0.25,
            mpp_y=0.25,
        )
        scan_id = queries.create_scan(s, slide.id, {"cell_detector": 1}).id
    n_rois = -(-n_cells // CELLS_PER_ROI)
    probs = {"NILM": 0.7, "LSIL": 0.2, "HSIL": 0.1}
    for first in range(0, n_rois, 100):
        rois = [
            RoiResult(i, (i % 200) * 448, (i // 200) * 448, 448, 448, "NILM", probs, 0)
            for i in range(first, min(first + 100, n_rois))
        ]
        cells = [
            CellResult(
                r.index, r.x + (k * 37) % 400, r.y + (k * 53) % 400, 24 + k % 9, 22 + k % 7,
                0.5 + (k % 50) / 100, LABELS[k % 10], 0.6 + (k % 40) / 100, probs,
                (k % 97) / 97, (k % 13) / 13, None,
            )
            for r in rois
            for k in range(min(CELLS_PER_ROI, n_cells - r.index * CELLS_PER_ROI))
        ]  # fmt: skip
        with db.session() as s, s.begin():
            queries.write_chunk(s, scan_id, rois, cells)
    return scan_id


def export_stream(s: Session, scan_id: int, out: Path) -> int:
    """The export as the CLI runs it."""
    with out.open("w") as f:
        return write_cells(s, str(scan_id), "geojson", f, origin=(0, 0))


def export_per_feature_dumps(s: Session, scan_id: int, out: Path) -> int:
    """The export before this one: a dict and json.dumps per cell, over `iter_cells`."""
    n = 0
    with out.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for n, row in enumerate(queries.iter_cells(s, scan_id), start=1):
            f.write(("," if n > 1 else "") + json.dumps(_feature(row)) + "\n")
        f.write("]}\n")
    return n


def export_in_memory(s: Session, scan_id: int, out: Path) -> int:
    """The baseline: every row fetched, the whole FeatureCollection built, one dumps."""
    rows = list(queries.iter_cells(s, scan_id))
    collection = {"type": "FeatureCollection", "features": [_feature(r) for r in rows]}
    out.write_text(json.dumps(collection))
    return len(rows)


def _feature(row) -> dict:
    x0, y0, x1, y1 = row.x, row.y, row.x + row.w, row.y + row.h
    measurements = {
        "score": row.score,
        "suspicion": row.suspicion,
        "detection_score": row.detection_score,
        "attention": row.attention,
    }
    if row.review_rank is not None:
        measurements["review_rank"] = row.review_rank
    return {
        "type": "Feature",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        },
        "properties": {
            "objectType": "detection",
            "classification": {"name": row.label},
            "measurements": measurements,
        },
    }


def timed(db: Database, scan_id: int, how: Callable, out: Path) -> float:
    """Seconds for one export, in its own session."""
    with db.session() as s:
        t0 = time.perf_counter()
        how(s, scan_id, out)
        return time.perf_counter() - t0


def peak_mib(db: Database, scan_id: int, how: Callable, out: Path) -> float:
    """tracemalloc peak of one export, MiB."""
    with db.session() as s:
        tracemalloc.start()
        try:
            how(s, scan_id, out)
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--db", help="SQLAlchemy URL (default: a fresh SQLite file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        workdir = Path(tmp)
        db = Database(args.db or f"sqlite:///{workdir / 'results.db'}")
        db.create_schema()
        t0 = time.perf_counter()
        scan_id = insert_scan(db, args.cells)
        console.print(
            f"{db.engine.dialect.name}: inserted {args.cells:,} cells in "
            f"{time.perf_counter() - t0:.1f} s (scan {scan_id})"
        )
        ways = {
            "stream (write_cells)": export_stream,
            "per-feature json.dumps (before)": export_per_feature_dumps,
            "in memory, one json.dumps (baseline)": export_in_memory,
        }
        out = workdir / "cells.geojson"
        try:
            timed(db, scan_id, export_stream, out)  # warm the database's page cache
            size_mib = out.stat().st_size / 2**20
            seconds = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, how in ways.items():
                    seconds[name].append(timed(db, scan_id, how, out))
            peaks = {name: peak_mib(db, scan_id, how, out) for name, how in ways.items()}
        finally:
            if args.db:
                with db.session() as s, s.begin():
                    slide_id = s.get(Scan, scan_id).slide_id
                    s.execute(delete(Slide).where(Slide.id == slide_id))
            db.dispose()

    rate = {name: args.cells / statistics.median(v) for name, v in seconds.items()}
    table = Table(title=f"GeoJSON export of {args.cells:,} cells ({size_mib:.0f} MiB)")
    for column in ("export", "cells/s (median)", "tracemalloc peak MiB"):
        table.add_column(column, justify="left" if column == "export" else "right")
    for name in ways:
        table.add_row(name, f"{rate[name]:,.0f}", f"{peaks[name]:.1f}")
    console.print(table)
    stream, base = "stream (write_cells)", "in memory, one json.dumps (baseline)"
    before = "per-feature json.dumps (before)"
    console.print(
        f"stream vs in-memory baseline: {rate[stream] / rate[base]:.2f}x the cells/s, "
        f"{peaks[base] / peaks[stream]:.0f}x less peak memory; vs the export before: "
        f"{rate[stream] / rate[before]:.2f}x the cells/s. Target >= 50,000 cells/s: "
        + ("met" if rate[stream] >= 50_000 else "NOT met")
    )


if __name__ == "__main__":
    main()
