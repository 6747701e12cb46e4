"""A fake of the TensorRT 10 and cuda-python calls the tensorrt backend makes.

It lets the backend's control flow (plan caching, stale rebuilds, per-thread contexts,
buffer reuse, copies) run on a machine without a GPU. Device memory is a dict of
bytearrays; an "engine" runs the plan's ONNX model with ONNX Runtime on the CPU. It checks
what it can of the real API's contract (every I/O address set, shapes inside the
profile), but it is no substitute for the `gpu` tests.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
import sys
import threading
import types
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 2: "UINT8", 9: "BOOL"}
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


class DataType(enum.Enum):
    """TensorRT's DataType: members with a name and an itemsize."""

    FLOAT = (0, 4)
    HALF = (1, 2)
    INT32 = (3, 4)
    BOOL = (4, 1)
    UINT8 = (5, 1)
    INT64 = (8, 8)

    @property
    def itemsize(self) -> int:
        return self.value[1]


class FakeCudart:
    """cuda-python's runtime module: (error, value) tuples, memory in a dict."""

    class cudaMemcpyKind(enum.Enum):  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaDeviceAttr(enum.Enum):  # noqa: N801
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    cudaEventDisableTiming = 2

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.memory: dict[int, bytearray] = {}
        self.mallocs = 0
        self.streams: set[int] = set()
        self.waits: list[tuple[str, int]] = []
        self._ids = itertools.count(1 << 20, 1 << 20)
        self._lock = threading.Lock()

    def cudaGetDeviceCount(self) -> tuple[int, int]:  # noqa: N802
        return (0, self.devices) if self.devices else (100, 0)

    def cudaSetDevice(self, index: int) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaDeviceGetAttribute(self, attribute: Any, index: int) -> tuple[int, int]:  # noqa: N802
        return (0, 9 if attribute.name.endswith("Major") else 0)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:  # noqa: N802
        with self._lock:
            pointer = next(self._ids)
            self.memory[pointer] = bytearray(nbytes)
            self.mallocs += 1
        return (0, pointer)

    def cudaFree(self, pointer: int) -> tuple[int]:  # noqa: N802
        del self.memory[pointer]
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:  # noqa: N802
        stream = next(self._ids)
        self.streams.add(stream)
        return (0, stream)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:  # noqa: N802
        self.streams.remove(stream)
        return (0,)

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[int, int]:  # noqa: N802
        return (0, next(self._ids))

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaEventDestroy(self, event: int) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaEventRecord(self, event: int, stream: int) -> tuple[int]:  # noqa: N802
        self.waits.append(("record", stream))
        return (0,)

    def cudaStreamWaitEvent(self, stream: int, event: int, flags: int) -> tuple[int]:  # noqa: N802
        assert stream in self.streams
        self.waits.append(("wait", stream))
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: int) -> tuple[int]:  # noqa: N802
        if kind is self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.write(dst, ctypes.string_at(src, n))
        else:
            ctypes.memmove(dst, bytes(self.read(src, n)), n)
        return (0,)

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: Any) -> tuple[int]:  # noqa: N802
        return self.cudaMemcpyAsync(dst, src, n, kind, 0)

    def _block(self, pointer: int) -> tuple[bytearray, int]:
        for base, block in self.memory.items():
            if base <= pointer < base + max(len(block), 1):
                return block, pointer - base
        raise AssertionError(f"{pointer:#x} is not device memory")

    def read(self, pointer: int, n: int) -> bytearray:
        block, offset = self._block(pointer)
        assert offset + n <= len(block), "read past the end of a device buffer"
        return block[offset : offset + n]

    def write(self, pointer: int, data: bytes) -> None:
        block, offset = self._block(pointer)
        assert offset + len(data) <= len(block), "write past the end of a device buffer"
        block[offset : offset + len(data)] = data


class _Tensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


def _onnx_tensors(values: Any) -> list[_Tensor]:
    tensors = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        tensors.append(_Tensor(value.name, DataType[_ONNX_TYPES[tensor_type.elem_type]], dims))
    return tensors


def fake_tensorrt(cudart: FakeCudart, version: str = "10.3.0") -> types.ModuleType:
    """A `tensorrt` module whose engines run their ONNX model with ONNX Runtime."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.DataType = DataType  # type: ignore[attr-defined]
    trt.builds = []  # type: ignore[attr-defined]
    # Every INT8 calibration batch the builder took from a calibrator, {input: array}.
    trt.calibration_batches = []  # type: ignore[attr-defined]

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class Network:
        def __init__(self) -> None:
            self.inputs: list[_Tensor] = []
            self.outputs: list[_Tensor] = []
            self.onnx = ""

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i: int) -> _Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> _Tensor:
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            self.network.inputs = _onnx_tensors(model.graph.input)
            self.network.outputs = _onnx_tensors(model.graph.output)
            self.network.onnx = path
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, Any, Any]] = {}

        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            assert len(low) == len(opt) == len(high)
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[Profile] = []
            self.int8_calibrator: Any = None
            self.calibration_profile: Profile | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            assert pool == "WORKSPACE" and size > 0

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: Profile) -> None:
            assert profile in self.profiles
            self.calibration_profile = profile

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            assert flags == 0
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
            if "INT8" in config.flags:
                calibrator = config.int8_calibrator
                if not calibrator.read_calibration_cache():
                    calibrator.write_calibration_cache(_calibrate(network, config))
                assert calibrator.read_calibration_cache() or trt.calibration_batches
            profile = config.profiles[0].shapes if config.profiles else {}
            trt.builds.append(sorted(config.flags))  # type: ignore[attr-defined]
            plan = {"onnx": network.onnx, "profile": profile, "flags": sorted(config.flags)}
            return json.dumps(plan).encode()

    def _calibrate(network: Network, config: BuilderConfig) -> bytes:
        """TensorRT's calibration: batches at the calibration profile's opt shape, read
        from the device pointers `get_batch` returns, until it returns None or []."""
        calibrator = config.int8_calibrator
        assert config.calibration_profile is not None, "dynamic shapes need a calibration profile"
        shapes = {name: opt for name, (_, opt, _) in config.calibration_profile.shapes.items()}
        names = [t.name for t in network.inputs]
        batch_size = calibrator.get_batch_size()
        peaks: dict[str, float] = {}
        while pointers := calibrator.get_batch(names):
            assert len(pointers) == len(names)
            batch = {}
            for tensor, pointer in zip(network.inputs, pointers, strict=True):
                shape = shapes[tensor.name]
                assert shape[0] == batch_size, "a calibration batch is not get_batch_size() long"
                dtype = np.dtype(_NUMPY[tensor.dtype.name])
                data = cudart.read(int(pointer), int(np.prod(shape)) * dtype.itemsize)
                batch[tensor.name] = np.frombuffer(bytes(data), dtype).reshape(shape).copy()
                peak = float(np.abs(batch[tensor.name]).max())
                peaks[tensor.name] = max(peaks.get(tensor.name, 0.0), peak)
            trt.calibration_batches.append(batch)  # type: ignore[attr-defined]
        assert trt.calibration_batches, "INT8 calibration got no batch"  # type: ignore[attr-defined]
        return b"TRT-100-EntropyCalibration2\n" + json.dumps(peaks).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            low, _, high = self.engine.profile[name]
            inside = all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True))
            if inside:
                self.shapes[name] = tuple(shape)
            return inside

        def set_tensor_address(self, name: str, pointer: int) -> bool:
            self.addresses[name] = pointer
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._run(read=False)[name].shape

        def execute_async_v3(self, stream: int) -> bool:
            assert stream in cudart.streams
            assert set(self.addresses) == {t.name for t in self.engine.tensors}
            for name, array in self._run(read=True).items():
                cudart.write(self.addresses[name], array.tobytes())
            return True

        def _run(self, read: bool) -> dict[str, np.ndarray]:
            feed = {}
            for tensor in self.engine.inputs:
                shape, dtype = self.shapes[tensor.name], _NUMPY[tensor.dtype.name]
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                data = cudart.read(self.addresses[tensor.name], nbytes) if read else None
                feed[tensor.name] = (
                    np.frombuffer(data, dtype).reshape(shape) if read else np.zeros(shape, dtype)
                )
            names = [t.name for t in self.engine.outputs]
            return dict(zip(names, self.engine.session.run(names, feed), strict=True))

    class Engine:
        def __init__(self, plan: dict[str, Any]) -> None:
            model = onnx.load(plan["onnx"])
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.profile = {k: tuple(map(tuple, v)) for k, v in plan["profile"].items()}
            self.inputs = _onnx_tensors(model.graph.input)
            self.outputs = _onnx_tensors(model.graph.output)
            self.tensors = self.inputs + self.outputs
            self.contexts = 0

        num_io_tensors = property(lambda self: len(self.tensors))

        def get_tensor_name(self, i: int) -> str:
            return self.tensors[i].name

        def _tensor(self, name: str) -> _Tensor:
            return next(t for t in self.tensors if t.name == name)

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            is_input = self._tensor(name) in self.inputs
            return TensorIOMode.INPUT if is_input else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return self._tensor(name).dtype

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._tensor(name).shape

        def create_execution_context(self) -> Context:
            self.contexts += 1
            return Context(self)

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            pass

        def deserialize_cuda_engine(self, data: Any) -> Engine | None:
            try:
                return Engine(json.loads(bytes(data)))
            except (ValueError, KeyError):
                return None

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    for name, value in {
        "ILogger": ILogger,
        "TensorIOMode": TensorIOMode,
        "OnnxParser": OnnxParser,
        "Builder": Builder,
        "Runtime": Runtime,
        "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        "BuilderFlag": types.SimpleNamespace(FP16="FP16", INT8="INT8"),
    }.items():
        setattr(trt, name, value)
    return trt


def install(monkeypatch: Any, cudart: FakeCudart, version: str = "10.3.0") -> types.ModuleType:
    """Puts the fakes where the backend imports `tensorrt` and `cuda.bindings.runtime`."""
    import engines.backends.tensorrt as backend

    trt = fake_tensorrt(cudart, version)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setattr(backend, "_TRT_LOGGER", None)
    return trt
