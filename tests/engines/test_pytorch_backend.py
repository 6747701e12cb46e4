"""engines.backends.pytorch: tiny exported programs, load-time checks, and every shipped
model against ONNX Runtime."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engines.backends import BACKENDS, OnnxRuntimeBackend, PyTorchBackend
from engines.backends.base import Device, example_feed
from engines.config import load_config
from engines.errors import BackendUnavailableError, ModelLoadError
from engines.repository import ModelRepository, default_repository_path
from tests.engines.conftest import CLASSIFIER_CONFIG, ROI_CONFIG, write_config

CPU = Device.parse("cpu")


class TinyClassifier(nn.Module):
    """crops (N,3,4,4) -> (probs (N,3), features (N,8)), as the tiny ONNX classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(48, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.embed(crops.flatten(1)))
        return torch.softmax(self.head(features), dim=1), features


class TinyRoi(nn.Module):
    """(cell_features (N,M,8), cell_mask (N,M)) -> (roi_probs (N,3), attention (N,M))."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(8, 1)
        self.head = nn.Linear(8, 3)

    def forward(
        self, cell_features: torch.Tensor, cell_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(cell_features).squeeze(-1) + (cell_mask - 1.0) * 1e9
        attention = torch.softmax(scores, dim=1) * cell_mask
        pooled = (attention.unsqueeze(-1) * cell_features).sum(dim=1)
        return torch.softmax(self.head(pooled), dim=1), attention


class WrongName(TinyClassifier):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(images)


class OneOutput(TinyClassifier):
    def forward(self, crops: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(crops)[0]


def _export(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    dynamic: dict[str, dict[int, Any]] | None,
) -> Path:
    program = torch.export.export(module.eval(), (), inputs, dynamic_shapes=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _classifier_repo(tmp_path: Path, module: nn.Module | None = None, **overrides: Any) -> Path:
    torch.manual_seed(0)
    module = module if module is not None else TinyClassifier()
    config = {**copy.deepcopy(CLASSIFIER_CONFIG), "backend": ["pytorch"], **overrides}
    write_config(tmp_path / "repo" / "tiny_classifier", config)
    batch = torch.export.Dim("batch", min=1, max=config["max_batch_size"])
    name = next(iter(_forward_names(module)))
    _export(
        module,
        {name: torch.rand(2, 3, 4, 4)},
        tmp_path / "repo" / "tiny_classifier" / "1" / "model.pt2",
        {name: {0: batch}},
    )
    return tmp_path / "repo"


def _forward_names(module: nn.Module) -> list[str]:
    code = type(module).forward.__code__
    return list(code.co_varnames[1 : code.co_argcount])


def _roi_repo(tmp_path: Path) -> tuple[Path, TinyRoi]:
    torch.manual_seed(1)
    module = TinyRoi().eval()
    config = {**copy.deepcopy(ROI_CONFIG), "backend": ["pytorch"]}
    write_config(tmp_path / "repo" / "tiny_roi", config)
    batch = torch.export.Dim("batch", min=1, max=config["max_batch_size"])
    cells = torch.export.Dim("cells", min=0)
    _export(
        module,
        {"cell_features": torch.rand(2, 5, 8), "cell_mask": torch.ones(2, 5)},
        tmp_path / "repo" / "tiny_roi" / "1" / "model.pt2",
        {"cell_features": {0: batch, 1: cells}, "cell_mask": {0: batch, 1: cells}},
    )
    return tmp_path / "repo", module


def _backend(repo: Path, name: str = "tiny_classifier", **kwargs: Any) -> PyTorchBackend:
    return PyTorchBackend(load_config(repo / name / "config.yaml"), **kwargs)


def test_registered_last() -> None:
    assert list(BACKENDS)[-1] == "pytorch" and BACKENDS["pytorch"] is PyTorchBackend


def test_loads_infers_and_matches_eager_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyClassifier().eval()
    repo = _classifier_repo(tmp_path, module=module)
    crops = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    with ModelRepository(repo).load("tiny_classifier", device="cpu") as model:
        assert model.backend_name == "pytorch"
        described = model.describe()
        assert described["device"] == "cpu" and described["mode"] == "eager"
        assert described["runtime_version"] == torch.__version__
        assert described["artifact"].endswith("model.pt2")
        out = model.infer({"crops": crops})
    with torch.no_grad():
        probs, features = module(torch.from_numpy(crops))
    assert out["probs"].dtype == np.float32 and out["probs"].shape == (5, 3)
    np.testing.assert_allclose(out["probs"], probs.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["features"], features.numpy(), atol=1e-6)


def test_dynamic_batch_and_dynamic_cell_axis(tmp_path: Path) -> None:
    repo, module = _roi_repo(tmp_path)
    backend = _backend(repo, "tiny_roi")
    backend.load(repo / "tiny_roi" / "1", CPU)
    backend.warmup()
    rng = np.random.default_rng(2)
    for batch, cells in [(1, 0), (1, 1), (3, 2), (4, 9), (2, 0)]:
        features = rng.random((batch, cells, 8), dtype=np.float32)
        mask = (rng.random((batch, cells)) < 0.7).astype(np.float32)
        out = backend.infer({"cell_features": features, "cell_mask": mask})
        with torch.no_grad():
            probs, attention = module(torch.from_numpy(features), torch.from_numpy(mask))
        assert out["roi_probs"].shape == (batch, 3) and out["attention"].shape == (batch, cells)
        np.testing.assert_allclose(out["roi_probs"], probs.numpy(), atol=1e-6)
        np.testing.assert_allclose(out["attention"], attention.numpy(), atol=1e-6)
    backend.close()


def test_host_inputs_are_shared_not_copied(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path)
    backend = _backend(repo)
    backend.load(repo / "tiny_classifier" / "1", CPU)
    crops = np.zeros((2, 3, 4, 4), np.float32)
    assert backend._tensor(crops).data_ptr() == crops.ctypes.data


def test_concurrent_inference_matches_serial(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path)
    backend = _backend(repo)
    backend.load(repo / "tiny_classifier" / "1", CPU)
    feeds = [np.random.default_rng(i).random((i % 8 + 1, 3, 4, 4), np.float32) for i in range(32)]
    serial = [backend.infer({"crops": feed})["probs"] for feed in feeds]
    results: dict[int, np.ndarray] = {}

    def work(start: int) -> None:
        for i in range(start, len(feeds), 4):
            results[i] = backend.infer({"crops": feeds[i]})["probs"]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, expected in enumerate(serial):
        np.testing.assert_array_equal(results[i], expected)


def test_missing_artifact_is_a_load_error(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path)
    version_dir = repo / "tiny_classifier" / "9"
    with pytest.raises(ModelLoadError) as info:
        _backend(repo).load(version_dir, CPU)
    assert str(info.value) == (
        f"{version_dir / 'model.pt2'}: the exported PyTorch program does not exist"
    )
    assert PyTorchBackend.find_artifact(version_dir) is None


def test_mismatched_input_names(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path, module=WrongName())
    artifact = repo / "tiny_classifier" / "1" / "model.pt2"
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier", device="cpu")
    assert str(info.value) == (
        f"{artifact}: the inputs ['images'] of the exported program do not match "
        "the config's inputs ['crops']"
    )


def test_too_few_outputs(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path, module=OneOutput())
    with pytest.raises(ModelLoadError, match=r"returns 1 tensor\(s\) but the config lists 2"):
        _backend(repo).load(repo / "tiny_classifier" / "1", CPU)


def test_fixed_batch_is_a_load_error(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path)
    _export(
        TinyClassifier(),
        {"crops": torch.rand(2, 3, 4, 4)},
        repo / "tiny_classifier" / "1" / "model.pt2",
        None,
    )
    with pytest.raises(
        ModelLoadError, match="has a fixed batch dimension 2 but max_batch_size is 8"
    ):
        _backend(repo).load(repo / "tiny_classifier" / "1", CPU)


def test_batch_range_below_max_batch_size_is_a_load_error(tmp_path: Path) -> None:
    repo = _classifier_repo(tmp_path, max_batch_size=4)
    write_config(
        repo / "tiny_classifier", {**copy.deepcopy(CLASSIFIER_CONFIG), "backend": ["pytorch"]}
    )
    with pytest.raises(ModelLoadError, match="accepts batch sizes 1 to 4 .* max_batch_size is 8"):
        _backend(repo).load(repo / "tiny_classifier" / "1", CPU)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an exported program", b"PK\x03\x04truncated zip" * 10, "torch.save"],
    ids=["empty", "text", "truncated zip", "a state dict"],
)
def test_corrupt_file_is_a_load_error(tmp_path: Path, content: bytes | str) -> None:
    repo = _classifier_repo(tmp_path)
    artifact = repo / "tiny_classifier" / "1" / "model.pt2"
    if content == "torch.save":
        torch.save({"weight": torch.zeros(3)}, artifact)
    else:
        artifact.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("tiny_classifier", device="cpu")
    message = str(info.value)
    assert message.startswith(f"{artifact}: PyTorch cannot load the exported program (")
    assert "\n" not in message


def test_compile_setting_must_be_0_or_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _classifier_repo(tmp_path)
    monkeypatch.setenv("PAPSCAN_TORCH_COMPILE", "yes")
    with pytest.raises(BackendUnavailableError, match="PAPSCAN_TORCH_COMPILE must be 1"):
        _backend(repo).load(repo / "tiny_classifier" / "1", CPU)


@pytest.mark.slow
def test_compiled_program_matches_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _classifier_repo(tmp_path)
    monkeypatch.setenv("PAPSCAN_TORCH_COMPILE", "1")
    crops = np.random.default_rng(3).random((6, 3, 4, 4), dtype=np.float32)
    eager = _backend(repo, compiled=False)
    eager.load(repo / "tiny_classifier" / "1", CPU)
    with ModelRepository(repo).load("tiny_classifier", device="cpu") as model:
        assert model.describe()["mode"] == "compiled (torch.compile)"
        out = model.infer({"crops": crops})
    np.testing.assert_allclose(out["probs"], eager.infer({"crops": crops})["probs"], atol=1e-5)


def test_cuda_without_cuda_is_unavailable(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert PyTorchBackend.unavailable_reason(Device.parse("cuda")) == "torch sees no CUDA device"
    assert PyTorchBackend.unavailable_reason(Device.parse("auto")) is None
    repo = _classifier_repo(tmp_path)
    with pytest.raises(BackendUnavailableError, match="torch sees no CUDA device 0"):
        _backend(repo).load(repo / "tiny_classifier" / "1", Device.parse("cuda"))


@pytest.mark.gpu
def test_cuda_runs_device_arrays_in_place(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    repo = _classifier_repo(tmp_path)
    backend = _backend(repo)
    backend.load(repo / "tiny_classifier" / "1", Device.parse("cuda"))
    backend.warmup()
    assert backend.describe()["device"] == "cuda:0"
    crops = torch.rand(5, 3, 4, 4, device="cuda")
    assert backend._tensor(crops).data_ptr() == crops.data_ptr()
    on_gpu = backend.infer({"crops": crops})
    on_host = backend.infer({"crops": crops.cpu().numpy()})
    assert isinstance(on_gpu["probs"], np.ndarray)
    np.testing.assert_allclose(on_gpu["probs"], on_host["probs"], atol=1e-6)
    backend.close()


# --- every shipped model: ONNX Runtime and PyTorch agree ------------------------------------


def _shipped_models() -> list[str]:
    path = default_repository_path()
    return ModelRepository(path).model_names() if path.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("name", _shipped_models())
def test_shipped_model_onnxruntime_and_pytorch_agree(name: str) -> None:
    repo = ModelRepository(default_repository_path())
    config = repo.config(name)
    version_dir = repo.path / name / str(repo.versions(name)[-1])
    assert PyTorchBackend.find_artifact(version_dir) is not None, f"{name} ships no model.pt2"
    backends = []
    for backend_cls in (OnnxRuntimeBackend, PyTorchBackend):
        backend = backend_cls(config)
        backend.load(version_dir, CPU)
        backends.append(backend)
    ort_backend, torch_backend = backends
    for batch in (1, 3):
        feed = example_feed(config, batch, "random")
        expected = ort_backend.infer(feed)
        got = torch_backend.infer(feed)
        for spec in config.outputs:
            assert got[spec.name].shape == expected[spec.name].shape
            diff = float(np.abs(got[spec.name] - expected[spec.name]).max())
            assert diff <= 1e-3, f"{name}: {spec.name} differs by {diff:.2e} at batch {batch}"
    for backend in backends:
        backend.close()
