"""A loaded model version: its config, card and backend, and batch-splitting inference."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from engines.backends.base import Backend
from engines.config import ModelConfig, TensorSpec
from engines.errors import ModelInputError
from engines.metrics import METRICS, InferenceMetrics, RequestTimes
from engines.tensors import is_device_array, shape_and_dtype

logger = logging.getLogger(__name__)


class Model:
    """One version of one model, loaded on a backend and warmed up.

    `infer` takes any batch size: it checks the inputs against the config, splits them into
    chunks of at most `max_batch_size` along axis 0, runs the chunks one after the other
    and concatenates each output along axis 0. A batch of 0 returns empty outputs (dynamic
    dims as 0) without running the backend. The only conversion it makes is float64 to
    float32 for a TYPE_FP32 input; any other dtype mismatch is an error.

    Each `infer` call counts as one request in `stats` (Triton's metrics, see
    `engines.metrics`); each backend run as one execution. Many threads may call `infer`
    at once when the backend allows it; `engines.batcher.DynamicBatcher` gathers small
    requests from many threads into full batches.

    Attributes:
        config: The model's config.
        version: The version number (the version folder's name).
        version_dir: The version folder.
        card: The version's `card.json` (training data, metrics, hashes), or {} if absent.
        backend_name: The backend running it (a key of `engines.backends.BACKENDS`).
        backend: The loaded backend.
        selection: Why this backend was chosen: the backends skipped before it, with reasons.
        stats: This version's counters in the process's `InferenceMetrics`.
    """

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        version_dir: Path,
        card: dict[str, Any],
        backend_name: str,
        backend: Backend,
        selection: str = "",
        metrics: InferenceMetrics = METRICS,
    ) -> None:
        self.config = config
        self.version = version
        self.version_dir = version_dir
        self.card = card
        self.backend_name = backend_name
        self.backend = backend
        self.selection = selection
        self.stats = metrics.for_model(config.name, version)
        self._input_specs = {spec.name: spec for spec in config.inputs}

    @property
    def name(self) -> str:
        """The model's name."""
        return self.config.name

    def __repr__(self) -> str:
        return f"Model({self.name}@{self.version}, backend={self.backend_name})"

    def input_spec(self, name: str) -> TensorSpec:
        """The config's spec of input `name`.

        Raises:
            ModelInputError: The model has no such input.
        """
        return self.config.input(name)

    def describe(self) -> dict[str, Any]:
        """The model, version, chosen backend with the reason, and the backend's own details."""
        return {
            "model": self.name,
            "version": self.version,
            "version_dir": str(self.version_dir),
            "selection": self.selection,
            **self.backend.describe(),
        }

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs the model on named arrays of any batch size: one request.

        Args:
            inputs: One array per config input, each shaped ``(N, *dims)`` for a batched
                model (the same N for all) or ``dims`` for an unbatched one; host numpy
                arrays, or device arrays a GPU backend uses in place (`engines.tensors`).

        Returns:
            One array per config output, ``(N, *dims)`` for a batched model.

        Raises:
            ModelInputError: A name, dtype, rank, fixed dim or batch size disagrees.
        """
        start = time.perf_counter()
        try:
            feed = self.checked_inputs(inputs)
            ready = time.perf_counter()
            chunks = [self.execute(chunk) for chunk in self._chunks(feed)]
            executed = time.perf_counter()
            outputs = self._joined(chunks, feed)
        except BaseException:
            self.stats.request_failed()
            raise
        end = time.perf_counter()
        self.stats.request_succeeded(
            RequestTimes(
                compute_input=ready - start,
                compute_infer=executed - ready,
                compute_output=end - executed,
                total=end - start,
            )
        )
        return outputs

    def execute(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs one execution on checked inputs of at most `max_batch_size`; counts it.

        The dynamic batcher calls this with the batches it assembles; `infer` calls it
        once per chunk. It does not count a request (its caller does).
        """
        outputs = self.backend.infer(feed)
        self.stats.executed(self.batch_size_of(feed))
        return outputs

    def batch_size_of(self, feed: Mapping[str, Any]) -> int:
        """The items in checked inputs: axis 0 of a batched model, else 1."""
        if not self.config.is_batched:
            return 1
        return shape_and_dtype(next(iter(feed.values())))[0][0]

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """The outputs of a batch of 0 (dynamic dims as 0), without running the backend."""
        return {
            spec.name: np.zeros((0, *(max(d, 0) for d in spec.dims)), dtype=spec.dtype)
            for spec in self.config.outputs
        }

    def _chunks(self, feed: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.config.is_batched:
            return [feed]
        batch_size = self.batch_size_of(feed)
        step = self.config.max_batch_size
        if batch_size <= step:
            return [feed] if batch_size else []
        return [
            {name: array[start : start + step] for name, array in feed.items()}
            for start in range(0, batch_size, step)
        ]

    def _joined(
        self, chunks: list[dict[str, np.ndarray]], feed: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        if not chunks:
            return self.empty_outputs()
        if len(chunks) == 1:
            return chunks[0]
        return {
            spec.name: np.concatenate([chunk[spec.name] for chunk in chunks], axis=0)
            for spec in self.config.outputs
        }

    def close(self) -> None:
        """Frees the backend; the model cannot infer afterwards."""
        self.backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def checked_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Returns the inputs with the config's dtypes, C-contiguous; or raises ModelInputError.

        Host arrays are converted from float64 for a TYPE_FP32 input and made contiguous;
        device arrays (`engines.tensors.is_device_array`) are checked and passed through as
        they are, for a GPU backend to use in place.
        """
        who = f"{self.name}@{self.version}"
        expected = list(self._input_specs)
        if not isinstance(inputs, Mapping) or set(inputs) != set(expected):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ModelInputError(f"{who} takes inputs {expected}, got {got}")
        feed: dict[str, Any] = {}
        for name, spec in self._input_specs.items():
            array = inputs[name]
            on_device = is_device_array(array) and not isinstance(array, np.ndarray)
            if not on_device and not isinstance(array, np.ndarray):
                raise ModelInputError(
                    f"{who}: input '{name}' must be a numpy or CUDA array, "
                    f"got {type(array).__name__}"
                )
            shape, dtype = shape_and_dtype(array)
            if dtype != spec.dtype:
                if not on_device and dtype == np.float64 and spec.data_type == "TYPE_FP32":
                    array = array.astype(np.float32)
                else:
                    raise ModelInputError(
                        f"{who}: input '{name}' must be {spec.dtype} ({spec.data_type}), "
                        f"got {dtype}"
                    )
            want_shape = self.config.full_shape(spec)
            fixed_ok = all(
                want in (-1, have) for want, have in zip(want_shape, shape, strict=False)
            )
            if len(shape) != len(want_shape) or not fixed_ok:
                raise ModelInputError(
                    f"{who}: input '{name}' must have shape {list(want_shape)} (-1 = any), "
                    f"got {list(shape)}"
                )
            feed[name] = array if on_device else np.ascontiguousarray(array)
        if self.config.is_batched:
            batch_sizes = {name: shape_and_dtype(array)[0][0] for name, array in feed.items()}
            if len(set(batch_sizes.values())) > 1:
                raise ModelInputError(
                    f"{who}: inputs must share one batch size (axis 0), got {batch_sizes}"
                )
        return feed
