"""engines.batcher.DynamicBatcher: own results per caller, batch limits, shapes, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from engines.batcher import DynamicBatcher
from engines.errors import BatcherClosedError, ModelInputError
from engines.model import Model


class ExecutionLog:
    """Wraps a model's backend to record each execution's inputs (optionally slowly)."""

    def __init__(self, model: Model, delay_s: float = 0.0) -> None:
        self.batches: list[dict[str, tuple[int, ...]]] = []
        self.delay_s = delay_s
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self._infer = model.backend.infer
        model.backend.infer = self.infer  # type: ignore[method-assign]

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        self.batches.append({name: a.shape for name, a in inputs.items()})
        self.started.set()
        self.release.wait(10)
        time.sleep(self.delay_s)
        return self._infer(inputs)

    @property
    def sizes(self) -> list[int]:
        return [next(iter(shapes.values()))[0] for shapes in self.batches]


def _crops(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"crops": rng.normal(size=(n, 3, 4, 4)).astype(np.float32)}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_concurrent_callers_get_exactly_their_own_rows(classifier: Model) -> None:
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(1, 5, size=150), 11, 12, 17]  # mostly small, a few to be split
    requests = [_crops(rng, int(n)) for n in rng.permutation(sizes)]
    expected = [classifier.infer(r) for r in requests]
    log = ExecutionLog(classifier)
    with DynamicBatcher(classifier, preferred_batch_size=(4, 8), max_queue_delay_ms=5) as batcher:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(batcher.infer, requests))
    for got, want in zip(results, expected, strict=True):
        _assert_same(got, want)
    assert max(log.sizes) <= classifier.config.max_batch_size
    assert sum(log.sizes) == sum(len(r["crops"]) for r in requests)
    # It batched: far fewer executions than requests.
    assert len(log.sizes) < len(requests) / 2


def test_a_request_larger_than_max_batch_is_split_and_joined_in_order(
    classifier: Model,
) -> None:
    request = _crops(np.random.default_rng(1), 37)
    want = classifier.infer(request)
    log = ExecutionLog(classifier)
    with DynamicBatcher(classifier) as batcher:
        got = batcher.infer(request)
    _assert_same(got, want)
    assert log.sizes == [8, 8, 8, 8, 5]


def test_a_preferred_size_runs_without_waiting_for_the_delay(classifier: Model) -> None:
    log = ExecutionLog(classifier)
    log.release.clear()  # hold the first execution so the rest queue up behind it
    rng = np.random.default_rng(2)
    with DynamicBatcher(classifier, preferred_batch_size=(4,), max_queue_delay_ms=60_000) as b:
        first = b.submit(_crops(rng, 4))
        assert log.started.wait(5)
        rest = [b.submit(_crops(rng, 1)) for _ in range(4)]
        log.release.set()
        # With a one-minute delay, only the preferred size can have started these.
        for future in [first, *rest]:
            future.result(timeout=10)
    assert log.sizes == [4, 4]


def test_the_delay_runs_a_partial_batch(classifier: Model) -> None:
    log = ExecutionLog(classifier)
    rng = np.random.default_rng(3)
    with DynamicBatcher(classifier, preferred_batch_size=(8,), max_queue_delay_ms=50) as batcher:
        futures = [batcher.submit(_crops(rng, 1)) for _ in range(3)]
        for future in futures:
            assert future.result(timeout=10)["probs"].shape == (1, 3)
    assert log.sizes == [3]


def test_requests_of_different_shapes_never_share_a_batch(roi: Model) -> None:
    rng = np.random.default_rng(4)

    def bag(cells: int) -> dict[str, np.ndarray]:
        return {
            "cell_features": rng.normal(size=(1, cells, 8)).astype(np.float32),
            "cell_mask": np.ones((1, cells), np.float32),
        }

    requests = [bag(int(n)) for n in rng.choice([5, 7, 9], size=40)]
    expected = [roi.infer(r) for r in requests]
    log = ExecutionLog(roi)
    with DynamicBatcher(roi, preferred_batch_size=(4,), max_queue_delay_ms=5) as batcher:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(batcher.infer, requests))
    for got, want in zip(results, expected, strict=True):
        _assert_same(got, want)
    assert all(len({s[1] for s in [b["cell_features"]]}) == 1 for b in log.batches)
    assert max(log.sizes) <= roi.config.max_batch_size
    assert len(log.sizes) < len(requests)


def test_close_drains_pending_requests(classifier: Model) -> None:
    log = ExecutionLog(classifier, delay_s=0.05)
    rng = np.random.default_rng(5)
    batcher = DynamicBatcher(classifier, preferred_batch_size=(2,), max_queue_delay_ms=1)
    futures = [batcher.submit(_crops(rng, 2)) for _ in range(6)]
    batcher.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert sum(log.sizes) == 12
    with pytest.raises(BatcherClosedError, match="is closed and takes no more requests"):
        batcher.submit(_crops(rng, 1))


def test_close_without_drain_fails_what_has_not_started(classifier: Model) -> None:
    log = ExecutionLog(classifier)
    log.release.clear()
    rng = np.random.default_rng(6)
    batcher = DynamicBatcher(classifier, max_queue_delay_ms=0)
    running = batcher.submit(_crops(rng, 8))
    assert log.started.wait(5)
    waiting = [batcher.submit(_crops(rng, 3)) for _ in range(3)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    for future in waiting:
        with pytest.raises(BatcherClosedError, match="was closed before this request ran"):
            future.result(timeout=5)
    log.release.set()
    closer.join(10)
    assert running.result(timeout=5)["probs"].shape == (8, 3)
    assert classifier.stats.snapshot()["nv_inference_pending_request_count"] == 0


def test_an_execution_error_reaches_every_caller_of_that_batch_only(classifier: Model) -> None:
    rng = np.random.default_rng(7)
    calls = {"n": 0}
    real = classifier.backend.infer

    def fails_once(inputs: Any) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(inputs)

    classifier.backend.infer = fails_once  # type: ignore[method-assign]
    with DynamicBatcher(classifier, preferred_batch_size=(4,), max_queue_delay_ms=1000) as b:
        first = [b.submit(_crops(rng, 1)) for _ in range(4)]
        for future in first:
            with pytest.raises(RuntimeError, match="device lost"):
                future.result(timeout=5)
        assert b.infer(_crops(rng, 2))["probs"].shape == (2, 3)
    counts = classifier.stats.snapshot()
    assert counts["nv_inference_request_failure"] == 4
    assert counts["nv_inference_request_success"] == 1


def test_bad_input_is_refused_in_the_callers_thread(classifier: Model) -> None:
    with DynamicBatcher(classifier) as batcher:
        with pytest.raises(ModelInputError, match="must have shape"):
            batcher.submit({"crops": np.zeros((2, 3, 5, 5), np.float32)})
        assert batcher.infer({"crops": np.zeros((0, 3, 4, 4), np.float32)})["probs"].shape == (
            0,
            3,
        )


def test_a_cancelled_request_is_dropped(classifier: Model) -> None:
    log = ExecutionLog(classifier)
    log.release.clear()
    rng = np.random.default_rng(8)
    with DynamicBatcher(classifier, max_queue_delay_ms=0) as batcher:
        batcher.submit(_crops(rng, 8))
        assert log.started.wait(5)
        doomed = batcher.submit(_crops(rng, 2))
        kept = batcher.submit(_crops(rng, 3))
        assert doomed.cancel()
        log.release.set()
        assert kept.result(timeout=5)["probs"].shape == (3, 3)
        with pytest.raises(CancelledError):
            doomed.result()
    assert log.sizes == [8, 3]
    assert classifier.stats.snapshot()["nv_inference_pending_request_count"] == 0


def test_settings_come_from_the_config_and_are_checked(classifier: Model) -> None:
    with pytest.raises(ModelInputError, match=r"preferred batch sizes must lie in 1\.\.8"):
        DynamicBatcher(classifier, preferred_batch_size=(16,))
    with DynamicBatcher(classifier, instance_count=2) as batcher:
        assert "instances=2" in repr(batcher)
        assert batcher.target == classifier.config.max_batch_size
