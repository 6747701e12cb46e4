"""The morning worklist and one slide's full result, as plain functions over a `Session`.

The worklist has one row per slide, its newest scan (the highest scan id of the slide,
found with one `max(id) GROUP BY slide_id` over the `(slide_id, id)` index), ranked so
slides that need a person come first: failed scans and "Unsatisfactory for evaluation"
on top, then by P(abnormal) descending; scans without a result (queued, running,
cancelled) last. Filters apply to that newest scan. `reviewed` says whether that scan
has at least one cytologist's decision (`slide_reviews`). None of these functions commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, case, exists, func, or_, select
from sqlalchemy.orm import Session

from worker.db import queries
from worker.db.models import SCAN_STATUSES, Cell, Scan, Slide, SlideResult, SlideReview
from worker.pipeline.slide_call import BETHESDA, UNSATISFACTORY

__all__ = [
    "ADEQUACIES",
    "CATEGORIES",
    "WORKLIST_COLUMNS",
    "WorklistFilter",
    "iter_worklist",
    "slide_detail",
    "worklist_statement",
]

CATEGORIES = (*BETHESDA, UNSATISFACTORY)
ADEQUACIES = ("satisfactory", "unsatisfactory")

# Keys of a worklist row, in order (a CSV header).
WORKLIST_COLUMNS = (
    "scan_id",
    "slide_id",
    "slide_path",
    "fingerprint",
    "barcode",
    "category",
    "score",
    "adequacy",
    "qc_flags",
    "status",
    "error",
    "created_at",
    "finished_at",
    "reviewed",
)


@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist keeps; None or empty keeps everything.

    Attributes:
        since, until: keep scans finished (or, unfinished, created) at or after `since`
            and before `until`; timezone-aware.
        status: the newest scan's status.
        categories: slide categories (exact names, see `CATEGORIES`).
        adequacy: "satisfactory" or "unsatisfactory".
        reviewed: True keeps slides whose newest scan has a review decision, False
            those without one.
        limit: at most this many rows, the top of the ranking.
        offset: skip this many rows of the ranking first (the next page).
    """

    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    categories: tuple[str, ...] = ()
    adequacy: str | None = None
    reviewed: bool | None = None
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in SCAN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(SCAN_STATUSES)}.")
        if self.adequacy is not None and self.adequacy not in ADEQUACIES:
            raise ValueError(f"adequacy must be one of {', '.join(ADEQUACIES)}.")
        for when in (self.since, self.until):
            if when is not None and when.tzinfo is None:
                raise ValueError("since and until must be timezone-aware.")


def worklist_statement(f: WorklistFilter = WorklistFilter()) -> Select:
    """The worklist as one SELECT whose rows carry `WORKLIST_COLUMNS`.

    An inner query ranks, filters and limits narrow rows (ids and sort keys); the outer
    one reads the chosen rows' columns by primary key. The QC flags come from their own
    column (`qc_flags`), never out of the whole QC JSON, which PostgreSQL would parse
    for every row shown (a sharpness per ROI: kilobytes a slide).
    """
    newest = (
        select(Scan.slide_id, func.max(Scan.id).label("scan_id"))
        .group_by(Scan.slide_id)
        .subquery("newest")
    )
    when = func.coalesce(Scan.finished_at, Scan.created_at)
    flagged = or_(Scan.status == "failed", SlideResult.category == UNSATISFACTORY)
    inner = (
        select(
            newest.c.scan_id,
            case((flagged, 0), else_=1).label("tier"),
            SlideResult.score.label("score"),
            when.label("sort_time"),
        )
        .join(Scan, Scan.id == newest.c.scan_id)
        .outerjoin(SlideResult, SlideResult.scan_id == newest.c.scan_id)
    )
    if f.since is not None:
        inner = inner.where(when >= _utc(f.since))
    if f.until is not None:
        inner = inner.where(when < _utc(f.until))
    if f.status is not None:
        inner = inner.where(Scan.status == f.status)
    if f.categories:
        inner = inner.where(SlideResult.category.in_(f.categories))
    if f.adequacy is not None:
        inner = inner.where(SlideResult.adequacy == f.adequacy)
    if f.reviewed is not None:
        has_review = _has_review(newest.c.scan_id)
        inner = inner.where(has_review if f.reviewed else ~has_review)
    if f.limit is not None or f.offset:
        inner = inner.order_by(*_ranking(inner.selected_columns)).limit(f.limit).offset(f.offset)
    ranked = inner.subquery("ranked")
    return (
        select(
            Scan.id.label("scan_id"),
            Slide.id.label("slide_id"),
            Slide.path.label("slide_path"),
            Slide.fingerprint,
            Slide.barcode,
            SlideResult.category,
            SlideResult.score,
            SlideResult.adequacy,
            SlideResult.qc_flags,  # not the whole QC (per-ROI lists)
            Scan.status,
            Scan.error,
            Scan.created_at,
            Scan.finished_at,
            _has_review(ranked.c.scan_id).label("reviewed"),
        )
        .select_from(ranked)
        .join(Scan, Scan.id == ranked.c.scan_id)
        .join(Slide, Slide.id == Scan.slide_id)
        .outerjoin(SlideResult, SlideResult.scan_id == ranked.c.scan_id)
        .order_by(*_ranking(ranked.c))
    )


def _has_review(scan_id: Any) -> Any:
    """Whether scan `scan_id` has a review decision (the index on `slide_reviews.scan_id`)."""
    return exists().where(SlideReview.scan_id == scan_id)


def _ranking(c: Any) -> list[Any]:
    """Failed and unsatisfactory first, then P(abnormal) down, then newest first."""
    return [c.tier, c.score.desc().nulls_last(), c.sort_time.desc(), c.scan_id.desc()]


def iter_worklist(
    s: Session, f: WorklistFilter = WorklistFilter(), *, batch_rows: int = 1000
) -> Iterator[dict[str, Any]]:
    """Stream the worklist as dicts keyed by `WORKLIST_COLUMNS`, best first.

    Rows come `batch_rows` at a time (a server-side cursor on PostgreSQL); consume the
    iterator inside the session. `qc_flags` is a list (empty without QC); times are
    timezone-aware UTC.
    """
    stmt = worklist_statement(f).execution_options(yield_per=batch_rows)
    for row in s.execute(stmt):
        item = row._asdict()
        item["qc_flags"] = list(item["qc_flags"] or [])
        item["created_at"] = aware(item["created_at"])
        item["finished_at"] = aware(item["finished_at"])
        item["reviewed"] = bool(item["reviewed"])
        yield item


def slide_detail(s: Session, ref: str) -> dict[str, Any]:
    """Everything `papscan results SLIDE|SCAN` shows about one scan, as plain values.

    `ref` resolves as in `queries.resolve_scan` (a scan id, or a slide path / fingerprint:
    its newest finished scan). The keys of `queries.scan_summary`, plus: barcode, vendor,
    width, height, mpp, slide_preparation, model_sha256, warnings, abnormal, adequacy,
    squamous_estimate, adequacy_minimum, preparation, operating_point, notes, qc_flags,
    qc (None without a result), evidence, and top_cells (review rank, box, label, score,
    suspicion; by rank).

    Raises:
        ScanNotFoundError: nothing matches `ref`, or the slide has no finished scan.
    """
    scan = queries.resolve_scan(s, ref)
    detail = queries.scan_summary(s, scan.id)
    slide = s.get(Slide, scan.slide_id)
    result = s.get(SlideResult, scan.id)
    for key in ("created_at", "started_at", "finished_at"):
        detail[key] = aware(detail[key])
    detail.update(
        barcode=slide.barcode,
        vendor=slide.vendor,
        width=slide.width,
        height=slide.height,
        mpp=slide.mpp_x,
        slide_preparation=slide.preparation,
        model_sha256=dict(scan.model_sha256 or {}),
        warnings=list(scan.warnings or []),
    )
    fields = (
        "abnormal",
        "adequacy",
        "squamous_estimate",
        "adequacy_minimum",
        "preparation",
        "operating_point",
    )
    detail.update({k: getattr(result, k) if result else None for k in fields})
    qc = dict(result.qc) if result and result.qc else None
    detail.update(
        notes=list(result.notes or []) if result else [],
        qc_flags=list((qc or {}).get("flags") or []),
        qc=qc,
        evidence=dict(result.evidence) if result and result.evidence else None,
        top_cells=[row._asdict() for row in s.execute(_top_cells(scan.id))],
    )
    return detail


def _top_cells(scan_id: int) -> Select:
    """A scan's review cells by rank (the partial index on `(scan_id, review_rank)`)."""
    return (
        select(
            Cell.review_rank,
            Cell.x,
            Cell.y,
            Cell.w,
            Cell.h,
            Cell.label,
            Cell.score,
            Cell.suspicion,
        )
        .where(Cell.scan_id == scan_id, Cell.review_rank.is_not(None))
        .order_by(Cell.review_rank)
    )


def aware(when: datetime | None) -> datetime | None:
    """A stored time as timezone-aware UTC (SQLite hands back naive UTC)."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC)


def _utc(when: datetime) -> datetime:
    """A bound time in UTC: SQLite compares times as text, which drops the offset."""
    return when.astimezone(UTC)
