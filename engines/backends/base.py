"""The interface every backend implements (Triton's lifecycle, with types), and `Device`.

A backend class is constructed with a `ModelConfig`, then `load`-ed from one version
folder, `warmup`-ed (it is not ready until that returns), asked to `infer` any number of
times, and `close`-d. The repository picks the first backend of the config's preference
list that finds its artifact in the version folder and can run on the device
(`find_artifact`, `unavailable_reason`); `engines.model.Model` validates inputs and splits
batches, so `infer` only ever sees batches of at most `max_batch_size`.

`infer` may be called from `config.instance_count` threads at once (the dynamic batcher's
executors): a backend is either thread-safe or keeps per-thread state (a TensorRT
execution context and stream per thread).

Inputs are host numpy arrays, or, on a GPU backend, arrays already in device memory that
expose `__cuda_array_interface__` (DALI and PyTorch CUDA tensors do); see
`engines.tensors`. Outputs are always host numpy arrays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from engines.errors import BackendUnavailableError, ModelLoadError

if TYPE_CHECKING:
    from engines.config import ModelConfig, TensorSpec


@dataclass(frozen=True)
class Device:
    """Where a model runs.

    Attributes:
        kind: ``auto`` (a GPU where the backend can use one, else the CPU), ``cpu``, or
            ``cuda`` (a GPU is required).
        index: The CUDA device index, for ``cuda`` (and ``auto`` when it picks a GPU).
    """

    kind: Literal["auto", "cpu", "cuda"] = "auto"
    index: int = 0

    @classmethod
    def parse(cls, value: str | Device) -> Device:
        """Parses ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

        Raises:
            BackendUnavailableError: `value` names no device papscan knows.
        """
        if isinstance(value, Device):
            return value
        match = re.fullmatch(r"(auto|cpu|cuda)(?::([0-9]+))?", str(value).strip().lower())
        if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
            raise BackendUnavailableError(
                f"device {value!r} is not one of auto, cpu, cuda or cuda:N"
            )
        return cls(kind=match.group(1), index=int(match.group(2) or 0))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind


class Backend(Protocol):
    """One runtime for one model version.

    Attributes:
        name: Key of the backend in `engines.backends.BACKENDS` and in `config.yaml`.
        artifact_name: The file this backend loads from a version folder, as a user
            would look for it (``model.onnx``, ``model.pt2``, ``model.<gpu>.<trt>.plan``).
        config: The model's config, frozen, parsed once from `config.yaml`.
    """

    name: ClassVar[str]
    artifact_name: ClassVar[str]
    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None: ...

    @classmethod
    def find_artifact(cls, version_dir: Path) -> Path | None:
        """The file in `version_dir` this backend would load (or build from), or None.

        Must be cheap and must not import the runtime.
        """
        ...

    @classmethod
    def unavailable_reason(cls, device: Device) -> str | None:
        """Why this backend cannot run on `device` here (a short phrase), or None if it can.

        Must not start a device or load a model: it is asked of every backend in the
        preference list.
        """
        ...

    def load(self, version_dir: Path, device: Device) -> None:
        """Loads the version's artifact (see `find_artifact`) onto `device`.

        Raises:
            ModelLoadError: The artifact is corrupt or does not match the config.
            BackendUnavailableError: The runtime or the device is missing.
        """
        ...

    def warmup(self) -> None:
        """Runs `warmup_feeds(config)` through `infer`; the backend is ready after.

        Raises:
            ModelLoadError: A warm-up inference failed (the sentence names the batch size).
        """
        ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch of validated inputs; returns every output of the config by name."""
        ...

    def close(self) -> None:
        """Frees the runtime's memory; the backend cannot infer afterwards."""
        ...

    def describe(self) -> dict[str, Any]:
        """What runs the model: backend, device/providers, runtime version, artifact."""
        ...


def warmup_batch_sizes(config: ModelConfig) -> list[int | None]:
    """Batch sizes a warm-up runs: the config's `warmup.batch_sizes`, else 1 and
    `max_batch_size`; None for an unbatched model."""
    if not config.is_batched:
        return [None]
    return list(config.warmup.batch_sizes) or sorted({1, config.max_batch_size})


def example_shape(config: ModelConfig, spec: TensorSpec, batch_size: int | None) -> list[int]:
    """A concrete shape for `spec`: dynamic dims become 1, or the image size for input[0].

    Args:
        config: The model's config (its `preprocessing` sizes the image input).
        spec: One of `config.inputs`.
        batch_size: The batch dimension, or None for an unbatched model.
    """
    shape = list(config.full_shape(spec, batch_size))
    pre = config.preprocessing
    if pre is not None and spec is config.inputs[0]:
        width, height = pre.input_size
        # The config check guarantees the last three dims agree with these (or are -1).
        shape[-3:] = [3, height, width] if pre.layout == "NCHW" else [height, width, 3]
    return [1 if d == -1 else d for d in shape]


def zeros_like_spec(config: ModelConfig, spec: TensorSpec, batch_size: int | None) -> np.ndarray:
    """An all-zero input for `spec` of `example_shape`."""
    return np.zeros(example_shape(config, spec, batch_size), dtype=spec.dtype)


def example_feed(
    config: ModelConfig, batch_size: int | None, data: str = "zero", seed: int = 0
) -> dict[str, np.ndarray]:
    """One input per config input at `batch_size`: zeros, or seeded uniform [0, 1) values.

    The same `seed` gives the same arrays on every machine, so backends can be compared on
    them (`papscan models verify`).
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in config.inputs:
        shape = example_shape(config, spec, batch_size)
        if data == "random":
            feed[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def warmup_feeds(config: ModelConfig) -> list[tuple[int | None, dict[str, np.ndarray]]]:
    """(batch size, inputs) pairs a backend's `warmup` runs, from the config's `warmup`."""
    return [
        (batch_size, example_feed(config, batch_size, config.warmup.data))
        for batch_size in warmup_batch_sizes(config)
    ]


def first_line(exc: BaseException) -> str:
    """The first line of a runtime's error message, or its type where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_warmup(backend: Backend, artifact: Path | None) -> None:
    """Runs `warmup_feeds` through `backend.infer`, turning a failure into ModelLoadError."""
    for batch_size, feed in warmup_feeds(backend.config):
        try:
            backend.infer(feed)
        except Exception as exc:  # runtimes raise their own Exception subclasses
            raise ModelLoadError(
                f"{artifact}: the warm-up inference at batch {batch_size} failed "
                f"({first_line(exc)})"
            ) from exc


def check_names(
    config: ModelConfig,
    inputs: list[str],
    outputs: list[str],
    artifact: Path,
    where: str,
) -> None:
    """Raises ModelLoadError unless an artifact has exactly the config's inputs and every
    one of its outputs.

    Args:
        config: The model's config.
        inputs: The artifact's input names.
        outputs: The artifact's output names (it may have more than the config uses).
        artifact: The file named in the error.
        where: What holds the tensors, for the error (``the ONNX model``, …).
    """
    config_inputs = [spec.name for spec in config.inputs]
    if sorted(inputs) != sorted(config_inputs):
        raise ModelLoadError(
            f"{artifact}: the inputs {sorted(inputs)} of {where} do not match "
            f"the config's inputs {sorted(config_inputs)}"
        )
    missing = [spec.name for spec in config.outputs if spec.name not in outputs]
    if missing:
        raise ModelLoadError(
            f"{artifact}: the outputs {sorted(outputs)} of {where} lack "
            f"the config's output(s) {missing}"
        )


def check_tensor(
    config: ModelConfig,
    spec: TensorSpec,
    *,
    kind: str,
    dtype: str,
    expected_dtype: str,
    shape: list[Any],
    artifact: Path,
    where: str,
) -> None:
    """Raises ModelLoadError where one tensor of an artifact disagrees with the config.

    Checks the element type, the rank, that the batch dimension is dynamic wherever
    `max_batch_size > 1`, and that every fixed dimension agrees. A dimension is fixed in
    the artifact when it is a non-negative int; symbols, None and -1 are dynamic.

    Args:
        config: The model's config.
        spec: The config's tensor.
        kind: ``input`` or ``output``.
        dtype: The artifact's element type, in the runtime's words.
        expected_dtype: The runtime's words for `spec.data_type`.
        shape: The artifact's shape.
        artifact: The file named in the error.
        where: What holds the tensor, for the error (``the ONNX model``, …).
    """
    who = f"{artifact}: {kind} '{spec.name}'"
    if dtype != expected_dtype:
        raise ModelLoadError(
            f"{who} is {dtype} in {where} but {spec.data_type} ({expected_dtype}) in the config"
        )
    want = list(config.full_shape(spec))
    text = "[" + ", ".join(str(d) for d in shape) + "]"
    if len(shape) != len(want):
        raise ModelLoadError(
            f"{who} has shape {text} in {where}, not of rank {len(want)} as the config's {want}"
        )
    if config.is_batched and _fixed(shape[0]) and not (shape[0] == 1 == config.max_batch_size):
        raise ModelLoadError(
            f"{who} has a fixed batch dimension {shape[0]} but max_batch_size is "
            f"{config.max_batch_size}; export it with a dynamic batch"
        )
    start = 1 if config.is_batched else 0
    for axis in range(start, len(want)):
        if want[axis] != -1 and _fixed(shape[axis]) and shape[axis] != want[axis]:
            raise ModelLoadError(
                f"{who} has shape {text} in {where}, which disagrees with the config's {want}"
            )


def _fixed(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
