"""TensorRT 10 plans for an exported model version: FP16, or INT8 calibrated on training data.

The build itself is `engines`' (`TensorRTBackend.build_plan`): the same builder settings,
optimisation profile, plan name (``model.<gpu>.<trt>.plan``) and build record a worker
uses, so a worker starting on the same GPU and TensorRT finds the plan fresh and loads it
without building. What `train` adds is INT8 calibration from data: an
`IInt8EntropyCalibrator2` fed batches of normalised training images, which TensorRT asks
for during the build and whose scales it hands back as `calibration.cache`, written into
the version folder beside the plan (a worker on another GPU rebuilds INT8 from that cache).

TensorRT calibrates a network with dynamic shapes at the optimisation profile's opt shape
(`tensorrt_plan.optimization_profile`: the largest preferred batch size), so every
calibration batch has that shape; the last one is filled up by wrapping round to the
first images. TensorRT 10 deprecates this implicit quantization (10.1) in favour of
explicit Q/DQ nodes, but it still builds with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Device
from engines.backends.tensorrt import INSTALL_HINT, TensorRTBackend, cuda_call
from engines.backends.tensorrt_plan import (
    CALIBRATION_CACHE_NAME,
    optimization_profile,
    read_build_record,
    write_atomically,
)
from engines.config import CONFIG_FILENAME, ModelConfig, load_config
from engines.errors import BackendUnavailableError
from train.export.onnx_export import onnx_session

logger = logging.getLogger(__name__)

#: Training images an INT8 calibration reads by default (TensorRT suggests about 500).
DEFAULT_CALIBRATION_IMAGES = 512


@dataclass(frozen=True)
class PlanBuild:
    """A TensorRT plan written into a version folder.

    Attributes:
        plan: The plan file (its build record lies beside it as ``<plan>.json``).
        precision: ``FP32``, ``FP16`` or ``INT8`` (the config's).
        build_key: The build record's key (ONNX and cache hashes, profile, GPU, TensorRT).
        seconds: Build time, calibration included.
        calibration_cache: `calibration.cache`, for INT8.
        calibration_items: Distinct items the calibrator fed TensorRT (INT8).
        calibration_batches: Batches it fed, each of the profile's opt shape (INT8).
        max_abs_diff_vs_onnxruntime: Output name -> max |TensorRT - ONNX Runtime FP32| on
            the check inputs, or None where none were given.
    """

    plan: Path
    precision: str
    build_key: dict[str, Any]
    seconds: float
    calibration_cache: Path | None = None
    calibration_items: int = 0
    calibration_batches: int = 0
    max_abs_diff_vs_onnxruntime: dict[str, float] | None = None

    def as_card(self) -> dict[str, Any]:
        """The card's `tensorrt` entry."""
        return {
            "plan": self.plan.name,
            "build_record": self.plan.name + ".json",
            "precision": self.precision,
            "gpu_arch": self.build_key.get("gpu_arch"),
            "tensorrt_version": self.build_key.get("tensorrt_version"),
            "build_seconds": round(self.seconds, 1),
            "calibration": (
                {
                    "cache": CALIBRATION_CACHE_NAME,
                    "sha256": self.build_key.get("calibration_sha256"),
                    "calibrator": "IInt8EntropyCalibrator2",
                    "training_items": self.calibration_items,
                    "batches": self.calibration_batches,
                }
                if self.calibration_cache
                else None
            ),
            "max_abs_diff_vs_onnxruntime_fp32": self.max_abs_diff_vs_onnxruntime,
        }


def require_tensorrt(device: Device | str = "cuda") -> None:
    """Raises BackendUnavailableError unless a TensorRT 10 plan can be built on `device`.

    Raises:
        BackendUnavailableError: TensorRT is not installed (the sentence says how to get
            it), is not TensorRT 10, or cuda-python or the GPU is missing.
    """
    device = Device.parse(device)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed, so no TensorRT plan can be built: {INSTALL_HINT}"
        ) from exc
    reason = TensorRTBackend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"no TensorRT plan can be built on {device}: {reason}")


def calibration_batches(
    inputs: Mapping[str, np.ndarray], config: ModelConfig
) -> list[dict[str, np.ndarray]]:
    """Cuts calibration items into batches of the optimisation profile's opt shape.

    Args:
        inputs: Input name -> items, batch first, already preprocessed as the model takes
            them (e.g. normalised [N, 3, S, S] float32 crops), every config input given
            with the same N, each item of the opt shape without its batch dimension.
        config: The model's config (its profile sets the batch size).

    Returns:
        ceil(N / opt batch) batches; the last is filled up with the first items.

    Raises:
        ValueError: Inputs are missing, empty, of different N, or of another item shape
            or dtype than the config and profile give.
    """
    profile = optimization_profile(config)
    names = [spec.name for spec in config.inputs]
    if sorted(inputs) != sorted(names):
        raise ValueError(f"calibration inputs {sorted(inputs)} are not the config's {names}")
    counts = {len(array) for array in inputs.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"calibration inputs must share one non-zero length, got {counts}")
    (count,) = counts
    for spec in config.inputs:
        opt = profile[spec.name][1]
        array = inputs[spec.name]
        if tuple(array.shape[1:]) != tuple(opt[1:]) or array.dtype != spec.dtype:
            raise ValueError(
                f"calibration input '{spec.name}' must be {spec.dtype} items of shape "
                f"{list(opt[1:])} (the profile's opt shape), got {array.dtype} {list(array.shape)}"
            )
    batch_size = profile[names[0]][1][0]
    order = np.resize(np.arange(count), math.ceil(count / batch_size) * batch_size)
    return [
        {name: np.ascontiguousarray(inputs[name][order[i : i + batch_size]]) for name in names}
        for i in range(0, len(order), batch_size)
    ]


def entropy_calibrator(
    trt: Any, cudart: Any, batches: Sequence[Mapping[str, np.ndarray]], cache_path: Path
) -> Any:
    """A TensorRT `IInt8EntropyCalibrator2` that feeds `batches`, then writes the cache.

    TensorRT calls `get_batch(names)` until it returns None; each call copies one batch
    into device buffers (allocated once, reused) and returns their pointers in `names`'
    order. `read_calibration_cache` returns None, so TensorRT always calibrates from the
    data; `write_calibration_cache` writes TensorRT's scales to `cache_path` atomically.
    Call `free()` after the build to release the device buffers.

    Args:
        trt: The tensorrt module.
        cudart: cuda-python's runtime module.
        batches: Input name -> array, every batch of the same shapes (`calibration_batches`).
        cache_path: Where the calibration cache is written.
    """
    if not batches:
        raise ValueError("INT8 calibration needs at least one batch")
    batch_size = len(next(iter(batches[0].values())))
    host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches_fed = 0
            self._buffers: dict[str, int] = {}

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.batches_fed == len(batches):
                return None
            batch = batches[self.batches_fed]
            pointers = [self._upload(name, batch[name]) for name in names]
            self.batches_fed += 1
            logger.debug("INT8 calibration batch %d of %d", self.batches_fed, len(batches))
            return pointers

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomically(cache_path, bytes(cache))
            logger.info("wrote the INT8 calibration cache %s", cache_path)

        def free(self) -> None:
            for pointer in self._buffers.values():
                cuda_call(cudart.cudaFree(pointer), "cudaFree")
            self._buffers = {}

        def _upload(self, name: str, array: np.ndarray) -> int:
            array = np.ascontiguousarray(array)
            if name not in self._buffers:
                self._buffers[name] = int(cuda_call(cudart.cudaMalloc(array.nbytes), "cudaMalloc"))
            pointer = self._buffers[name]
            result = cudart.cudaMemcpy(pointer, array.ctypes.data, array.nbytes, host_to_device)
            cuda_call(result, "cudaMemcpy")
            return pointer

    return _EntropyCalibrator()


def build_plan(
    version_dir: Path,
    *,
    device: Device | str = "cuda",
    calibration_inputs: Mapping[str, np.ndarray] | None = None,
    check_inputs: Mapping[str, np.ndarray] | None = None,
) -> PlanBuild:
    """Builds the version's TensorRT plan for this GPU at its config's precision.

    Args:
        version_dir: ``<repo>/<model>/<version>``, holding `model.onnx`; the plan, its
            build record and (INT8) `calibration.cache` are written there.
        device: The GPU (``cuda`` or ``cuda:N``).
        calibration_inputs: For INT8 (required then, refused otherwise): input name ->
            preprocessed training items (see `calibration_batches`).
        check_inputs: Inputs (at most `max_batch_size` items) run through the loaded plan
            and through ONNX Runtime on `model.onnx`, to record how far they differ.

    Returns:
        What was built.

    Raises:
        BackendUnavailableError: TensorRT, cuda-python or the GPU is missing.
        ValueError: Calibration inputs are missing for INT8, given for another precision,
            or of the wrong shapes.
        ModelLoadError: TensorRT cannot parse or build the model.
    """
    version_dir = Path(version_dir)
    device = Device.parse(device)
    config = load_config(version_dir.parent / CONFIG_FILENAME)
    require_tensorrt(device)
    backend = TensorRTBackend(config)
    calibrators: list[Any] = []
    cache: Path | None = None
    batches: list[dict[str, np.ndarray]] = []
    if config.precision == "INT8":
        if calibration_inputs is None:
            raise ValueError(f"{config.name}: an INT8 plan needs calibration inputs")
        batches = calibration_batches(calibration_inputs, config)
        cache = version_dir / CALIBRATION_CACHE_NAME
        cache.unlink(missing_ok=True)  # a stale cache must not stand in for this data
    elif calibration_inputs is not None:
        raise ValueError(
            f"{config.name}: calibration inputs are for INT8, the config asks for "
            f"{config.precision}"
        )

    def make_calibrator(trt: Any, cudart: Any) -> Any:
        calibrator = entropy_calibrator(trt, cudart, batches, cache)  # type: ignore[arg-type]
        calibrators.append(calibrator)
        return calibrator

    start = time.perf_counter()
    try:
        plan = backend.build_plan(version_dir, device, make_calibrator if batches else None)
    finally:
        for calibrator in calibrators:
            calibrator.free()
    seconds = time.perf_counter() - start
    key = read_build_record(plan) or {}
    logger.info("%s: built %s (%s) in %.0f s", config.name, plan.name, config.precision, seconds)
    diffs = (
        None
        if check_inputs is None
        else _diff_vs_onnxruntime(backend, version_dir, device, check_inputs)
    )
    return PlanBuild(
        plan=plan,
        precision=config.precision,
        build_key=key,
        seconds=seconds,
        calibration_cache=cache,
        calibration_items=len(next(iter(calibration_inputs.values()))) if calibration_inputs else 0,
        calibration_batches=len(batches),
        max_abs_diff_vs_onnxruntime=diffs,
    )


def _diff_vs_onnxruntime(
    backend: TensorRTBackend, version_dir: Path, device: Device, inputs: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Loads the plan just built and compares its outputs with ONNX Runtime's on `inputs`."""
    backend.load(version_dir, device)
    try:
        if backend.describe()["plan_built_now"]:
            logger.warning("%s: the plan just built was not found fresh", backend.config.name)
        got = backend.infer(dict(inputs))
    finally:
        backend.close()
    names = [spec.name for spec in backend.config.outputs]
    want = dict(
        zip(names, onnx_session(version_dir / "model.onnx").run(names, dict(inputs)), strict=True)
    )
    return {
        name: float(np.abs(got[name].astype(np.float64) - want[name]).max())
        if want[name].size
        else 0.0
        for name in names
    }
