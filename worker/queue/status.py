"""What `papscan status` shows: the queue from Redis, the scans from the database.

Queue depth per priority and jobs in flight come from the broker; running scans (with
percentage and ETA), per-worker throughput and recent failures come from the results
database, which outlives any worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from worker.db import jobs
from worker.db.models import utc_now
from worker.db.session import Database
from worker.errors import BrokerUnavailableError
from worker.queue.broker import queue_depths

__all__ = ["QueueStatus", "collect_status", "render_status"]


@dataclass
class QueueStatus:
    """A snapshot of the queue and the workers.

    Attributes:
        depths: jobs waiting per priority queue, and `in_flight` (taken, not yet done);
            None when the broker could not be reached (`broker_error` says why).
        running: scans in progress; `stale` ones lost their worker (no lease renewal).
        dead_workers: workers whose every running scan is stale: dead or stuck.
        throughput: per worker, over `window`.
        failures: recent failed scans.
        results: the newest finished scans' calls.
    """

    taken_at: datetime
    depths: dict[str, int] | None
    broker_error: str | None
    running: list[jobs.RunningScan]
    dead_workers: list[str]
    throughput: list[jobs.WorkerThroughput]
    failures: list[jobs.FailedScan]
    window: timedelta
    results: list[jobs.RecentResult]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 text)."""
        data = asdict(self)
        data["window"] = self.window.total_seconds()
        return _iso(data)


def collect_status(
    db: Database,
    broker_url: str,
    window: timedelta = timedelta(hours=1),
    failures: int = 10,
) -> QueueStatus:
    """Read the queue and the scans.

    The database must be reachable; an unreachable broker is reported in the snapshot,
    since the scans alone are still worth showing.

    Raises:
        DatabaseUnavailableError: the database cannot be reached.
    """
    now = utc_now()
    try:
        depths, broker_error = queue_depths(broker_url), None
    except BrokerUnavailableError as exc:
        depths, broker_error = None, str(exc)
    with db.session() as s:
        running = jobs.running_scans(s, now)
        return QueueStatus(
            taken_at=now,
            depths=depths,
            broker_error=broker_error,
            running=running,
            dead_workers=_dead_workers(running),
            throughput=jobs.worker_throughput(s, window, now),
            failures=jobs.recent_failures(s, limit=failures, now=now),
            window=window,
            results=jobs.recent_results(s),
        )


def render_status(status: QueueStatus) -> Any:
    """The snapshot as rich renderables, for a console or a live display."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if status.depths is None:
        parts.append(Text(f"queue: unknown ({status.broker_error})", style="red"))
    else:
        d = status.depths
        parts.append(
            Text.assemble(
                ("queue  ", "bold"),
                f"stat {d.get('stat', 0)}   routine {d.get('routine', 0)}   ",
                f"in flight {d.get('in_flight', 0)}",
            )
        )
    running = Table(title="running scans", header_style="bold", box=None, title_justify="left")
    for column in ("scan", "slide", "worker", "priority", "progress", "ETA", "heartbeat"):
        running.add_column(column, justify="right" if column in ("scan", "progress") else "left")
    for r in status.running:
        progress = "planning" if r.progress is None else f"{r.progress:.0%}"
        if r.rois_planned:
            progress += f" ({r.rois_done}/{r.rois_planned})"
        attempt = f" (attempt {r.attempt})" if r.attempt > 1 else ""
        since = None if r.heartbeat_at is None else (status.taken_at - r.heartbeat_at)
        heartbeat = "-" if since is None else _duration(since.total_seconds()) + " ago"
        running.add_row(
            str(r.scan_id),
            r.slide_path,
            (r.worker or "?") + attempt,
            r.priority,
            progress,
            "stale" if r.stale else _duration(r.eta_s),
            heartbeat,
            style="red" if r.stale else None,
        )
    parts.append(running if status.running else Text("no scan running"))
    if status.dead_workers:
        stale = sum(r.stale for r in status.running)
        parts.append(
            Text(
                f"dead or stuck workers: {', '.join(status.dead_workers)} (no lease renewal);"
                f" their {stale} stale scan(s) go back to the queue at the next reaper round"
                " of any live worker.",
                style="red",
            )
        )
    hours = status.window.total_seconds() / 3600
    workers = Table(
        title=f"workers (scans finished in the last {hours:g} h)",
        header_style="bold",
        box=None,
        title_justify="left",
    )
    for column in ("worker", "slides", "slides/h", "mean scan", "last finished"):
        workers.add_column(column, justify="left" if column == "worker" else "right")
    for w in status.throughput:
        workers.add_row(
            w.worker,
            str(w.slides_done),
            f"{w.slides_per_hour:.1f}",
            _duration(w.mean_scan_s),
            _clock(w.last_finished_at),
        )
    parts.append(workers if status.throughput else Text("no scan finished in the window"))
    if status.results:
        done = Table(title="recent results", header_style="bold", box=None, title_justify="left")
        for column in ("scan", "slide", "category", "P(abnormal)", "adequacy", "notes and QC"):
            done.add_column(column, overflow="fold")
        for r in status.results:
            done.add_row(
                str(r.scan_id),
                r.slide_path,
                r.category,
                f"{r.score:.3f}",
                r.adequacy or "-",
                " ".join(r.notes + r.qc_flags),
                style=None if r.category == "NILM" else "bold",
            )
        parts.append(done)
    if status.failures:
        failed = Table(title="recent failures", header_style="bold", box=None, title_justify="left")
        for column in ("scan", "slide", "when", "error"):
            failed.add_column(column, overflow="fold")
        for f in status.failures:
            failed.add_row(str(f.scan_id), f.slide_path, _clock(f.finished_at), f.error or "")
        parts.append(failed)
    return Group(*parts)


def _dead_workers(running: list[jobs.RunningScan]) -> list[str]:
    live = {r.worker for r in running if not r.stale}
    return sorted({r.worker or "?" for r in running if r.stale} - live)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _clock(value: datetime | None) -> str:
    return value.astimezone().strftime("%H:%M:%S") if value else "-"


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _iso(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso(v) for v in value]
    return value
