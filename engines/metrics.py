"""Per model and version inference metrics, named and counted as Triton counts them.

Triton's meanings, kept here:

- a *request* is one call by a client (`Model.infer`, or one `DynamicBatcher.submit`);
  `nv_inference_request_success` / `_failure` count them;
- `nv_inference_count` counts the items inferred (a request of 4 cells counts 4) and
  `nv_inference_exec_count` the model executions (a batch of 64 counts 1), so the
  average batch size is one divided by the other;
- the `*_duration_us` counters are cumulative microseconds summed over successful
  requests: a request's total time (`request`), its wait for a batch (`queue`), and the
  time of the batch it ran in spent preparing inputs (`compute_input`), executing
  (`compute_infer`) and handing back outputs (`compute_output`);
- `nv_inference_pending_request_count` is a gauge of requests waiting for a batch.

The worker serves `METRICS` over HTTP (`prometheus_client` collector); tests and the CLI
read `snapshot()`. On the wire the counters carry the `_total` suffix that OpenMetrics and
prometheus_client require of a counter (`nv_inference_request_success_total`); that suffix
is the only difference from Triton's names, so a Triton dashboard needs `_total` added.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry

COUNTERS: dict[str, str] = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (a request of n items counts n)",
    "nv_inference_exec_count": "Number of model executions performed (a batch counts once)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_input_duration_us": ("Cumulative compute input duration in microseconds"),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds"
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative compute output duration in microseconds"
    ),
}
PENDING_GAUGE = "nv_inference_pending_request_count"
_LABELS = ["model", "version"]


@dataclass(frozen=True)
class RequestTimes:
    """Where one request's time went, in seconds."""

    queue: float = 0.0
    compute_input: float = 0.0
    compute_infer: float = 0.0
    compute_output: float = 0.0
    total: float = 0.0


class ModelStats:
    """The counters of one model version; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0.0)
        self._pending = 0

    def request_succeeded(self, times: RequestTimes) -> None:
        """Counts one successful request and adds its durations."""
        with self._lock:
            c = self._counts
            c["nv_inference_request_success"] += 1
            c["nv_inference_request_duration_us"] += times.total * 1e6
            c["nv_inference_queue_duration_us"] += times.queue * 1e6
            c["nv_inference_compute_input_duration_us"] += times.compute_input * 1e6
            c["nv_inference_compute_infer_duration_us"] += times.compute_infer * 1e6
            c["nv_inference_compute_output_duration_us"] += times.compute_output * 1e6

    def request_failed(self) -> None:
        """Counts one failed request (its durations are not added, as in Triton)."""
        with self._lock:
            self._counts["nv_inference_request_failure"] += 1

    def executed(self, batch_size: int) -> None:
        """Counts one model execution of `batch_size` items."""
        with self._lock:
            self._counts["nv_inference_exec_count"] += 1
            self._counts["nv_inference_count"] += batch_size

    def pending(self, delta: int) -> None:
        """Moves the pending-request gauge by `delta`."""
        with self._lock:
            self._pending += delta

    def snapshot(self) -> dict[str, float]:
        """Every counter and the gauge, by Triton name."""
        with self._lock:
            return {**self._counts, PENDING_GAUGE: float(self._pending)}


class InferenceMetrics:
    """The `ModelStats` of every model version in the process, as a Prometheus collector.

    Args:
        registry: Where to register for scraping; None registers nowhere (tests make
            their own instances and read `snapshot()`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelStats] = {}
        if registry is not None:
            registry.register(self)

    def for_model(self, name: str, version: int) -> ModelStats:
        """The stats of `name` version `version`, created on first use."""
        key = (name, str(version))
        with self._lock:
            if key not in self._models:
                self._models[key] = ModelStats()
            return self._models[key]

    def snapshot(self) -> dict[tuple[str, str], dict[str, float]]:
        """(model, version) -> counters, for every model version seen."""
        with self._lock:
            models = dict(self._models)
        return {key: stats.snapshot() for key, stats in models.items()}

    def collect(self) -> Iterator[Metric]:
        """Prometheus' collector hook: one family per counter and the pending gauge."""
        snapshot = self.snapshot()
        for name, documentation in COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=_LABELS)
            for (model, version), values in snapshot.items():
                family.add_metric([model, version], values[name])
            yield family
        gauge = GaugeMetricFamily(
            PENDING_GAUGE, "Number of requests waiting for a batch", labels=_LABELS
        )
        for (model, version), values in snapshot.items():
            gauge.add_metric([model, version], values[PENDING_GAUGE])
        yield gauge


#: The process-wide metrics every `Model` reports to unless given others.
METRICS = InferenceMetrics(REGISTRY)
