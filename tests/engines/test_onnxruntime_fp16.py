"""engines.backends.onnxruntime: which ONNX file runs — `model.fp16.onnx` only for an FP16
config on the CUDA provider, `model.onnx` everywhere else.

The CUDA provider is faked where the machine has none: ONNX Runtime lists it, and sessions
run on the CPU while reporting the providers a CUDA session would (or a CPU-only list, for
a CUDA provider that fails to start).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.transformers.float16 import convert_float_to_float16

from engines.backends import OnnxRuntimeBackend
from engines.backends.base import Device
from engines.backends.onnxruntime import CPU_PROVIDER, CUDA_PROVIDER, FP16_ARTIFACT_NAME
from engines.config import load_config
from engines.errors import BackendUnavailableError
from engines.repository import ModelRepository
from tests.engines.conftest import CLASSIFIER_CONFIG, build_classifier_onnx, write_config

_REAL_SESSION = ort.InferenceSession


def _version_dir(tmp_path: Path, precision: str, with_fp16: bool = True) -> tuple[Any, Path]:
    """A tiny classifier version folder with `model.onnx` (and its FP16 twin)."""
    raw = {**copy.deepcopy(CLASSIFIER_CONFIG), "precision": precision}
    config = load_config(write_config(tmp_path / raw["name"], raw))
    version_dir = tmp_path / raw["name"] / "1"
    onnx_path = build_classifier_onnx(version_dir / "model.onnx")
    if with_fp16:
        _write_fp16(onnx_path)
    return config, version_dir


def _write_fp16(onnx_path: Path) -> None:
    """Writes the FP16 twin of `onnx_path` beside it (FP32 inputs and outputs)."""
    fp16 = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(fp16, str(onnx_path.parent / FP16_ARTIFACT_NAME))


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, starts: bool = True) -> list[str]:
    """Makes ONNX Runtime offer CUDA; returns the names of the files sessions open."""
    opened: list[str] = []

    class Session:
        def __init__(self, path: str, sess_options: Any = None, providers: Any = None) -> None:
            opened.append(Path(path).name)
            self._session = _REAL_SESSION(path, sess_options, providers=[CPU_PROVIDER])
            names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
            self._providers = [CUDA_PROVIDER, CPU_PROVIDER] if starts else [CPU_PROVIDER]
            if CUDA_PROVIDER not in names:
                self._providers = [CPU_PROVIDER]

        def get_providers(self) -> list[str]:
            return self._providers

        def __getattr__(self, name: str) -> Any:
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    return opened


def _loaded(config: Any, version_dir: Path, device: str) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(config)
    backend.load(version_dir, Device.parse(device))
    return backend


def _crops(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).normal(size=(batch, 3, 4, 4)).astype(np.float32)


def test_fp16_runs_its_own_file_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config, version_dir = _version_dir(tmp_path, "FP16")
    reference = _loaded(config, version_dir, "cpu").infer({"crops": _crops(5)})
    opened = _fake_cuda(monkeypatch)
    caplog.set_level("INFO", logger="engines.backends.onnxruntime")
    backend = _loaded(config, version_dir, "auto")
    assert opened == [FP16_ARTIFACT_NAME]
    described = backend.describe()
    assert described["artifact"] == str(version_dir / FP16_ARTIFACT_NAME)
    assert described["artifact_reason"] == f"precision FP16 on {CUDA_PROVIDER}"
    assert f"runs {FP16_ARTIFACT_NAME} (precision FP16 on {CUDA_PROVIDER})" in caplog.text
    got = backend.infer({"crops": _crops(5)})
    for name in ("probs", "features"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=5e-3)
    backend.close()


@pytest.mark.parametrize(
    ("precision", "with_fp16", "device", "reason"),
    [
        ("FP16", True, "cpu", "precision FP16, but FP16 runs only on CUDA"),
        ("FP32", True, "auto", "precision FP32"),
        ("INT8", True, "auto", "precision INT8"),
        ("FP16", False, "auto", f"precision FP16, but no {FP16_ARTIFACT_NAME}"),
    ],
)
def test_model_onnx_runs_everywhere_else(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    with_fp16: bool,
    device: str,
    reason: str,
) -> None:
    config, version_dir = _version_dir(tmp_path, precision, with_fp16)
    opened = _fake_cuda(monkeypatch)
    backend = _loaded(config, version_dir, device)
    assert opened == ["model.onnx"]
    assert backend.describe()["artifact"] == str(version_dir / "model.onnx")
    assert backend.describe()["artifact_reason"] == reason
    backend.close()


def test_a_cuda_provider_that_does_not_start_falls_back_to_model_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, version_dir = _version_dir(tmp_path, "FP16")
    opened = _fake_cuda(monkeypatch, starts=False)
    backend = _loaded(config, version_dir, "auto")
    assert opened == [FP16_ARTIFACT_NAME, "model.onnx"]
    assert backend.describe()["providers"] == [CPU_PROVIDER]
    assert backend.describe()["artifact_reason"] == (
        f"{CUDA_PROVIDER} did not start, and FP16 runs only there"
    )
    assert backend.infer({"crops": _crops(2)})["probs"].shape == (2, 3)
    backend.close()
    with pytest.raises(BackendUnavailableError, match="could not start CUDAExecutionProvider"):
        _loaded(config, version_dir, "cuda")


def test_the_repository_loads_the_fp16_file_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_repo: Callable[..., Path]
) -> None:
    repo = make_repo(classifier_overrides={"precision": "FP16"})
    version_dir = repo / "tiny_classifier" / "1"
    _write_fp16(version_dir / "model.onnx")
    _fake_cuda(monkeypatch)
    with ModelRepository(repo).load("tiny_classifier", device="auto") as model:
        assert model.describe()["artifact"] == str(version_dir / FP16_ARTIFACT_NAME)
