"""The review routes: a cytologist's decisions on a scan and its cells.

Decisions are stored beside the AI's result (`worker/db/reviews.py`), never over it;
the reviewer is the name of the bearer token the request came with.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.api.routes import NOT_FOUND, CellId, ScanId, _db
from worker.api.schemas import Error
from worker.db import reviews
from worker.db.models import ApiToken
from worker.db.worklist import CATEGORIES

__all__ = ["router"]

router = APIRouter(prefix="/api")

Category = Literal[CATEGORIES]  # type: ignore[valid-type]
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    409: {"model": Error, "description": "The scan is not done."},
    422: {"model": Error},
}


class SlideReviewIn(BaseModel):
    """A decision on a scan: agree or not with the AI category, one's own, a note."""

    model_config = ConfigDict(extra="forbid")

    agrees: bool
    category: Category | None = Field(
        None,
        description="The reviewer's category: a Bethesda name or 'Unsatisfactory for "
        "evaluation' (any case is taken; 'unsatisfactory' for short).",
    )
    note: str | None = Field(None, max_length=10_000)

    @field_validator("category", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        """A category as stored, from any case; 'unsatisfactory' names the long one."""
        if not isinstance(value, str):
            return value
        by_key = {c.lower(): c for c in CATEGORIES}
        by_key["unsatisfactory"] = CATEGORIES[-1]
        return by_key.get(value.strip().lower(), value)


class SlideReviewOut(BaseModel):
    """A recorded decision on a scan."""

    id: int
    scan_id: int
    reviewer: str
    agrees: bool
    category: str | None
    note: str | None
    created_at: datetime


class CellReviewIn(BaseModel):
    """A verdict on one detected cell."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["true_positive", "false_positive"]


class CellReviewOut(BaseModel):
    """A recorded verdict on a cell."""

    id: int
    cell_id: int
    scan_id: int
    reviewer: str
    verdict: str
    created_at: datetime


class ReviewHistory(BaseModel):
    """A scan's decisions and cell verdicts, newest first; `current` is the newest decision."""

    scan_id: int
    current: SlideReviewOut | None
    reviews: list[SlideReviewOut]
    cell_reviews: list[CellReviewOut]


@router.post(
    "/scans/{scan_id}/review",
    status_code=201,
    response_model=SlideReviewOut,
    responses=WRITE_ERRORS,
)
def review_scan(request: Request, scan_id: ScanId, body: SlideReviewIn) -> dict[str, Any]:
    """Record a decision on a done scan; a later one is a new row (the newest is current)."""
    with _db(request).transaction() as s:
        try:
            return reviews.add_slide_review(
                s,
                scan_id,
                _reviewer(s, request),
                agrees=body.agrees,
                category=body.category,
                note=body.note,
            )
        except reviews.ReviewError as exc:
            raise _http(exc) from None


@router.get("/scans/{scan_id}/reviews", response_model=ReviewHistory, responses=NOT_FOUND)
def scan_reviews(request: Request, scan_id: ScanId) -> dict[str, Any]:
    """A scan's decisions and cell verdicts, newest first."""
    with _db(request).session() as s:
        try:
            history = reviews.slide_reviews(s, scan_id)
        except reviews.ReviewError as exc:
            raise _http(exc) from None
        cells = reviews.cell_reviews(s, scan_id)
    return {
        "scan_id": scan_id,
        "current": history[0] if history else None,
        "reviews": history,
        "cell_reviews": cells,
    }


@router.post(
    "/scans/{scan_id}/cells/{cell_id}/review",
    status_code=201,
    response_model=CellReviewOut,
    responses=WRITE_ERRORS,
)
def review_cell(
    request: Request, scan_id: ScanId, cell_id: CellId, body: CellReviewIn
) -> dict[str, Any]:
    """Mark a cell of a done scan as a true or a false positive."""
    with _db(request).transaction() as s:
        try:
            return reviews.add_cell_review(s, scan_id, cell_id, _reviewer(s, request), body.verdict)
        except reviews.ReviewError as exc:
            raise _http(exc) from None


def _reviewer(s: Session, request: Request) -> str:
    """The name of the request's bearer token (the app has already checked it)."""
    _, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
    name = s.scalar(
        select(ApiToken.name).where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
    )
    if name is None:
        raise HTTPException(
            401, "A valid bearer token is needed.", headers={"WWW-Authenticate": "Bearer"}
        )
    return name


def _http(exc: reviews.ReviewError) -> HTTPException:
    status = 409 if isinstance(exc, reviews.ScanNotDoneError) else 404
    return HTTPException(status, str(exc))
