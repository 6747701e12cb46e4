"""train.export.run_export: a tiny trained run folder -> a model version engines can run,
with its FP16 twin, the FP32 / FP16 comparison, and TensorRT plans through the fake of
TensorRT (`tests/engines/fake_tensorrt.py`).

The run's data set is a class-folder set written to `tmp_path`, opened by its path through
`train.data.catalog.open_image_set`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engines.backends.onnxruntime import FP16_ARTIFACT_NAME
from engines.backends.tensorrt_plan import read_build_record
from engines.config import load_config
from engines.errors import BackendUnavailableError
from engines.preprocess import normalise
from engines.repository import ModelRepository
from tests.engines.fake_tensorrt import FakeCudart, install
from train.export.configs import classifier_config
from train.export.run_export import ExportReport, export_run
from train.export.tensorrt_build import calibration_batches
from train.models import create_model

SIZE_PX = 32
CLASSES = ["NILM", "ABNORMAL"]
MEAN = [120.0, 110.0, 100.0]
STD = [60.0, 55.0, 50.0]
PER_CLASS = 18


@pytest.fixture(autouse=True)
def catalog() -> Any:
    """`train.data.catalog.open_image_set`, with one torch thread for the tests."""
    from train.data.catalog import open_image_set

    torch.set_num_threads(1)
    return open_image_set


def _write_data(root: Path) -> Path:
    """Two classes told apart by colour, with noise: a learnable tiny set."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            base = np.array([200, 80, 80] if label else [80, 80, 200], np.float32)
            pixels = base + rng.normal(0, 40, (SIZE_PX, SIZE_PX, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(root / name / f"{i:02d}.png")
    return root


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """A few optimiser steps: real weights and BatchNorm statistics, not a fresh init."""
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(25):
        optimiser.zero_grad()
        logits, _ = model(inputs)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        optimiser.step()
    model.eval()


@pytest.fixture
def run_dir(tmp_path: Path, catalog: Any) -> Path:
    """A finished run of `se_cellnet_tiny` on the class-folder set (fold 0 exported)."""
    data = _write_data(tmp_path / "data")
    images = catalog(str(data), SIZE_PX)
    order = np.random.default_rng(1).permutation(len(images))
    test, val, train = order[:10], order[10:12], order[12:]
    torch.manual_seed(0)
    model = create_model("se_cellnet_tiny", num_classes=2, embed_dim=16)
    _train(model, normalise(images.images[train], MEAN, STD), images.labels[train])
    run = tmp_path / "run"
    run.mkdir()
    info = {
        "task": "cells",
        "arch": "se_cellnet_tiny",
        "arch_kwargs": {"embed_dim": 16},
        "dataset": str(data),
        "classes": CLASSES,
        "input_px": SIZE_PX,
        "mean": MEAN,
        "std": STD,
        "protocol": {"preset": "tiny"},
        "seed": 3,
        "data_sha256": images.sha256(),
        "git_commit": "abc123",
        "command": "papscan train cells --tiny",
        "duration_s": 1.5,
        "status": "done",
    }
    (run / "run.json").write_text(json.dumps(info))
    report = {"fold": 0, "accuracy": 0.9, "weighted_f1": 0.9}
    summary = {"accuracy": {"mean": 0.9, "std": 0.0}, "weighted_f1": {"mean": 0.9, "std": 0.0}}
    (run / "metrics.json").write_text(json.dumps({"folds": [report], "summary": summary}))
    folds = [{"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}]
    (run / "splits.json").write_text(json.dumps({"folds": folds, "exported_fold": 0}))
    checkpoint = {
        "arch": "se_cellnet_tiny",
        "arch_kwargs": {"embed_dim": 16},
        "num_classes": 2,
        "state_dict": model.state_dict(),
        "fold": 0,
    }
    torch.save(checkpoint, run / "model.pt")
    return run


def _test_feed(run_dir: Path, catalog: Any) -> tuple[np.ndarray, np.ndarray]:
    run = json.loads((run_dir / "run.json").read_text())
    test = json.loads((run_dir / "splits.json").read_text())["folds"][0]["test"]
    images = catalog(run["dataset"], SIZE_PX).subset(np.asarray(test))
    return normalise(images.images, MEAN, STD), images.labels


def test_export_writes_a_version_engines_runs(run_dir: Path, tmp_path: Path, catalog: Any) -> None:
    repo = tmp_path / "repo"
    report = export_run(run_dir, repo, name="tiny_cells")
    assert isinstance(report, ExportReport)
    version_dir = repo / "tiny_cells" / "1"
    assert report.version == 1 and report.version_dir == version_dir
    assert report.onnx_vs_torch_max_abs_diff <= 1e-4
    assert report.check_source == "test images" and report.check_items == 10
    assert {p.name for p in version_dir.iterdir()} == {
        "model.onnx",
        FP16_ARTIFACT_NAME,
        "card.json",
    }

    config = load_config(repo / "tiny_cells" / "config.yaml")
    assert config.precision == "FP16" and config.labels == tuple(CLASSES)
    assert config.preprocessing is not None
    assert config.preprocessing.mean == tuple(MEAN) and config.preprocessing.std == tuple(STD)
    assert config.preprocessing.input_size == (SIZE_PX, SIZE_PX)
    assert [s.name for s in config.outputs] == ["probs", "features"]
    assert config.output("features").dims == (16,)

    fp16 = report.fp16
    assert fp16 is not None
    assert fp16.fp32_bytes == (version_dir / "model.onnx").stat().st_size
    assert fp16.fp16_bytes == (version_dir / FP16_ARTIFACT_NAME).stat().st_size
    assert 0.45 < fp16.size_ratio < 0.65
    assert fp16.items == 10 and fp16.note is None
    assert fp16.fp32_accuracy is not None and fp16.accuracy_delta is not None
    assert abs(fp16.accuracy_delta) <= 0.1 and fp16.agreement is not None
    assert fp16.max_abs_diff["probs"] < 1e-2

    card = json.loads((version_dir / "card.json").read_text())
    assert card["fp16"]["fp16_bytes"] == fp16.fp16_bytes
    assert card["fp16"]["fp32_accuracy"] == fp16.fp32_accuracy
    assert card["training"]["data_sha256"] and card["training"]["git_commit"] == "abc123"
    assert card["metrics"]["summary"]["accuracy"]["mean"] == 0.9
    assert card["metrics"]["exported_fold"]["fold"] == 0
    assert set(card["extra_artifacts"]) == {FP16_ARTIFACT_NAME}
    assert card["architecture"]["mpp_recorded_by_run"] is False
    lines = report.summary_lines()
    assert lines[0].startswith("tiny_cells@1 -> ") and "FP16" in "\n".join(lines)

    crops, labels = _test_feed(run_dir, catalog)
    model = create_model("se_cellnet_tiny", num_classes=2, embed_dim=16)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        logits, features = model.eval()(torch.from_numpy(crops))
    with ModelRepository(repo).load("tiny_cells", device="cpu") as engine:
        assert engine.describe()["artifact"] == str(version_dir / "model.onnx")
        out = engine.infer({"crops": crops})
    np.testing.assert_allclose(out["probs"], torch.softmax(logits, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(out["features"], features.numpy(), atol=1e-4)
    assert fp16.fp32_accuracy == pytest.approx(float((out["probs"].argmax(1) == labels).mean()))

    again = export_run(run_dir, repo, name="tiny_cells", fp16=False)
    assert again.version == 2 and again.fp16 is None and again.precision == "FP32"
    assert not (repo / "tiny_cells" / "2" / FP16_ARTIFACT_NAME).exists()


def test_without_the_data_set_the_card_has_sizes_only(run_dir: Path, tmp_path: Path) -> None:
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "dataset": str(tmp_path / "gone")}))
    report = export_run(run_dir, tmp_path / "repo")
    assert report.name == "cell_classifier" and report.check_source == "seeded random inputs"
    fp16 = report.fp16
    assert fp16 is not None and fp16.fp32_accuracy is None and fp16.items == 0
    assert fp16.note is not None and "cannot be opened here" in fp16.note
    card = json.loads((report.version_dir / "card.json").read_text())
    assert card["fp16"]["note"] == fp16.note and card["fp16"]["fp16_bytes"] > 0

    (run_dir / "run.json").write_text(json.dumps({**run, "data_sha256": "0" * 64}))
    changed = export_run(run_dir, tmp_path / "repo")
    assert changed.version == 2 and changed.fp16 is not None
    assert "differs from the one the run trained on" in (changed.fp16.note or "")


def test_bad_arguments_and_incomplete_runs(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensorrt must be one of fp16, int8"):
        export_run(run_dir, tmp_path / "repo", tensorrt="int4")
    with pytest.raises(ValueError, match="version must be a positive integer"):
        export_run(run_dir, tmp_path / "repo", version=0)
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "status": "running"}))
    with pytest.raises(ValueError, match="has not finished training"):
        export_run(run_dir, tmp_path / "repo")
    with pytest.raises(ValueError, match="has no run.json"):
        export_run(tmp_path, tmp_path / "repo")


def test_cli_exports_a_run_and_refuses_a_bad_one_in_one_sentence(
    run_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from worker.cli.main import app

    runner = CliRunner()
    done = runner.invoke(app, ["export", str(run_dir), "--repository", str(tmp_path / "repo")])
    assert done.exit_code == 0, done.output
    assert "cell_classifier@1" in done.output
    assert (tmp_path / "repo" / "cell_classifier" / "1" / FP16_ARTIFACT_NAME).is_file()
    bad = runner.invoke(app, ["export", str(tmp_path), "--repository", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "has no run.json" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_another_interface_under_the_same_name_is_refused(run_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    export_run(run_dir, repo, name="cells", fp16=False)
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "classes": ["A", "B"]}))
    with pytest.raises(ValueError, match="whose config differs in labels"):
        export_run(run_dir, repo, name="cells", fp16=False)
    assert not (repo / "cells" / "2").exists()


def test_without_tensorrt_one_sentence_and_nothing_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError) as error:
        export_run(run_dir, tmp_path / "repo", tensorrt="fp16")
    assert str(error.value) == (
        "TensorRT is not installed, so no TensorRT plan can be built: install TensorRT 10 "
        "from NVIDIA, then pip install 'papscan[tensorrt]'"
    )
    assert not (tmp_path / "repo").exists()


def test_int8_calibrates_on_the_training_images(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, catalog: Any
) -> None:
    cudart = FakeCudart()
    trt = install(monkeypatch, cudart)
    report = export_run(run_dir, tmp_path / "repo", name="tiny_cells", tensorrt="int8")
    version_dir = report.version_dir
    assert report.precision == "INT8"
    assert load_config(version_dir.parent / "config.yaml").precision == "INT8"
    build = report.tensorrt
    assert build is not None and build.plan == version_dir / "model.sm90.trt10.3.0.plan"
    assert trt.builds == [["FP16", "INT8"]]

    # The profile's opt batch (the largest preferred batch, 128) of normalised training
    # images of fold 0, in split order, wrapped round to fill the batch.
    run = json.loads((run_dir / "run.json").read_text())
    train = json.loads((run_dir / "splits.json").read_text())["folds"][0]["train"]
    images = catalog(run["dataset"], SIZE_PX).subset(np.asarray(train))
    expected = normalise(images.images, MEAN, STD)
    assert len(trt.calibration_batches) == 1
    fed = trt.calibration_batches[0]["crops"]
    assert fed.shape == (128, 3, SIZE_PX, SIZE_PX)
    np.testing.assert_array_equal(fed, np.resize(expected, fed.shape))
    assert build.calibration_items == len(train) and build.calibration_batches == 1
    assert cudart.memory == {}  # the calibrator's device buffers are freed

    cache = version_dir / "calibration.cache"
    assert cache.read_bytes().startswith(b"TRT-100-EntropyCalibration2\n")
    key = read_build_record(build.plan)
    assert key is not None and key["precision"] == "INT8"
    assert key["calibration_sha256"] == build.build_key["calibration_sha256"]
    assert build.max_abs_diff_vs_onnxruntime is not None
    assert max(build.max_abs_diff_vs_onnxruntime.values()) < 1e-5
    card = json.loads((version_dir / "card.json").read_text())
    assert card["tensorrt"]["plan"] == build.plan.name
    assert card["tensorrt"]["calibration"]["training_items"] == len(train)
    assert "calibrated on" in report.summary_lines()[-1]

    # A worker on the same GPU and TensorRT finds the plan fresh: no second build.
    with ModelRepository(tmp_path / "repo").load("tiny_cells", device="cuda") as engine:
        assert engine.describe()["plan_built_now"] is False
    assert len(trt.builds) == 1


def test_fp16_plan_through_the_fake(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = install(monkeypatch, FakeCudart())
    report = export_run(run_dir, tmp_path / "repo", tensorrt="fp16", fp16=False)
    assert report.precision == "FP16" and trt.builds == [["FP16"]]
    assert report.tensorrt is not None and report.tensorrt.calibration_cache is None
    assert not (report.version_dir / "calibration.cache").exists()


def test_calibration_batches_follow_the_profile(tmp_path: Path) -> None:
    from engines.config import load_config as load

    raw = classifier_config(8, 0.5, CLASSES, 4, max_batch_size=16)
    raw["dynamic_batching"]["preferred_batch_size"] = [4]
    (tmp_path / "cell_classifier").mkdir()
    path = tmp_path / "cell_classifier" / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    items = np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8)
    batches = calibration_batches({"crops": items}, config)
    assert [b["crops"].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(batches[2]["crops"], items[[8, 9, 0, 1]])
    with pytest.raises(ValueError, match=r"items of shape \[3, 8, 8\]"):
        calibration_batches({"crops": items[:, :, :4]}, config)
    with pytest.raises(ValueError, match="are not the config's"):
        calibration_batches({"images": items}, config)


def test_rois_export_runs_through_engines(tmp_path: Path) -> None:
    kwargs = {"backbone": "resnet18", "embed_dim": 32, "attn_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    model = create_model("global_local_roi", num_classes=3, **kwargs).eval()
    run = tmp_path / "run"
    run.mkdir()
    info = {
        "task": "rois",
        "arch": "global_local_roi",
        "arch_kwargs": kwargs,
        "dataset": "lbc",
        "classes": ["NILM", "LSIL", "HSIL"],
        "input_px": SIZE_PX,
        "mean": MEAN,
        "std": STD,
        "status": "done",
    }
    (run / "run.json").write_text(json.dumps(info))
    checkpoint = {"arch": "global_local_roi", "arch_kwargs": kwargs, "num_classes": 3}
    torch.save({**checkpoint, "state_dict": model.state_dict(), "fold": 0}, run / "model.pt")
    report = export_run(run, tmp_path / "repo")
    assert report.name == "roi_classifier" and report.onnx_vs_torch_max_abs_diff <= 1e-4
    # Without the bag settings of a real run there are no test ROIs to score: sizes only.
    assert report.fp16 is not None and report.fp16.fp32_accuracy is None
    assert report.fp16.note == "run.json names no cells_per_roi, crop_px"
    # How the scan cuts its crops: without crop_px / mpp in run.json, input_px at 0.5 µm/px.
    config = ModelRepository(tmp_path / "repo").config("roi_classifier")
    assert config.preprocessing is not None and config.preprocessing.mpp == 0.5
    assert config.preprocessing.input_size == (SIZE_PX, SIZE_PX)
    assert list(config.preprocessing.mean) == MEAN and list(config.preprocessing.std) == STD
    assert config.severity == config.labels == ("NILM", "LSIL", "HSIL")
    rng = np.random.default_rng(5)
    cells = rng.standard_normal((1, 3, 3, SIZE_PX, SIZE_PX)).astype(np.float32)
    mask = np.array([[1, 1, 0]], np.float32)
    # The warm-up sends all-zero masks: bags without cells must run in the exported graph.
    roi_repo = ModelRepository(tmp_path / "repo")
    with roi_repo.load("roi_classifier", device="cpu") as engine:
        out = engine.infer({"cells": cells, "mask": mask})
        empty = engine.infer({"cells": cells, "mask": np.zeros_like(mask)})
    assert np.isfinite(empty["roi_probs"]).all() and not empty["attention"].any()
    assert out["roi_probs"].shape == (1, 3) and out["cell_probs"].shape == (1, 3, 3)
    np.testing.assert_allclose(out["roi_probs"].sum(1), 1.0, atol=1e-5)
    assert out["attention"].shape == (1, 3)
