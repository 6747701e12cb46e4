"""Review decisions: a cytologist's call on a scan and on its cells, as plain functions.

Decisions sit beside the AI's result (`slide_results`, `cells`), which they never
change. Each call adds a row; the history is kept and the newest row is current.
None of these functions commits: the caller's transaction does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db.models import REVIEW_VERDICTS, Cell, CellReview, Scan, SlideReview, utc_now
from worker.db.worklist import CATEGORIES, aware

__all__ = [
    "CellNotInScanError",
    "ReviewError",
    "ScanNotDoneError",
    "ScanNotFoundError",
    "add_cell_review",
    "add_slide_review",
    "cell_reviews",
    "slide_reviews",
]


class ReviewError(Exception):
    """A decision that cannot be recorded; the message is one sentence."""


class ScanNotFoundError(ReviewError):
    """No scan has that id."""


class ScanNotDoneError(ReviewError):
    """The scan has no finished result to review."""


class CellNotInScanError(ReviewError):
    """The cell does not exist or belongs to another scan."""


def _done_scan(s: Session, scan_id: int) -> Scan:
    scan = s.get(Scan, scan_id)
    if scan is None:
        raise ScanNotFoundError(f"Scan {scan_id} does not exist.")
    if scan.status != "done":
        raise ScanNotDoneError(
            f"Scan {scan_id} is {scan.status}, not done: only a finished result is reviewed."
        )
    return scan


def _reviewer(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64:
        raise ValueError("a reviewer name must have 1 to 64 characters.")
    return name


def add_slide_review(
    s: Session,
    scan_id: int,
    reviewer: str,
    *,
    agrees: bool,
    category: str | None = None,
    note: str | None = None,
    when: datetime | None = None,
) -> dict[str, Any]:
    """Record `reviewer`'s decision on scan `scan_id` and return it as `slide_reviews` does.

    Raises:
        ScanNotFoundError: no such scan.
        ScanNotDoneError: the scan is not done.
        ValueError: `category` is not one of `worklist.CATEGORIES`, or a bad reviewer.
    """
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}.")
    reviewer = _reviewer(reviewer)
    _done_scan(s, scan_id)
    review = SlideReview(
        scan_id=scan_id,
        reviewer=reviewer,
        agrees=agrees,
        category=category,
        note=note,
        created_at=when or utc_now(),
    )
    s.add(review)
    s.flush()
    return _slide_row(review)


def slide_reviews(s: Session, scan_id: int) -> list[dict[str, Any]]:
    """Every decision on scan `scan_id`, newest first (the first is current).

    Raises:
        ScanNotFoundError: no such scan.
    """
    if s.get(Scan, scan_id) is None:
        raise ScanNotFoundError(f"Scan {scan_id} does not exist.")
    stmt = (
        select(SlideReview)
        .where(SlideReview.scan_id == scan_id)
        .order_by(SlideReview.created_at.desc(), SlideReview.id.desc())
    )
    return [_slide_row(r) for r in s.scalars(stmt)]


def add_cell_review(
    s: Session,
    scan_id: int,
    cell_id: int,
    reviewer: str,
    verdict: str,
    *,
    when: datetime | None = None,
) -> dict[str, Any]:
    """Record `reviewer`'s verdict ('true_positive' | 'false_positive') on a cell.

    Raises:
        ScanNotFoundError: no such scan.
        ScanNotDoneError: the scan is not done.
        CellNotInScanError: the cell does not exist in that scan.
        ValueError: a bad verdict or reviewer.
    """
    if verdict not in REVIEW_VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(REVIEW_VERDICTS)}.")
    reviewer = _reviewer(reviewer)
    _done_scan(s, scan_id)
    found = s.scalar(select(Cell.id).where(Cell.id == cell_id, Cell.scan_id == scan_id))
    if found is None:
        raise CellNotInScanError(f"Scan {scan_id} has no cell {cell_id}.")
    review = CellReview(
        cell_id=cell_id,
        scan_id=scan_id,
        reviewer=reviewer,
        verdict=verdict,
        created_at=when or utc_now(),
    )
    s.add(review)
    s.flush()
    return _cell_row(review)


def cell_reviews(s: Session, scan_id: int) -> list[dict[str, Any]]:
    """Every verdict on the cells of scan `scan_id`, newest first."""
    stmt = (
        select(CellReview)
        .where(CellReview.scan_id == scan_id)
        .order_by(CellReview.created_at.desc(), CellReview.id.desc())
    )
    return [_cell_row(r) for r in s.scalars(stmt)]


def _slide_row(r: SlideReview) -> dict[str, Any]:
    return {
        "id": r.id,
        "scan_id": r.scan_id,
        "reviewer": r.reviewer,
        "agrees": r.agrees,
        "category": r.category,
        "note": r.note,
        "created_at": aware(r.created_at),
    }


def _cell_row(r: CellReview) -> dict[str, Any]:
    return {
        "id": r.id,
        "cell_id": r.cell_id,
        "scan_id": r.scan_id,
        "reviewer": r.reviewer,
        "verdict": r.verdict,
        "created_at": aware(r.created_at),
    }
