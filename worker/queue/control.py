"""Cancelling and retrying queued scans (`papscan cancel`, `papscan retry`).

Cancelling touches only the database: a queued job whose scan is cancelled is dropped
when a worker takes it, and a running scan stops at its next chunk and removes its rows.
Retrying puts a failed or cancelled scan back to queued and sends its job again (a
queued scan's job is sent again too, for a job lost with an unpersisted Redis: a
duplicate job is harmless, as the second delivery finds the scan running or done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.db import jobs, queries
from worker.db.session import Database
from worker.errors import BrokerUnavailableError, ScanStateError
from worker.queue.broker import check_broker, send_scan

__all__ = ["RetriedScan", "cancel", "failed_scans", "retry", "send_jobs"]

logger = logging.getLogger(__name__)


def cancel(db: Database, scan_id: int) -> str:
    """Cancel a queued or running scan.

    Returns:
        The status the scan had ("queued" or "running").

    Raises:
        ScanNotFoundError: no such scan.
        ScanStateError: the scan has already ended (done, failed or cancelled).
    """
    with db.session() as s, s.begin():
        scan = queries.get_scan(s, scan_id)
        before = scan.status
        if before not in ("queued", "running"):
            raise ScanStateError(f"scan {scan_id} is already {before}; there is nothing to cancel.")
        queries.cancel_scan(s, scan_id)
    logger.info("scan %d cancelled (was %s)", scan_id, before)
    return before


@dataclass(frozen=True)
class RetriedScan:
    """A scan put back in the queue."""

    scan_id: int
    was: str
    priority: str


def retry(
    db: Database,
    broker_url: str,
    scan_ids: Sequence[int],
    send: Callable[[int, str], None] = send_scan,
) -> list[RetriedScan]:
    """Queue failed, cancelled (or queued) scans again under their own ids and priorities.

    Args:
        scan_ids: the scans; each must exist and be failed, cancelled or queued.

    Raises:
        ScanNotFoundError: a scan does not exist (nothing is requeued).
        ScanStateError: a scan is running or done (nothing is requeued).
        BrokerUnavailableError: Redis cannot be reached.
    """
    check_broker(broker_url)
    retried: list[RetriedScan] = []
    with db.session() as s, s.begin():
        for scan_id in scan_ids:
            was = queries.get_scan(s, scan_id).status
            scan = jobs.requeue_scan(s, scan_id)
            retried.append(RetriedScan(scan_id, was, scan.priority))
    send_jobs(db, [(r.scan_id, r.priority) for r in retried], send)
    return retried


def send_jobs(
    db: Database,
    scans: Sequence[tuple[int, str]],
    send: Callable[[int, str], None] = send_scan,
) -> None:
    """Send the jobs of committed queued scans; if Redis goes away, fail the unsent ones.

    A scan whose job could not be sent is marked failed with a sentence naming
    `papscan retry --failed`, so no scan waits as queued for a job that does not exist.

    Args:
        scans: (scan id, priority) pairs, in sending order.

    Raises:
        BrokerUnavailableError: saying how many jobs were sent before Redis went away.
    """
    for position, (scan_id, priority) in enumerate(scans):
        try:
            send(scan_id, priority)
        except BrokerUnavailableError as exc:
            reason = str(exc).rstrip(".")
            unsent = scans[position:]
            with db.session() as s, s.begin():
                for left, _ in unsent:
                    jobs.give_up_scan(
                        s,
                        left,
                        f"its job could not be sent ({reason});"
                        " `papscan retry --failed` sends it again.",
                    )
            raise BrokerUnavailableError(
                f"{reason}; {position} of {len(scans)} jobs were sent, the other"
                f" {len(unsent)} scans are marked failed for `papscan retry --failed`."
            ) from exc


def failed_scans(db: Database) -> list[int]:
    """Ids of every failed scan, oldest first."""
    with db.session() as s:
        return list(jobs.failed_scan_ids(s))
