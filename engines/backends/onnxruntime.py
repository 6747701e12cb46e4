"""ONNX Runtime backend: runs `model.onnx` with the CUDA provider where it exists, else CPU.

A config of precision FP16 whose version folder also holds `model.fp16.onnx` (FP16
weights and arithmetic, FP32 inputs and outputs, written by `train`'s export) runs that
file on the CUDA provider; on the CPU provider it keeps `model.onnx`, since ONNX Runtime's
CPU kernels are FP32 and an FP16 graph there only adds casts. `describe()` says which file
runs and why.

The session is tuned for throughput of large batches rather than latency of one, from
settings read once per load:

- `PAPSCAN_INTRA_OP_THREADS` (or the `intra_op_num_threads` argument): threads inside
  one operator; 0 lets ONNX Runtime use one per core.
- `PAPSCAN_INTER_OP_THREADS`: default 1, sequential execution (the graphs are chains, so
  running independent nodes in parallel only adds scheduling); above 1, parallel
  execution with that many threads.
- `PAPSCAN_ORT_GRAPH_OPTIMIZATION`: ``all`` (default), ``extended``, ``basic`` or
  ``disable``.

On the CUDA provider, inference goes through I/O binding: inputs already on the GPU
(`engines.tensors`, e.g. a DALI batch) are bound where they lie, host inputs are copied
once, and outputs come back to the host. On the CPU a plain `run` is as fast. The Azure
provider that some wheels register is never used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.backends.base import Device, check_names, check_tensor, first_line, run_warmup
from engines.errors import BackendUnavailableError, ModelInputError, ModelLoadError
from engines.tensors import cuda_view, is_device_array

if TYPE_CHECKING:
    from engines.config import ModelConfig

logger = logging.getLogger(__name__)

THREADS_ENV = "PAPSCAN_INTRA_OP_THREADS"
INTER_OP_ENV = "PAPSCAN_INTER_OP_THREADS"
GRAPH_OPTIMIZATION_ENV = "PAPSCAN_ORT_GRAPH_OPTIMIZATION"
_GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_WHERE = "the ONNX model"
CUDA_PROVIDER = "CUDAExecutionProvider"
#: The FP16 twin of `model.onnx`, run on the CUDA provider when the config's precision is FP16.
FP16_ARTIFACT_NAME = "model.fp16.onnx"
CPU_PROVIDER = "CPUExecutionProvider"

# ONNX Runtime's names for the element types of the config's data types.
_ORT_TYPES = {
    "TYPE_FP32": "tensor(float)",
    "TYPE_FP16": "tensor(float16)",
    "TYPE_INT64": "tensor(int64)",
    "TYPE_INT32": "tensor(int32)",
    "TYPE_UINT8": "tensor(uint8)",
    "TYPE_BOOL": "tensor(bool)",
}


def _import_ort() -> Any:
    """Imports onnxruntime on first use, so importing papscan starts no runtime."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the onnxruntime backend needs the onnxruntime package, "
            f"which cannot be imported ({exc})"
        ) from exc
    return onnxruntime


class OnnxRuntimeBackend:
    """Runs one model version's `model.onnx` in an ONNX Runtime `InferenceSession`.

    `load` checks the ONNX graph against the config: the same input names, every
    configured output present, the same element types and ranks, agreeing fixed dims, and a
    dynamic batch dimension wherever `max_batch_size > 1`. On ``device=auto`` a CUDA
    provider that fails to start (missing CUDA libraries) leaves the session on the CPU,
    logged and visible in `describe()`; on ``device=cuda`` that is an error.

    Args:
        config: The model's config.
        intra_op_num_threads: Threads inside one operator; None reads
            `PAPSCAN_INTRA_OP_THREADS` (default 0: ONNX Runtime's choice, one per core).
    """

    name: ClassVar[str] = "onnxruntime"
    artifact_name: ClassVar[str] = "model.onnx"

    def __init__(self, config: ModelConfig, intra_op_num_threads: int | None = None) -> None:
        self.config = config
        self._intra_op_num_threads = intra_op_num_threads
        self._session: Any = None
        self._artifact: Path | None = None
        self._artifact_reason: str | None = None
        self._output_names = [spec.name for spec in config.outputs]
        self._threads_used: int | None = None
        self._inter_op_used: int | None = None
        self._graph_level: str | None = None
        self._device_id = 0
        self._bind_io = False

    @classmethod
    def unavailable_reason(cls, device: Device) -> str | None:
        try:
            ort = _import_ort()
        except BackendUnavailableError:
            return "the onnxruntime package cannot be imported"
        if device.kind == "cuda" and CUDA_PROVIDER not in ort.get_available_providers():
            return f"this onnxruntime build has no {CUDA_PROVIDER}"
        return None

    def load(self, version_dir: Path, device: Device) -> None:
        ort = _import_ort()
        artifact = Path(version_dir) / self.artifact_name
        if not artifact.is_file():
            raise ModelLoadError(f"{artifact}: the ONNX model file does not exist")
        providers = self._providers(ort, device)
        options = self._session_options(ort)
        artifact, reason = self._choose_artifact(Path(version_dir), providers[0])
        session = self._open_session(ort, artifact, options, providers)
        used = session.get_providers()
        if artifact.name == FP16_ARTIFACT_NAME and CUDA_PROVIDER not in used:
            artifact = Path(version_dir) / self.artifact_name
            reason = f"{CUDA_PROVIDER} did not start, and FP16 runs only there"
            session = self._open_session(ort, artifact, options, [CPU_PROVIDER])
            used = session.get_providers()
        logger.info("%s: ONNX Runtime runs %s (%s)", self.config.name, artifact.name, reason)
        if device.kind == "cuda" and CUDA_PROVIDER not in used:
            raise BackendUnavailableError(
                f"{artifact}: ONNX Runtime could not start {CUDA_PROVIDER} on {device} "
                "(are the CUDA and cuDNN libraries installed?)"
            )
        if providers[0] != CPU_PROVIDER and CUDA_PROVIDER not in used:
            logger.warning(
                "%s: %s did not start, running on the CPU", self.config.name, CUDA_PROVIDER
            )
        self._check_graph(session, artifact)
        self._session = session
        self._artifact = artifact
        self._artifact_reason = reason
        self._device_id = device.index
        self._bind_io = CUDA_PROVIDER in used

    @classmethod
    def find_artifact(cls, version_dir: Path) -> Path | None:
        path = Path(version_dir) / cls.artifact_name
        return path if path.is_file() else None

    def _choose_artifact(self, version_dir: Path, provider: Any) -> tuple[Path, str]:
        """(the ONNX file to run, why) for the first provider asked for."""
        precision = self.config.precision
        fp16 = version_dir / FP16_ARTIFACT_NAME
        on_cuda = provider != CPU_PROVIDER
        if precision != "FP16":
            return version_dir / self.artifact_name, f"precision {precision}"
        if not on_cuda:
            return version_dir / self.artifact_name, "precision FP16, but FP16 runs only on CUDA"
        if not fp16.is_file():
            return version_dir / self.artifact_name, f"precision FP16, but no {fp16.name}"
        return fp16, f"precision FP16 on {CUDA_PROVIDER}"

    @staticmethod
    def _open_session(ort: Any, artifact: Path, options: Any, providers: list[Any]) -> Any:
        try:
            return ort.InferenceSession(str(artifact), sess_options=options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own Exception subclasses
            raise ModelLoadError(
                f"{artifact}: ONNX Runtime cannot load the model ({first_line(exc)})"
            ) from exc

    def warmup(self) -> None:
        run_warmup(self, self._artifact)

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise ModelLoadError(f"{self.config.name}: the onnxruntime backend is not loaded")
        on_device = [n for n, a in inputs.items() if is_device_array(a) and not _is_host(a)]
        if self._bind_io:
            return self._run_bound(inputs, "cuda")
        if on_device:
            raise ModelInputError(
                f"{self.config.name}: input(s) {on_device} are in GPU memory but this "
                "ONNX Runtime session runs on the CPU; pass host arrays"
            )
        outputs = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, outputs, strict=True))

    def _run_bound(self, inputs: Mapping[str, Any], device_type: str) -> dict[str, np.ndarray]:
        """One run through I/O binding: device arrays bound in place, outputs to the host.

        Args:
            inputs: Host arrays, or arrays exposing `__cuda_array_interface__` whose memory
                is on `device_type` (the CUDA provider's GPU).
            device_type: ONNX Runtime's name of the device the arrays' pointers are on.
        """
        binding = self._session.io_binding()
        for name, array in inputs.items():
            if is_device_array(array) and not _is_host(array):
                view = cuda_view(array)
                if not view.contiguous:
                    raise ModelInputError(
                        f"{self.config.name}: GPU input '{name}' must be C-contiguous"
                    )
                binding.bind_input(
                    name, device_type, self._device_id, view.dtype, list(view.shape), view.pointer
                )
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        ort = _import_ort()
        return {
            "backend": self.name,
            "runtime_version": ort.__version__,
            "providers": list(self._session.get_providers()) if self._session else [],
            "intra_op_num_threads": self._threads_used,
            "inter_op_num_threads": self._inter_op_used,
            "graph_optimization": self._graph_level,
            "io_binding": self._bind_io,
            "artifact": str(self._artifact) if self._artifact else None,
            "artifact_reason": self._artifact_reason,
        }

    def _threads(self) -> int:
        if self._intra_op_num_threads is not None:
            return _count_setting(self._intra_op_num_threads, "intra_op_num_threads", 0)
        return _count_setting(os.environ.get(THREADS_ENV, "0"), THREADS_ENV, 0)

    def _session_options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        level = os.environ.get(GRAPH_OPTIMIZATION_ENV, "all").strip().lower()
        if level not in _GRAPH_LEVELS:
            raise BackendUnavailableError(
                f"{GRAPH_OPTIMIZATION_ENV} must be one of {', '.join(_GRAPH_LEVELS)}, got {level!r}"
            )
        self._graph_level = level
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_LEVELS[level])
        self._threads_used = self._threads()
        options.intra_op_num_threads = self._threads_used
        self._inter_op_used = _count_setting(os.environ.get(INTER_OP_ENV, "1"), INTER_OP_ENV, 1)
        options.inter_op_num_threads = self._inter_op_used
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self._inter_op_used > 1
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.log_severity_level = 3  # errors only: its warnings go to stderr, not logging
        return options

    @staticmethod
    def _providers(ort: Any, device: Device) -> list[Any]:
        available = ort.get_available_providers()
        if device.kind != "cpu" and CUDA_PROVIDER in available:
            return [(CUDA_PROVIDER, {"device_id": device.index}), CPU_PROVIDER]
        if device.kind == "cuda":
            raise BackendUnavailableError(f"this onnxruntime build has no {CUDA_PROVIDER}")
        return [CPU_PROVIDER]

    def _check_graph(self, session: Any, artifact: Path) -> None:
        """Raises ModelLoadError where the ONNX graph disagrees with the config."""
        graph_inputs = {node.name: node for node in session.get_inputs()}
        graph_outputs = {node.name: node for node in session.get_outputs()}
        check_names(self.config, list(graph_inputs), list(graph_outputs), artifact, _WHERE)
        for kind, specs, nodes in (
            ("input", self.config.inputs, graph_inputs),
            ("output", self.config.outputs, graph_outputs),
        ):
            for spec in specs:
                node = nodes[spec.name]
                check_tensor(
                    self.config,
                    spec,
                    kind=kind,
                    dtype=node.type,
                    expected_dtype=_ORT_TYPES[spec.data_type],
                    shape=list(node.shape),
                    artifact=artifact,
                    where=_WHERE,
                )


def _count_setting(value: Any, source: str, minimum: int) -> int:
    """A thread count from a setting, or BackendUnavailableError naming the setting."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < minimum or isinstance(value, bool):
        meaning = "0 = one per core" if minimum == 0 else "1 = sequential"
        raise BackendUnavailableError(
            f"{source} must be an integer >= {minimum} ({meaning}), got {value!r}"
        )
    return count


def _is_host(array: Any) -> bool:
    return isinstance(array, np.ndarray)
