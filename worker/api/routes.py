"""The API's routes: thin wrappers over `worker.db` queries, one session per request."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.api import cells as cell_queries
from worker.api.schemas import CellPage, CellRow, Error, ScanRow, WorklistRow
from worker.api.slide_files import SlideGone
from worker.db.models import SCAN_STATUSES, Cell, Scan, Slide
from worker.db.report import FIELD_UM
from worker.db.session import Database

router = APIRouter(prefix="/api")

ScanId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The scan's database id.")]
CellId = Annotated[int, Path(ge=1, le=2**62, description="The cell's database id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Error}}
#: Worklist rows per page unless asked: a night's slides, never the whole archive in one
#: answer (10,000 rows cost 300 ms in serialising alone; bench/api_speed.py).
WORKLIST_PAGE = 500
Status = Literal[SCAN_STATUSES]  # type: ignore[valid-type]


def _db(request: Request) -> Database:
    return request.app.state.db


def _scan(s: Session, scan_id: int) -> Scan:
    scan = s.get(Scan, scan_id)
    if scan is None:
        raise HTTPException(404, f"Scan {scan_id} does not exist.")
    return scan


def _cell(s: Session, scan_id: int, cell_id: int) -> tuple[Scan, Cell, Slide]:
    """The scan, its cell and its slide (404 where the scan or its cell is unknown)."""
    scan = _scan(s, scan_id)
    cell = s.scalar(select(Cell).where(Cell.id == cell_id, Cell.scan_id == scan_id))
    if cell is None:
        raise HTTPException(404, f"Scan {scan_id} has no cell {cell_id}.")
    return scan, cell, s.get(Slide, scan.slide_id)


@router.get("/worklist", response_model=list[WorklistRow], responses={422: {"model": Error}})
def worklist(
    request: Request,
    since: Annotated[str | None, Query(description="YYYY-MM-DD or ISO 8601 (UTC if bare).")] = None,
    until: Annotated[str | None, Query(description="Up to this date, inclusive.")] = None,
    status: Status | None = None,
    category: Annotated[list[str] | None, Query(description="Repeat for several.")] = None,
    adequacy: Literal["satisfactory", "unsatisfactory"] | None = None,
    reviewed: Annotated[
        bool | None, Query(description="Whether the newest scan has a review decision.")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="A page of at most this many slides.")
    ] = WORKLIST_PAGE,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Slides to skip.")] = 0,
) -> list[dict[str, Any]]:
    """The morning worklist, as `papscan results`: those needing a person first, a page
    at a time (a page shorter than `limit` is the last)."""
    from worker.db.worklist import WorklistFilter, iter_worklist

    f = WorklistFilter(
        since=_when(since, "since"),
        until=_when(until, "until", end=True),
        status=status,
        categories=tuple(_category(c) for c in category or ()),
        adequacy=adequacy,
        reviewed=reviewed,
        limit=limit,
        offset=offset,
    )
    with _db(request).session() as s:
        return list(iter_worklist(s, f))


@router.get("/scans", response_model=list[ScanRow], responses={422: {"model": Error}})
def scans(
    request: Request,
    status: Status | None = None,
    slide_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[dict[str, Any]]:
    """Scans newest first, of any status (a slide's rescans included), by status or slide."""
    from worker.db.models import SlideResult
    from worker.db.worklist import aware

    stmt = (
        select(Scan, Slide.path, SlideResult.category, SlideResult.score)
        .join(Slide, Slide.id == Scan.slide_id)
        .outerjoin(SlideResult, SlideResult.scan_id == Scan.id)
        .order_by(Scan.id.desc())
        .offset(offset)
        .limit(limit)
    )
    if status is not None:
        stmt = stmt.where(Scan.status == status)
    if slide_id is not None:
        stmt = stmt.where(Scan.slide_id == slide_id)
    with _db(request).session() as s:
        return [
            {
                "scan_id": scan.id,
                "slide_id": scan.slide_id,
                "slide_path": path,
                "status": scan.status,
                "priority": scan.priority,
                "attempt": scan.attempt,
                "category": category,
                "score": score,
                "error": scan.error,
                "worker": scan.worker,
                "model_versions": dict(scan.model_versions or {}),
                "created_at": aware(scan.created_at),
                "started_at": aware(scan.started_at),
                "finished_at": aware(scan.finished_at),
            }
            for scan, path, category, score in s.execute(stmt)
        ]


@router.get("/scans/{scan_id}", responses=NOT_FOUND)
def scan_detail(request: Request, scan_id: ScanId) -> dict[str, Any]:
    """One scan's result in full, as `papscan results SCAN --json`."""
    from worker.db.worklist import slide_detail

    with _db(request).session() as s:
        _scan(s, scan_id)
        return slide_detail(s, str(scan_id))


@router.get(
    "/scans/{scan_id}/cells",
    response_model=CellPage,
    responses={**NOT_FOUND, 400: {"model": Error}},
)
def scan_cells(
    request: Request,
    scan_id: ScanId,
    label: Annotated[str | None, Query(max_length=32)] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    region: Annotated[
        str | None, Query(max_length=64, description="x,y,w,h in level-0 px; cells overlapping.")
    ] = None,
    review_rank_max: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> dict[str, Any]:
    """A page of a scan's cells by label, score, region and review rank, in id order."""
    with _db(request).session() as s:
        scan = _scan(s, scan_id)
        box = None
        if region is not None:
            try:
                box = cell_queries.region(region, s.get(Slide, scan.slide_id))
            except ValueError as exc:
                raise HTTPException(400, str(exc)[:1].upper() + str(exc)[1:]) from None
        f = cell_queries.CellFilter(label, min_score, max_score, box, review_rank_max)
        stmt = cell_queries.cells_statement(scan_id, f).offset(offset).limit(limit + 1)
        rows = [CellRow(**row._asdict()) for row in s.execute(stmt)]
    more = len(rows) > limit
    return {
        "scan_id": scan_id,
        "offset": offset,
        "limit": limit,
        "next_offset": offset + limit if more else None,
        "cells": rows[:limit],
    }


@router.get(
    "/scans/{scan_id}/cells/{cell_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The cell's field, PNG."},
        **NOT_FOUND,
        410: {"model": Error, "description": "The slide file is gone or changed."},
    },
)
def cell_image(
    request: Request,
    scan_id: ScanId,
    cell_id: CellId,
) -> Response:
    """The cell's field (48 µm, level 0) cut from the scanned slide, its box drawn."""
    with _db(request).session() as s:
        _, cell, slide = _cell(s, scan_id, cell_id)
    try:
        png = cell_queries.cell_png(slide, cell, FIELD_UM, request.app.state.open_slides)
    except SlideGone as exc:
        raise HTTPException(410, str(exc)[:1].upper() + str(exc)[1:]) from None
    return Response(png, media_type="image/png")


@router.get("/vocabulary")
def vocabulary() -> dict[str, Any]:
    """The words results use, for clients' menus: cell classes from least to most severe
    with their fixed display colours (those of the GeoJSON export and the report), slide
    categories, scan statuses and adequacies."""
    from worker.db.export import CLASS_ORDER, class_colour
    from worker.db.worklist import ADEQUACIES, CATEGORIES

    return {
        "cell_classes": [
            {"name": name, "colour": "#{:02x}{:02x}{:02x}".format(*class_colour(name))}
            for name in CLASS_ORDER
        ],
        "categories": list(CATEGORIES),
        "statuses": list(SCAN_STATUSES),
        "adequacies": list(ADEQUACIES),
    }


@router.get("/queue")
def queue(request: Request) -> dict[str, Any]:
    """The queue and the workers, as `papscan status --json` (broker errors inside)."""
    from worker.queue.status import collect_status
    from worker.settings import get_settings

    broker_url = request.app.state.broker_url or get_settings().broker_url
    return collect_status(_db(request), broker_url).to_dict()


def _when(text: str | None, name: str, *, end: bool = False) -> datetime | None:
    """A date (whole day; `until` inclusive) or ISO 8601 time; bare times are UTC."""
    if text is None:
        return None
    try:
        day = date.fromisoformat(text.strip())
        return datetime.combine(day + timedelta(days=int(end)), time(), tzinfo=UTC)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise HTTPException(422, f"{name} must be YYYY-MM-DD or an ISO 8601 time.") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _category(name: str) -> str:
    """A category as stored, from any case; 'unsatisfactory' names the long one."""
    from worker.db.worklist import CATEGORIES

    by_key = {c.lower(): c for c in CATEGORIES}
    by_key["unsatisfactory"] = CATEGORIES[-1]
    found = by_key.get(name.strip().lower())
    if found is None:
        raise HTTPException(422, f"category must be one of {', '.join(CATEGORIES)}.")
    return found
