"""The results database's tables, as SQLAlchemy 2.0 typed ORM classes.

Boxes (`x, y, w, h`) are level-0 slide pixels; a slide's microns per pixel are stored on
the slide, so physical sizes can be derived. Class probabilities are JSON objects
`{class name: probability}`. The same schema runs on SQLite and PostgreSQL; the Alembic
revision in `migrations/` creates exactly these tables (a test checks they agree).

A scan owns its rows: deleting a scan deletes its ROIs, cells and slide result, and a
retried scan deletes its own partial rows first (`queries.clear_scan_rows`), so a slide
scanned twice has two scans with their own rows, never duplicate cells within one scan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

__all__ = ["SCAN_STATUSES", "Base", "Cell", "Roi", "Scan", "Slide", "SlideResult"]

SCAN_STATUSES = ("queued", "running", "done", "failed", "cancelled")

# BIGINT ids on PostgreSQL (billions of cells over a lab's lifetime); on SQLite only an
# INTEGER PRIMARY KEY is the rowid alias that autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Fixed constraint names, so Alembic can alter or drop them the same way on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of papscan's tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        # none_as_null: Python None is SQL NULL, not the JSON value null.
        dict[str, Any]: JSON(none_as_null=True),
        datetime: DateTime(timezone=True),
    }


class Slide(Base):
    """A slide file, identified by its content fingerprint (OpenSlide quickhash-1).

    The same file moved or renamed keeps its row; `path` is where it was last seen.
    """

    __tablename__ = "slides"

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)
    vendor: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer, doc="level-0 width, px")
    height: Mapped[int] = mapped_column(Integer, doc="level-0 height, px")
    mpp_x: Mapped[float] = mapped_column(Float, doc="microns per level-0 pixel, x")
    mpp_y: Mapped[float] = mapped_column(Float, doc="microns per level-0 pixel, y")
    barcode: Mapped[str | None] = mapped_column(String(128))
    preparation: Mapped[str | None] = mapped_column(
        String(32), doc="liquid-based | conventional; NULL: not given (liquid-based assumed)"
    )
    created_at: Mapped[datetime] = mapped_column(default=utc_now, server_default=func.now())


class Scan(Base):
    """One run of the pipeline over one slide: status, progress, versions, timings.

    `status` goes queued -> running -> done | failed; queued or running -> cancelled.
    Progress is `rois_done / rois_planned`. `attempt` counts the times a worker claimed
    the scan (a job redelivered after its worker died claims it again); a worker writes
    only while the row still carries its own attempt, so two deliveries of one job never
    both write rows. A running scan's `worker` holds a lease until `lease_expires_at`,
    renewed while it runs (`heartbeat_at`): no one else claims it before the lease ends.
    `model_sha256` (engine -> artifact sha256) is the models' identity, `model_versions`
    their names for people.
    """

    __tablename__ = "scans"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="status"
        ),
        Index(None, "slide_id", "id"),
        Index(None, "status"),
        # Scan ids are shown to users: never reuse one after a delete.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    model_versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_sha256: Mapped[dict[str, Any] | None]
    warnings: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    stage_timings_ms: Mapped[dict[str, Any] | None]
    rois_planned: Mapped[int | None] = mapped_column(Integer)
    rois_done: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    reader: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utc_now, server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]


class Roi(Base):
    """One scanned ROI of a scan; `index` is its position in the scan's plan."""

    __tablename__ = "rois"
    __table_args__ = (UniqueConstraint("scan_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    w: Mapped[int] = mapped_column(Integer)
    h: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(32))
    probs: Mapped[dict[str, Any]]
    cell_count: Mapped[int] = mapped_column(Integer)


class Cell(Base):
    """One detected, classified cell; its box is centred on the detected nucleus.

    Indexes serve: the review cells of a scan (`review_rank`, a small partial index),
    the most suspicious cells of a scan, every cell of a class in a region, a scan's
    cells in id order (the API's pages and the exports; without `(scan_id, id)`
    PostgreSQL walks the primary key over every scan's cells), and the cascade from
    `rois` (without an index on `roi_id`, PostgreSQL scans the whole table once per
    deleted ROI).
    """

    __tablename__ = "cells"
    __table_args__ = (
        Index(
            None,
            "scan_id",
            "review_rank",
            sqlite_where=text("review_rank IS NOT NULL"),
            postgresql_where=text("review_rank IS NOT NULL"),
        ),
        Index(None, "scan_id", "suspicion"),
        Index(None, "scan_id", "label", "x", "y"),
        Index(None, "scan_id", "id"),
        Index(None, "roi_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    roi_id: Mapped[int] = mapped_column(BigId, ForeignKey("rois.id", ondelete="CASCADE"))
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    w: Mapped[int] = mapped_column(Integer)
    h: Mapped[int] = mapped_column(Integer)
    detection_score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float, doc="probability of `label`")
    suspicion: Mapped[float] = mapped_column(Float, doc="1 - P(NILM)")
    probs: Mapped[dict[str, Any]]
    attention: Mapped[float] = mapped_column(Float)
    review_rank: Mapped[int | None] = mapped_column(Integer, doc="1..K for review cells")


class SlideResult(Base):
    """The slide-level result of a finished scan; `score` sorts the worklist.

    `category` is the Bethesda category or "Unsatisfactory for evaluation"; `score` the
    calibrated probability that the slide is abnormal; `operating_point` names the rules
    that made the call (`worker/pipeline/slide_call.py`), `evidence` what they saw.
    """

    __tablename__ = "slide_results"
    __table_args__ = (Index(None, "score"),)

    scan_id: Mapped[int] = mapped_column(
        ForeignKey("scans.id", ondelete="CASCADE"), primary_key=True
    )
    category: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    cell_count: Mapped[int] = mapped_column(Integer)
    roi_count: Mapped[int] = mapped_column(Integer)
    class_counts: Mapped[dict[str, Any]]
    abnormal: Mapped[bool | None] = mapped_column(Boolean)
    adequacy: Mapped[str | None] = mapped_column(String(16), doc="satisfactory | unsatisfactory")
    squamous_estimate: Mapped[int | None] = mapped_column(Integer)
    adequacy_minimum: Mapped[int | None] = mapped_column(Integer)
    preparation: Mapped[str | None] = mapped_column(String(32))
    operating_point: Mapped[str | None] = mapped_column(String(64))
    notes: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    qc: Mapped[dict[str, Any] | None]
    qc_flags: Mapped[list[str] | None] = mapped_column(
        JSON(none_as_null=True), doc='`qc["flags"]`, apart: the worklist reads only these'
    )
    evidence: Mapped[dict[str, Any] | None]

    @validates("qc")
    def _set_qc_flags(self, key: str, qc: dict[str, Any] | None) -> dict[str, Any] | None:
        """Setting `qc` sets `qc_flags` too, so every writer keeps the two in step."""
        self.qc_flags = list(qc.get("flags") or []) if qc else None
        return qc


class ApiToken(Base):
    """A bearer token of the REST API (`papscan token create`); only its sha256 is kept.

    A token is refused once `revoked_at` is set; the row stays, so `token list` shows it.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now, server_default=func.now())
    revoked_at: Mapped[datetime | None]


__all__ += ["ApiToken"]


REVIEW_VERDICTS = ("true_positive", "false_positive")


class SlideReview(Base):
    """A cytologist's decision on a scan, stored beside the AI's result (never over it).

    `agrees` says whether they agree with the AI category; `category` is their own
    (a Bethesda category or "Unsatisfactory for evaluation"), `note` free text.
    `reviewer` is the API token's name. A later decision is a new row: the newest is
    current, the older ones are the history.
    """

    __tablename__ = "slide_reviews"
    __table_args__ = (Index(None, "scan_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(64))
    agrees: Mapped[bool] = mapped_column(Boolean)
    category: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now, server_default=func.now())


class CellReview(Base):
    """A cytologist's verdict on one detected cell: a true or a false positive.

    `scan_id` is the cell's scan (the reviews of a scan without a join). A later
    verdict on the same cell is a new row; the newest is current.
    """

    __tablename__ = "cell_reviews"
    __table_args__ = (
        CheckConstraint("verdict IN ('true_positive', 'false_positive')", name="verdict"),
        Index(None, "scan_id"),
        Index(None, "cell_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    cell_id: Mapped[int] = mapped_column(BigId, ForeignKey("cells.id", ondelete="CASCADE"))
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utc_now, server_default=func.now())


__all__ += ["REVIEW_VERDICTS", "CellReview", "SlideReview"]
