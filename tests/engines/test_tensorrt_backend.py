"""engines.backends.tensorrt: plan names, build records, profiles and I/O checks everywhere;
building, running and threading real TensorRT engines where TensorRT and a GPU exist."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.backends import BACKENDS, OnnxRuntimeBackend, TensorRTBackend
from engines.backends import tensorrt as trt_backend
from engines.backends.base import Device
from engines.backends.tensorrt_plan import (
    DYNAMIC_DIM_MAX,
    DYNAMIC_DIM_OPT,
    TensorInfo,
    build_key,
    build_record_path,
    check_io,
    gpu_arch,
    int8_calibration_cache,
    is_writable,
    optimization_profile,
    parse_plan_filename,
    plan_cache_dir,
    plan_filename,
    read_build_record,
    stale_reason,
    tensorrt_version_problem,
    write_atomically,
)
from engines.config import ModelConfig, load_config
from engines.errors import BackendUnavailableError, ModelInputError, ModelLoadError
from engines.hashing import file_sha256
from engines.repository import ModelRepository
from tests.engines.conftest import (
    CLASSIFIER_CONFIG,
    ROI_CONFIG,
    build_classifier_onnx,
    build_roi_onnx,
    write_config,
)
from tests.engines.fake_tensorrt import FakeCudart, install

NOT_INSTALLED = (
    "the tensorrt package is not installed "
    "(install TensorRT 10 from NVIDIA, then pip install 'papscan[tensorrt]')"
)


def _config(tmp_path: Path, base: dict[str, Any], **overrides: Any) -> ModelConfig:
    raw = {**copy.deepcopy(base), **overrides}
    return load_config(write_config(tmp_path / raw["name"], raw))


@pytest.fixture
def without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes `import tensorrt` fail as on a machine without it, wherever the test runs."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _fake_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", module)


# --- plan names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("major", "minor", "arch"), [(9, 0, "sm90"), (8, 6, "sm86"), (12, 0, "sm120"), (7, 5, "sm75")]
)
def test_gpu_arch_from_compute_capability(major: int, minor: int, arch: str) -> None:
    assert gpu_arch(major, minor) == arch


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("10.3.0", "model.sm90.trt10.3.0.plan"),
        ("10.13.0.35", "model.sm90.trt10.13.0.plan"),
        ("10.0", "model.sm90.trt10.0.plan"),
    ],
)
def test_plan_filename_round_trips(version: str, name: str) -> None:
    assert plan_filename("sm90", version) == name
    assert parse_plan_filename(name) == ("sm90", ".".join(version.split(".")[:3]))


@pytest.mark.parametrize(
    "name",
    ["model.onnx", "model.sm90.trt10.3.0.plan.json", "model.plan", "other.sm90.trt10.plan"],
)
def test_other_files_are_not_plans(name: str) -> None:
    assert parse_plan_filename(name) is None


def test_build_record_sits_beside_the_plan(tmp_path: Path) -> None:
    plan = tmp_path / "model.sm90.trt10.3.0.plan"
    assert build_record_path(plan) == tmp_path / "model.sm90.trt10.3.0.plan.json"


# --- build key and stale plans ----------------------------------------------------------------


def _key(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "onnx_sha256": "a" * 64,
        "precision": "FP16",
        "profile": {"crops": ((1, 3, 4, 4), (8, 3, 4, 4), (8, 3, 4, 4))},
        "tensorrt_version": "10.3.0",
        "gpu_arch": "sm90",
    }
    return build_key(**{**fields, **changes})


def test_a_key_survives_its_json_record() -> None:
    key = _key()
    assert stale_reason(json.loads(json.dumps(key)), key) is None
    assert key["profile"] == {"crops": [[1, 3, 4, 4], [8, 3, 4, 4], [8, 3, 4, 4]]}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"onnx_sha256": "b" * 64}, "model.onnx changed since it was built"),
        ({"precision": "FP32"}, "it was built for FP32 but the config asks for FP16"),
        (
            {"profile": {"crops": ((1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4))}},
            "the optimisation profile (max_batch_size, preferred sizes or dims) changed",
        ),
        ({"tensorrt_version": "10.2.0"}, "it was built by TensorRT 10.2.0"),
        ({"gpu_arch": "sm86"}, "it was built for sm86"),
        ({"calibration_sha256": "c" * 64}, "calibration.cache changed since it was built"),
    ],
)
def test_a_changed_input_makes_the_plan_stale(change: dict[str, Any], reason: str) -> None:
    assert stale_reason(_key(**change), _key()) == reason


def test_a_plan_without_a_record_or_of_an_old_layout_is_stale() -> None:
    assert stale_reason(None, _key()) == "it has no readable build record"
    old = {**_key(), "format": 0}
    assert stale_reason(old, _key()) == "its build record has an older layout"


def test_build_record_reading(tmp_path: Path) -> None:
    plan = tmp_path / "model.sm90.trt10.3.0.plan"
    assert read_build_record(plan) is None
    build_record_path(plan).write_text("{not json")
    assert read_build_record(plan) is None
    build_record_path(plan).write_text(json.dumps({"built": "yesterday"}))
    assert read_build_record(plan) is None
    build_record_path(plan).write_text(json.dumps({"key": _key(), "built": "today"}))
    assert read_build_record(plan) == _key()


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00onnx" * 100_000)
    assert file_sha256(path) == hashlib.sha256(b"\x00onnx" * 100_000).hexdigest()


# --- optimisation profile ---------------------------------------------------------------------


def test_profile_spans_the_batch_up_to_max_batch_size(tmp_path: Path) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG)
    assert optimization_profile(config) == {
        "crops": ((1, 3, 4, 4), (8, 3, 4, 4), (8, 3, 4, 4)),
    }


def test_profile_is_tuned_for_the_largest_preferred_batch(tmp_path: Path) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG, dynamic_batching={"preferred_batch_size": [2, 4]})
    assert optimization_profile(config)["crops"] == ((1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4))


def test_profile_of_dynamic_non_batch_dims(tmp_path: Path) -> None:
    config = _config(tmp_path, ROI_CONFIG)
    assert optimization_profile(config) == {
        "cell_features": ((1, 1, 8), (4, DYNAMIC_DIM_OPT, 8), (4, DYNAMIC_DIM_MAX, 8)),
        "cell_mask": ((1, 1), (4, DYNAMIC_DIM_OPT), (4, DYNAMIC_DIM_MAX)),
    }
    assert (DYNAMIC_DIM_OPT, DYNAMIC_DIM_MAX) == (64, 512)


def test_profile_of_an_unbatched_model(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        ROI_CONFIG,
        max_batch_size=0,
        input=[{"name": "cells", "data_type": "TYPE_FP32", "dims": [-1, 8]}],
        output=[{"name": "roi_probs", "data_type": "TYPE_FP32", "dims": [3]}],
    )
    assert optimization_profile(config) == {"cells": ((1, 8), (64, 8), (512, 8))}


def test_profile_fixes_dynamic_image_dims_at_the_preprocessing_size(tmp_path: Path) -> None:
    raw = copy.deepcopy(CLASSIFIER_CONFIG)
    raw["input"] = [{"name": "crops", "data_type": "TYPE_FP32", "dims": [3, -1, -1]}]
    raw["preprocessing"]["input_size"] = [6, 4]  # width 6, height 4
    config = _config(tmp_path, raw, max_batch_size=1)
    assert optimization_profile(config) == {"crops": ((1, 3, 4, 6), (1, 3, 4, 6), (1, 3, 4, 6))}


# --- INT8, versions, cache folder, files ------------------------------------------------------


def test_int8_needs_a_calibration_cache(tmp_path: Path) -> None:
    assert int8_calibration_cache(tmp_path, "FP16") is None
    assert int8_calibration_cache(tmp_path, "FP32") is None
    with pytest.raises(ModelLoadError) as info:
        int8_calibration_cache(tmp_path, "INT8")
    assert str(info.value) == (
        f"{tmp_path / 'calibration.cache'}: precision INT8 needs this TensorRT calibration "
        "cache, which does not exist; add one from an INT8 calibration run or set precision "
        "to FP16 in config.yaml"
    )
    (tmp_path / "calibration.cache").write_bytes(b"TRT-100-EntropyCalibration2\n")
    assert int8_calibration_cache(tmp_path, "INT8") == tmp_path / "calibration.cache"


@pytest.mark.parametrize(
    ("version", "fits"),
    [("10.3.0", True), ("10.13.0.35", True), ("11.4.0", False), ("8.6.1", False)],
)
def test_only_tensorrt_10_fits(version: str, fits: bool) -> None:
    problem = tensorrt_version_problem(version)
    if fits:
        assert problem is None
    else:
        assert problem == (
            f"TensorRT {version} is installed but papscan's tensorrt backend is written for "
            "TensorRT 10"
        )


def test_plan_cache_dir_is_per_version_folder(tmp_path: Path) -> None:
    one = plan_cache_dir(tmp_path / "a" / "tiny_classifier" / "1", tmp_path / "cache")
    other = plan_cache_dir(tmp_path / "b" / "tiny_classifier" / "1", tmp_path / "cache")
    assert one != other
    assert one.parent == other.parent == tmp_path / "cache" / "tensorrt"
    assert one.name.startswith("tiny_classifier-1-")
    assert plan_cache_dir(tmp_path / "a" / "tiny_classifier" / "1", tmp_path / "cache") == one


def test_write_atomically_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "model.sm90.trt10.3.0.plan"
    write_atomically(path, b"first")
    write_atomically(path, memoryview(b"second plan"))
    assert path.read_bytes() == b"second plan"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(OSError):
        write_atomically(tmp_path / "missing" / "x.plan", b"data")


def test_is_writable(tmp_path: Path) -> None:
    assert is_writable(tmp_path)
    assert not is_writable(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


# --- I/O checks -------------------------------------------------------------------------------


def _classifier_io(**changes: TensorInfo) -> list[TensorInfo]:
    tensors = {
        "crops": TensorInfo("crops", True, "FLOAT", (-1, 3, 4, 4)),
        "probs": TensorInfo("probs", False, "FLOAT", (-1, 3)),
        "features": TensorInfo("features", False, "FLOAT", (-1, 8)),
    }
    tensors.update(changes)
    return list(tensors.values())


def test_matching_io_passes_and_extra_outputs_are_allowed(tmp_path: Path) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG)
    extra = TensorInfo("logits", False, "HALF", (-1, 3))
    check_io(config, [*_classifier_io(), extra], tmp_path / "p.plan", "the TensorRT plan")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"crops": TensorInfo("images", True, "FLOAT", (-1, 3, 4, 4))},
            "the inputs ['images'] of the TensorRT plan do not match the config's inputs ['crops']",
        ),
        (
            {"probs": TensorInfo("scores", False, "FLOAT", (-1, 3))},
            "the outputs ['features', 'scores'] of the TensorRT plan lack the config's "
            "output(s) ['probs']",
        ),
        (
            {"crops": TensorInfo("crops", True, "HALF", (-1, 3, 4, 4))},
            "input 'crops' is HALF in the TensorRT plan but TYPE_FP32 (FLOAT) in the config",
        ),
        (
            {"crops": TensorInfo("crops", True, "FLOAT", (-1, 48))},
            "input 'crops' has shape [-1, 48] in the TensorRT plan, not of rank 4 as the "
            "config's [-1, 3, 4, 4]",
        ),
        (
            {"crops": TensorInfo("crops", True, "FLOAT", (8, 3, 4, 4))},
            "input 'crops' has a fixed batch dimension 8 but max_batch_size is 8; export it "
            "with a dynamic batch",
        ),
        (
            {"features": TensorInfo("features", False, "FLOAT", (-1, 16))},
            "output 'features' has shape [-1, 16] in the TensorRT plan, which disagrees with "
            "the config's [-1, 8]",
        ),
    ],
)
def test_mismatched_io_is_one_sentence(
    tmp_path: Path, change: dict[str, TensorInfo], message: str
) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG)
    plan = tmp_path / "model.sm90.trt10.3.0.plan"
    with pytest.raises(ModelLoadError) as info:
        check_io(config, _classifier_io(**change), plan, "the TensorRT plan")
    assert str(info.value) == f"{plan}: {message}"


def test_a_fixed_batch_of_one_suits_max_batch_size_one(tmp_path: Path) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG, max_batch_size=1)
    tensors = _classifier_io(crops=TensorInfo("crops", True, "FLOAT", (1, 3, 4, 4)))
    check_io(config, tensors, tmp_path / "model.onnx", "the ONNX model")


# --- registration, availability, fallback -----------------------------------------------------


def test_tensorrt_is_the_first_backend() -> None:
    assert next(iter(BACKENDS)) == "tensorrt"
    assert BACKENDS["tensorrt"] is TensorRTBackend


def test_importing_the_backend_imports_no_runtime() -> None:
    code = (
        "import sys, engines.backends.tensorrt, engines.backends.tensorrt_plan\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorrt', 'cuda'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_find_artifact(tmp_path: Path) -> None:
    version_dir = tmp_path / "1"
    assert TensorRTBackend.find_artifact(version_dir) is None
    version_dir.mkdir()
    assert TensorRTBackend.find_artifact(version_dir) is None
    (version_dir / "card.json").write_text("{}")
    assert TensorRTBackend.find_artifact(version_dir) is None
    (version_dir / "model.onnx").write_bytes(b"onnx")
    assert TensorRTBackend.find_artifact(version_dir) == version_dir / "model.onnx"
    (version_dir / "model.sm90.trt10.3.0.plan").write_bytes(b"plan")
    (version_dir / "model.sm86.trt10.3.0.plan").write_bytes(b"plan")
    assert TensorRTBackend.find_artifact(version_dir) == version_dir / "model.sm86.trt10.3.0.plan"


def test_unavailable_on_the_cpu() -> None:
    assert (
        TensorRTBackend.unavailable_reason(Device("cpu"))
        == "TensorRT needs a GPU and the device is cpu"
    )


@pytest.mark.usefixtures("without_tensorrt")
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:1"])
def test_unavailable_without_the_tensorrt_package(device: str) -> None:
    assert TensorRTBackend.unavailable_reason(Device.parse(device)) == NOT_INSTALLED


def test_unavailable_with_another_tensorrt_major(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch, "11.4.0")
    assert TensorRTBackend.unavailable_reason(Device("cuda")) == (
        "TensorRT 11.4.0 is installed but papscan's tensorrt backend is written for TensorRT 10"
    )


def test_unavailable_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch, "10.3.0")
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    assert TensorRTBackend.unavailable_reason(Device("auto")) == (
        "the cuda-python package is not installed (pip install 'papscan[tensorrt]')"
    )


def test_unavailable_without_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = pytest.importorskip("cuda.bindings.runtime")
    code, count = cudart.cudaGetDeviceCount()
    if int(code) == 0 and count > 0:
        pytest.skip("this machine has a CUDA device")
    _fake_tensorrt(monkeypatch, "10.3.0")
    reason = TensorRTBackend.unavailable_reason(Device("cuda"))
    assert reason is not None
    assert reason.startswith(("no CUDA device is usable (cudaError", "no CUDA device is visible"))


@pytest.mark.usefixtures("without_tensorrt")
def test_load_without_the_runtime_raises(tmp_path: Path) -> None:
    config = _config(tmp_path, CLASSIFIER_CONFIG)
    version_dir = tmp_path / "tiny_classifier" / "1"
    build_classifier_onnx(version_dir / "model.onnx")
    backend = TensorRTBackend(config)
    with pytest.raises(BackendUnavailableError) as info:
        backend.load(version_dir, Device("cuda"))
    assert str(info.value) == f"the tensorrt backend cannot run: {NOT_INSTALLED}"
    with pytest.raises(BackendUnavailableError, match="cannot run on the cpu"):
        backend.load(version_dir, Device("cpu"))


def test_an_unloaded_backend_describes_itself_and_refuses_to_infer(tmp_path: Path) -> None:
    backend = TensorRTBackend(_config(tmp_path, CLASSIFIER_CONFIG))
    described = backend.describe()
    assert described["backend"] == "tensorrt"
    assert described["plan"] is None
    assert described["precision"] == "FP16"
    with pytest.raises(ModelLoadError, match="the tensorrt backend is not loaded"):
        backend.infer({"crops": np.zeros((1, 3, 4, 4), np.float32)})
    backend.close()


@pytest.mark.usefixtures("without_tensorrt")
def test_repository_falls_back_to_onnxruntime_and_says_why(make_repo: Any) -> None:
    repo = make_repo(classifier_overrides={"backend": ["tensorrt", "onnxruntime"]})
    with ModelRepository(repo).load("tiny_classifier") as model:
        assert model.backend_name == "onnxruntime"
        assert model.selection == (f"first available for auto; skipped tensorrt: {NOT_INSTALLED}")
        outputs = model.infer({"crops": np.zeros((2, 3, 4, 4), np.float32)})
        assert outputs["probs"].shape == (2, 3)
    with ModelRepository(repo).load("tiny_classifier", device="cpu") as model:
        assert model.backend_name == "onnxruntime"
        assert model.selection.endswith(
            "skipped tensorrt: TensorRT needs a GPU and the device is cpu"
        )


@pytest.mark.usefixtures("without_tensorrt")
def test_repository_with_only_tensorrt_cannot_run_here(make_repo: Any) -> None:
    repo = make_repo(classifier_overrides={"backend": ["tensorrt"]})
    with pytest.raises(BackendUnavailableError) as info:
        ModelRepository(repo).load("tiny_classifier")
    assert str(info.value) == (
        f"model 'tiny_classifier' version 1 cannot run on auto here (tensorrt: {NOT_INSTALLED})"
    )


# --- with TensorRT and a GPU ------------------------------------------------------------------


@pytest.fixture
def trt_gpu() -> None:
    """Skips unless TensorRT 10, cuda-python and a CUDA device are all here."""
    reason = TensorRTBackend.unavailable_reason(Device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _version_dir(
    tmp_path: Path, base: dict[str, Any] = CLASSIFIER_CONFIG, **overrides: Any
) -> tuple[ModelConfig, Path]:
    """A model folder with config.yaml and version 1's model.onnx; (config, version folder)."""
    config = _config(tmp_path, base, **overrides)
    version_dir = tmp_path / config.name / "1"
    if config.name == ROI_CONFIG["name"]:
        build_roi_onnx(version_dir / "model.onnx")
    else:
        build_classifier_onnx(version_dir / "model.onnx")
    return config, version_dir


def _loaded(config: ModelConfig, version_dir: Path, **kwargs: Any) -> TensorRTBackend:
    backend = TensorRTBackend(config, **kwargs)
    backend.load(version_dir, Device("cuda"))
    backend.warmup()
    return backend


def _reference(config: ModelConfig, version_dir: Path, feed: dict[str, Any]) -> dict[str, Any]:
    ort = OnnxRuntimeBackend(config)
    ort.load(version_dir, Device("cpu"))
    try:
        return ort.infer(feed)
    finally:
        ort.close()


def _crops(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, 4, 4)).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
@pytest.mark.parametrize(("precision", "atol"), [("FP32", 1e-3), ("FP16", 1e-2)])
def test_built_plan_agrees_with_onnxruntime(tmp_path: Path, precision: str, atol: float) -> None:
    config, version_dir = _version_dir(tmp_path, precision=precision)
    backend = _loaded(config, version_dir)
    described = backend.describe()
    assert described["plan_built_now"] is True
    plan = Path(described["plan"])
    assert plan == version_dir / plan_filename(described["gpu_arch"], described["runtime_version"])
    assert plan.is_file()
    assert read_build_record(plan)["precision"] == precision  # type: ignore[index]
    for batch in (1, 5, 8):
        feed = {"crops": _crops(batch, seed=batch)}
        got, want = backend.infer(feed), _reference(config, version_dir, feed)
        assert set(got) == {"probs", "features"}
        for name in want:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol)
    backend.close()
    again = _loaded(config, version_dir)
    assert again.describe()["plan_built_now"] is False
    assert again.describe()["plan"] == str(plan)
    again.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_dynamic_cells_agree_with_onnxruntime(tmp_path: Path) -> None:
    config, version_dir = _version_dir(tmp_path, ROI_CONFIG, precision="FP32")
    backend = _loaded(config, version_dir)
    rng = np.random.default_rng(3)
    for batch, cells in ((1, 3), (4, 17), (2, DYNAMIC_DIM_MAX)):
        mask = (rng.random((batch, cells)) > 0.2).astype(np.float32)
        mask[:, 0] = 1.0
        feed = {
            "cell_features": rng.random((batch, cells, 8)).astype(np.float32),
            "cell_mask": mask,
        }
        got, want = backend.infer(feed), _reference(config, version_dir, feed)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-3)
    too_many = DYNAMIC_DIM_MAX + 1
    with pytest.raises(ModelInputError, match="outside the TensorRT plan's range"):
        backend.infer(
            {
                "cell_features": np.zeros((1, too_many, 8), np.float32),
                "cell_mask": np.ones((1, too_many), np.float32),
            }
        )
    backend.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_a_stale_plan_is_rebuilt(tmp_path: Path) -> None:
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    _loaded(config, version_dir).close()
    fp16 = _config(tmp_path, CLASSIFIER_CONFIG, precision="FP16")
    backend = _loaded(fp16, version_dir)
    assert backend.describe()["plan_built_now"] is True
    assert read_build_record(Path(backend.describe()["plan"]))["precision"] == "FP16"  # type: ignore[index]
    backend.close()
    build_classifier_onnx(version_dir / "model.onnx", seed=7)
    backend = _loaded(fp16, version_dir)
    assert backend.describe()["plan_built_now"] is True
    feed = {"crops": _crops(3)}
    np.testing.assert_allclose(
        backend.infer(feed)["probs"],
        _reference(fp16, version_dir, feed)["probs"],
        rtol=0,
        atol=1e-2,
    )
    backend.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_a_prebuilt_plan_runs_without_onnx_but_not_for_another_precision(tmp_path: Path) -> None:
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    _loaded(config, version_dir).close()
    (version_dir / "model.onnx").unlink()
    backend = _loaded(config, version_dir)
    assert backend.describe()["plan_built_now"] is False
    backend.close()
    fp16 = _config(tmp_path, CLASSIFIER_CONFIG, precision="FP16")
    with pytest.raises(ModelLoadError, match="built for FP32 but the config asks for FP16"):
        TensorRTBackend(fp16).load(version_dir, Device("cuda"))


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_a_read_only_version_folder_caches_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    monkeypatch.setattr(trt_backend, "is_writable", lambda folder: folder != version_dir)
    cache_root = tmp_path / "cache"
    backend = _loaded(config, version_dir, cache_root=cache_root)
    plan = Path(backend.describe()["plan"])
    assert plan.parent == plan_cache_dir(version_dir, cache_root)
    assert plan.is_file() and build_record_path(plan).is_file()
    assert not list(version_dir.glob("*.plan"))
    backend.close()
    again = _loaded(config, version_dir, cache_root=cache_root)
    assert again.describe()["plan_built_now"] is False
    again.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_onnx_disagreeing_with_the_config_is_a_load_error(tmp_path: Path) -> None:
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    build_classifier_onnx(version_dir / "model.onnx", input_name="images")
    with pytest.raises(ModelLoadError) as info:
        TensorRTBackend(config).load(version_dir, Device("cuda"))
    assert str(info.value) == (
        f"{version_dir / 'model.onnx'}: the inputs ['images'] of the ONNX model do not match "
        "the config's inputs ['crops']"
    )


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_device_arrays_are_used_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    backend = _loaded(config, version_dir)
    crops = _crops(6)
    want = _reference(config, version_dir, {"crops": crops})

    def no_copy(*args: Any) -> None:
        raise AssertionError("a device array was copied from the host")

    monkeypatch.setattr(trt_backend, "_copy_host_to_device", no_copy)
    on_gpu = torch.from_numpy(crops).cuda()
    got = backend.infer({"crops": on_gpu})
    assert isinstance(got["probs"], np.ndarray)
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=0, atol=1e-3)
    strided = on_gpu.transpose(2, 3)
    assert not strided.is_contiguous()
    with pytest.raises(ModelInputError, match="must be a C-contiguous float32 device array"):
        backend.infer({"crops": strided})
    backend.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("trt_gpu")
def test_concurrent_threads_each_get_a_context(tmp_path: Path) -> None:
    config, version_dir = _version_dir(tmp_path, precision="FP32", instance_count=4)
    backend = _loaded(config, version_dir)
    feeds = [{"crops": _crops(1 + i % 8, seed=i)} for i in range(32)]
    wants = [_reference(config, version_dir, feed)["probs"] for feed in feeds]
    threads: set[int] = set()

    def run(i: int) -> np.ndarray:
        threads.add(threading.get_ident())
        return backend.infer(feeds[i])["probs"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        gots = list(pool.map(run, range(len(feeds))))
    for got, want in zip(gots, wants, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    # warmup ran on this thread; each pool thread made its own context.
    assert backend.describe()["execution_contexts"] == len(threads | {threading.get_ident()})
    backend.close()
    assert backend.describe()["execution_contexts"] == 0


# --- the backend's control flow on a fake TensorRT and CUDA (runs everywhere) -----------------


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, FakeCudart]:
    """(fake tensorrt module, fake cudart) installed where the backend imports them."""
    cudart = FakeCudart()
    return install(monkeypatch, cudart), cudart


class _DeviceArray:
    """A C-contiguous array in the fake's device memory, seen through the CUDA array
    interface (as a DALI TensorGPU or a PyTorch CUDA tensor would be)."""

    def __init__(self, cudart: FakeCudart, host: np.ndarray, **interface: Any) -> None:
        self.pointer = cudart.cudaMalloc(host.nbytes)[1]
        cudart.write(self.pointer, host.tobytes())
        self.__cuda_array_interface__ = {
            "shape": host.shape,
            "typestr": host.dtype.str,
            "data": (self.pointer, False),
            "version": 3,
            **interface,
        }


def test_fake_build_caches_the_plan_and_agrees_with_onnxruntime(
    tmp_path: Path, fake: tuple[Any, FakeCudart]
) -> None:
    trt, cudart = fake
    config, version_dir = _version_dir(tmp_path)
    backend = _loaded(config, version_dir)
    plan = version_dir / "model.sm90.trt10.3.0.plan"
    assert backend.describe()["plan"] == str(plan)
    assert backend.describe()["plan_built_now"] is True
    assert backend.describe()["gpu_arch"] == "sm90"
    assert backend.describe()["device"] == "cuda:0"
    assert trt.builds == [["FP16"]]
    key = read_build_record(plan)
    assert key is not None and key["precision"] == "FP16" and key["gpu_arch"] == "sm90"
    assert key["onnx_sha256"] == file_sha256(version_dir / "model.onnx")
    mallocs = cudart.mallocs  # warm-up ran batches 1 and 8: the buffers are full size
    for batch in (5, 1, 8):
        feed = {"crops": _crops(batch, seed=batch)}
        got, want = backend.infer(feed), _reference(config, version_dir, feed)
        for name in ("probs", "features"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
    assert cudart.mallocs == mallocs
    backend.close()
    assert cudart.memory == {} and cudart.streams == set()
    again = _loaded(config, version_dir)
    assert again.describe()["plan_built_now"] is False
    assert trt.builds == [["FP16"]]
    again.close()


def test_fake_stale_plans_are_rebuilt(tmp_path: Path, fake: tuple[Any, FakeCudart]) -> None:
    trt, _ = fake
    config, version_dir = _version_dir(tmp_path)
    _loaded(config, version_dir).close()
    fp32 = _config(tmp_path, CLASSIFIER_CONFIG, precision="FP32")
    _loaded(fp32, version_dir).close()
    build_classifier_onnx(version_dir / "model.onnx", seed=9)
    _loaded(fp32, version_dir).close()
    _loaded(fp32, version_dir).close()
    assert trt.builds == [["FP16"], [], []]
    plan = version_dir / "model.sm90.trt10.3.0.plan"
    plan.write_bytes(b"corrupt")  # its record still matches: it fails to load, so rebuild
    backend = _loaded(fp32, version_dir)
    assert backend.describe()["plan_built_now"] is True
    assert len(trt.builds) == 4
    backend.close()


def test_fake_int8_reads_the_calibration_cache(
    tmp_path: Path, fake: tuple[Any, FakeCudart]
) -> None:
    trt, _ = fake
    config, version_dir = _version_dir(tmp_path, precision="INT8")
    with pytest.raises(ModelLoadError, match="precision INT8 needs this TensorRT calibration"):
        TensorRTBackend(config).load(version_dir, Device("cuda"))
    (version_dir / "calibration.cache").write_bytes(b"TRT-1003-EntropyCalibration2\n")
    backend = _loaded(config, version_dir)
    assert trt.builds == [["FP16", "INT8"]]
    key = read_build_record(Path(backend.describe()["plan"]))
    assert key is not None and key["calibration_sha256"] == file_sha256(
        version_dir / "calibration.cache"
    )
    backend.close()


def test_fake_read_only_folder_caches_the_plan(
    tmp_path: Path, fake: tuple[Any, FakeCudart], monkeypatch: pytest.MonkeyPatch
) -> None:
    trt, _ = fake
    config, version_dir = _version_dir(tmp_path)
    monkeypatch.setattr(trt_backend, "is_writable", lambda folder: folder != version_dir)
    backend = _loaded(config, version_dir, cache_root=tmp_path / "cache")
    plan = Path(backend.describe()["plan"])
    assert plan == plan_cache_dir(version_dir, tmp_path / "cache") / "model.sm90.trt10.3.0.plan"
    assert read_build_record(plan) is not None
    assert not list(version_dir.glob("*.plan"))
    backend.close()
    _loaded(config, version_dir, cache_root=tmp_path / "cache").close()
    assert len(trt.builds) == 1


def test_fake_threads_get_their_own_contexts(tmp_path: Path, fake: tuple[Any, FakeCudart]) -> None:
    _, cudart = fake
    config, version_dir = _version_dir(tmp_path, precision="FP32", instance_count=3)
    backend = _loaded(config, version_dir)
    feeds = [{"crops": _crops(1 + i % 8, seed=i)} for i in range(24)]
    wants = [_reference(config, version_dir, feed)["probs"] for feed in feeds]
    barrier = threading.Barrier(3)
    threads: set[int] = set()

    def run(i: int) -> np.ndarray:
        if threading.get_ident() not in threads:
            threads.add(threading.get_ident())
            barrier.wait(timeout=10)  # every pool thread runs, so three contexts exist
        return backend.infer(feeds[i])["probs"]

    with ThreadPoolExecutor(max_workers=3) as pool:
        gots = list(pool.map(run, range(len(feeds))))
    for got, want in zip(gots, wants, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(threads) == 3
    assert backend.describe()["execution_contexts"] == 4  # and the warm-up's thread
    assert len(cudart.streams) == 4
    backend.close()
    assert backend.describe()["execution_contexts"] == 0
    assert cudart.memory == {} and cudart.streams == set()


def test_fake_device_arrays_are_used_in_place(
    tmp_path: Path, fake: tuple[Any, FakeCudart], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cudart = fake
    config, version_dir = _version_dir(tmp_path, precision="FP32")
    backend = _loaded(config, version_dir)
    crops = _crops(4)
    want = _reference(config, version_dir, {"crops": crops})

    def no_copy(*args: Any) -> None:
        raise AssertionError("a device array was copied from the host")

    monkeypatch.setattr(trt_backend, "_copy_host_to_device", no_copy)
    got = backend.infer({"crops": _DeviceArray(cudart, crops)})
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=0, atol=1e-6)
    assert cudart.waits == []
    backend.infer({"crops": _DeviceArray(cudart, crops, stream=77)})
    assert cudart.waits[0] == ("record", 77) and cudart.waits[1][0] == "wait"
    strided = _DeviceArray(cudart, crops, strides=(4, 64, 16, 4))
    with pytest.raises(ModelInputError) as info:
        backend.infer({"crops": strided})
    assert str(info.value) == (
        "tiny_classifier: input 'crops' must be a C-contiguous float32 device array, "
        "got a strided float32 one"
    )
    backend.close()


def test_fake_shapes_outside_the_profile_are_input_errors(
    tmp_path: Path, fake: tuple[Any, FakeCudart]
) -> None:
    config, version_dir = _version_dir(tmp_path, ROI_CONFIG)
    backend = _loaded(config, version_dir)
    cells = DYNAMIC_DIM_MAX + 1
    with pytest.raises(ModelInputError) as info:
        backend.infer(
            {
                "cell_features": np.zeros((1, cells, 8), np.float32),
                "cell_mask": np.ones((1, cells), np.float32),
            }
        )
    assert str(info.value) == (
        f"tiny_roi: input 'cell_features' has shape [1, {cells}, 8], outside the TensorRT "
        f"plan's range [1, 1, 8] to [4, {DYNAMIC_DIM_MAX}, 8]"
    )
    feed = {
        "cell_features": np.random.default_rng(0).random((2, 30, 8)).astype(np.float32),
        "cell_mask": np.ones((2, 30), np.float32),
    }
    got, want = backend.infer(feed), _reference(config, version_dir, feed)
    np.testing.assert_allclose(got["attention"], want["attention"], rtol=0, atol=1e-6)
    backend.close()


def test_fake_mismatched_onnx_is_a_load_error(tmp_path: Path, fake: tuple[Any, FakeCudart]) -> None:
    config, version_dir = _version_dir(tmp_path)
    build_classifier_onnx(version_dir / "model.onnx", input_name="images")
    with pytest.raises(ModelLoadError) as info:
        TensorRTBackend(config).load(version_dir, Device("cuda"))
    assert str(info.value) == (
        f"{version_dir / 'model.onnx'}: the inputs ['images'] of the ONNX model do not match "
        "the config's inputs ['crops']"
    )


def test_fake_plan_for_another_gpu_without_onnx(
    tmp_path: Path, fake: tuple[Any, FakeCudart]
) -> None:
    config, version_dir = _version_dir(tmp_path)
    (version_dir / "model.onnx").unlink()
    (version_dir / "model.sm86.trt10.3.0.plan").write_bytes(b"plan")
    with pytest.raises(ModelLoadError) as info:
        TensorRTBackend(config).load(version_dir, Device("cuda"))
    assert str(info.value) == (
        f"{version_dir / 'model.sm90.trt10.3.0.plan'}: there is no TensorRT plan for this GPU "
        "and TensorRT version (found model.sm86.trt10.3.0.plan) and no model.onnx to build one "
        "from"
    )


def test_fake_repository_prefers_tensorrt(make_repo: Any, fake: tuple[Any, FakeCudart]) -> None:
    repo = make_repo(classifier_overrides={"backend": ["tensorrt", "onnxruntime"]})
    with ModelRepository(repo).load("tiny_classifier") as model:
        assert model.backend_name == "tensorrt"
        assert model.selection == "first preference, available for auto"
        outputs = model.infer({"crops": _crops(11)})  # split into 8 + 3 by the model
        assert outputs["probs"].shape == (11, 3)


def test_fake_no_device_is_unavailable(
    tmp_path: Path, fake: tuple[Any, FakeCudart], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cudart = fake
    assert TensorRTBackend.unavailable_reason(Device("cuda")) is None
    assert TensorRTBackend.unavailable_reason(Device.parse("cuda:1")) == (
        "there is no CUDA device 1 (1 visible)"
    )
    monkeypatch.setattr(cudart, "devices", 0)
    assert TensorRTBackend.unavailable_reason(Device("auto")) == "no CUDA device is usable (100)"
