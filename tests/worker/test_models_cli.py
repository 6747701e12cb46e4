"""`papscan models …` as a user runs it, on the shipped repository and broken copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engines.repository import default_repository_path
from tests.worker.test_cli import papscan


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(default_repository_path(), tmp_path / "repo"))


def test_list_shows_every_model() -> None:
    result = papscan("models", "list", str(default_repository_path()))
    assert result.returncode == 0, result.stderr
    for name in ("cell_detector", "cell_classifier", "roi_classifier"):
        assert name in result.stdout


def test_verify_passes_on_the_shipped_repository() -> None:
    result = papscan("models", "verify")
    assert result.returncode == 0, result.stderr
    assert "3 model version(s) verified" in result.stdout
    assert "verified; the scan models fit together" in result.stdout
    assert "reference" in result.stdout


def test_verify_refuses_models_that_do_not_fit_together(repo_copy: Path) -> None:
    config = repo_copy / "cell_classifier" / "config.yaml"
    config.write_text(config.read_text().replace("mpp: 0.5", "mpp: 0.25"))
    result = papscan("models", "verify", str(repo_copy))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"papscan: model repository {repo_copy}: cell_detector and cell_classifier expect "
        "different resolutions: cell_detector 0.5 µm/px, cell_classifier 0.25 µm/px (the cell "
        "crops are cut from the detector's ROI images, so both must be equal)"
    ]


def test_verify_fails_when_an_artifact_does_not_match_its_card(repo_copy: Path) -> None:
    card_path = repo_copy / "roi_classifier" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["artifact"]["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    result = papscan("models", "verify", str(repo_copy), "--model", "roi_classifier")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "papscan: verification failed for roi_classifier@1"
    ]
    assert "differs" in result.stdout  # the detail column wraps the sentence


def test_describe_json_names_the_backend_and_why(repo_copy: Path) -> None:
    result = papscan("models", "describe", "cell_classifier", str(repo_copy), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model"] == "cell_classifier" and info["version"] == 1
    assert info["runtime"]["backend"] == "onnxruntime"
    assert "available for" in info["runtime"]["selection"]
    assert info["config"]["max_batch_size"] == 256
    assert "model.onnx" in info["artifacts"]


def test_describe_an_unknown_model_is_one_sentence() -> None:
    result = papscan("models", "describe", "nucleus_segmenter")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no model 'nucleus_segmenter'" in lines[0]


def test_an_invalid_config_is_one_sentence_naming_the_field(repo_copy: Path) -> None:
    config = repo_copy / "cell_classifier" / "config.yaml"
    text = config.read_text()
    assert "instance_count: 1\n" in text
    config.write_text(text.replace("instance_count: 1\n", "instance_count: 0\n"))
    result = papscan("models", "list", str(repo_copy))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"papscan: {config}: instance_count must be a positive integer, got 0"
    )


def test_warmup_and_bench_run_the_models(repo_copy: Path) -> None:
    warm = papscan("models", "warmup", str(repo_copy), "-m", "roi_classifier")
    assert warm.returncode == 0, warm.stderr
    assert "roi_classifier@1: ready on onnxruntime" in warm.stdout
    bench = papscan(
        "models",
        "bench",
        str(repo_copy),
        "-m",
        "roi_classifier",
        "--batch-sizes",
        "1,4",
        "--seconds",
        "0.2",
    )
    assert bench.returncode == 0, bench.stderr
    assert bench.stdout.count("roi_classifier@1") == 2
    bad = papscan("models", "bench", str(repo_copy), "--batch-sizes", "1,x")
    assert bad.returncode == 1
    assert "--batch-sizes must be comma-separated integers" in bad.stderr
