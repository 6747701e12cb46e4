"""The API's response bodies, as pydantic models (they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

__all__ = ["CellPage", "CellRow", "DeepZoomInfo", "Error", "ScanRow", "WorklistRow"]


class Error(BaseModel):
    """Every error: one sentence, no internals."""

    detail: str


class WorklistRow(BaseModel):
    """One slide of the worklist: its newest scan (`worklist.WORKLIST_COLUMNS`)."""

    scan_id: int
    slide_id: int
    slide_path: str
    fingerprint: str
    barcode: str | None
    category: str | None
    score: float | None
    adequacy: str | None
    qc_flags: list[Any]
    status: str
    error: str | None
    created_at: datetime | None
    finished_at: datetime | None
    reviewed: bool


class ScanRow(BaseModel):
    """One scan, any status: a slide's scans are its attempts at a result over time."""

    scan_id: int
    slide_id: int
    slide_path: str
    status: str
    priority: str
    attempt: int
    category: str | None
    score: float | None
    error: str | None
    worker: str | None
    model_versions: dict[str, Any]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class CellRow(BaseModel):
    """One cell; its box in level-0 px."""

    id: int
    x: int
    y: int
    w: int
    h: int
    label: str
    score: float
    detection_score: float
    suspicion: float
    attention: float
    review_rank: int | None
    roi_index: int


class CellPage(BaseModel):
    """A page of a scan's cells, in id order; `next_offset` is None on the last page."""

    scan_id: int
    offset: int
    limit: int
    next_offset: int | None
    cells: list[CellRow]


class DeepZoomInfo(BaseModel):
    """A slide's DeepZoom pyramid; level `levels - 1` is level 0 of the slide."""

    width: int
    height: int
    tile_size: int
    overlap: int
    format: str
    levels: int
    mpp: float
    tiles: str
