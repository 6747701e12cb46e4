"""ONNX Runtime backend: runs `model.onnx` with the CUDA provider where it exists, else CPU.

The session is tuned for throughput of large batches rather than latency of one:
every graph optimisation, one inter-op thread with sequential execution (the graphs are
chains; parallel execution only adds scheduling), and `intra_op_num_threads` from the
argument or `PAPSCAN_INTRA_OP_THREADS` (0 lets ONNX Runtime use one thread per core).
The Azure provider that some wheels register is never used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.backends.base import Device, first_line, run_warmup
from engines.errors import BackendUnavailableError, ModelLoadError

if TYPE_CHECKING:
    from engines.config import ModelConfig, TensorSpec

logger = logging.getLogger(__name__)

THREADS_ENV = "PAPSCAN_INTRA_OP_THREADS"
CUDA_PROVIDER = "CUDAExecutionProvider"
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
        self._output_names = [spec.name for spec in config.outputs]
        self._threads_used: int | None = None

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
        try:
            session = ort.InferenceSession(str(artifact), sess_options=options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own Exception subclasses
            raise ModelLoadError(
                f"{artifact}: ONNX Runtime cannot load the model ({first_line(exc)})"
            ) from exc
        used = session.get_providers()
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

    @classmethod
    def find_artifact(cls, version_dir: Path) -> Path | None:
        path = Path(version_dir) / cls.artifact_name
        return path if path.is_file() else None

    def warmup(self) -> None:
        run_warmup(self, self._artifact)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise ModelLoadError(f"{self.config.name}: the onnxruntime backend is not loaded")
        outputs = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        ort = _import_ort()
        return {
            "backend": self.name,
            "runtime_version": ort.__version__,
            "providers": list(self._session.get_providers()) if self._session else [],
            "intra_op_num_threads": self._threads_used,
            "artifact": str(self._artifact) if self._artifact else None,
        }

    def _threads(self) -> int:
        if self._intra_op_num_threads is not None:
            threads: Any = self._intra_op_num_threads
            source = "intra_op_num_threads"
        else:
            threads = os.environ.get(THREADS_ENV, "0")
            source = THREADS_ENV
        try:
            value = int(threads)
        except (TypeError, ValueError):
            value = -1
        if value < 0 or isinstance(threads, bool):
            raise BackendUnavailableError(
                f"{source} must be a non-negative integer (0 = one per core), got {threads!r}"
            )
        return value

    def _session_options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._threads_used = self._threads()
        options.intra_op_num_threads = self._threads_used
        options.inter_op_num_threads = 1
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
        config_inputs = [spec.name for spec in self.config.inputs]
        if set(graph_inputs) != set(config_inputs):
            raise ModelLoadError(
                f"{artifact}: the ONNX inputs {sorted(graph_inputs)} do not match "
                f"the config's inputs {sorted(config_inputs)}"
            )
        missing = [spec.name for spec in self.config.outputs if spec.name not in graph_outputs]
        if missing:
            raise ModelLoadError(
                f"{artifact}: the ONNX outputs {sorted(graph_outputs)} lack "
                f"the config's output(s) {missing}"
            )
        for spec in self.config.inputs:
            self._check_tensor(spec, graph_inputs[spec.name], artifact, "input")
        for spec in self.config.outputs:
            self._check_tensor(spec, graph_outputs[spec.name], artifact, "output")

    def _check_tensor(self, spec: TensorSpec, node: Any, artifact: Path, kind: str) -> None:
        expected_type = _ORT_TYPES[spec.data_type]
        if node.type != expected_type:
            raise ModelLoadError(
                f"{artifact}: {kind} '{spec.name}' is {node.type} in the ONNX model "
                f"but {spec.data_type} ({expected_type}) in the config"
            )
        config_shape = self.config.full_shape(spec)
        graph_shape = list(node.shape)
        if len(graph_shape) != len(config_shape):
            raise ModelLoadError(
                f"{artifact}: {kind} '{spec.name}' has shape {graph_shape} in the ONNX model, "
                f"not of rank {len(config_shape)} as the config's {list(config_shape)}"
            )
        if self.config.is_batched:
            batch_dim = graph_shape[0]
            if isinstance(batch_dim, int) and not (batch_dim == 1 == self.config.max_batch_size):
                raise ModelLoadError(
                    f"{artifact}: {kind} '{spec.name}' has a fixed batch dimension {batch_dim} "
                    f"but max_batch_size is {self.config.max_batch_size}; export it with a "
                    "dynamic batch"
                )
        start = 1 if self.config.is_batched else 0
        for axis in range(start, len(config_shape)):
            want, have = config_shape[axis], graph_shape[axis]
            if want != -1 and isinstance(have, int) and have != want:
                raise ModelLoadError(
                    f"{artifact}: {kind} '{spec.name}' has shape {graph_shape} in the ONNX model, "
                    f"which disagrees with the config's {list(config_shape)}"
                )
