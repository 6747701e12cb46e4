"""A loaded model version: its config, card and backend, and batch-splitting inference."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from engines.backends.base import Backend
from engines.config import ModelConfig, TensorSpec
from engines.errors import ModelInputError

logger = logging.getLogger(__name__)


class Model:
    """One version of one model, loaded on a backend and warmed up.

    `infer` takes any batch size: it checks the inputs against the config, splits them into
    chunks of at most `max_batch_size` along axis 0, runs the chunks one after the other
    and concatenates each output along axis 0. A batch of 0 returns empty outputs (dynamic
    dims as 0) without running the backend. The only conversion it makes is float64 to
    float32 for a TYPE_FP32 input; any other dtype mismatch is an error.

    Attributes:
        config: The model's config.
        version: The version number (the version folder's name).
        version_dir: The version folder.
        card: The version's `card.json` (training data, metrics, hashes), or {} if absent.
        backend_name: The backend running it (a key of `engines.backends.BACKENDS`).
        backend: The loaded backend.
        selection: Why this backend was chosen: the backends skipped before it, with reasons.
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
    ) -> None:
        self.config = config
        self.version = version
        self.version_dir = version_dir
        self.card = card
        self.backend_name = backend_name
        self.backend = backend
        self.selection = selection
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

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model on named arrays of any batch size.

        Args:
            inputs: One array per config input, each shaped ``(N, *dims)`` for a batched
                model (the same N for all) or ``dims`` for an unbatched one.

        Returns:
            One array per config output, ``(N, *dims)`` for a batched model.

        Raises:
            ModelInputError: A name, dtype, rank, fixed dim or batch size disagrees.
        """
        feed = self._checked(inputs)
        if not self.config.is_batched:
            return self.backend.infer(feed)
        batch_size = next(iter(feed.values())).shape[0]
        if batch_size == 0:
            return {
                spec.name: np.zeros((0, *(max(d, 0) for d in spec.dims)), dtype=spec.dtype)
                for spec in self.config.outputs
            }
        step = self.config.max_batch_size
        if batch_size <= step:
            return self.backend.infer(feed)
        chunks = [
            self.backend.infer({name: array[start : start + step] for name, array in feed.items()})
            for start in range(0, batch_size, step)
        ]
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

    def _checked(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Returns C-contiguous inputs of the config's dtypes, or raises ModelInputError."""
        who = f"{self.name}@{self.version}"
        expected = list(self._input_specs)
        if not isinstance(inputs, Mapping) or set(inputs) != set(expected):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ModelInputError(f"{who} takes inputs {expected}, got {got}")
        feed: dict[str, np.ndarray] = {}
        for name, spec in self._input_specs.items():
            array = inputs[name]
            if not isinstance(array, np.ndarray):
                raise ModelInputError(
                    f"{who}: input '{name}' must be a numpy array, got {type(array).__name__}"
                )
            if array.dtype != spec.dtype:
                if array.dtype == np.float64 and spec.data_type == "TYPE_FP32":
                    array = array.astype(np.float32)
                else:
                    raise ModelInputError(
                        f"{who}: input '{name}' must be {spec.dtype} ({spec.data_type}), "
                        f"got {array.dtype}"
                    )
            shape = self.config.full_shape(spec)
            fixed_ok = all(
                want in (-1, have) for want, have in zip(shape, array.shape, strict=False)
            )
            if array.ndim != len(shape) or not fixed_ok:
                raise ModelInputError(
                    f"{who}: input '{name}' must have shape {list(shape)} (-1 = any), "
                    f"got {list(array.shape)}"
                )
            feed[name] = np.ascontiguousarray(array)
        if self.config.is_batched:
            batch_sizes = {name: array.shape[0] for name, array in feed.items()}
            if len(set(batch_sizes.values())) > 1:
                raise ModelInputError(
                    f"{who}: inputs must share one batch size (axis 0), got {batch_sizes}"
                )
        return feed
