"""Reads and writes of the results database, as plain functions over a `Session`.

None of these functions commits: the caller owns the transaction, at the task or
command boundary::

    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, rois, cells)

Review ranks: cells are written in chunks while the scan runs, before the slide's top-K
is known, so `finish_scan` sets `cells.review_rank` afterwards by matching each of
`SlideSummary.top_cells` to its stored row on (scan, ROI index, x, y, w, h); the rank is
the cell's own `review_rank` if set, else its 1-based position in `top_cells`. A
`review_rank` already set on a `CellResult` given to `write_chunk` is stored as is.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Integer,
    Row,
    Select,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from worker.db.models import SCAN_STATUSES, Cell, Roi, Scan, Slide, SlideResult, utc_now
from worker.errors import ScanNotFoundError
from worker.pipeline.records import CellResult, RoiResult, SlideSummary

if TYPE_CHECKING:
    from worker.wsi.slide import SlideInfo

__all__ = [
    "CELL_EXPORT_COLUMNS",
    "ScanNotFoundError",
    "cancel_scan",
    "cells_statement",
    "clear_scan_rows",
    "create_scan",
    "fail_scan",
    "finish_scan",
    "get_scan",
    "iter_cells",
    "latest_scan_for_slide",
    "resolve_scan",
    "scan_summary",
    "start_scan",
    "upsert_slide",
    "write_chunk",
]

logger = logging.getLogger(__name__)

# Columns of the rows `iter_cells` yields, in order (a CSV header).
CELL_EXPORT_COLUMNS = (
    "x",
    "y",
    "w",
    "h",
    "label",
    "score",
    "detection_score",
    "suspicion",
    "attention",
    "review_rank",
    "roi_id",
    "roi_index",
)

_MAX_ERROR_CHARS = 4000


# --- slides and scans -----------------------------------------------------------------


def upsert_slide(
    s: Session,
    *,
    fingerprint: str,
    path: str | os.PathLike[str],
    vendor: str,
    width: int,
    height: int,
    mpp_x: float,
    mpp_y: float,
    barcode: str | None = None,
) -> Slide:
    """Insert a slide, or update the one with the same fingerprint.

    Race-free on SQLite and PostgreSQL (`INSERT .. ON CONFLICT DO UPDATE`): two workers
    recording the same slide at once get the same row. An existing row gets the new
    `path`, and the new `barcode` when one is given; its other fields are kept (the
    fingerprint fixes the file's content).

    Args:
        fingerprint: the slide's content hash (OpenSlide quickhash-1).
        path: where the file is now.
        vendor: OpenSlide vendor (e.g. "aperio", "generic-tiff").
        width, height: level-0 size, px.
        mpp_x, mpp_y: microns per level-0 pixel.
        barcode: the slide label's barcode, if read.

    Returns:
        The slide row.
    """
    values = dict(
        fingerprint=fingerprint,
        path=str(path),
        vendor=vendor,
        width=width,
        height=height,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        barcode=barcode,
        created_at=utc_now(),
    )
    dialect = s.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        stmt = dialect_insert(Slide).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[Slide.fingerprint],
            set_={
                "path": stmt.excluded.path,
                "barcode": func.coalesce(stmt.excluded.barcode, Slide.barcode),
            },
        ).returning(Slide)
        return s.scalars(stmt, execution_options={"populate_existing": True}).one()
    slide = s.scalars(select(Slide).where(Slide.fingerprint == fingerprint)).one_or_none()
    if slide is None:
        slide = Slide(**values)
        s.add(slide)
    else:
        slide.path = str(path)
        if barcode is not None:
            slide.barcode = barcode
    s.flush()
    return slide


def record_slide(
    s: Session, info: SlideInfo, *, barcode: str | None = None, preparation: str | None = None
) -> Slide:
    """`upsert_slide` for an opened slide: its fingerprint, path, vendor, size and mpp.

    Args:
        info: `Slide.info` of the opened file.
        barcode: the slide label's barcode, if read.
        preparation: liquid-based or conventional, if given (kept when None).
    """
    slide = upsert_slide(
        s,
        fingerprint=info.fingerprint,
        path=info.path,
        vendor=info.vendor,
        width=info.width,
        height=info.height,
        mpp_x=info.mpp_x,
        mpp_y=info.mpp_y,
        barcode=barcode,
    )
    if preparation is not None:
        slide.preparation = preparation
    return slide


def create_scan(
    s: Session,
    slide_id: int,
    model_versions: dict[str, int | str],
    priority: str = "routine",
    reader: str | None = None,
    model_sha256: dict[str, str] | None = None,
) -> Scan:
    """Record a queued scan of a slide.

    Args:
        slide_id: the slide's id.
        model_versions: engine name -> version used (e.g. {"cell_detector": 1}).
        model_sha256: engine name -> sha256 of its weights (the models' identity).
        priority: queue priority label (e.g. "routine", "urgent").
        reader: how regions are read, if known (e.g. "dali-cpu", "openslide").

    Returns:
        The scan row, flushed (its id is set).
    """
    scan = Scan(
        slide_id=slide_id,
        status="queued",
        priority=priority,
        model_versions=dict(model_versions),
        model_sha256=dict(model_sha256) if model_sha256 else None,
        rois_done=0,
        reader=reader,
        created_at=utc_now(),
    )
    s.add(scan)
    s.flush()
    return scan


def get_scan(s: Session, scan_id: int) -> Scan:
    """Return the scan with this id.

    Raises:
        ScanNotFoundError: no such scan.
    """
    scan = s.get(Scan, scan_id)
    if scan is None:
        raise ScanNotFoundError(f"scan {scan_id} does not exist in the results database.")
    return scan


def start_scan(
    s: Session,
    scan_id: int,
    rois_planned: int,
    worker: str | None = None,
    reader: str | None = None,
) -> Scan:
    """Mark a scan running: planned ROIs known, progress reset, previous error cleared.

    Args:
        scan_id: the scan's id.
        rois_planned: ROIs the planner laid over the slide.
        worker: who runs it (e.g. "host:pid:gpu0").
        reader: how regions are read (e.g. "dali-cpu"); kept as is when None.

    Raises:
        ScanNotFoundError: no such scan.
    """
    scan = get_scan(s, scan_id)
    scan.status = "running"
    scan.rois_planned = rois_planned
    scan.rois_done = 0
    scan.worker = worker
    if reader is not None:
        scan.reader = reader
    scan.error = None
    scan.started_at = utc_now()
    scan.finished_at = None
    s.flush()
    return scan


def clear_scan_rows(s: Session, scan_id: int) -> None:
    """Delete a scan's cells, ROIs and slide result, and reset its progress.

    Run before (re)starting a scan, so a retried scan never duplicates rows. Idempotent.
    """
    for model in (Cell, Roi, SlideResult):
        s.execute(
            delete(model).where(model.scan_id == scan_id),
            execution_options={"synchronize_session": False},
        )
    s.execute(
        update(Scan).where(Scan.id == scan_id).values(rois_done=0),
        execution_options={"synchronize_session": False},
    )
    _expire_scan(s, scan_id, ["rois_done"])


def write_chunk(
    s: Session, scan_id: int, rois: Sequence[RoiResult], cells: Sequence[CellResult]
) -> None:
    """Bulk-insert a chunk of a scan's ROIs and cells; advance `scans.rois_done`.

    ROIs are inserted with RETURNING (ids in parameter order), then cells: on PostgreSQL
    with COPY inside the caller's transaction (several times the rows/s of INSERTs), on
    other databases in one executemany (multi-row INSERTs). The stored rows are the same
    either way. A cell's `roi_index` may name an ROI of this chunk or one written earlier
    in the same scan.

    Args:
        scan_id: the scan's id.
        rois: ROIs finished in this chunk (`rois_done` grows by their number).
        cells: the cells found in them.

    Raises:
        ValueError: a cell names an ROI index the scan does not have.
    """
    roi_ids: dict[int, int] = {}
    if rois:
        roi_rows = [
            dict(
                scan_id=scan_id,
                index=r.index,
                x=r.x,
                y=r.y,
                w=r.w,
                h=r.h,
                label=r.label,
                probs=dict(r.probs),
                cell_count=r.cell_count,
            )
            for r in rois
        ]
        ids = s.scalars(insert(Roi).returning(Roi.id, sort_by_parameter_order=True), roi_rows)
        roi_ids = dict(zip((r.index for r in rois), ids, strict=True))
    if cells:
        missing = {c.roi_index for c in cells} - roi_ids.keys()
        if missing:
            roi_ids.update(_roi_ids(s, scan_id, missing))
            unknown = missing - roi_ids.keys()
            if unknown:
                raise ValueError(
                    f"cells name ROI indexes {sorted(unknown)[:5]} that scan {scan_id} lacks."
                )
        if s.get_bind().dialect.name == "postgresql":
            _copy_cells(s, scan_id, roi_ids, cells)
        else:
            cell_rows = cell_row_dicts(scan_id, roi_ids, cells)
            s.execute(insert(Cell), cell_rows)
    if rois:
        s.execute(
            update(Scan).where(Scan.id == scan_id).values(rois_done=Scan.rois_done + len(rois)),
            execution_options={"synchronize_session": False},
        )
        _expire_scan(s, scan_id, ["rois_done"])
    logger.debug("scan %d: wrote %d ROIs, %d cells", scan_id, len(rois), len(cells))


_COPY_CELLS = (
    "COPY cells (scan_id, roi_id, x, y, w, h, detection_score, label, score, suspicion,"
    " probs, attention, review_rank) FROM STDIN"
)


def _copy_cells(
    s: Session, scan_id: int, roi_ids: dict[int, int], cells: Sequence[CellResult]
) -> None:
    """COPY cells into PostgreSQL on the session's own connection, in its transaction.

    `probs` is written as the text `json.dumps` gives, which is what SQLAlchemy's JSON
    type stores for an INSERT, so both paths store the same rows.
    """
    dbapi = s.connection().connection.driver_connection
    keys: dict[str, str] = {}  # label -> its JSON string, e.g. '"NILM": '
    with dbapi.cursor() as cursor, cursor.copy(_COPY_CELLS) as copy:
        write_row = copy.write_row
        for c in cells:
            write_row(
                (
                    scan_id,
                    roi_ids[c.roi_index],
                    c.x,
                    c.y,
                    c.w,
                    c.h,
                    c.detection_score,
                    c.label,
                    c.score,
                    c.suspicion,
                    _json_object(c.probs, keys),
                    c.attention,
                    c.review_rank,
                )
            )


def _json_object(probs: dict[str, float], keys: dict[str, str]) -> str:
    """`json.dumps(probs)` for a dict of label -> finite float, about 4x faster.

    `json.dumps` writes a finite float with `float.__repr__` and an int with `int.__repr__`;
    anything else (NaN, infinities, other types) goes through `json.dumps` itself.
    """
    parts = []
    for key, value in probs.items():
        if type(value) not in (float, int) or not math.isfinite(value):
            return json.dumps(dict(probs))
        prefix = keys.get(key)
        if prefix is None:
            prefix = keys[key] = json.dumps(key) + ": "
        parts.append(prefix + repr(value))
    return "{" + ", ".join(parts) + "}"


def finish_scan(
    s: Session,
    scan_id: int,
    summary: SlideSummary,
    timings_ms: dict[str, float],
    reader: str | None = None,
) -> Scan:
    """Write the slide result, mark the review cells, and mark the scan done.

    Args:
        scan_id: the scan's id.
        summary: the slide-level result; its `top_cells` get review ranks (see module doc).
        timings_ms: stage name -> wall time, ms.
        reader: how regions were read (e.g. "dali-cpu"); kept as is when None.

    Raises:
        ScanNotFoundError: no such scan.
        ValueError: a top cell is not among the scan's stored cells.
    """
    scan = get_scan(s, scan_id)
    s.execute(
        update(Cell)
        .where(Cell.scan_id == scan_id, Cell.review_rank.is_not(None))
        .values(review_rank=None),
        execution_options={"synchronize_session": False},
    )
    roi_ids = _roi_ids(s, scan_id, {c.roi_index for c in summary.top_cells})
    for position, cell in enumerate(summary.top_cells, start=1):
        roi_id = roi_ids.get(cell.roi_index)
        updated = 0
        if roi_id is not None:
            updated = s.execute(
                update(Cell)
                .where(
                    Cell.scan_id == scan_id,
                    Cell.roi_id == roi_id,
                    Cell.x == cell.x,
                    Cell.y == cell.y,
                    Cell.w == cell.w,
                    Cell.h == cell.h,
                )
                .values(review_rank=cell.review_rank or position),
                execution_options={"synchronize_session": False},
            ).rowcount
        if not updated:
            raise ValueError(
                f"top cell {position} (ROI {cell.roi_index}, box {cell.x},{cell.y},"
                f"{cell.w},{cell.h}) is not among the stored cells of scan {scan_id}."
            )
    s.execute(
        delete(SlideResult).where(SlideResult.scan_id == scan_id),
        execution_options={"synchronize_session": False},
    )
    call, adequacy = summary.call, summary.call.adequacy if summary.call else None
    s.add(
        SlideResult(
            scan_id=scan_id,
            category=summary.category,
            score=summary.score,
            cell_count=summary.cell_count,
            roi_count=summary.roi_count,
            class_counts=dict(summary.class_counts),
            abnormal=call.abnormal if call else None,
            adequacy=None
            if adequacy is None
            else ("satisfactory" if adequacy.satisfactory else "unsatisfactory"),
            squamous_estimate=adequacy.squamous_estimate if adequacy else None,
            adequacy_minimum=adequacy.minimum if adequacy else None,
            preparation=adequacy.preparation if adequacy else None,
            operating_point=call.operating_point if call else None,
            notes=list(call.notes) if call and call.notes else None,
            qc=dict(summary.qc) if summary.qc else None,
            evidence=asdict(summary.evidence) if summary.evidence else None,
        )
    )
    scan.status = "done"
    scan.lease_expires_at = None
    if reader is not None:
        scan.reader = reader
    scan.stage_timings_ms = {k: float(v) for k, v in timings_ms.items()}
    scan.error = None
    scan.finished_at = utc_now()
    s.flush()
    return scan


def fail_scan(s: Session, scan_id: int, error: str) -> Scan:
    """Mark a scan failed with its error (one sentence; long text is cut).

    Rows written before the failure stay until the scan is retried (`clear_scan_rows`);
    queries for results should only read scans whose status is done.

    Raises:
        ScanNotFoundError: no such scan.
    """
    scan = get_scan(s, scan_id)
    scan.status = "failed"
    scan.lease_expires_at = None
    scan.error = error[:_MAX_ERROR_CHARS]
    scan.finished_at = utc_now()
    s.flush()
    return scan


def cancel_scan(s: Session, scan_id: int) -> Scan:
    """Mark a queued or running scan cancelled (a finished scan is left as it is).

    Raises:
        ScanNotFoundError: no such scan.
    """
    scan = get_scan(s, scan_id)
    if scan.status in ("queued", "running"):
        scan.status = "cancelled"
        scan.lease_expires_at = None
        scan.finished_at = utc_now()
        s.flush()
    return scan


# --- reads ----------------------------------------------------------------------------


def latest_scan_for_slide(
    s: Session, slide: int | str | os.PathLike[str], status: str | None = None
) -> Scan | None:
    """Return the newest scan of a slide, or None.

    Args:
        slide: a slide id (int), or a fingerprint or path (str / path). A path matches as
            given, absolute, or with symlinks resolved.
        status: only scans with this status (e.g. "done").

    Raises:
        ValueError: `status` is not a scan status.
    """
    if status is not None and status not in SCAN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(SCAN_STATUSES)}, not {status!r}.")
    stmt = select(Scan).join(Slide, Scan.slide_id == Slide.id)
    if isinstance(slide, int):
        stmt = stmt.where(Slide.id == slide)
    else:
        ref = os.fspath(slide)
        stmt = stmt.where(or_(Slide.fingerprint == ref, Slide.path.in_(_path_forms(ref))))
    if status is not None:
        stmt = stmt.where(Scan.status == status)
    return s.scalars(stmt.order_by(Scan.id.desc()).limit(1)).first()


def resolve_scan(s: Session, ref: str) -> Scan:
    """Find the scan a user means: a scan id, or a slide path / fingerprint.

    A slide path or fingerprint resolves to that slide's newest finished (done) scan.

    Raises:
        ScanNotFoundError: nothing matches, or the slide has no finished scan; the
            message says which.
    """
    ref = ref.strip()
    if ref.isdigit():
        scan = s.get(Scan, int(ref))
        if scan is not None:
            return scan
    slide = s.scalars(
        select(Slide)
        .where(or_(Slide.fingerprint == ref, Slide.path.in_(_path_forms(ref))))
        .order_by(Slide.id.desc())
        .limit(1)
    ).first()
    if slide is None:
        what = "scan or slide" if ref.isdigit() else "slide"
        raise ScanNotFoundError(
            f"no {what} matches {ref!r} in the results database"
            " (give a scan id, a slide path or a slide fingerprint)."
        )
    scan = latest_scan_for_slide(s, slide.id, status="done")
    if scan is None:
        latest = latest_scan_for_slide(s, slide.id)
        state = f"its latest scan {latest.id} is {latest.status}" if latest else "never scanned"
        raise ScanNotFoundError(f"slide {slide.path} has no finished scan ({state}).")
    return scan


class _scan_ids(FunctionElement):
    """A scan id to compare `cells.scan_id` with: `:scan_id`, on PostgreSQL
    `ANY(ARRAY[:scan_id])`.

    Ordered by `(scan_id, id)` after a plain `scan_id = s`, PostgreSQL drops `scan_id`
    from the order (it is a constant) and, under a LIMIT or a cursor, may walk the
    primary key through every scan's cells looking for this one's, trusting them to be
    spread evenly over the table; they lie together, the newest at its end (a filter
    on `score` alone over 1,000,000 cells: 63 ms instead of 9). Matched through an array,
    `scan_id` stays in the order, which only `ix_cells_scan_id_id` gives.
    """

    type = Integer()
    inherit_cache = True
    name = "scan_ids"


@compiles(_scan_ids)
def _scan_ids_default(element: _scan_ids, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_scan_ids, "postgresql")
def _scan_ids_postgresql(element: _scan_ids, compiler: Any, **kw: Any) -> str:
    return f"ANY(ARRAY[{compiler.process(element.clauses, **kw)}])"


def cells_statement(scan_id: int, *leading: Any) -> Select:
    """A scan's cells as `CELL_EXPORT_COLUMNS`, after any `leading` columns (e.g.
    `Cell.id`), in insertion order (`(scan_id, id)`, from its index: see `_scan_ids`);
    callers add filters, paging or streaming."""
    return (
        select(
            *leading,
            Cell.x,
            Cell.y,
            Cell.w,
            Cell.h,
            Cell.label,
            Cell.score,
            Cell.detection_score,
            Cell.suspicion,
            Cell.attention,
            Cell.review_rank,
            Cell.roi_id,
            Roi.index.label("roi_index"),
        )
        .join(Roi, Cell.roi_id == Roi.id)
        .where(Cell.scan_id == _scan_ids(literal(scan_id, Integer)))
        .order_by(Cell.scan_id, Cell.id)
    )


def iter_cells(s: Session, scan_id: int, *, batch_rows: int = 2000) -> Iterator[Row[Any]]:
    """Stream a scan's cells for export, in insertion order (stable across calls).

    Rows are fetched `batch_rows` at a time (a server-side cursor on PostgreSQL), never
    all at once. Consume the iterator inside the session's transaction.

    Args:
        scan_id: the scan's id.
        batch_rows: rows fetched per round trip.

    Yields:
        Rows with the fields of `CELL_EXPORT_COLUMNS` (boxes in level-0 px); use
        `row._asdict()` for a dict.
    """
    stmt = cells_statement(scan_id).execution_options(yield_per=batch_rows)
    yield from s.execute(stmt)


def scan_summary(s: Session, scan_id: int) -> dict[str, Any]:
    """Return what `papscan results` prints about a scan, as plain values.

    Keys: scan_id, slide_id, slide_path, fingerprint, status, priority, progress (0..1 or
    None), rois_planned, rois_done, category, score, cell_count, roi_count, class_counts
    (None until done), stage_timings_ms, model_versions, reader, worker, error,
    created_at, started_at, finished_at.

    Raises:
        ScanNotFoundError: no such scan.
    """
    scan = get_scan(s, scan_id)
    slide = s.get(Slide, scan.slide_id)
    result = s.get(SlideResult, scan_id)
    progress = None
    if scan.status == "done":
        progress = 1.0
    elif scan.rois_planned:
        progress = min(1.0, scan.rois_done / scan.rois_planned)
    return {
        "scan_id": scan.id,
        "slide_id": scan.slide_id,
        "slide_path": slide.path if slide else None,
        "fingerprint": slide.fingerprint if slide else None,
        "status": scan.status,
        "priority": scan.priority,
        "progress": progress,
        "rois_planned": scan.rois_planned,
        "rois_done": scan.rois_done,
        "category": result.category if result else None,
        "score": result.score if result else None,
        "cell_count": result.cell_count if result else None,
        "roi_count": result.roi_count if result else None,
        "class_counts": dict(result.class_counts) if result else None,
        "stage_timings_ms": dict(scan.stage_timings_ms or {}),
        "model_versions": dict(scan.model_versions or {}),
        "reader": scan.reader,
        "worker": scan.worker,
        "error": scan.error,
        "created_at": scan.created_at,
        "started_at": scan.started_at,
        "finished_at": scan.finished_at,
    }


# --- helpers --------------------------------------------------------------------------


def _roi_ids(s: Session, scan_id: int, indexes: set[int]) -> dict[int, int]:
    """Return ROI index -> ROI id for the given indexes of a scan (missing ones left out)."""
    if not indexes:
        return {}
    rows = s.execute(
        select(Roi.index, Roi.id).where(Roi.scan_id == scan_id, Roi.index.in_(sorted(indexes)))
    )
    return {index: roi_id for index, roi_id in rows}


def _expire_scan(s: Session, scan_id: int, attributes: list[str]) -> None:
    """Expire attributes of a loaded Scan that a bulk UPDATE changed behind the ORM."""
    scan = s.identity_map.get(s.identity_key(Scan, scan_id))
    if scan is not None:
        s.expire(scan, attributes)


def _path_forms(ref: str) -> list[str]:
    """Return the ways a slide path may have been stored: as given, absolute, resolved."""
    forms = [ref]
    try:
        path = Path(ref).expanduser()
        forms += [os.path.abspath(path), str(path.resolve())]
    except (OSError, RuntimeError, ValueError):
        pass
    return list(dict.fromkeys(forms))


def cell_row_dicts(
    scan_id: int, roi_ids: dict[int, int], cells: list[CellResult]
) -> list[dict[str, Any]]:
    """The `cells` table rows of `cells` as dicts, for an executemany INSERT.

    Args:
        scan_id: The scan the cells belong to.
        roi_ids: ROI index within the scan -> `rois.id`.
        cells: The pipeline's cells.
    """
    return [
        dict(
            scan_id=scan_id,
            roi_id=roi_ids[c.roi_index],
            x=c.x,
            y=c.y,
            w=c.w,
            h=c.h,
            detection_score=c.detection_score,
            label=c.label,
            score=c.score,
            suspicion=c.suspicion,
            probs=dict(c.probs),
            attention=c.attention,
            review_rank=c.review_rank,
        )
        for c in cells
    ]
