"""The Celery task `scan_slide(scan_id)` and the state a worker process keeps between jobs.

Pool: `solo` (one job at a time in the worker's main process) by default, `threads`
when asked for more than one job at once; never `prefork`. A CUDA context does not
survive `fork()`: prefork children of a parent that touched the GPU fail, and a parent
that must never touch it cannot warm the models before taking work. One process per GPU
(`papscan worker --gpu N`) with the models loaded in that process keeps one CUDA context
per GPU, and the pipeline already overlaps reading, decoding and inference on its own
threads, so a second slide in the same process would only compete for the same GPU.

The models are loaded and warmed up once per process, before the worker consumes its
first job (`papscan worker` calls `load_runtime`); a process that reaches a job without
them (a bare `celery worker`, or a child after a fork) loads them lazily, once.

Time limits: Celery enforces `task_soft_time_limit` / `task_time_limit` only in the
prefork pool, so this task enforces them itself: past the soft limit the scan stops at
its next chunk and fails (the worker goes on); past the hard limit a watchdog thread
fails the scan (every statement bounded, since the database may be what is stuck), ends
the leases of any other scans in this process so live workers re-queue them at once,
and ends the process within a short grace whatever the database does. Its supervisor
starts it again; the job, when Redis delivers it again, finds its scan failed.

Leases: a scan running here holds a lease renewed while it runs (`worker.lifecycle`).
Every worker also runs a small reaper (`worker.queue.reaper`) that re-queues scans whose
lease ran out, so a SIGKILLed worker's slide starts again within minutes, not after
Redis's visibility timeout.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery.signals import worker_ready, worker_shutdown
from celery.utils.time import get_exponential_backoff_interval

from worker import metrics
from worker.db import jobs
from worker.db.session import Database
from worker.errors import TransientError
from worker.lifecycle import Outcome, ScanRuntime, run_scan
from worker.queue.app import SCAN_TASK, app
from worker.queue.pod_cost import pod_cost
from worker.queue.reaper import LeaseReaper
from worker.settings import Settings, get_settings

__all__ = ["load_runtime", "scan_slide"]

logger = logging.getLogger(__name__)

_MAX_RETRY_DELAY_S = 600
_HARD_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: restart me
HARD_LIMIT_GRACE_S = 10.0  # the watchdog's database writes get this long, then exit

_runtime: ScanRuntime | None = None
_runtime_pid: int | None = None  # the process that loaded it: a forked child reloads
_runtime_lock = threading.Lock()


def load_runtime(worker: str, settings: Settings | None = None) -> ScanRuntime:
    """Load and warm up this process's models and open its database; once per process.

    Args:
        worker: this worker's name, recorded on its scans.
        settings: papscan's settings; default read from the environment.

    Raises:
        ModelNotFoundError, ModelConfigError, ModelLoadError, BackendUnavailableError:
            the model repository cannot be used.
    """
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            from worker.cli.common import repository
            from worker.pipeline.scan import ScanModels, ScanOptions

            settings = settings or get_settings()
            models = ScanModels.load(repository(settings.models_dir))  # warms each engine up
            _runtime = ScanRuntime(
                db=Database(settings.db_url),
                models=models,
                options=ScanOptions.from_settings(settings),
                worker=worker,
                soft_limit_s=settings.scan_soft_limit_s,
                lease_s=settings.scan_lease_s,
            )
            _runtime_pid = os.getpid()
            logger.info("models loaded on %s: %s", worker, models.versions())
        return _runtime


@app.task(name=SCAN_TASK, bind=True)
def scan_slide(self, scan_id: int) -> str:
    """Scan the slide of a queued scan; idempotent, so a redelivered job is safe.

    Args:
        scan_id: the scan row to run (created by `papscan submit`).

    Returns:
        How this delivery ended: done, failed, skipped, held or superseded.
    """
    settings = get_settings()
    runtime = load_runtime(self.request.hostname or "worker", settings)
    # A pod with a job in hand is the last a scale-in picks (no-op outside Kubernetes).
    with pod_cost().busy(), hard_limit(runtime, scan_id, settings.scan_hard_limit_s):
        try:
            return run_scan(runtime, scan_id).outcome.value
        except TransientError as exc:
            retries = self.request.retries
            if retries >= settings.task_max_retries:
                return _give_up(runtime, scan_id, retries, exc).value
            delay_s = get_exponential_backoff_interval(
                settings.retry_backoff_s, retries, _MAX_RETRY_DELAY_S
            )
            logger.warning(
                "scan %d: %s; retry %d of %d in %d s",
                scan_id,
                str(exc).rstrip("."),
                retries + 1,
                settings.task_max_retries,
                delay_s,
            )
            raise self.retry(
                exc=exc, countdown=delay_s, max_retries=settings.task_max_retries
            ) from exc


def _give_up(runtime: ScanRuntime, scan_id: int, retries: int, exc: Exception) -> Outcome:
    sentence = f"gave up after {retries} retries: {exc}"
    logger.error("scan %d: %s", scan_id, sentence)
    try:
        with runtime.db.transaction() as s:
            failed = jobs.give_up_scan(s, scan_id, sentence)
    except TransientError:
        logger.error("scan %d: could not record the failure either; it stays queued", scan_id)
    else:
        if failed:
            metrics.slide_ended("failed")
    return Outcome.FAILED


@contextmanager
def hard_limit(
    runtime: ScanRuntime, scan_id: int, limit_s: float, grace_s: float = HARD_LIMIT_GRACE_S
) -> Iterator[None]:
    """Fail the scan and end the process if the job is still running after `limit_s`.

    The exit does not wait on the database: it comes `grace_s` after the limit whatever
    the failure's write is blocked on (a held row lock, an unreachable server).
    """

    def stop() -> None:
        threading.Timer(grace_s, _exit_now).start()  # unconditional, even if the write hangs
        sentence = (
            f"scan {scan_id} ran past its hard time limit of {limit_s:.0f} s"
            " (PAPSCAN_SCAN_HARD_LIMIT_S); its worker process was ended."
        )
        logger.critical(sentence)
        with runtime._lock:
            others = [i for i in runtime.running if i != scan_id]
        try:
            with runtime.db.transaction(timeout_s=grace_s / 2) as s:
                jobs.give_up_scan(s, scan_id, sentence)
                # Scans beside it in this process die with it: let reapers take them now.
                jobs.release_leases(s, others, runtime.worker)
        except Exception:
            logger.exception("scan %d: could not record the hard-limit failure", scan_id)
        _exit_now()

    timer = threading.Timer(limit_s, stop)
    timer.daemon = True
    timer.name = f"papscan-hard-limit-{scan_id}"
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _exit_now() -> None:
    logging.shutdown()
    os._exit(_HARD_LIMIT_EXIT_CODE)


_reaper: LeaseReaper | None = None


@worker_ready.connect
def _start_reaper(sender=None, **kwargs) -> None:
    """Every worker re-queues scans whose lease ran out (a worker killed mid-slide)."""
    global _reaper
    settings = get_settings()
    _reaper = LeaseReaper(Database(settings.db_url), settings.reaper_interval_s)
    _reaper.start()


@worker_ready.connect
def _mark_pod_idle(sender=None, **kwargs) -> None:
    """A restarted container's pod may still carry its old busy deletion cost."""
    pod_cost().idle()


@worker_shutdown.connect
def _stop_reaper(sender=None, **kwargs) -> None:
    if _reaper is not None:
        _reaper.stop()
