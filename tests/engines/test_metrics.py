"""engines.metrics: Triton's counters add up after a known workload, and are scraped."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engines.batcher import DynamicBatcher
from engines.errors import ModelInputError
from engines.metrics import COUNTERS, PENDING_GAUGE, InferenceMetrics
from engines.model import Model


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> InferenceMetrics:
    """Overrides the conftest's: these counters are also registered for scraping."""
    return InferenceMetrics(registry)


def _crops(n: int) -> dict[str, np.ndarray]:
    return {"crops": np.random.default_rng(n).normal(size=(n, 3, 4, 4)).astype(np.float32)}


def _counting_executions(model: Model) -> list[int]:
    sizes: list[int] = []
    real = model.backend.infer

    def infer(inputs: Any) -> dict[str, np.ndarray]:
        sizes.append(len(inputs["crops"]))
        return real(inputs)

    model.backend.infer = infer  # type: ignore[method-assign]
    return sizes


def test_direct_requests_add_up(classifier: Model, metrics: InferenceMetrics) -> None:
    warm = metrics.snapshot()[("tiny_classifier", "1")]  # the warm-up runs the backend only
    assert warm["nv_inference_exec_count"] == 0
    for n in (5, 8, 20):  # max_batch_size 8: 1 + 1 + 3 executions
        classifier.infer(_crops(n))
    with pytest.raises(ModelInputError):
        classifier.infer({"crops": np.zeros((2, 3, 9, 9), np.float32)})
    counts = metrics.snapshot()[("tiny_classifier", "1")]
    assert counts["nv_inference_request_success"] == 3
    assert counts["nv_inference_request_failure"] == 1
    assert counts["nv_inference_count"] == 33
    assert counts["nv_inference_exec_count"] == 5
    assert counts["nv_inference_queue_duration_us"] == 0
    parts = sum(
        counts[f"nv_inference_compute_{part}_duration_us"] for part in ("input", "infer", "output")
    )
    assert 0 < counts["nv_inference_compute_infer_duration_us"] <= parts
    assert parts <= counts["nv_inference_request_duration_us"] * 1.0001


def test_batched_requests_add_up(classifier: Model, metrics: InferenceMetrics) -> None:
    executions = _counting_executions(classifier)
    with DynamicBatcher(classifier, preferred_batch_size=(4,), max_queue_delay_ms=200) as b:
        futures = [b.submit(_crops(2)) for _ in range(10)]
        for future in futures:
            future.result(timeout=10)
        with pytest.raises(ModelInputError):
            b.submit({"crops": np.zeros((1, 3, 9, 9), np.float32)})
    counts = metrics.snapshot()[("tiny_classifier", "1")]
    assert counts["nv_inference_request_success"] == 10
    assert counts["nv_inference_request_failure"] == 1
    assert counts["nv_inference_count"] == 20 == sum(executions)
    assert counts["nv_inference_exec_count"] == len(executions) < 10
    # Average batch = inferences / executions, as Triton's dashboards compute it.
    assert counts["nv_inference_count"] / counts["nv_inference_exec_count"] > 1
    assert counts["nv_inference_queue_duration_us"] > 0
    assert counts[PENDING_GAUGE] == 0
    assert counts["nv_inference_request_duration_us"] >= counts["nv_inference_queue_duration_us"]


def test_exposition_uses_tritons_names(classifier: Model, registry: CollectorRegistry) -> None:
    classifier.infer(_crops(3))
    text = generate_latest(registry).decode()
    labels = '{model="tiny_classifier",version="1"}'
    assert f"nv_inference_request_success_total{labels} 1.0" in text
    assert f"nv_inference_count_total{labels} 3.0" in text
    assert f"nv_inference_exec_count_total{labels} 1.0" in text
    assert "# TYPE nv_inference_request_success_total counter" in text
    assert f"# TYPE {PENDING_GAUGE} gauge" in text
    for name in COUNTERS:
        assert f"{name}_total{labels} " in text
