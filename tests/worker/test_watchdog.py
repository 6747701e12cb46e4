"""The hard-limit watchdog ends its process on time, even when the database is stuck.

Each case runs the watchdog in a child process (it ends the process with `os._exit`)
against a real PostgreSQL, one with the scan's row locked by another connection: the
failure's write then waits on the lock, and the process must still exit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from sqlalchemy import select

from tests.worker.conftest import queued_scan
from worker.db import jobs
from worker.db.models import Scan
from worker.db.session import Database

EXIT_CODE = 75
CHILD = textwrap.dedent(
    """
    import sys, time
    from worker.db.session import Database
    from worker.lifecycle import ScanRuntime
    from worker.queue.tasks import hard_limit

    url, scan_id, other_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    runtime = ScanRuntime(db=Database(url), models=None, options=None, worker="w1")
    runtime.running.update({scan_id: 1, other_id: 1})
    with hard_limit(runtime, scan_id, limit_s=0.5, grace_s=3.0):
        time.sleep(120)  # the scan "hangs"
    sys.exit(0)
    """
)


def _running_scans(db: Database, n: int) -> list[int]:
    ids = [queued_scan(db)[1] for _ in range(n)]
    with db.transaction() as s:
        for scan_id in ids:
            jobs.claim_scan(s, scan_id, "w1", 600.0)
    return ids


def _run_child(url: str, scan_id: int, other_id: int) -> tuple[int, float]:
    start = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(scan_id), str(other_id)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return child.returncode, time.monotonic() - start


def test_the_watchdog_fails_the_scan_and_frees_the_scans_beside_it(pg_db: Database) -> None:
    scan_id, other_id = _running_scans(pg_db, 2)
    code, _ = _run_child(pg_db.url.render_as_string(hide_password=False), scan_id, other_id)
    assert code == EXIT_CODE
    with pg_db.session() as s:
        scan, other = s.get(Scan, scan_id), s.get(Scan, other_id)
        assert scan.status == "failed" and "hard time limit" in scan.error
        # The scan beside it died with the process: its lease is over, reapers take it.
        assert other.status == "running"
        assert other_id in [i for i, _ in jobs.reap_expired_leases(s)]


def test_the_watchdog_exits_within_its_grace_while_the_row_is_locked(pg_db: Database) -> None:
    scan_id, other_id = _running_scans(pg_db, 2)
    with pg_db.session() as holder, holder.begin():
        holder.execute(select(Scan).where(Scan.id == scan_id).with_for_update()).all()
        code, elapsed = _run_child(
            pg_db.url.render_as_string(hide_password=False), scan_id, other_id
        )
    assert code == EXIT_CODE
    assert elapsed < 30  # limit 0.5 s + grace 3 s + start-up; it hung forever before
    with pg_db.session() as s:
        assert s.get(Scan, scan_id).status == "running"  # the write could not happen
