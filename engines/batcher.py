"""Triton's dynamic batcher for one loaded model: small requests in, full batches out.

Callers on any number of threads `submit` named arrays of any batch size and get a
`Future`. `instance_count` executor threads (one per model instance) take the oldest
pending work, wait until a preferred batch size is gathered or the oldest request has
waited `max_queue_delay_ms`, run one execution of at most `max_batch_size`, and hand each
caller exactly its own rows, in order.

How a batch is formed (the rules the tests pin down):

- A request larger than `max_batch_size` is cut into pieces of at most that size; its
  future resolves when every piece has run, with the pieces joined in order.
- Only requests whose inputs agree beyond axis 0 share a batch (the ROI classifier's
  bags differ in length); others wait for a batch of their own shape. Among those,
  pieces run in arrival order and a piece that would overflow `max_batch_size` waits for
  the next batch (no reordering, no starvation).
- A batch runs as soon as it reaches the largest preferred size, or reaches any
  preferred size with nothing more of its shape waiting, or is full, or its oldest
  request has waited `max_queue_delay_ms`.

Cancelling and waiting:

- A caller may cancel its future at any time (a failed scan cancels all of its own): the
  pieces not yet run are dropped, and a cancel that lands while its batch runs wins over
  the result, which is discarded. Either way the request counts once, as neither a
  success nor a failure.
- `wait` (and `infer`) give up after `result_timeout_s` with `BatcherTimeoutError` and
  cancel the request, so a stuck model fails its callers instead of hanging them.
- An error in an execution, the batcher's own bookkeeping included, fails that
  execution's requests only; the executor threads go on serving.

`close()` stops new submissions; by default pending requests still run (drain), with
`drain=False` they fail with `BatcherClosedError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from engines.errors import BatcherClosedError, BatcherTimeoutError, ModelInputError
from engines.metrics import RequestTimes
from engines.model import Model
from engines.tensors import is_device_array

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


@dataclass
class _Request:
    """One `submit` call: its future, its pieces' outputs as they arrive, its timings.

    Its pieces may finish on different executor threads, so every field after `enqueued`
    is read and written under the batcher's `_book` lock.
    """

    future: Future[Outputs]
    pieces: int
    enqueued: float
    parts: list[Outputs | None] = field(default_factory=list)
    done_pieces: int = 0
    settled: bool = False  # resolved, failed or dropped after a cancel: counted once
    queue: float = 0.0
    compute_input: float = 0.0
    compute_infer: float = 0.0
    compute_output: float = 0.0


@dataclass
class _Piece:
    """At most `max_batch_size` rows of one request, waiting for a batch."""

    request: _Request
    index: int
    feed: dict[str, np.ndarray]
    size: int
    shape_key: tuple[tuple[int, ...], ...]


class DynamicBatcher:
    """Gathers requests to one `Model` into batches (Triton's `dynamic_batching`).

    Args:
        model: A loaded, batched model (`max_batch_size > 0`).
        preferred_batch_size: Batch sizes to run as soon as they are gathered; None takes
            the config's `dynamic_batching.preferred_batch_size`.
        max_queue_delay_ms: Longest the oldest request waits for company; None takes the
            config's (0 without a `dynamic_batching` block: batch only what is already
            waiting).
        instance_count: Executor threads (batches running at once); None takes the
            config's `instance_count`.
        result_timeout_s: Longest `wait` and `infer` wait for a result by default, in
            seconds; None waits for ever.

    Raises:
        ModelInputError: The model has no batch dimension, or a setting is out of range.
    """

    def __init__(
        self,
        model: Model,
        *,
        preferred_batch_size: tuple[int, ...] | None = None,
        max_queue_delay_ms: float | None = None,
        instance_count: int | None = None,
        result_timeout_s: float | None = 300.0,
    ) -> None:
        config = model.config
        if not config.is_batched:
            raise ModelInputError(
                f"{model.name} has max_batch_size 0 (no batch dimension), so it cannot be "
                "batched dynamically"
            )
        settings = config.dynamic_batching
        if preferred_batch_size is None:
            preferred_batch_size = settings.preferred_batch_size if settings else ()
        if max_queue_delay_ms is None:
            max_queue_delay_ms = settings.max_queue_delay_ms if settings else 0.0
        if instance_count is None:
            instance_count = config.instance_count
        self.model = model
        self.max_batch_size = config.max_batch_size
        self.preferred = tuple(sorted(set(preferred_batch_size)))
        if any(b < 1 or b > self.max_batch_size for b in self.preferred):
            raise ModelInputError(
                f"{model.name}: preferred batch sizes must lie in 1..{self.max_batch_size}, "
                f"got {list(self.preferred)}"
            )
        if max_queue_delay_ms < 0 or instance_count < 1:
            raise ModelInputError(
                f"{model.name}: the batcher needs max_queue_delay_ms >= 0 and "
                f"instance_count >= 1, got {max_queue_delay_ms} and {instance_count}"
            )
        if result_timeout_s is not None and result_timeout_s <= 0:
            raise ModelInputError(
                f"{model.name}: the batcher needs result_timeout_s > 0 (or None), "
                f"got {result_timeout_s}"
            )
        self.result_timeout_s = result_timeout_s
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.target = self.preferred[-1] if self.preferred else self.max_batch_size
        self._pending: list[_Piece] = []
        self._cond = threading.Condition()
        self._gather = threading.Lock()  # one executor forms a batch at a time
        self._book = threading.Lock()  # requests' bookkeeping; taken after _cond, never before
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{model.name}-{i}", daemon=True)
            for i in range(instance_count)
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return (
            f"DynamicBatcher({self.model.name}@{self.model.version}, "
            f"preferred={list(self.preferred)}, max_batch_size={self.max_batch_size}, "
            f"max_queue_delay_ms={self.max_queue_delay * 1e3:g}, "
            f"instances={len(self._threads)})"
        )

    def submit(self, inputs: Mapping[str, Any]) -> Future[Outputs]:
        """Queues one request; the future resolves to its outputs, rows in input order.

        Raises:
            ModelInputError: The inputs disagree with the model's config (raised here, in
                the caller's thread, so a bad request never reaches a batch).
            BatcherClosedError: The batcher was closed.
        """
        try:
            feed = self.model.checked_inputs(inputs)
            if any(is_device_array(a) and not isinstance(a, np.ndarray) for a in feed.values()):
                raise ModelInputError(
                    f"{self.model.name}: the batcher takes host arrays; call Model.infer "
                    "directly with arrays already on the GPU"
                )
        except ModelInputError:
            self.model.stats.request_failed()
            raise
        size = self.model.batch_size_of(feed)
        future: Future[Outputs] = Future()
        if size == 0:
            future.set_result(self.model.empty_outputs())
            return future
        shape_key = tuple(array.shape[1:] for array in feed.values())
        starts = range(0, size, self.max_batch_size)
        request = _Request(future, len(starts), time.perf_counter(), [None] * len(starts))
        pieces = [
            _Piece(
                request,
                i,
                {name: a[start : start + self.max_batch_size] for name, a in feed.items()},
                min(self.max_batch_size, size - start),
                shape_key,
            )
            for i, start in enumerate(starts)
        ]
        with self._cond:
            if self._closed:
                raise BatcherClosedError(
                    f"the {self.model.name} batcher is closed and takes no more requests"
                )
            self._pending.extend(pieces)
            self.model.stats.pending(1)
            self._cond.notify_all()
        return future

    def infer(self, inputs: Mapping[str, Any], timeout: float | None = None) -> Outputs:
        """`submit` and `wait` for the outputs (re-raising the execution's error)."""
        return self.wait(self.submit(inputs), timeout)

    def wait(self, future: Future[Outputs], timeout: float | None = None) -> Outputs:
        """Waits for a future from `submit`: its outputs, or the execution's error.

        Args:
            future: What `submit` returned.
            timeout: Longest to wait, in seconds; None takes `result_timeout_s`.

        Raises:
            BatcherTimeoutError: No result in time; the request is cancelled, so its rows
                not yet run are dropped.
            CancelledError: The future was cancelled.
        """
        if timeout is None:
            timeout = self.result_timeout_s
        # cancel() fails only when the result arrived meanwhile: then return it.
        if not wait_for([future], timeout).done and future.cancel():
            raise BatcherTimeoutError(
                f"the {self.model.name} batcher gave no result within {timeout:g} s, so the "
                "request was cancelled: the model is stuck or overloaded (see the log)"
            )
        return future.result()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests and stops the executors.

        Args:
            drain: Run the pending requests first; False fails them with
                `BatcherClosedError` instead.
            timeout: Longest to wait for each executor thread, in seconds.
        """
        dropped: list[_Piece] = []
        with self._cond:
            self._closed = True
            if not drain:
                dropped, self._pending = self._pending, []
            self._cond.notify_all()
        # Outside the lock: settling a future runs its callers' callbacks.
        self._fail(
            dropped,
            BatcherClosedError(f"the {self.model.name} batcher was closed before this request ran"),
        )
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- executor side ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._gather:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # only if failing the batch failed too: keep serving the rest
                logger.exception("%s: the batcher could not settle a batch", self.model.name)

    def _next_batch(self) -> list[_Piece] | None:
        """Waits for work, then for a batch worth running; None once closed and drained."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._pending[0].request.enqueued + self.max_queue_delay
            while True:
                batch, blocked, more = self._gathered()
                size = sum(piece.size for piece in batch)
                ready = (
                    size >= self.target
                    or size == self.max_batch_size
                    or blocked
                    or (size in self.preferred and not more)
                    or self._closed
                )
                remaining = deadline - time.perf_counter()
                if ready or remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken = {id(piece) for piece in batch}
            self._pending = [piece for piece in self._pending if id(piece) not in taken]
            return batch

    def _drop_cancelled(self) -> None:
        """Forgets pieces whose caller cancelled, or whose request already failed."""
        keep = []
        for piece in self._pending:
            request = piece.request
            if request.future.done():
                self._mark_settled(request)
            else:
                keep.append(piece)
        self._pending = keep

    def _mark_settled(self, request: _Request) -> bool:
        """Marks `request` settled; True the first time (so its gauge moves once)."""
        with self._book:
            if request.settled:
                return False
            request.settled = True
        self.model.stats.pending(-1)
        return True

    @staticmethod
    def _set_outcome(future: Future[Outputs], outcome: Outputs | BaseException) -> bool:
        """Sets the future's result or error; False when it was cancelled or set first.

        The one place futures are settled: a caller's cancel may land between any check
        and the call, and must not raise in (and so kill) the executor thread.
        """
        try:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        except InvalidStateError:
            return False
        return True

    def _gathered(self) -> tuple[list[_Piece], bool, bool]:
        """The oldest piece and those after it of its shape that fit in one batch.

        Returns:
            The batch; whether a piece of its shape had to be left out for lack of room;
            whether pieces of its shape are still waiting beyond it.
        """
        key = self._pending[0].shape_key
        batch: list[_Piece] = []
        size = 0
        for piece in self._pending:
            if piece.shape_key != key:
                continue
            if size + piece.size > self.max_batch_size:
                return batch, True, True
            batch.append(piece)
            size += piece.size
        return batch, False, False

    def _execute(self, batch: list[_Piece]) -> None:
        """Runs one batch and settles what it completes; any error fails this batch only."""
        started = time.perf_counter()
        try:
            names = list(batch[0].feed)
            if len(batch) == 1:
                feed = batch[0].feed
            else:
                feed = {name: np.concatenate([p.feed[name] for p in batch]) for name in names}
            ready = time.perf_counter()
            outputs = self.model.execute(feed)
            executed = time.perf_counter()
            rows = []
            offset = 0
            for piece in batch:
                rows.append({k: v[offset : offset + piece.size] for k, v in outputs.items()})
                offset += piece.size
            finished = time.perf_counter()
            complete = []
            with self._book:
                for piece, part in zip(batch, rows, strict=True):
                    request = piece.request
                    if request.settled:  # failed in another batch, or dropped after a cancel
                        continue
                    request.parts[piece.index] = part
                    request.queue += started - request.enqueued if piece.index == 0 else 0.0
                    request.compute_input += ready - started
                    request.compute_infer += executed - ready
                    request.compute_output += finished - executed
                    request.done_pieces += 1
                    if request.done_pieces == request.pieces:
                        request.settled = True
                        complete.append(request)
            if complete:  # all at once: a failure resolving one must not skip another's
                self.model.stats.pending(-len(complete))
            for request in complete:
                self._resolve(request)
        except Exception as exc:  # the execution's error belongs to its callers
            logger.warning("%s: a batch of %d failed: %s", self.model.name, len(batch), exc)
            self._fail(batch, exc)

    def _resolve(self, request: _Request) -> None:
        """Joins a complete request's parts into its result (settled by the caller)."""
        parts = [part for part in request.parts if part is not None]
        if len(parts) == 1:
            outputs = {k: v.copy() for k, v in parts[0].items()}
        else:
            outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not self._set_outcome(request.future, outputs):  # cancelled meanwhile
            return
        self.model.stats.request_succeeded(
            RequestTimes(
                queue=request.queue,
                compute_input=request.compute_input,
                compute_infer=request.compute_infer,
                compute_output=request.compute_output,
                total=time.perf_counter() - request.enqueued,
            )
        )

    def _fail(self, pieces: list[_Piece], exc: BaseException) -> None:
        """Fails the requests of `pieces` not settled yet: those still waiting for their
        pieces, and any this batch completed but an error kept from its result."""
        for request in {id(p.request): p.request for p in pieces}.values():
            self._mark_settled(request)
            if self._set_outcome(request.future, exc):
                self.model.stats.request_failed()
