"""engines.batcher.DynamicBatcher: own results per caller, batch limits, shapes, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import engines.batcher
from engines.batcher import DynamicBatcher
from engines.errors import (
    BatcherClosedError,
    BatcherTimeoutError,
    ModelInputError,
    PapscanError,
)
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


class CancelledWhileSettling(Future):
    """A future its caller cancels at the worst moment: once `armed`, the thread settling it
    parks just before `set_result` / `set_exception` until the test has cancelled it (a
    real `cancel()`, from the test's thread), then goes on to settle it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.settling = threading.Event()
        self.cancel_landed = threading.Event()

    def _window(self) -> None:
        if self.armed:
            self.settling.set()
            self.cancel_landed.wait(10)

    def set_result(self, result: Any) -> None:
        self._window()
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        self._window()
        super().set_exception(exception)


@pytest.mark.parametrize("outcome", ["result", "error"])
def test_a_cancel_landing_as_the_batcher_settles_the_future_does_not_stop_it(
    classifier: Model, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    rng = np.random.default_rng(9)
    log = ExecutionLog(classifier)
    log.release.clear()
    if outcome == "error":
        real = log._infer
        calls = iter([RuntimeError("device lost")])

        def fails_once(inputs: Any) -> dict[str, np.ndarray]:
            error = next(calls, None)
            if error:
                raise error
            return real(inputs)

        log._infer = fails_once
    monkeypatch.setattr(engines.batcher, "Future", CancelledWhileSettling)
    with DynamicBatcher(classifier, max_queue_delay_ms=0) as batcher:
        doomed = batcher.submit(_crops(rng, 3))
        assert isinstance(doomed, CancelledWhileSettling)
        assert log.started.wait(5)  # the model holds the batch: nothing settled yet
        doomed.armed = True
        log.release.set()
        assert doomed.settling.wait(5)
        cancelled = doomed.cancel()  # between the batcher's last look and its settle
        doomed.cancel_landed.set()
        if cancelled:
            with pytest.raises(CancelledError):
                doomed.result(timeout=5)
        elif outcome == "error":  # a batcher may refuse the cancel, then settle as usual
            assert isinstance(doomed.exception(timeout=5), RuntimeError)
        else:
            assert doomed.result(timeout=5)["probs"].shape == (3, 3)
        # The executor lived through it: a fresh request is served.
        assert batcher.submit(_crops(rng, 2)).result(timeout=5)["probs"].shape == (2, 3)
    counts = classifier.stats.snapshot()
    assert counts["nv_inference_pending_request_count"] == 0
    assert counts["nv_inference_request_success"] == 1 + (not cancelled and outcome == "result")
    assert counts["nv_inference_request_failure"] == (not cancelled and outcome == "error")


class PreemptedWhileSettling(Future):
    """A future whose settling thread yields the GIL just before setting it, as the OS may
    preempt it there at any time: widens the race against callers' cancels."""

    def set_result(self, result: Any) -> None:
        time.sleep(0)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        time.sleep(0)
        super().set_exception(exception)


def _tagged(request_id: int, n: int) -> dict[str, np.ndarray]:
    """Crops whose first pixel holds (request id, row, rows): the echo model returns it."""
    crops = np.zeros((n, 3, 4, 4), np.float32)
    crops[:, 0, 0, 0] = request_id
    crops[:, 1, 0, 0] = np.arange(n)
    crops[:, 2, 0, 0] = n
    return {"crops": crops}


def _tags(request_id: int, n: int) -> np.ndarray:
    return _tagged(request_id, n)["crops"][:, :, 0, 0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("instance_count", [1, 3])
def test_many_callers_cancelling_at_random_never_wedge_the_batcher(
    classifier: Model, monkeypatch: pytest.MonkeyPatch, instance_count: int
) -> None:
    ran: dict[int, threading.Event] = {}  # set once the model has run rows of a request

    def echo(inputs: Any) -> dict[str, np.ndarray]:
        crops = inputs["crops"]
        outputs = {
            "probs": crops[:, :, 0, 0].copy(),
            "features": crops.reshape(len(crops), -1)[:, :8].copy(),
        }
        for request_id in np.unique(crops[:, 0, 0, 0]).astype(int):
            ran[int(request_id)].set()
        return outputs

    classifier.backend.infer = echo  # type: ignore[method-assign]
    monkeypatch.setattr(engines.batcher, "Future", PreemptedWhileSettling)
    deadline = time.monotonic() + 15  # a wedged batcher fails the test here, not hangs it

    def caller(thread: int) -> int:
        rng = np.random.default_rng(thread)
        resolved = 0
        for k in range(30):
            request_id = thread * 1000 + k
            n = int(rng.integers(1, 21))  # up to 20 rows: split across batches of 8
            ran[request_id] = threading.Event()
            future = batcher.submit(_tagged(request_id, n))
            how = rng.choice(["wait", "cancel now", "cancel once it ran"], p=[0.5, 0.25, 0.25])
            if how == "cancel once it ran":
                ran[request_id].wait(5)  # cancel while its rows are being handed back
            if how != "wait" and future.cancel():
                with pytest.raises(CancelledError):
                    future.result(timeout=max(deadline - time.monotonic(), 0.01))
                continue
            got = future.result(timeout=max(deadline - time.monotonic(), 0.01))
            np.testing.assert_array_equal(got["probs"], _tags(request_id, n))
            assert got["features"].shape == (n, 8)
            resolved += 1
        return resolved

    with DynamicBatcher(
        classifier, preferred_batch_size=(4, 8), max_queue_delay_ms=1, instance_count=instance_count
    ) as batcher:
        with ThreadPoolExecutor(16) as pool:
            resolved = sum(pool.map(caller, range(16)))
        ran[99_999] = threading.Event()
        got = batcher.submit(_tagged(99_999, 13)).result(timeout=5)
        np.testing.assert_array_equal(got["probs"], _tags(99_999, 13))
    counts = classifier.stats.snapshot()
    assert counts["nv_inference_pending_request_count"] == 0
    assert counts["nv_inference_request_success"] == resolved + 1
    assert counts["nv_inference_request_failure"] == 0


def test_an_error_while_settling_fails_that_batch_and_the_executor_goes_on(
    classifier: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(10)
    log = ExecutionLog(classifier)
    log.release.clear()
    real = classifier.stats.request_succeeded
    calls = iter([RuntimeError("metrics store down")])

    def fails_once(times: Any) -> None:
        error = next(calls, None)
        if error:
            raise error
        real(times)

    monkeypatch.setattr(classifier.stats, "request_succeeded", fails_once)
    with DynamicBatcher(classifier, preferred_batch_size=(4,), max_queue_delay_ms=1000) as b:
        first, second = b.submit(_crops(rng, 2)), b.submit(_crops(rng, 2))
        log.release.set()
        assert first.result(timeout=5)["probs"].shape == (2, 3)  # set before the error
        with pytest.raises(RuntimeError, match="metrics store down"):
            second.result(timeout=5)
        assert b.infer(_crops(rng, 4), timeout=5)["probs"].shape == (4, 3)
    assert log.sizes == [4, 4]
    assert classifier.stats.snapshot()["nv_inference_pending_request_count"] == 0


def test_wait_gives_up_after_its_timeout_and_cancels_the_request(classifier: Model) -> None:
    log = ExecutionLog(classifier)
    log.release.clear()  # a stuck model
    rng = np.random.default_rng(11)
    with DynamicBatcher(classifier, max_queue_delay_ms=0, result_timeout_s=0.2) as batcher:
        running = batcher.submit(_crops(rng, 8))
        assert log.started.wait(5)
        queued = batcher.submit(_crops(rng, 2))
        with pytest.raises(BatcherTimeoutError, match=r"gave no result within 0\.05 s") as info:
            batcher.wait(queued, timeout=0.05)
        assert isinstance(info.value, PapscanError) and isinstance(info.value, TimeoutError)
        assert queued.cancelled()
        with pytest.raises(BatcherTimeoutError, match=r"within 0\.2 s, so the request was"):
            batcher.infer(_crops(rng, 1))  # the default, result_timeout_s
        log.release.set()
        assert batcher.wait(running)["probs"].shape == (8, 3)
    assert log.sizes == [8]  # the requests given up on never ran
    assert classifier.stats.snapshot()["nv_inference_pending_request_count"] == 0
    with pytest.raises(ModelInputError, match="result_timeout_s > 0"):
        DynamicBatcher(classifier, result_timeout_s=0)
