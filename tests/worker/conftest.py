"""Fixtures for the queue's integration tests: real `papscan` processes, Redis, PostgreSQL.

Each test that asks for `cluster` gets a PostgreSQL database of its own (created on the
server at PAPSCAN_TEST_PG_URL, dropped afterwards) and a Redis database number of its
own (PAPSCAN_TEST_REDIS_URL, default db 13 of the machine's Redis), flushed before and
after, so nothing touches other data. Workers are `python -m worker worker` subprocesses
whose output goes to a log file per worker; every process a test starts is killed at the
end of the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tests.conftest import PG_URL, new_pg_database, service_missing
from worker.db.models import Cell, Roi, Scan
from worker.db.session import Database

REDIS_URL = os.environ.get("PAPSCAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class WorkerProcess:
    """A `papscan worker` subprocess and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited ({self.proc.returncode}):\n{self.text()}")
            return "ready, consuming" in self.text()

        wait_for(ready, timeout, f"worker {self.name} to be ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    """One test's database, Redis and processes."""

    tmp: Path
    db_url: str
    broker_url: str
    env: dict[str, str]
    db: Database
    processes: list[subprocess.Popen] = field(default_factory=list)

    def papscan(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run `papscan ARGS` to completion."""
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            cwd=REPO_ROOT,
        )

    def submit(self, *args: str) -> dict:
        """`papscan submit ARGS --json`, which must succeed; returns its report."""
        result = self.papscan("submit", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def spawn(self, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `papscan ARGS` in the background, output to `log`."""
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=REPO_ROOT,
            )
        self.processes.append(proc)
        return proc

    def start_worker(
        self, name: str, *extra: str, env: dict[str, str] | None = None, ready: bool = True
    ) -> WorkerProcess:
        log = self.tmp / f"worker-{name}.log"
        proc = self.spawn("worker", "--name", name, *extra, log=log, env=env)
        worker = WorkerProcess(name, proc, log)
        if ready:
            worker.wait_ready()
        return worker

    def scan(self, scan_id: int) -> Scan:
        with self.db.session() as s:
            scan = s.get(Scan, scan_id)
            assert scan is not None
            s.expunge(scan)
            return scan

    def wait_scans_end(self, scan_ids: list[int], timeout: float = 240) -> dict[int, Scan]:
        """Wait until every scan is done, failed or cancelled; return them."""

        def ended() -> dict[int, Scan] | None:
            scans = {i: self.scan(i) for i in scan_ids}
            if all(s.status in ("done", "failed", "cancelled") for s in scans.values()):
                return scans
            return None

        return wait_for(ended, timeout, f"scans {scan_ids} to end", every=0.5)

    def row_counts(self, scan_id: int) -> tuple[int, int]:
        """(ROIs, cells) stored for a scan."""
        with self.db.session() as s:
            rois = s.scalar(select(func.count()).select_from(Roi).where(Roi.scan_id == scan_id))
            cells = s.scalar(select(func.count()).select_from(Cell).where(Cell.scan_id == scan_id))
        return rois, cells


def _pg_admin_dsn() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    with new_pg_database() as url:
        yield url


def set_pg_connections(db_url: str, allowed: bool) -> None:
    """Let clients connect to a test database, or refuse them and drop those connected."""
    import psycopg

    name = make_url(db_url).database
    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, empty before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        how = "`redis-server --daemonize yes`"
        service_missing("Redis", REDIS_URL, "PAPSCAN_TEST_REDIS_URL", how, exc)
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def cluster(tmp_path: Path, fresh_pg_url: str, redis_url: str) -> Iterator[Cluster]:
    env = {
        **os.environ,
        "PAPSCAN_DB_URL": fresh_pg_url,
        "PAPSCAN_BROKER_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
        # Two workers share this machine's cores: one inference thread each.
        "PAPSCAN_INTRA_OP_THREADS": "1",
    }
    for name in ("PAPSCAN_MODELS", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    db = Database(fresh_pg_url)
    db.create_schema()
    cluster = Cluster(tmp_path, fresh_pg_url, redis_url, env, db)
    try:
        yield cluster
    finally:
        for proc in cluster.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        db.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queued_scan(
    db: Database,
    versions: dict | None = None,
    model_sha256: dict | None = None,
    path: str = "/slides/x.svs",
) -> tuple[int, int]:
    """Record a slide (a fresh fingerprint) and a queued scan of it: (slide id, scan id)."""
    from worker.db import queries

    with db.transaction() as s:
        slide = queries.upsert_slide(
            s,
            fingerprint=uuid.uuid4().hex,
            path=path,
            vendor="aperio",
            width=4096,
            height=4096,
            mpp_x=0.5,
            mpp_y=0.5,
        )
        scan = queries.create_scan(
            s, slide.id, versions or {"cell_detector": 1}, model_sha256=model_sha256
        )
        return slide.id, scan.id


def one_sentence(response, status: int) -> str:
    """An API error: `status`, and a body of one sentence, `{"detail": "..."}`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert body["detail"].endswith(".") and "\n" not in body["detail"]
    return body["detail"]


def serve_app(app) -> tuple[str, object, threading.Thread]:
    """Run the ASGI `app` under uvicorn in a thread on a free port; return its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread
