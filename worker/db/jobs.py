"""The scan row as a queued job: claim it, fence writes to it, requeue it, report on it.

A job (`scan_slide(scan_id)`) may be delivered more than once: Redis hands an
unacknowledged job to another worker when its first worker dies, and `papscan retry`
may send a job again. Each delivery *claims* the scan (`claim_scan`: status running,
`attempt` + 1, its partial rows deleted, all in one transaction), and every later write
of that delivery first *holds* the row (`hold_scan`: `SELECT … FOR UPDATE` and a check
that status and attempt are still its own) in the same transaction as the write. On
PostgreSQL the row lock orders a claim against a chunk write, so an attempt that lost
its claim fails its next write instead of adding rows beside the new attempt's.

Like `queries`, no function here commits; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.db import queries
from worker.db.models import Scan, Slide, utc_now
from worker.errors import ScanStateError, ScanSupersededError

__all__ = [
    "PENDING_OR_DONE",
    "Claim",
    "FailedScan",
    "RunningScan",
    "WorkerThroughput",
    "claim_scan",
    "discard_cancelled_rows",
    "failed_scan_ids",
    "find_equivalent_scan",
    "give_up_scan",
    "hold_scan",
    "plan_scan",
    "recent_failures",
    "requeue_scan",
    "running_scans",
    "worker_throughput",
]

# Scans that make a new scan of the same slide with the same models pointless.
PENDING_OR_DONE = ("queued", "running", "done")
_CLAIMABLE = ("queued", "running")  # running: its previous worker died mid-slide


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run a scan it has claimed.

    Attributes:
        scan_id: the scan.
        attempt: this delivery's attempt number (1 for the first).
        slide_path: where the slide file was when it was submitted.
        fingerprint: the slide's recorded fingerprint (the file must still match it).
        model_versions: engine name -> version recorded at submit.
    """

    scan_id: int
    attempt: int
    slide_path: str
    fingerprint: str
    model_versions: dict[str, Any]


def claim_scan(s: Session, scan_id: int, worker: str) -> Claim | None:
    """Claim a queued (or orphaned running) scan for this delivery and clear its rows.

    Args:
        scan_id: the scan.
        worker: who runs it (the Celery node name).

    Returns:
        The claim, or None when there is nothing to do: no such scan, or it is done,
        failed or cancelled (a duplicate or stale delivery).
    """
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None or scan.status not in _CLAIMABLE:
        return None
    slide = s.get(Slide, scan.slide_id)
    queries.clear_scan_rows(s, scan_id)
    scan.status = "running"
    scan.attempt = (scan.attempt or 0) + 1
    scan.worker = worker
    scan.rois_planned = None
    scan.rois_done = 0
    scan.error = None
    scan.started_at = utc_now()
    scan.finished_at = None
    s.flush()
    return Claim(
        scan_id=scan_id,
        attempt=scan.attempt,
        slide_path=slide.path,
        fingerprint=slide.fingerprint,
        model_versions=dict(scan.model_versions or {}),
    )


def hold_scan(s: Session, scan_id: int, attempt: int) -> Scan:
    """Lock the scan row and check it is still this attempt's to write.

    Call first in every transaction that writes for a claimed scan.

    Raises:
        ScanSupersededError: the scan was cancelled, deleted, finished, or claimed again.
    """
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None:
        raise ScanSupersededError(scan_id, "deleted")
    if scan.status != "running" or scan.attempt != attempt:
        state = scan.status if scan.status != "running" else f"claimed by {scan.worker}"
        raise ScanSupersededError(scan_id, state)
    return scan


def plan_scan(s: Session, scan_id: int, attempt: int, rois_planned: int) -> None:
    """Record the number of ROIs planned for a claimed scan (progress starts at 0).

    Raises:
        ScanSupersededError: see `hold_scan`.
    """
    scan = hold_scan(s, scan_id, attempt)
    scan.rois_planned = rois_planned
    scan.rois_done = 0
    s.flush()


def give_up_scan(s: Session, scan_id: int, error: str, attempt: int | None = None) -> bool:
    """Fail a scan that has not finished, with its partial rows removed.

    Args:
        scan_id: the scan.
        error: the sentence to store.
        attempt: only if the row is still this attempt's (None: whatever its attempt,
            as long as it is queued or running).

    Returns:
        Whether the scan was failed (False: it had finished, been cancelled, or moved on).
    """
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None or scan.status not in _CLAIMABLE:
        return False
    if attempt is not None and scan.attempt != attempt:
        return False
    queries.clear_scan_rows(s, scan_id)
    queries.fail_scan(s, scan_id, error)
    return True


def discard_cancelled_rows(s: Session, scan_id: int, attempt: int) -> None:
    """Delete the partial rows of a scan cancelled while this attempt ran it."""
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is not None and scan.status == "cancelled" and scan.attempt == attempt:
        queries.clear_scan_rows(s, scan_id)


def requeue_scan(s: Session, scan_id: int) -> Scan:
    """Put a failed, cancelled or queued scan back in the queued state, rows cleared.

    The caller sends its job after the transaction commits.

    Raises:
        ScanNotFoundError: no such scan.
        ScanStateError: the scan is running or done.
    """
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None:
        queries.get_scan(s, scan_id)  # raises ScanNotFoundError
    if scan.status == "done":
        raise ScanStateError(
            f"scan {scan_id} is done; `papscan submit --force` scans its slide again as a new scan."
        )
    if scan.status == "running":
        raise ScanStateError(f"scan {scan_id} is running on {scan.worker}; cancel it first.")
    queries.clear_scan_rows(s, scan_id)
    scan.status = "queued"
    scan.error = None
    scan.rois_planned = None
    scan.started_at = None
    scan.finished_at = None
    s.flush()
    return scan


def find_equivalent_scan(s: Session, slide_id: int, model_versions: dict[str, Any]) -> Scan | None:
    """The newest queued, running or done scan of a slide with exactly these model versions.

    Args:
        slide_id: the slide.
        model_versions: engine name -> version.
    """
    wanted = {k: int(v) for k, v in model_versions.items()}
    scans = s.scalars(
        select(Scan)
        .where(Scan.slide_id == slide_id, Scan.status.in_(PENDING_OR_DONE))
        .order_by(Scan.id.desc())
    )
    for scan in scans:
        if {k: int(v) for k, v in (scan.model_versions or {}).items()} == wanted:
            return scan
    return None


# --- what `papscan status` shows ------------------------------------------------------


@dataclass(frozen=True)
class RunningScan:
    """A scan in progress, as `papscan status` shows it.

    Attributes:
        eta_s: seconds left at the pace so far, None until the first chunk is written.
    """

    scan_id: int
    slide_path: str
    worker: str | None
    priority: str
    attempt: int
    rois_done: int
    rois_planned: int | None
    started_at: datetime | None
    progress: float | None
    eta_s: float | None


@dataclass(frozen=True)
class WorkerThroughput:
    """One worker's finished scans over a recent window."""

    worker: str
    slides_done: int
    slides_per_hour: float
    mean_scan_s: float
    last_finished_at: datetime


@dataclass(frozen=True)
class FailedScan:
    """A recent failure and its sentence."""

    scan_id: int
    slide_path: str
    worker: str | None
    error: str | None
    finished_at: datetime | None


def running_scans(s: Session, now: datetime | None = None) -> list[RunningScan]:
    """Scans with status running, oldest first, with progress and ETA."""
    now = now or utc_now()
    rows = s.execute(
        select(Scan, Slide.path)
        .join(Slide, Scan.slide_id == Slide.id)
        .where(Scan.status == "running")
        .order_by(Scan.started_at)
    )
    out = []
    for scan, path in rows:
        progress = eta = None
        if scan.rois_planned:
            progress = min(1.0, scan.rois_done / scan.rois_planned)
            if scan.rois_done and scan.started_at is not None:
                elapsed = (now - _aware(scan.started_at)).total_seconds()
                eta = max(0.0, elapsed * (scan.rois_planned - scan.rois_done) / scan.rois_done)
        out.append(
            RunningScan(
                scan_id=scan.id,
                slide_path=path,
                worker=scan.worker,
                priority=scan.priority,
                attempt=scan.attempt,
                rois_done=scan.rois_done,
                rois_planned=scan.rois_planned,
                started_at=scan.started_at,
                progress=progress,
                eta_s=eta,
            )
        )
    return out


def worker_throughput(
    s: Session, window: timedelta = timedelta(hours=1), now: datetime | None = None
) -> list[WorkerThroughput]:
    """Slides per hour per worker, from the scans each finished in the last `window`.

    The rate is scans done over the time from the first of them starting to now (at most
    `window`), so a worker that joined ten minutes ago is not under-counted.
    """
    now = now or utc_now()
    since = now - window
    rows = s.execute(
        select(
            Scan.worker,
            func.count(),
            func.min(Scan.started_at),
            func.max(Scan.finished_at),
        )
        .where(Scan.status == "done", Scan.finished_at >= since, Scan.worker.is_not(None))
        .group_by(Scan.worker)
        .order_by(Scan.worker)
    )
    durations = _mean_durations(s, since)
    out = []
    for worker, count, first_start, last_finish in rows:
        start = max(_aware(first_start), since) if first_start else since
        hours = max((now - start).total_seconds(), 1.0) / 3600
        out.append(
            WorkerThroughput(
                worker=worker,
                slides_done=count,
                slides_per_hour=count / hours,
                mean_scan_s=durations.get(worker, 0.0),
                last_finished_at=last_finish,
            )
        )
    return out


def recent_failures(
    s: Session, limit: int = 10, window: timedelta = timedelta(days=1), now: datetime | None = None
) -> list[FailedScan]:
    """The newest failed scans of the last `window`, with their error sentence."""
    since = (now or utc_now()) - window
    rows = s.execute(
        select(Scan, Slide.path)
        .join(Slide, Scan.slide_id == Slide.id)
        .where(Scan.status == "failed", Scan.finished_at >= since)
        .order_by(Scan.finished_at.desc())
        .limit(limit)
    )
    return [
        FailedScan(scan.id, path, scan.worker, scan.error, scan.finished_at) for scan, path in rows
    ]


def failed_scan_ids(s: Session) -> Sequence[int]:
    """Ids of every failed scan, oldest first."""
    return s.scalars(select(Scan.id).where(Scan.status == "failed").order_by(Scan.id)).all()


def _mean_durations(s: Session, since: datetime) -> dict[str, float]:
    rows = s.execute(
        select(Scan.worker, Scan.started_at, Scan.finished_at).where(
            Scan.status == "done", Scan.finished_at >= since, Scan.worker.is_not(None)
        )
    )
    sums: dict[str, list[float]] = {}
    for worker, started, finished in rows:
        if started and finished:
            sums.setdefault(worker, []).append((_aware(finished) - _aware(started)).total_seconds())
    return {w: sum(v) / len(v) for w, v in sums.items()}


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns: they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
