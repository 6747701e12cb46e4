"""The scan row as a queued job: claim it, fence writes to it, requeue it, report on it.

A job (`scan_slide(scan_id)`) may be delivered more than once: Redis hands an
unacknowledged job to another worker when its first worker dies, and `papscan retry`
may send a job again. Each delivery *claims* the scan (`claim_scan`: status running,
`attempt` + 1, its partial rows deleted, all in one transaction), and every later write
of that delivery first *holds* the row (`hold_scan`: `SELECT … FOR UPDATE` and a check
that status and attempt are still its own) in the same transaction as the write. On
PostgreSQL the row lock orders a claim against a chunk write, so an attempt that lost
its claim fails its next write instead of adding rows beside the new attempt's.

A running scan also holds a *lease* (`lease_expires_at`), renewed while its worker runs
it (`renew_lease`, and every `hold_scan` with `lease_s`): a delivery that finds a live
lease held by someone else is dropped (`claim_scan` says `Held`), so a retried job or a
redelivery while the first worker is alive restarts nothing, and `reap_expired_leases`
puts a scan whose worker stopped renewing back in the queue long before Redis's
visibility timeout would.

Like `queries`, no function here commits; the caller owns the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from engines.errors import PapscanError
from worker.db import queries
from worker.db.models import Scan, Slide, SlideResult, utc_now
from worker.db.session import Database
from worker.errors import ScanStateError, ScanSupersededError

logger = logging.getLogger(__name__)

__all__ = [
    "PENDING_OR_DONE",
    "RecentResult",
    "VersionInUseError",
    "Claim",
    "FailedScan",
    "Held",
    "RunningScan",
    "WorkerThroughput",
    "claim_scan",
    "discard_cancelled_rows",
    "failed_scan_ids",
    "find_equivalent_scan",
    "give_up_scan",
    "hold_scan",
    "plan_scan",
    "reap_expired_leases",
    "refuse_overwrite_of_scanned_weights",
    "recent_failures",
    "recent_results",
    "release_leases",
    "renew_lease",
    "requeue_scan",
    "running_scans",
    "unreap",
    "scans_using_weights",
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
        mpp: the slide's recorded microns per pixel (given at submit for a file without).
        model_versions: engine name -> version recorded at submit.
        preparation: the slide's preparation as submitted, None if not given.
    """

    scan_id: int
    attempt: int
    slide_path: str
    fingerprint: str
    mpp: float
    model_versions: dict[str, Any]
    preparation: str | None = None


@dataclass(frozen=True)
class Held:
    """A claim refused: the scan is running under a live lease held by `worker`."""

    scan_id: int
    worker: str | None
    lease_expires_at: datetime


def claim_scan(
    s: Session,
    scan_id: int,
    worker: str,
    lease_s: float,
    *,
    running_here: Container[int] = (),
    now: datetime | None = None,
) -> Claim | Held | None:
    """Claim a queued scan, or a running one whose lease ran out, and clear its rows.

    Args:
        scan_id: the scan.
        worker: who runs it (the Celery node name); unique per worker process.
        lease_s: how long the claim holds without renewal.
        running_here: scans this process is running now: a live lease of `worker`'s own
            on any other scan is stale (its last delivery died with a transient error)
            and is taken back.
        now: the time (tests).

    Returns:
        The claim; `Held` when another delivery holds a live lease on it; None when there
        is nothing to do: no such scan, or it is done, failed or cancelled.
    """
    now = now or utc_now()
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None or scan.status not in _CLAIMABLE:
        return None
    if scan.status == "running" and _lease_live(scan, now):
        if scan.worker != worker or scan_id in running_here:
            return Held(scan_id, scan.worker, _aware(scan.lease_expires_at))
    slide = s.get(Slide, scan.slide_id)
    queries.clear_scan_rows(s, scan_id)
    scan.status = "running"
    scan.attempt = (scan.attempt or 0) + 1
    scan.worker = worker
    scan.rois_planned = None
    scan.rois_done = 0
    scan.error = None
    scan.warnings = None
    scan.started_at = now
    scan.finished_at = None
    scan.heartbeat_at = now
    scan.lease_expires_at = now + timedelta(seconds=lease_s)
    s.flush()
    return Claim(
        scan_id=scan_id,
        attempt=scan.attempt,
        slide_path=slide.path,
        fingerprint=slide.fingerprint,
        mpp=slide.mpp_x,
        model_versions=dict(scan.model_versions or {}),
        preparation=slide.preparation,
    )


def hold_scan(s: Session, scan_id: int, attempt: int, lease_s: float | None = None) -> Scan:
    """Lock the scan row, check it is still this attempt's to write, renew its lease.

    Call first in every transaction that writes for a claimed scan.

    Args:
        lease_s: renew the lease for this long from now (None: leave it).

    Raises:
        ScanSupersededError: the scan was cancelled, deleted, finished, re-queued or
            claimed again.
    """
    scan = s.get(Scan, scan_id, with_for_update=True, populate_existing=True)
    if scan is None:
        raise ScanSupersededError(scan_id, "deleted")
    if scan.status != "running" or scan.attempt != attempt:
        state = scan.status if scan.status != "running" else f"claimed by {scan.worker}"
        raise ScanSupersededError(scan_id, state)
    if lease_s is not None:
        now = utc_now()
        scan.heartbeat_at = now
        scan.lease_expires_at = now + timedelta(seconds=lease_s)
    return scan


def renew_lease(s: Session, scan_id: int, attempt: int, lease_s: float) -> None:
    """Extend a claimed scan's lease by `lease_s` from now.

    Raises:
        ScanSupersededError: see `hold_scan`.
    """
    hold_scan(s, scan_id, attempt, lease_s)
    s.flush()


def release_leases(s: Session, scan_ids: Sequence[int], worker: str) -> int:
    """End now the leases `worker` holds on these running scans, for reapers to re-queue.

    Returns:
        How many leases were ended.
    """
    if not scan_ids:
        return 0
    result = s.execute(
        update(Scan)
        .where(Scan.id.in_(list(scan_ids)), Scan.status == "running", Scan.worker == worker)
        .values(lease_expires_at=utc_now()),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount


def reap_expired_leases(
    s: Session, *, grace_s: float = 0.0, now: datetime | None = None, limit: int = 100
) -> list[tuple[int, str]]:
    """Put running scans whose lease ended more than `grace_s` ago back to queued.

    Their partial rows stay until the next claim clears them; a late write of the lost
    worker is fenced off (the scan is no longer running under its attempt). Rows locked
    by another reaper are skipped on PostgreSQL, so reapers never queue a scan twice.

    Returns:
        (scan id, priority) of each re-queued scan; the caller sends their jobs after
        the transaction commits.
    """
    cutoff = (now or utc_now()) - timedelta(seconds=grace_s)
    query = (
        select(Scan)
        .where(
            Scan.status == "running",
            or_(Scan.lease_expires_at.is_(None), Scan.lease_expires_at < cutoff),
        )
        .order_by(Scan.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    requeued = []
    for scan in s.scalars(query):
        scan.status = "queued"
        scan.lease_expires_at = None
        scan.rois_planned = None
        requeued.append((scan.id, scan.priority))
    s.flush()
    return requeued


def unreap(s: Session, scan_ids: Sequence[int]) -> None:
    """Undo `reap_expired_leases` for scans whose job could not be sent: the next reap
    (or Redis's own redelivery) tries again."""
    if scan_ids:
        s.execute(
            update(Scan)
            .where(Scan.id.in_(list(scan_ids)), Scan.status == "queued")
            .values(status="running", lease_expires_at=None),
            execution_options={"synchronize_session": False},
        )


def _lease_live(scan: Scan, now: datetime) -> bool:
    return scan.lease_expires_at is not None and _aware(scan.lease_expires_at) > now


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


def find_equivalent_scan(
    s: Session,
    slide_id: int,
    model_versions: dict[str, Any],
    model_sha256: dict[str, str] | None = None,
) -> Scan | None:
    """The newest queued, running or done scan of a slide with exactly these models.

    Models are the same when their weights' sha256 match; a scan recorded before papscan
    kept hashes is compared by version numbers alone.

    Args:
        slide_id: the slide.
        model_versions: engine name -> version.
        model_sha256: engine name -> weights sha256 (None: compare versions only).
    """
    wanted = {k: int(v) for k, v in model_versions.items()}
    scans = s.scalars(
        select(Scan)
        .where(Scan.slide_id == slide_id, Scan.status.in_(PENDING_OR_DONE))
        .order_by(Scan.id.desc())
    )
    for scan in scans:
        if {k: int(v) for k, v in (scan.model_versions or {}).items()} != wanted:
            continue
        if model_sha256 and scan.model_sha256 and dict(scan.model_sha256) != model_sha256:
            continue
        return scan
    return None


def scans_using_weights(s: Session, model: str, sha256: str) -> int:
    """How many scans ran (or are queued to run) `model` with weights of this sha256."""
    count = 0
    for hashes in s.scalars(select(Scan.model_sha256).where(Scan.model_sha256.is_not(None))):
        count += (hashes or {}).get(model) == sha256
    return count


class VersionInUseError(PapscanError):
    """A model version folder whose weights scans ran cannot be overwritten."""


def refuse_overwrite_of_scanned_weights(
    db: Database, version_dir: Path, name: str, sha256: str
) -> None:
    """Refuse to replace a model version whose weights scans in `db` ran.

    Installed by the `papscan` CLI as `train.export.repository`'s overwrite guard. A
    database that cannot be reached, or holds no schema yet, has no such scans.

    Raises:
        VersionInUseError: with the count of scans and what to do instead.
    """
    try:
        if db.current_revision() is None:
            return
        with db.session() as s:
            used = scans_using_weights(s, name, sha256)
    except PapscanError as exc:
        logger.warning("could not check whether scans used %s: %s", version_dir, exc)
        return
    if used:
        raise VersionInUseError(
            f"{version_dir} holds the weights of {name} that {used} scan(s) in {db.safe_url}"
            " ran; write the new model as a new version or into another repository folder."
        )


# --- what `papscan status` shows ------------------------------------------------------


@dataclass(frozen=True)
class RunningScan:
    """A scan in progress, as `papscan status` shows it.

    Attributes:
        eta_s: seconds left at the pace so far, None until the first chunk is written.
        heartbeat_at: when its worker last renewed the lease.
        stale: its lease ran out: its worker is dead or stuck, and a live worker's
            reaper will queue it again.
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
    heartbeat_at: datetime | None = None
    stale: bool = False


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
                heartbeat_at=_aware(scan.heartbeat_at) if scan.heartbeat_at else None,
                stale=not _lease_live(scan, now),
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


@dataclass(frozen=True)
class RecentResult:
    """A finished scan's call, as `papscan status` shows it."""

    scan_id: int
    slide_path: str
    category: str
    score: float
    adequacy: str | None
    notes: list[str]
    qc_flags: list[str]
    finished_at: datetime | None


def recent_results(s: Session, limit: int = 10) -> list[RecentResult]:
    """The newest finished scans with their category, score, adequacy, notes and QC flags."""
    rows = s.execute(
        select(Scan, Slide.path, SlideResult)
        .join(Slide, Scan.slide_id == Slide.id)
        .join(SlideResult, SlideResult.scan_id == Scan.id)
        .where(Scan.status == "done")
        .order_by(Scan.finished_at.desc())
        .limit(limit)
    )
    return [
        RecentResult(
            scan.id,
            path,
            result.category,
            result.score,
            result.adequacy,
            list(result.notes or []),
            list((result.qc or {}).get("flags", [])),
            scan.finished_at,
        )
        for scan, path, result in rows
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
