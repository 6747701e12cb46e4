"""The worker's Prometheus metrics: what it scanned, what is queued, what autoscaling reads.

Everything here is in prometheus_client's default registry, which `papscan worker
--metrics-port` and `papscan serve --metrics-port` serve at `/metrics`, beside the
engines' Triton-style `nv_inference_*` counters (`engines.metrics`).

Counted by the process that scanned (`worker.lifecycle` calls `scan_started`,
`lease_renewed`, `cells_written`, `slide_ended` and `scan_stopped`):

- `papscan_slides_total{outcome="done"|"failed"}`: scans this process finished or failed;
- `papscan_cells_total`: cell rows this process wrote;
- `papscan_slide_seconds`: a scan's wall time, claim to end (histogram, to 2 h);
- `papscan_stage_seconds{stage}`: a done scan's time per pipeline stage (histogram): the
  stages the pipeline times (`plan`, `read` (read and decode), `qc`, `detect`, `crop`,
  `classify_cells`, `classify_rois`, `write`) and `open` (opening the slide file);
- `papscan_running_scans`: scans running in this process now;
- `papscan_lease_age_seconds`: seconds since the oldest running scan's lease was last
  renewed (0 when idle); past the lease (`PAPSCAN_SCAN_LEASE_S`) reapers take the slide;
- `papscan_gpu_memory_used_bytes{gpu}`: device memory in use on each GPU the process sees
  (torch's `mem_get_info`, so every allocator counts); absent without CUDA.

Read from Redis and the database at scrape time (`QueueCollector`; an unreachable broker or
database leaves its families empty and sets `papscan_metrics_source_up{source}` to 0, it
never fails the scrape):

- `papscan_queue_depth{priority="stat"|"routine"}`: jobs waiting in each Redis list;
- `papscan_scans{status}`: scans in the database by status;
- `papscan_outstanding_scans`: queued + running scans, the autoscaling number: the very
  query `OUTSTANDING_SCANS_SQL` that KEDA's `postgresql` scaler runs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from worker.db.models import SCAN_STATUSES, Scan

__all__ = [
    "OUTSTANDING_SCANS_SQL",
    "QueueCollector",
    "cells_written",
    "install_collectors",
    "lease_renewed",
    "metric_names",
    "outstanding_scans",
    "scan_started",
    "scan_stopped",
    "serve",
    "scans_by_status",
    "slide_ended",
]

logger = logging.getLogger(__name__)

#: The autoscaling number: scans queued or running (a running scan whose lease ran out is
#: still work: a reaper queues it again). KEDA's `postgresql` trigger runs exactly this.
OUTSTANDING_SCANS_SQL = "SELECT count(*) FROM scans WHERE status IN ('queued', 'running')"

SLIDE_BUCKETS_S = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200)
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
SCRAPE_TIMEOUT_S = 3.0  # each of Redis and the database, well inside a 10 s scrape

SLIDES = Counter(
    "papscan_slides", "Scans this process ended, by outcome (done or failed)", ["outcome"]
)
CELLS = Counter("papscan_cells", "Cell rows this process wrote")
SLIDE_SECONDS = Histogram(
    "papscan_slide_seconds", "Wall time of one scan, claim to end", buckets=SLIDE_BUCKETS_S
)
STAGE_SECONDS = Histogram(
    "papscan_stage_seconds",
    "Time one done scan spent in a pipeline stage (summed over its ROIs)",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
)
RUNNING_SCANS = Gauge("papscan_running_scans", "Scans running in this worker process")
LEASE_AGE = Gauge(
    "papscan_lease_age_seconds",
    "Seconds since the oldest running scan's lease was last renewed; 0 when idle",
)
for _outcome in ("done", "failed"):
    SLIDES.labels(_outcome)  # both series exist from the start, at 0

_leases: dict[int, float] = {}  # scan id -> time.monotonic() of its last lease renewal
_leases_lock = threading.Lock()


def _running() -> int:
    with _leases_lock:
        return len(_leases)


def _lease_age() -> float:
    with _leases_lock:
        oldest = min(_leases.values(), default=None)
    return 0.0 if oldest is None else time.monotonic() - oldest


RUNNING_SCANS.set_function(_running)
LEASE_AGE.set_function(_lease_age)


# --- what the lifecycle reports -----------------------------------------------------------


def scan_started(scan_id: int) -> None:
    """A scan was claimed (its lease taken) in this process."""
    with _leases_lock:
        _leases[scan_id] = time.monotonic()


def lease_renewed(scan_id: int) -> None:
    """The scan's lease was renewed (by the lease keeper or a chunk's write)."""
    with _leases_lock:
        if scan_id in _leases:
            _leases[scan_id] = time.monotonic()


def cells_written(count: int) -> None:
    """`count` cell rows were committed."""
    CELLS.inc(count)


def scan_stopped(scan_id: int) -> None:
    """The scan is no longer running here, however it ended (done, failed, superseded,
    a transient error to retry)."""
    with _leases_lock:
        _leases.pop(scan_id, None)


def slide_ended(
    outcome: str, seconds: float | None = None, stages_ms: Mapping[str, float] | None = None
) -> None:
    """A scan run here ended done or failed (a superseded run counts nothing: the scan
    goes on elsewhere).

    Args:
        outcome: "done" or "failed", for `papscan_slides_total`.
        seconds: its wall time, claim to end, for `papscan_slide_seconds`; None for a
            scan failed without a run (given up after transient errors).
        stages_ms: a done scan's time per stage in ms (`ScanOutcome.timings_ms`), for
            `papscan_stage_seconds`; its `total` is left out.
    """
    SLIDES.labels(outcome).inc()
    if seconds is not None:
        SLIDE_SECONDS.observe(seconds)
    for stage, ms in (stages_ms or {}).items():
        if stage != "total":
            STAGE_SECONDS.labels(stage).observe(ms / 1000)


# --- the database's numbers ---------------------------------------------------------------


def outstanding_scans(s: Session) -> int:
    """Scans queued or running: the autoscaling number (runs `OUTSTANDING_SCANS_SQL`)."""
    return int(s.execute(text(OUTSTANDING_SCANS_SQL)).scalar_one())


def scans_by_status(s: Session) -> dict[str, int]:
    """Scans per status, every status present (0 when none); one indexed GROUP BY."""
    rows = s.execute(select(Scan.status, func.count()).group_by(Scan.status))
    counts = dict.fromkeys(SCAN_STATUSES, 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


# --- scrape-time collectors -----------------------------------------------------------------


class QueueCollector(Collector):
    """Reads the queue's depth from Redis and the scans from the database at each scrape.

    A source that fails (unreachable, refused, too slow) leaves its families without
    samples and `papscan_metrics_source_up{source}` at 0; the error is logged once until
    it changes or the source comes back.

    Args:
        broker_url: the Redis URL (`PAPSCAN_BROKER_URL`); None reads no queue.
        db_url: the results database URL; None reads no scans.
    """

    def __init__(self, broker_url: str | None, db_url: str | None) -> None:
        self._broker_url = broker_url
        self._db_url = db_url
        self._db = None
        self._errors: dict[str, str | None] = {}
        self._lock = threading.Lock()  # one scrape at a time reads the sources

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            up = GaugeMetricFamily(
                "papscan_metrics_source_up",
                "Whether this scrape could read the source (broker, database)",
                labels=["source"],
            )
            depth = GaugeMetricFamily(
                "papscan_queue_depth", "Jobs waiting in each priority queue", labels=["priority"]
            )
            scans = GaugeMetricFamily(
                "papscan_scans", "Scans in the results database by status", labels=["status"]
            )
            outstanding = GaugeMetricFamily(
                "papscan_outstanding_scans",
                "Scans queued or running in the results database (the autoscaling number)",
            )
            if self._broker_url is not None:
                depths = self._read("broker", self._queue_depths)
                for priority, n in (depths or {}).items():
                    depth.add_metric([priority], n)
                up.add_metric(["broker"], float(depths is not None))
            if self._db_url is not None:
                counts = self._read("database", self._scans)
                if counts is not None:
                    by_status, n = counts
                    for status, count in by_status.items():
                        scans.add_metric([status], count)
                    outstanding.add_metric([], n)
                up.add_metric(["database"], float(counts is not None))
            yield from (depth, scans, outstanding, up)

    def describe(self) -> Iterable[Metric]:
        return ()  # collected at scrape time only; registering must not touch Redis or SQL

    def _read(self, source: str, read):
        try:
            value = read()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if self._errors.get(source) != message:
                logger.warning("metrics: cannot read the %s: %s", source, message)
            self._errors[source] = message
            return None
        if self._errors.get(source):
            logger.info("metrics: the %s is readable again", source)
        self._errors[source] = None
        return value

    def _queue_depths(self) -> dict[str, int]:
        from worker.queue.app import QUEUES
        from worker.queue.broker import queue_depths

        depths = queue_depths(self._broker_url, timeout_s=SCRAPE_TIMEOUT_S)
        return {name: depths[name] for name in QUEUES}

    def _scans(self) -> tuple[dict[str, int], int]:
        if self._db is None:
            from sqlalchemy.engine import make_url

            from worker.db.session import Database

            url = make_url(self._db_url)
            if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
                url = url.update_query_dict({"connect_timeout": str(int(SCRAPE_TIMEOUT_S))})
            self._db = Database(url)
        with self._db.transaction(write=False, timeout_s=SCRAPE_TIMEOUT_S) as s:
            return scans_by_status(s), outstanding_scans(s)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()


class GpuMemoryCollector(Collector):
    """`papscan_gpu_memory_used_bytes{gpu}` for each CUDA device torch sees (total minus
    free, so TensorRT's and ONNX Runtime's memory count too); nothing without CUDA.

    torch is only asked if the process already imported it (the engines did), so a
    CPU-only process never pays for importing it at a scrape.
    """

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        family = GaugeMetricFamily(
            "papscan_gpu_memory_used_bytes", "Device memory in use on the GPU", labels=["gpu"]
        )
        try:
            if torch is None or not torch.cuda.is_available():
                return
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                family.add_metric([str(index)], float(total - free))
        except Exception as exc:  # a broken driver must not break the scrape
            logger.debug("metrics: cannot read GPU memory: %s", exc)
            return
        yield family

    def describe(self) -> Iterable[Metric]:
        return ()


_installed: list[Collector] = []


def install_collectors(
    broker_url: str | None,
    db_url: str | None,
    *,
    gpu: bool = True,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Register the scrape-time collectors (queue and database, and GPU memory) once per
    process; called by `papscan worker` and `papscan serve` when they serve metrics."""
    if _installed:
        return
    _installed.append(QueueCollector(broker_url, db_url))
    if gpu:
        _installed.append(GpuMemoryCollector())
    for collector in _installed:
        registry.register(collector)


def serve(port: int, broker_url: str | None, db_url: str | None, *, gpu: bool) -> None:
    """Install the scrape-time collectors and serve the default registry at
    `http://0.0.0.0:PORT/metrics` from a daemon thread.

    Raises:
        OSError: the port cannot be bound.
    """
    from prometheus_client import start_http_server

    install_collectors(broker_url, db_url, gpu=gpu)
    start_http_server(port)
    logger.info("metrics at http://0.0.0.0:%d/metrics", port)


# --- names, for dashboards and their tests --------------------------------------------------

_SCRAPE_TIME_GAUGES = (
    "papscan_queue_depth",
    "papscan_scans",
    "papscan_outstanding_scans",
    "papscan_metrics_source_up",
    "papscan_gpu_memory_used_bytes",
)


def metric_names() -> set[str]:
    """Every metric family and sample name a worker can expose, as they appear in
    `/metrics` (Prometheus text format): the papscan families, their `_total`, `_bucket`,
    `_sum`, `_count` and `_created` samples, the engines' `nv_inference_*` names
    (counters with and without `_total`), and prometheus_client's own `process_*` and
    `python_*` (on Linux)."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    from engines.metrics import COUNTERS, PENDING_GAUGE

    names: set[str] = set(_SCRAPE_TIME_GAUGES) | {PENDING_GAUGE}
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        for family in collector.collect():
            names.add(family.name)
            names |= {sample.name for sample in family.samples}
    for name in COUNTERS:
        names |= {name, f"{name}_total"}
    for metric in (SLIDES, CELLS, SLIDE_SECONDS, STAGE_SECONDS, RUNNING_SCANS, LEASE_AGE):
        for family in metric.describe():
            names.add(family.name)
            if family.type == "counter":
                names |= {f"{family.name}_total", f"{family.name}_created"}
            elif family.type == "histogram":
                names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created")}
    return names
