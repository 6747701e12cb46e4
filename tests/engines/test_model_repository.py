"""engines.repository: models, versions and policies, errors, backend selection."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.backends import BACKENDS, OnnxRuntimeBackend
from engines.backends.base import Device
from engines.errors import (
    BackendUnavailableError,
    ModelConfigError,
    ModelLoadError,
    ModelNotFoundError,
)
from engines.model import Model
from engines.repository import ModelRepository, default_repository_path


def test_model_names_and_load(make_repo: Any, caplog: pytest.LogCaptureFixture) -> None:
    repo = ModelRepository(make_repo(card={"sha256": "abc"}))
    (repo.path / "notes").mkdir()  # a folder without config.yaml is not a model
    (repo.path / "README.md").write_text("hello")
    assert repo.model_names() == ["tiny_classifier", "tiny_roi"]
    with caplog.at_level(logging.INFO, logger="engines.repository"):
        model = repo.load("tiny_classifier")
    try:
        assert isinstance(model, Model)
        assert model.version == 1
        assert model.version_dir == repo.path / "tiny_classifier" / "1"
        assert model.backend_name == "onnxruntime"
        assert model.card == {"sha256": "abc", "version": 1}
        assert model.config.labels == ("NILM", "LSIL", "HSIL")
        described = model.describe()
        assert described["backend"] == "onnxruntime"
        assert described["providers"] == ["CPUExecutionProvider"]
        assert described["selection"] == "first preference, available for auto"
        assert "AzureExecutionProvider" not in described["providers"]
        assert "loaded tiny_classifier@1 on onnxruntime" in caplog.text
    finally:
        model.close()


def test_card_is_optional(make_repo: Any) -> None:
    with ModelRepository(make_repo()).load("tiny_roi", warmup=False) as model:
        assert model.card == {}


def test_invalid_card_is_a_load_error(make_repo: Any) -> None:
    repo = ModelRepository(make_repo())
    card = repo.path / "tiny_roi" / "1" / "card.json"
    card.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"card\.json: the model card is not valid JSON"):
        repo.load("tiny_roi")


@pytest.mark.parametrize(
    ("policy", "served", "default"),
    [
        ({"latest": 1}, [10], 10),
        ({"latest": 2}, [3, 10], 10),
        ("all", [1, 2, 3, 10], 10),
        ({"specific": [2, 3]}, [2, 3], 3),
        ({"specific": [1, 99]}, [1], 1),
    ],
)
def test_version_policy(make_repo: Any, policy: Any, served: list[int], default: int) -> None:
    repo = ModelRepository(
        make_repo(
            classifier_versions=(1, 2, 3, 10), classifier_overrides={"version_policy": policy}
        )
    )
    assert repo.versions("tiny_classifier") == served
    with repo.load("tiny_classifier", warmup=False) as model:
        assert model.version == default
    with repo.load("tiny_classifier", version=served[0], warmup=False) as model:
        assert model.version == served[0]


def test_non_numeric_version_folders_are_ignored(make_repo: Any) -> None:
    repo = ModelRepository(
        make_repo(classifier_versions=(1, 2), classifier_overrides={"version_policy": "all"})
    )
    model_dir = repo.path / "tiny_classifier"
    for name in ("latest", "3a", "007", "0", "-4", ".ipynb_checkpoints"):
        shutil.copytree(model_dir / "2", model_dir / name)
    (model_dir / "5").write_text("a file, not a folder")
    assert repo.versions("tiny_classifier") == [1, 2]


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        ModelRepository(tmp_path / "nowhere")
    assert str(info.value) == f"the model repository {tmp_path / 'nowhere'} does not exist"


def test_missing_model_names_the_models(make_repo: Any) -> None:
    repo = ModelRepository(make_repo())
    with pytest.raises(ModelNotFoundError) as info:
        repo.load("cell_detector")
    assert str(info.value) == (
        f"the model repository {repo.path} has no model 'cell_detector' "
        "(models: tiny_classifier, tiny_roi)"
    )


def test_missing_version_names_the_versions(make_repo: Any) -> None:
    repo = ModelRepository(make_repo(classifier_versions=(1, 2)))
    with pytest.raises(ModelNotFoundError) as info:
        repo.load("tiny_classifier", version=7)
    assert str(info.value) == "model 'tiny_classifier' has no version 7 (version folders: 1, 2)"


def test_version_outside_the_policy(make_repo: Any) -> None:
    repo = ModelRepository(make_repo(classifier_versions=(1, 2)))
    with pytest.raises(ModelNotFoundError) as info:
        repo.load("tiny_classifier", version=1)
    assert str(info.value) == (
        "model 'tiny_classifier' version 1 exists but its version_policy {latest: 1} serves only 2"
    )


def test_no_served_version(make_repo: Any) -> None:
    repo = ModelRepository(
        make_repo(
            classifier_versions=(1,), classifier_overrides={"version_policy": {"specific": [4]}}
        )
    )
    with pytest.raises(ModelNotFoundError) as info:
        repo.load("tiny_classifier")
    assert str(info.value) == (
        "model 'tiny_classifier' has no version folder its version_policy "
        "{specific: [4]} serves (version folders: 1)"
    )


def test_version_without_artifact(make_repo: Any) -> None:
    repo = ModelRepository(make_repo(classifier_versions=(1,)))
    (repo.path / "tiny_classifier" / "2").mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        repo.load("tiny_classifier")
    assert str(info.value) == (
        "model 'tiny_classifier' version 2 has no artifact any of its backends loads "
        "(onnxruntime: no model.onnx)"
    )


def test_invalid_config_surfaces_on_load(make_repo: Any) -> None:
    repo = ModelRepository(make_repo(classifier_overrides={"max_batch_size": "eight"}))
    assert "tiny_classifier" in repo.model_names()
    with pytest.raises(ModelConfigError, match="max_batch_size must be a non-negative integer"):
        repo.load("tiny_classifier")


def test_cuda_device_without_cuda_provider(make_repo: Any) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    repo = ModelRepository(make_repo())
    with pytest.raises(BackendUnavailableError) as info:
        repo.load("tiny_classifier", device="cuda:0")
    assert str(info.value) == (
        "model 'tiny_classifier' version 1 cannot run on cuda:0 here "
        "(onnxruntime: this onnxruntime build has no CUDAExecutionProvider)"
    )


def test_backend_selection_skips_unavailable(
    make_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first backend in the preference list that can run wins; the reason is kept."""

    class Unavailable(OnnxRuntimeBackend):
        name = "unavailable"

        @classmethod
        def unavailable_reason(cls, device: Device) -> str | None:
            return "its runtime is not installed"

    monkeypatch.setitem(BACKENDS, "unavailable", Unavailable)
    repo = ModelRepository(
        make_repo(classifier_overrides={"backend": ["unavailable", "onnxruntime"]})
    )
    with repo.load("tiny_classifier", device="cpu") as model:
        assert model.backend_name == "onnxruntime"
        assert model.describe()["selection"] == (
            "first available for cpu; skipped unavailable: its runtime is not installed"
        )
        assert model.infer({"crops": np.zeros((2, 3, 4, 4), np.float32)})["probs"].shape == (2, 3)


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cpu:1"])
def test_unknown_device(make_repo: Any, text: str) -> None:
    repo = ModelRepository(make_repo())
    with pytest.raises(BackendUnavailableError, match="is not one of auto, cpu, cuda or cuda:N"):
        repo.load("tiny_classifier", device=text)


def test_default_repository_path_is_inside_the_package() -> None:
    import engines

    assert default_repository_path() == Path(engines.__file__).resolve().parent / "repository"
