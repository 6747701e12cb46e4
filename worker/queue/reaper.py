"""The lease reaper: every worker re-queues scans whose worker stopped renewing its lease.

A worker SIGKILLed mid-slide leaves its scan `running` and its job unacknowledged in
Redis, which hands the job to another worker only after the visibility timeout (hours,
as it must outlast the longest slide). The scan's lease ends within minutes instead; the
first live worker to look puts the scan back to queued and sends its job again, and the
old job, when Redis finally redelivers it, finds the scan running elsewhere or done.
"""

from __future__ import annotations

import logging
import threading

from worker.db import jobs
from worker.db.session import Database
from worker.errors import BrokerUnavailableError
from worker.queue.broker import send_scan

__all__ = ["LeaseReaper", "reap_once"]

logger = logging.getLogger(__name__)


def reap_once(db: Database, send=send_scan) -> list[int]:
    """Re-queue every scan whose lease ran out and send its job; returns their ids.

    Raises:
        TransientError: the database cannot be reached.
    """
    with db.transaction() as s:
        reaped = jobs.reap_expired_leases(s)
    sent = []
    for position, (scan_id, priority) in enumerate(reaped):
        try:
            send(scan_id, priority)
        except BrokerUnavailableError as exc:
            logger.warning("lease reaper: %s; trying again next round", exc)
            with db.transaction() as s:
                jobs.unreap(s, [i for i, _ in reaped[position:]])
            break
        sent.append(scan_id)
        logger.warning("scan %d: its worker stopped renewing its lease; queued again", scan_id)
    return sent


class LeaseReaper:
    """Runs `reap_once` every `interval_s` on a daemon thread until `stop()`."""

    def __init__(self, db: Database, interval_s: float) -> None:
        self._db, self._interval_s = db, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="papscan-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                reap_once(self._db)
            except Exception as exc:  # the database away: next round
                logger.warning("lease reaper: %s", exc)
