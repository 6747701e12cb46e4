"""TensorRT plans on disk and what they are built for: pure functions, no TensorRT import.

A plan is specific to one GPU architecture and one TensorRT version, so a version folder
may hold several, named ``model.<gpu-arch>.trt<version>.plan`` (``model.sm90.trt10.3.0.plan``).
Beside each lies ``<plan>.json``, its build record: the build key (`build_key`: the sha256
of `model.onnx`, the precision, the optimisation profile, the TensorRT version, the GPU
architecture, and the sha256 of `calibration.cache` for INT8) with the build time. A plan
whose key disagrees with the current one is stale (`stale_reason`). `check_io` compares a
network's or engine's tensors with the config. `engines.backends.tensorrt` runs the plans;
everything here runs without a GPU and is unit-tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.backends.base import check_names, check_tensor
from engines.errors import ModelLoadError

if TYPE_CHECKING:
    from engines.config import ModelConfig, TensorSpec

ONNX_NAME = "model.onnx"
CALIBRATION_CACHE_NAME = "calibration.cache"
#: The TensorRT major version papscan's tensorrt backend is written for.
TENSORRT_MAJOR = 10
#: A dynamic non-batch dimension (e.g. cells per ROI) is built for 1 to
#: `DYNAMIC_DIM_MAX`, with kernels tuned for `DYNAMIC_DIM_OPT`.
DYNAMIC_DIM_OPT = 64
DYNAMIC_DIM_MAX = 512
#: Version of the build record's layout; a record of another layout is stale.
BUILD_RECORD_FORMAT = 1
_PLAN_NAME = re.compile(r"model\.(sm[0-9]+)\.trt([0-9]+(?:\.[0-9]+)*)\.plan")

# TensorRT's DataType member names for the config's data types.
TRT_TYPES = {
    "TYPE_FP32": "FLOAT",
    "TYPE_FP16": "HALF",
    "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32",
    "TYPE_UINT8": "UINT8",
    "TYPE_BOOL": "BOOL",
}

#: Input name -> (min shape, opt shape, max shape), batch dim included.
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


# --- plan names, build records, profiles: pure functions ---------------------------------------


def gpu_arch(major: int, minor: int) -> str:
    """The architecture tag of a compute capability: 9.0 -> ``sm90``, 12.0 -> ``sm120``."""
    return f"sm{major}{minor}"


def short_version(version: str) -> str:
    """The first three parts of a TensorRT version: ``10.3.0.26`` -> ``10.3.0``."""
    return ".".join(version.split(".")[:3])


def plan_filename(arch: str, tensorrt_version: str) -> str:
    """``model.<arch>.trt<version>.plan``, e.g. ``model.sm90.trt10.3.0.plan``."""
    return f"model.{arch}.trt{short_version(tensorrt_version)}.plan"


def parse_plan_filename(name: str) -> tuple[str, str] | None:
    """(gpu arch, TensorRT version) of a plan's file name, or None if it is not one."""
    match = _PLAN_NAME.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def build_record_path(plan: Path) -> Path:
    """The build record beside `plan`: ``<plan>.json``."""
    return plan.with_name(plan.name + ".json")


def optimization_profile(config: ModelConfig) -> Profile:
    """The (min, opt, max) shape TensorRT builds each input for.

    The batch dimension runs from 1 to `max_batch_size`, tuned for the largest
    `preferred_batch_size` (else `max_batch_size`). The image dims of input[0] are fixed at
    `preprocessing.input_size` (the pipeline always resamples to it). Any other dynamic
    dim runs from 1 to `DYNAMIC_DIM_MAX`, tuned for `DYNAMIC_DIM_OPT`; fixed dims stay.

    Returns:
        Input name -> (min shape, opt shape, max shape), each with the batch dim.
    """
    profile: Profile = {}
    for spec in config.inputs:
        dims = config.full_shape(spec)
        image = _image_dims(config, spec, len(dims))
        ranges: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(dims):
            if config.is_batched and axis == 0:
                ranges.append((1, _opt_batch_size(config), config.max_batch_size))
            elif axis in image:
                ranges.append((image[axis],) * 3)
            elif dim == -1:
                ranges.append((1, DYNAMIC_DIM_OPT, DYNAMIC_DIM_MAX))
            else:
                ranges.append((dim,) * 3)
        lows, opts, highs = zip(*ranges, strict=True)
        profile[spec.name] = (tuple(lows), tuple(opts), tuple(highs))
    return profile


def _opt_batch_size(config: ModelConfig) -> int:
    batching = config.dynamic_batching
    if batching is not None and batching.preferred_batch_size:
        return max(batching.preferred_batch_size)
    return config.max_batch_size


def _image_dims(config: ModelConfig, spec: TensorSpec, rank: int) -> dict[int, int]:
    """Axis -> size of input[0]'s last three dims, from `preprocessing`; {} for others."""
    pre = config.preprocessing
    if pre is None or spec is not config.inputs[0]:
        return {}
    width, height = pre.input_size
    sizes = [3, height, width] if pre.layout == "NCHW" else [height, width, 3]
    return {rank - 3 + i: size for i, size in enumerate(sizes)}


def build_key(
    *,
    onnx_sha256: str,
    precision: str,
    profile: Profile,
    tensorrt_version: str,
    gpu_arch: str,
    calibration_sha256: str | None = None,
) -> dict[str, Any]:
    """What a plan was built from, as its build record stores it (JSON types only)."""
    key: dict[str, Any] = {
        "format": BUILD_RECORD_FORMAT,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": {name: [list(shape) for shape in shapes] for name, shapes in profile.items()},
        "tensorrt_version": tensorrt_version,
        "gpu_arch": gpu_arch,
    }
    if calibration_sha256 is not None:
        key["calibration_sha256"] = calibration_sha256
    return key


def stale_reason(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """Why a plan built with key `recorded` must be rebuilt for `current`, or None if not."""
    if recorded is None:
        return "it has no readable build record"
    if recorded.get("format") != current.get("format"):
        return "its build record has an older layout"
    if recorded.get("onnx_sha256") != current.get("onnx_sha256"):
        return f"{ONNX_NAME} changed since it was built"
    if recorded.get("precision") != current.get("precision"):
        return (
            f"it was built for {recorded.get('precision')} "
            f"but the config asks for {current.get('precision')}"
        )
    if recorded.get("profile") != current.get("profile"):
        return "the optimisation profile (max_batch_size, preferred sizes or dims) changed"
    if recorded.get("tensorrt_version") != current.get("tensorrt_version"):
        return f"it was built by TensorRT {recorded.get('tensorrt_version')}"
    if recorded.get("gpu_arch") != current.get("gpu_arch"):
        return f"it was built for {recorded.get('gpu_arch')}"
    if recorded.get("calibration_sha256") != current.get("calibration_sha256"):
        return f"{CALIBRATION_CACHE_NAME} changed since it was built"
    if dict(recorded) != dict(current):
        return "its build record differs"
    return None


def read_build_record(plan: Path) -> dict[str, Any] | None:
    """The build key in `plan`'s record, or None where it is missing or unreadable."""
    try:
        record = json.loads(build_record_path(plan).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, dict) else None


def int8_calibration_cache(version_dir: Path, precision: str) -> Path | None:
    """The calibration cache an INT8 build reads, or None for another precision.

    Raises:
        ModelLoadError: The precision is INT8 and the version folder has no cache.
    """
    if precision != "INT8":
        return None
    path = Path(version_dir) / CALIBRATION_CACHE_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: precision INT8 needs this TensorRT calibration cache, which does not "
            "exist; add one from an INT8 calibration run or set precision to FP16 in config.yaml"
        )
    return path


def tensorrt_version_problem(version: str) -> str | None:
    """Why TensorRT `version` does not suit this backend (a phrase), or None."""
    major = version.split(".")[0]
    if major == str(TENSORRT_MAJOR):
        return None
    return (
        f"TensorRT {version} is installed but papscan's tensorrt backend is written for "
        f"TensorRT {TENSORRT_MAJOR}"
    )


def plan_cache_dir(version_dir: Path, cache_root: Path) -> Path:
    """Where plans of a read-only version folder are cached: one folder per version folder.

    ``<cache_root>/tensorrt/<model>-<version>-<hash of the folder's path>``, so two
    repositories holding a model of the same name do not overwrite each other's plans.
    """
    resolved = Path(version_dir).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return Path(cache_root) / "tensorrt" / f"{resolved.parent.name}-{resolved.name}-{digest}"


def user_cache_root() -> Path:
    """papscan's user cache folder (``platformdirs.user_cache_dir("papscan")``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("papscan"))


def is_writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried, since permissions and read-only
    mounts both say no)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it over `path`, so a
    reader sees the old file or the whole new one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if absent) where the OS has flock."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: builds may then race, which is slow but correct
        yield
        return
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


# --- engine I/O against the config --------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a TensorRT network or engine.

    Attributes:
        name: The tensor's name.
        is_input: Whether it is an input.
        dtype: TensorRT's DataType member name (``FLOAT``, ``HALF``, ``INT64``, …).
        shape: Its shape, batch dim included; -1 is dynamic.
    """

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]


def check_io(config: ModelConfig, tensors: list[TensorInfo], artifact: Path, where: str) -> None:
    """Raises ModelLoadError where TensorRT's tensors disagree with the config.

    The same input names, every configured output present, the same data types and
    ranks, agreeing fixed dims, and a dynamic batch dim wherever `max_batch_size > 1`.

    Args:
        config: The model's config.
        tensors: The network's or engine's inputs and outputs.
        artifact: The file named in the error.
        where: Whose tensors, for the error (``the TensorRT plan``, ``the ONNX model``).
    """
    inputs = {t.name: t for t in tensors if t.is_input}
    outputs = {t.name: t for t in tensors if not t.is_input}
    check_names(config, list(inputs), list(outputs), artifact, where)
    for kind, specs, found in (
        ("input", config.inputs, inputs),
        ("output", config.outputs, outputs),
    ):
        for spec in specs:
            tensor = found[spec.name]
            check_tensor(
                config,
                spec,
                kind=kind,
                dtype=tensor.dtype,
                expected_dtype=TRT_TYPES[spec.data_type],
                shape=list(tensor.shape),
                artifact=artifact,
                where=where,
            )
