"""Backends that run a model version, found by name (the `backend` list of `config.yaml`).

Each backend is one module implementing `engines.backends.base.Backend`; add one by
adding it to `BACKENDS`. Importing this package imports no runtime: each backend imports
its runtime on first use.
"""

from __future__ import annotations

from engines.backends.base import Backend, Device
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.backends.pytorch import PyTorchBackend
from engines.backends.tensorrt import TensorRTBackend

#: Backend name (as written in `config.yaml`) -> backend class.
BACKENDS: dict[str, type[Backend]] = {
    TensorRTBackend.name: TensorRTBackend,
    OnnxRuntimeBackend.name: OnnxRuntimeBackend,
    PyTorchBackend.name: PyTorchBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "Device",
    "OnnxRuntimeBackend",
    "PyTorchBackend",
    "TensorRTBackend",
]
