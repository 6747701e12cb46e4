"""engines.diagnostics: backends compared on the same inputs, card hashes, timings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from engines.backends import BACKENDS
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.diagnostics import time_model, verify_repository
from engines.repository import ModelRepository


class ShiftedBackend(OnnxRuntimeBackend):
    """ONNX Runtime with every output moved by `shift`: a second backend that may disagree."""

    name: ClassVar[str] = "shifted"
    shift: ClassVar[float] = 0.0

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        return {k: v + np.float32(self.shift) for k, v in super().infer(inputs).items()}


@pytest.fixture
def two_backend_repo(make_repo: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(BACKENDS, "shifted", ShiftedBackend)
    return make_repo(classifier_overrides={"backend": ["onnxruntime", "shifted"]})


@pytest.mark.parametrize(("shift", "status"), [(1e-5, "agrees"), (1e-2, "disagrees")])
def test_backends_are_compared_within_the_tolerance(
    two_backend_repo: Path, monkeypatch: pytest.MonkeyPatch, shift: float, status: str
) -> None:
    monkeypatch.setattr(ShiftedBackend, "shift", shift)
    (check,) = verify_repository(ModelRepository(two_backend_repo), ["tiny_classifier"])
    reference, other = check.backends
    assert (reference.backend, reference.status) == ("onnxruntime", "reference")
    assert (other.backend, other.status) == ("shifted", status)
    assert other.max_abs_diff["probs"] == pytest.approx(shift, rel=1e-2)
    assert check.ok is (status == "agrees")


def test_a_backend_that_cannot_run_here_is_reported_not_failed(
    two_backend_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        ShiftedBackend, "unavailable_reason", classmethod(lambda cls, device: "needs a GPU")
    )
    (check,) = verify_repository(ModelRepository(two_backend_repo), ["tiny_classifier"])
    assert [(b.backend, b.status, b.detail) for b in check.backends] == [
        ("onnxruntime", "reference", ""),
        ("shifted", "unavailable", "needs a GPU"),
    ]
    assert check.ok


def test_a_corrupt_artifact_fails_verification(make_repo: Any) -> None:
    repo = make_repo()
    (repo / "tiny_classifier" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    (check,) = verify_repository(ModelRepository(repo), ["tiny_classifier"])
    (only,) = check.backends
    assert only.status == "failed"
    assert "ONNX Runtime cannot load the model" in only.detail
    assert not check.ok


def test_card_hashes_are_checked(make_repo: Any) -> None:
    repo = make_repo()
    version_dir = repo / "tiny_classifier" / "1"
    digest = hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()
    card = {"artifact": {"file": "model.onnx", "sha256": digest}}
    (version_dir / "card.json").write_text(json.dumps(card))
    (check,) = verify_repository(ModelRepository(repo), ["tiny_classifier"])
    assert (check.hashes, check.hash_errors, check.ok) == (["model.onnx"], [], True)
    card["artifact"]["sha256"] = "f" * 64
    (version_dir / "card.json").write_text(json.dumps(card))
    (check,) = verify_repository(ModelRepository(repo), ["tiny_classifier"])
    assert "differs from the card's ffffffffffff" in check.hash_errors[0]
    assert not check.ok


def test_time_model_reports_each_batch_size(make_repo: Any) -> None:
    with ModelRepository(make_repo()).load("tiny_classifier") as model:
        timings = time_model(model, [1, 4], seconds=0.05)
    assert [t.batch_size for t in timings] == [1, 4]
    for t in timings:
        assert t.runs >= 3 and 0 < t.p50_ms <= t.p95_ms
        assert t.items_per_s == pytest.approx(t.batch_size * 1e3 / t.mean_ms, rel=1e-6)
