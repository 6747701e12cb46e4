"""TensorRT backend: runs a serialized TensorRT 10 engine (a plan), built from `model.onnx`.

Plans are named per GPU architecture and TensorRT version, with a build record beside
each (see `engines.backends.tensorrt_plan`). On `load` the plan for this GPU is used if
its record matches what the config and files ask for now; otherwise it is built from
`model.onnx` (seconds to minutes) and written atomically into the version folder, or,
where that is read-only, into ``<user cache dir>/tensorrt/`` (logged). A build holds a
file lock, so worker processes starting together build once.

Precision follows the config: FP16 (the default) lets TensorRT pick FP16 kernels, FP32
builds plain, INT8 needs a TensorRT calibration cache (`calibration.cache`) in the version
folder and falls back to FP16 where INT8 has no kernel. The engine has one optimisation
profile (`tensorrt_plan.optimization_profile`). `build_plan` builds and saves a plan
without loading it, optionally with a calibrator that feeds data and writes the cache
(`train.export.tensorrt_build` ships plans this way).

`infer` may run in `config.instance_count` threads at once: each thread gets its own
execution context, CUDA stream and device buffers, created on its first call and kept
until `close`. Host inputs are copied to the device; device arrays exposing
`__cuda_array_interface__` (DALI, PyTorch CUDA tensors) go to TensorRT in place. The
backend is written for TensorRT 10: TensorRT 11 removed the FP16/INT8 builder flags and
the calibrator it uses. Importing this module imports neither TensorRT nor CUDA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.backends.base import Device, run_warmup
from engines.backends.tensorrt_plan import (
    ONNX_NAME,
    Profile,
    TensorInfo,
    build_key,
    build_record_path,
    check_io,
    file_lock,
    gpu_arch,
    int8_calibration_cache,
    is_writable,
    optimization_profile,
    plan_cache_dir,
    plan_filename,
    read_build_record,
    stale_reason,
    tensorrt_version_problem,
    user_cache_root,
    write_atomically,
)
from engines.errors import BackendUnavailableError, ModelInputError, ModelLoadError
from engines.hashing import file_sha256
from engines.tensors import cuda_view, is_device_array

if TYPE_CHECKING:
    from engines.config import ModelConfig, TensorSpec

logger = logging.getLogger(__name__)

INSTALL_HINT = "install TensorRT 10 from NVIDIA, then pip install 'papscan[tensorrt]'"
CUDA_PYTHON_MISSING = "the cuda-python package is not installed (pip install 'papscan[tensorrt]')"
#: Scratch memory TensorRT may use while choosing kernels during a build.
WORKSPACE_BYTES = 4 << 30
_ALIGN_BYTES = 256  # cudaMalloc's alignment; buffers are rounded up to it


# --- runtimes, imported on first use ----------------------------------------------------------


def _import_trt() -> Any:
    """Imports tensorrt on first use, so importing papscan starts no runtime.

    Raises:
        BackendUnavailableError: It is missing, broken, or not TensorRT 10.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the tensorrt backend cannot run: {_trt_import_problem(exc)}"
        ) from exc
    problem = tensorrt_version_problem(str(getattr(tensorrt, "__version__", "unknown")))
    if problem is not None:
        raise BackendUnavailableError(f"the tensorrt backend cannot run: {problem}")
    return tensorrt


def _trt_import_problem(exc: ImportError) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "tensorrt":
        return f"the tensorrt package is not installed ({INSTALL_HINT})"
    return f"the tensorrt package cannot be imported ({exc})"


def _import_cudart() -> Any:
    """Imports cuda-python's runtime API (``cuda.bindings.runtime`` from 12.6, else
    ``cuda.cudart``).

    Raises:
        BackendUnavailableError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the tensorrt backend cannot run: {CUDA_PYTHON_MISSING}"
            ) from exc
    return cudart


def cuda_call(result: tuple[Any, ...], call: str, error: type[Exception] = RuntimeError) -> Any:
    """The value a cuda-python call returned after its error code, raising on an error."""
    code = result[0]
    if int(code) != 0:
        raise error(f"CUDA {call} failed ({_error_name(code)})")
    return result[1] if len(result) == 2 else result[1:]


def _error_name(code: Any) -> str:
    return str(getattr(code, "name", code))


def _device_problem(cudart: Any, index: int) -> str | None:
    """Why CUDA device `index` cannot be used (a phrase), or None. Starts no context."""
    code, count = cudart.cudaGetDeviceCount()
    if int(code) != 0:
        return f"no CUDA device is usable ({_error_name(code)})"
    if count == 0:
        return "no CUDA device is visible"
    if index >= count:
        return f"there is no CUDA device {index} ({count} visible)"
    return None


_TRT_LOGGER: Any = None
_TRT_LOGGER_LOCK = threading.Lock()


def _trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger, forwarding to `logging`; it remembers the last
    error, so failures can say why in one sentence."""
    global _TRT_LOGGER
    with _TRT_LOGGER_LOCK:
        if _TRT_LOGGER is None:
            _TRT_LOGGER = _make_trt_logger(trt)
        return _TRT_LOGGER


def _make_trt_logger(trt: Any) -> Any:
    levels = {
        trt.ILogger.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.ERROR: logging.ERROR,
        trt.ILogger.WARNING: logging.WARNING,
        trt.ILogger.INFO: logging.DEBUG,  # TensorRT's info is build chatter
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity)
            if level is None:  # VERBOSE
                return
            if level == logging.ERROR:
                self.last_error = msg.strip().splitlines()[0] if msg.strip() else msg
            logger.log(level, "TensorRT: %s", msg)

    return _Logger()


def _last_error(trt: Any) -> str:
    return _trt_logger(trt).last_error or "no error was logged"


def _forget_last_error(trt: Any) -> None:
    _trt_logger(trt).last_error = ""


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An entropy calibrator that only hands TensorRT an existing calibration cache."""

    class _CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # no data: every scale must come from the cache

        def read_calibration_cache(self) -> bytes:
            return self.cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return _CacheCalibrator()


def _tensor_infos(trt: Any, engine: Any) -> list[TensorInfo]:
    infos = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        infos.append(
            TensorInfo(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=engine.get_tensor_dtype(name).name,
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
            )
        )
    return infos


def _network_infos(network: Any) -> list[TensorInfo]:
    tensors = [(network.get_input(i), True) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i), False) for i in range(network.num_outputs)]
    return [
        TensorInfo(t.name, is_input, t.dtype.name, tuple(int(d) for d in t.shape))
        for t, is_input in tensors
    ]


# --- per-thread execution state ---------------------------------------------------------------


class _ThreadState:
    """One thread's execution context, CUDA stream, event, and device buffers by tensor."""

    def __init__(self, cudart: Any, engine: Any, device_index: int) -> None:
        cuda_call(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(
                "TensorRT could not create an execution context (out of GPU memory?)"
            )
        self.stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.event = cuda_call(
            cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreate"
        )
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def buffer(self, cudart: Any, name: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for tensor `name`, grown when too small."""
        pointer, capacity = self.buffers.get(name, (0, 0))
        if nbytes <= capacity:
            return pointer
        if pointer:
            cuda_call(cudart.cudaFree(pointer), "cudaFree")
        capacity = max(_ALIGN_BYTES, -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES)
        pointer = int(cuda_call(cudart.cudaMalloc(capacity), f"cudaMalloc({capacity})"))
        self.buffers[name] = (pointer, capacity)
        return pointer

    def free(self, cudart: Any) -> None:
        """Frees the buffers, event, stream and context; a failure is logged, not raised
        (`close` frees every thread's state and must reach the last)."""
        calls = [("cudaStreamSynchronize", self.stream)]
        calls += [("cudaFree", pointer) for pointer, _ in self.buffers.values()]
        calls += [("cudaEventDestroy", self.event), ("cudaStreamDestroy", self.stream)]
        for call, argument in calls:
            try:
                cuda_call(getattr(cudart, call)(argument), call)
            except RuntimeError as exc:
                logger.debug("freeing a TensorRT execution state: %s", exc)
        self.buffers = {}
        self.context = None


def _copy_host_to_device(cudart: Any, pointer: int, array: np.ndarray, stream: Any) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    cuda_call(
        cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream), "copy"
    )


def _copy_device_to_host(cudart: Any, array: np.ndarray, pointer: int, stream: Any) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    cuda_call(
        cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream), "copy"
    )


def _producer_stream(array: Any) -> int | None:
    """The stream `__cuda_array_interface__` (v3) says the array's producer wrote it on."""
    stream = array.__cuda_array_interface__.get("stream")
    return int(stream) if stream else None


# --- the backend --------------------------------------------------------------------------------


class TensorRTBackend:
    """Runs one model version as a TensorRT 10 engine on one GPU.

    `load` checks the engine against the config as the ONNX backend does (input names,
    every configured output, data types, ranks, fixed dims, a dynamic batch). An
    input shape outside the optimisation profile is a `ModelInputError`. `close` must
    not race `infer`.

    Args:
        config: The model's config.
        cache_root: Where plans of read-only version folders are cached; None means
            ``platformdirs.user_cache_dir("papscan")``.
    """

    name: ClassVar[str] = "tensorrt"
    artifact_name: ClassVar[str] = "model.<gpu>.<trt>.plan"

    def __init__(self, config: ModelConfig, cache_root: Path | None = None) -> None:
        self.config = config
        self._cache_root = cache_root
        self._trt: Any = None
        self._cudart: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._plan: Path | None = None
        self._built_now = False
        self._device_index = 0
        self._gpu_arch: str | None = None
        self._profile: Profile = {}
        self._extra_outputs: dict[str, int] = {}  # engine outputs not in the config -> itemsize
        self._lock = threading.Lock()
        self._local = threading.local()
        self._states: list[_ThreadState] = []

    @classmethod
    def find_artifact(cls, version_dir: Path) -> Path | None:
        plans = sorted(Path(version_dir).glob("model.*.plan"))
        if plans:
            return plans[0]
        onnx = Path(version_dir) / ONNX_NAME
        return onnx if onnx.is_file() else None

    @classmethod
    def unavailable_reason(cls, device: Device) -> str | None:
        if device.kind == "cpu":
            return "TensorRT needs a GPU and the device is cpu"
        try:
            import tensorrt
        except ImportError as exc:
            return _trt_import_problem(exc)
        problem = tensorrt_version_problem(str(getattr(tensorrt, "__version__", "unknown")))
        if problem is not None:
            return problem
        try:
            cudart = _import_cudart()
        except BackendUnavailableError:
            return CUDA_PYTHON_MISSING
        return _device_problem(cudart, device.index)

    def load(self, version_dir: Path, device: Device) -> None:
        version_dir = Path(version_dir)
        trt = self._start(device)
        filename = plan_filename(self._gpu_arch or "", trt.__version__)
        if (version_dir / ONNX_NAME).is_file():
            engine, plan, built = self._load_or_build(version_dir, filename)
        else:
            plan, built = version_dir / filename, False
            engine = self._load_prebuilt(plan)
        tensors = _tensor_infos(trt, engine)
        check_io(self.config, tensors, plan, "the TensorRT plan")
        configured = {spec.name for spec in self.config.outputs}
        self._extra_outputs = {
            t.name: engine.get_tensor_dtype(t.name).itemsize
            for t in tensors
            if not t.is_input and t.name not in configured
        }
        self._engine, self._plan, self._built_now = engine, plan, built

    def build_plan(
        self,
        version_dir: Path,
        device: Device,
        make_calibrator: Callable[[Any, Any], Any] | None = None,
    ) -> Path:
        """Builds this GPU's plan from the version folder's `model.onnx` now and saves it,
        with its build record, into the version folder (a plan already there is replaced).

        `train` calls this to ship plans; `load` then finds the plan fresh. The backend is
        not loaded afterwards: call `load` to run the plan.

        Args:
            version_dir: The version folder; it must hold `model.onnx` and be writable.
            device: The GPU to build for (``cuda`` or ``cuda:N``).
            make_calibrator: For an INT8 config, `(tensorrt, cudart) -> calibrator`: a
                TensorRT INT8 calibrator that feeds data and writes `calibration.cache`
                into `version_dir` during the build (the build record hashes the cache
                after the build). None builds INT8 from the existing cache.

        Returns:
            The plan file, ``<version_dir>/model.<gpu>.<trt>.plan``.

        Raises:
            ValueError: `make_calibrator` is given for a config that is not INT8.
            BackendUnavailableError: TensorRT, cuda-python or the GPU is missing.
            ModelLoadError: `model.onnx` is missing, or TensorRT cannot parse or build it.
        """
        version_dir = Path(version_dir)
        if make_calibrator is not None and self.config.precision != "INT8":
            raise ValueError(
                f"{self.config.name}: a calibrator is only used for precision INT8, "
                f"but the config asks for {self.config.precision}"
            )
        onnx = version_dir / ONNX_NAME
        if not onnx.is_file():
            raise ModelLoadError(f"{onnx}: the ONNX model to build a TensorRT plan from is missing")
        trt = self._start(device)
        if make_calibrator is not None:
            calibrator = make_calibrator(trt, self._cudart)
        else:
            calibrator = self._cache_calibrator(version_dir)
        plan = version_dir / plan_filename(self._gpu_arch or "", trt.__version__)
        with file_lock(version_dir / f".{plan.name}.lock"):
            serialized = self._build(onnx, calibrator)
            # Only now: a data calibrator writes calibration.cache during the build.
            self._save(plan, serialized, self._build_key(version_dir))
        self._runtime = None
        return plan

    def warmup(self) -> None:
        run_warmup(self, self._plan)

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs one batch; see the module docstring for device arrays and threads.

        Raises:
            ModelInputError: A device array is not C-contiguous or of the config's dtype,
                or a shape lies outside the optimisation profile.
            RuntimeError: CUDA or TensorRT failed (the message names the call).
        """
        if self._engine is None:
            raise ModelLoadError(f"{self.config.name}: the tensorrt backend is not loaded")
        cudart = self._cudart
        state = self._thread_state()
        cuda_call(cudart.cudaSetDevice(self._device_index), "cudaSetDevice")
        for spec in self.config.inputs:
            self._bind_input(state, spec, inputs[spec.name])
        outputs = self._bind_outputs(state)
        if not state.context.execute_async_v3(state.stream_handle):
            raise RuntimeError(
                f"{self._plan}: TensorRT could not run the batch ({_last_error(self._trt)})"
            )
        for name, array in outputs.items():
            _copy_device_to_host(cudart, array, state.buffers[name][0], state.stream)
        cuda_call(cudart.cudaStreamSynchronize(state.stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        with self._lock:
            states, self._states = self._states, []
            self._local = threading.local()
            self._engine = None
        for state in states:
            state.free(self._cudart)
        self._runtime = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "runtime_version": self._trt.__version__ if self._trt else None,
            "device": f"cuda:{self._device_index}" if self._gpu_arch else None,
            "gpu_arch": self._gpu_arch,
            "precision": self.config.precision,
            "plan": str(self._plan) if self._plan else None,
            "plan_built_now": self._built_now,
            "profile": {name: [list(s) for s in shapes] for name, shapes in self._profile.items()},
            "execution_contexts": len(self._states),
        }

    # --- load helpers ---

    def _start(self, device: Device) -> Any:
        """Imports the runtimes, selects the GPU, reads its architecture; returns tensorrt."""
        if device.kind == "cpu":
            raise BackendUnavailableError("the tensorrt backend cannot run on the cpu")
        trt = _import_trt()
        cudart = _import_cudart()
        problem = _device_problem(cudart, device.index)
        if problem is not None:
            raise BackendUnavailableError(f"the tensorrt backend cannot run: {problem}")
        cuda_call(cudart.cudaSetDevice(device.index), "cudaSetDevice", BackendUnavailableError)
        major = self._attribute(cudart, "cudaDevAttrComputeCapabilityMajor", device.index)
        minor = self._attribute(cudart, "cudaDevAttrComputeCapabilityMinor", device.index)
        self._trt, self._cudart, self._device_index = trt, cudart, device.index
        self._gpu_arch = gpu_arch(major, minor)
        self._profile = optimization_profile(self.config)
        self._runtime = trt.Runtime(_trt_logger(trt))
        return trt

    def _build_key(self, version_dir: Path) -> dict[str, Any]:
        """What a plan of this version folder, config, TensorRT and GPU is built from."""
        calibration = int8_calibration_cache(version_dir, self.config.precision)
        return build_key(
            onnx_sha256=file_sha256(version_dir / ONNX_NAME),
            precision=self.config.precision,
            profile=self._profile,
            tensorrt_version=self._trt.__version__,
            gpu_arch=self._gpu_arch or "",
            calibration_sha256=file_sha256(calibration) if calibration else None,
        )

    def _cache_calibrator(self, version_dir: Path) -> Any:
        """A calibrator handing TensorRT `calibration.cache` for INT8, else None."""
        calibration = int8_calibration_cache(version_dir, self.config.precision)
        if calibration is None:
            return None
        return _cache_calibrator(self._trt, calibration.read_bytes())

    @staticmethod
    def _attribute(cudart: Any, name: str, index: int) -> int:
        attribute = getattr(cudart.cudaDeviceAttr, name)
        result = cudart.cudaDeviceGetAttribute(attribute, index)
        return int(cuda_call(result, "cudaDeviceGetAttribute", BackendUnavailableError))

    def _load_prebuilt(self, plan: Path) -> Any:
        """The engine of `plan` (for this GPU and TensorRT) where there is no model.onnx."""
        if not plan.is_file():
            others = sorted(p.name for p in plan.parent.glob("model.*.plan"))
            raise ModelLoadError(
                f"{plan}: there is no TensorRT plan for this GPU and TensorRT version "
                f"(found {', '.join(others) or 'none'}) and no {ONNX_NAME} to build one from"
            )
        recorded = read_build_record(plan)
        if recorded is not None and recorded.get("precision") != self.config.precision:
            raise ModelLoadError(
                f"{plan}: the plan was built for {recorded.get('precision')} but the config "
                f"asks for {self.config.precision}, and there is no {ONNX_NAME} to rebuild it from"
            )
        engine = self._deserialize(plan.read_bytes())
        if engine is None:
            raise ModelLoadError(
                f"{plan}: TensorRT {self._trt.__version__} cannot load the plan "
                f"({_last_error(self._trt)}); add {ONNX_NAME} to rebuild it"
            )
        return engine

    def _load_or_build(self, version_dir: Path, filename: str) -> tuple[Any, Path, bool]:
        """The fresh plan of the version folder or cache, else one built now and saved."""
        trt = self._trt
        onnx = version_dir / ONNX_NAME
        key = self._build_key(version_dir)
        cache_dir = plan_cache_dir(version_dir, self._cache_root or user_cache_root())
        candidates = [version_dir / filename, cache_dir / filename]
        found = self._first_fresh(candidates, key, log=True)
        if found is not None:
            return (*found, False)
        target_dir = self._plan_dir(version_dir, cache_dir)
        lock: Any = contextlib.nullcontext()
        if target_dir is not None:
            lock = file_lock(target_dir / f".{filename}.lock")
        with lock:
            found = self._first_fresh(candidates, key, log=False)  # built while we waited?
            if found is not None:
                return (*found, False)
            serialized = self._build(onnx, self._cache_calibrator(version_dir))
            plan = onnx  # where it cannot be saved, the plan is the ONNX model's, in memory
            if target_dir is not None:
                plan = target_dir / filename
                self._save(plan, serialized, key)
        engine = self._deserialize(serialized)
        if engine is None:
            raise ModelLoadError(
                f"{onnx}: TensorRT built a plan from it that it cannot load ({_last_error(trt)})"
            )
        return engine, plan, True

    def _plan_dir(self, version_dir: Path, cache_dir: Path) -> Path | None:
        """The version folder where writable, else the cache folder, else None (not saved)."""
        if is_writable(version_dir):
            return version_dir
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning(
                "%s: %s and the cache %s are not writable (%s); the TensorRT plan will be "
                "rebuilt on every load",
                self.config.name,
                version_dir,
                cache_dir,
                exc,
            )
            return None
        logger.info(
            "%s: %s is read-only; caching its TensorRT plan in %s",
            self.config.name,
            version_dir,
            cache_dir,
        )
        return cache_dir

    def _first_fresh(
        self, candidates: list[Path], key: dict[str, Any], log: bool
    ) -> tuple[Any, Path] | None:
        """(engine, plan) of the first candidate that exists, matches `key` and loads."""
        for plan in candidates:
            if not plan.is_file():
                continue
            reason = stale_reason(read_build_record(plan), key)
            if reason is not None:
                if log:
                    logger.info("%s: %s is stale: %s", self.config.name, plan, reason)
                continue
            engine = self._deserialize(plan.read_bytes())
            if engine is not None:
                return engine, plan
            if log:
                logger.warning(
                    "%s: TensorRT cannot load %s (%s)",
                    self.config.name,
                    plan,
                    _last_error(self._trt),
                )
        return None

    def _deserialize(self, data: bytes | memoryview) -> Any:
        _forget_last_error(self._trt)
        return self._runtime.deserialize_cuda_engine(data)

    def _save(self, plan: Path, serialized: memoryview, key: dict[str, Any]) -> None:
        """Writes the plan, then its record: a reader never pairs a new record with an old
        plan (an old record with a new plan only costs a rebuild)."""
        write_atomically(plan, serialized)
        record = {"key": key, "onnx": ONNX_NAME, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomically(build_record_path(plan), json.dumps(record, indent=2).encode())
        logger.info("%s: saved TensorRT plan %s", self.config.name, plan)

    def _build(self, onnx: Path, calibrator: Any) -> memoryview:
        """Parses `onnx` and builds a serialized engine for this GPU and the config, with
        `calibrator` (an INT8 calibrator, or None) setting INT8 scales."""
        trt = self._trt
        logger.info(
            "%s: building a %s TensorRT plan for %s from %s (this takes a while)",
            self.config.name,
            self.config.precision,
            self._gpu_arch,
            onnx,
        )
        start = time.perf_counter()
        _forget_last_error(trt)
        builder = trt.Builder(_trt_logger(trt))
        network = builder.create_network(0)  # explicit batch, TensorRT 10's only mode
        parser = trt.OnnxParser(network, _trt_logger(trt))
        if not parser.parse_from_file(str(onnx)):
            errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
            raise ModelLoadError(
                f"{onnx}: TensorRT cannot parse the ONNX model ({errors[0] if errors else '?'})"
            )
        check_io(self.config, _network_infos(network), onnx, "the ONNX model")
        build_config = self._builder_config(builder, network, calibrator)
        serialized = builder.build_serialized_network(network, build_config)
        if serialized is None:
            what = "and its INT8 calibration " if calibrator is not None else ""
            raise ModelLoadError(
                f"{onnx}: TensorRT could not build a {self.config.precision} engine from it "
                f"{what}for {self._gpu_arch} ({_last_error(trt)})"
            )
        logger.info(
            "%s: built the TensorRT plan in %.0f s", self.config.name, time.perf_counter() - start
        )
        return memoryview(serialized)

    def _builder_config(self, builder: Any, network: Any, calibrator: Any) -> Any:
        trt = self._trt
        build_config = builder.create_builder_config()
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.config.precision in ("FP16", "INT8"):
            build_config.set_flag(trt.BuilderFlag.FP16)
        profile = self._trt_profile(builder, network)
        if profile is not None:
            build_config.add_optimization_profile(profile)
        if calibrator is not None:
            build_config.set_flag(trt.BuilderFlag.INT8)
            build_config.int8_calibrator = calibrator
            if profile is not None:
                build_config.set_calibration_profile(profile)
        return build_config

    def _trt_profile(self, builder: Any, network: Any) -> Any:
        """TensorRT's optimisation profile over the network's dynamic inputs, or None."""
        profile = builder.create_optimization_profile()
        dynamic = 0
        for info in _network_infos(network):
            if info.is_input and -1 in info.shape:
                profile.set_shape(info.name, *self._profile[info.name])
                dynamic += 1
        return profile if dynamic else None

    # --- infer helpers ---

    def _thread_state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = _ThreadState(self._cudart, self._engine, self._device_index)
            with self._lock:
                self._states.append(state)
            self._local.state = state
        return state

    def _bind_input(self, state: _ThreadState, spec: TensorSpec, array: Any) -> None:
        """Sets one input's shape and address: a device array in place, a host one copied."""
        who = f"{self.config.name}: input '{spec.name}'"
        if is_device_array(array) and not isinstance(array, np.ndarray):
            view = cuda_view(array)
            if view.dtype != spec.dtype or not view.contiguous:
                raise ModelInputError(
                    f"{who} must be a C-contiguous {spec.dtype} device array, got a "
                    f"{'contiguous' if view.contiguous else 'strided'} {view.dtype} one"
                )
            shape, address = view.shape, view.pointer
            self._wait_for_producer(state, array)
        else:
            host = np.ascontiguousarray(array)
            if host.dtype != spec.dtype:
                raise ModelInputError(f"{who} must be {spec.dtype}, got {host.dtype}")
            shape = host.shape
            address = state.buffer(self._cudart, spec.name, host.nbytes)
            _copy_host_to_device(self._cudart, address, host, state.stream)
        if not state.context.set_input_shape(spec.name, tuple(shape)):
            low, _, high = self._profile.get(spec.name, ((), (), ()))
            raise ModelInputError(
                f"{who} has shape {list(shape)}, outside the TensorRT plan's range "
                f"{list(low)} to {list(high)}"
            )
        state.context.set_tensor_address(spec.name, address)

    def _wait_for_producer(self, state: _ThreadState, array: Any) -> None:
        """Makes this thread's stream wait for the stream the array was written on."""
        producer = _producer_stream(array)
        if producer is None:
            return  # no stream given: written already, or on the legacy default stream
        cudart = self._cudart
        cuda_call(cudart.cudaEventRecord(state.event, producer), "cudaEventRecord")
        cuda_call(cudart.cudaStreamWaitEvent(state.stream, state.event, 0), "cudaStreamWaitEvent")

    def _bind_outputs(self, state: _ThreadState) -> dict[str, np.ndarray]:
        """Sets every output's address; returns host arrays for the configured ones."""
        outputs = {}
        sizes = {spec.name: spec.dtype.itemsize for spec in self.config.outputs}
        sizes.update(self._extra_outputs)
        for name, itemsize in sizes.items():
            shape = tuple(int(d) for d in state.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(
                    f"{self._plan}: output '{name}' has a data-dependent shape {list(shape)}, "
                    "which the tensorrt backend does not support"
                )
            address = state.buffer(self._cudart, name, math.prod(shape) * itemsize)
            state.context.set_tensor_address(name, address)
            if name not in self._extra_outputs:
                outputs[name] = np.empty(shape, dtype=self.config.output(name).dtype)
        return outputs
