"""Export to a model repository: ONNX Runtime matches PyTorch, config and card are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engines.config import load_config
from train.data.paths import PROJECT_ROOT, default_data_root
from train.export.configs import classifier_config, roi_config
from train.export.onnx_export import (
    check_dynamic_batch,
    export_onnx,
    max_abs_diff_vs_torch,
    onnx_io_names,
)
from train.export.pt2_export import export_pt2, max_abs_diff_onnx_vs_pt2
from train.export.repository import sha256_of, write_model_version
from train.models import create_model
from train.models.cell_cnn import CellClassifierExport
from train.models.mil import RoiClassifierExport

LABELS = ["NILM", "LSIL", "HSIL"]


def _export_classifier(tmp_path: Path) -> tuple[CellClassifierExport, Path]:
    torch.manual_seed(0)
    model = create_model("se_cellnet_tiny").eval()
    wrapper = CellClassifierExport(model).eval()
    path = export_onnx(
        wrapper,
        (torch.zeros(2, 3, 96, 96),),
        tmp_path / "cls.onnx",
        ["crops"],
        ["probs", "features"],
        {"crops": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    return wrapper, path


def _export_mil(tmp_path: Path) -> tuple[RoiClassifierExport, Path]:
    torch.manual_seed(0)
    wrapper = RoiClassifierExport(create_model("gated_attention_mil")).eval()
    path = export_onnx(
        wrapper,
        (torch.zeros(2, 5, 64), torch.ones(2, 5)),
        tmp_path / "mil.onnx",
        ["cell_features", "cell_mask"],
        ["roi_probs", "attention"],
        {
            "cell_features": {0: "batch", 1: "cells"},
            "cell_mask": {0: "batch", 1: "cells"},
            "roi_probs": {0: "batch"},
            "attention": {0: "batch", 1: "cells"},
        },
    )
    return wrapper, path


def test_classifier_onnx_matches_torch(tmp_path: Path) -> None:
    wrapper, path = _export_classifier(tmp_path)
    assert onnx_io_names(path) == (["crops"], ["probs", "features"])
    x = np.random.default_rng(0).normal(size=(7, 3, 96, 96)).astype(np.float32)
    assert max_abs_diff_vs_torch(wrapper, path, {"crops": x}) <= 1e-4
    shapes = check_dynamic_batch(path, lambda b: {"crops": x[:b]}, (1, 7))
    assert shapes == {"1": [[1, 3], [1, 64]], "7": [[7, 3], [7, 64]]}


@pytest.mark.parametrize("cells", [0, 1, 9])
def test_mil_onnx_matches_torch_for_any_bag_size(tmp_path: Path, cells: int) -> None:
    wrapper, path = _export_mil(tmp_path)
    rng = np.random.default_rng(cells)
    x = rng.normal(size=(4, cells, 64)).astype(np.float32)
    mask = np.ones((4, cells), np.float32)
    if cells > 1:
        mask[1, cells // 2 :] = 0
    mask[3] = 0
    assert max_abs_diff_vs_torch(wrapper, path, {"cell_features": x, "cell_mask": mask}) <= 1e-4
    from train.export.onnx_export import onnx_session

    probs, attention = onnx_session(path).run(None, {"cell_features": x, "cell_mask": mask})
    assert np.isfinite(probs).all() and np.isfinite(attention).all()
    assert probs.shape == (4, 3) and attention.shape == (4, cells)
    assert np.all(attention[mask == 0] == 0)


def test_repository_layout_config_and_card(tmp_path: Path) -> None:
    _, cls_path = _export_classifier(tmp_path)
    _, mil_path = _export_mil(tmp_path)
    repo = tmp_path / "repo"
    card = {"seed": 0, "command": "pytest", "metrics": {"accuracy": 0.5}}
    write_model_version(repo, classifier_config(96, 0.5, LABELS, 64), cls_path, card)
    write_model_version(repo, roi_config(LABELS, 64), mil_path, card)

    for name in ("cell_classifier", "roi_classifier"):
        version_dir = repo / name / "1"
        assert (version_dir / "model.onnx").is_file()
        loaded = json.loads((version_dir / "card.json").read_text())
        assert loaded["artifact"]["sha256"] == sha256_of(version_dir / "model.onnx")
        assert loaded["artifact"]["onnx_opset"] == 17
        assert loaded["seed"] == 0 and loaded["metrics"] == {"accuracy": 0.5}
        assert {"torch", "onnx", "onnxruntime"} <= set(loaded["software"])
        assert loaded["date_utc"].endswith("Z")
        config = load_config(repo / name / "config.yaml")  # the engines' own validation
        assert config.name == name and list(config.labels) == LABELS
        raw = yaml.safe_load((repo / name / "config.yaml").read_text())
        inputs, outputs = onnx_io_names(version_dir / "model.onnx")
        assert inputs == [t["name"] for t in raw["input"]]
        assert outputs == [t["name"] for t in raw["output"]]

    raw = yaml.safe_load((repo / "cell_classifier" / "config.yaml").read_text())
    assert raw["preprocessing"] == {
        "mpp": 0.5,
        "input_size": [96, 96],
        "mean": [123.7, 116.3, 103.5],
        "std": [58.4, 57.1, 57.4],
        "channel_order": "RGB",
        "layout": "NCHW",
    }
    assert raw["max_batch_size"] == 256
    assert raw["backend"] == ["tensorrt", "onnxruntime", "pytorch"]
    assert raw["dynamic_batching"] == {
        "preferred_batch_size": [32, 64, 128],
        "max_queue_delay_ms": 2,
    }
    assert raw["instance_count"] == 1 and raw["precision"] == "FP16"
    assert raw["warmup"] == {"batch_sizes": [1, 256], "data": "zero"}
    assert raw["output"] == [
        {"name": "probs", "data_type": "TYPE_FP32", "dims": [3]},
        {"name": "features", "data_type": "TYPE_FP32", "dims": [64]},
    ]
    raw = yaml.safe_load((repo / "roi_classifier" / "config.yaml").read_text())
    assert "preprocessing" not in raw and raw["max_batch_size"] == 16
    assert "dynamic_batching" not in raw
    assert raw["warmup"] == {"batch_sizes": [1, 16], "data": "zero"}
    assert raw["input"] == [
        {"name": "cell_features", "data_type": "TYPE_FP32", "dims": [-1, 64]},
        {"name": "cell_mask", "data_type": "TYPE_FP32", "dims": [-1]},
    ]


def test_classifier_pt2_matches_torch_and_onnx(tmp_path: Path) -> None:
    wrapper, onnx_path = _export_classifier(tmp_path)
    x = np.random.default_rng(0).normal(size=(7, 3, 96, 96)).astype(np.float32)
    pt2 = export_pt2(
        wrapper,
        {"crops": torch.from_numpy(x)},
        tmp_path / "cls.pt2",
        ["probs", "features"],
        max_batch_size=256,
    )
    assert pt2.max_abs_diff_vs_eager <= 1e-4 and pt2.check_batch_sizes == (1, 7)
    program = torch.export.load(pt2.path)
    assert program.graph_signature.user_inputs == ("crops",)
    assert (
        max_abs_diff_onnx_vs_pt2(onnx_path, pt2.path, {"crops": x}, ["probs", "features"]) <= 1e-4
    )


@pytest.mark.parametrize("cells", [0, 1, 9])
def test_mil_pt2_takes_any_bag_size(tmp_path: Path, cells: int) -> None:
    wrapper, onnx_path = _export_mil(tmp_path)
    rng = np.random.default_rng(cells)
    pt2 = export_pt2(
        wrapper,
        {"cell_features": torch.randn(4, 6, 64), "cell_mask": torch.ones(4, 6)},
        tmp_path / "mil.pt2",
        ["roi_probs", "attention"],
        max_batch_size=16,
        dynamic_axes={"cell_features": {1: "cells"}, "cell_mask": {1: "cells"}},
    )
    x = rng.normal(size=(3, cells, 64)).astype(np.float32)
    mask = np.ones((3, cells), np.float32)
    mask[2] = 0
    inputs = {"cell_features": x, "cell_mask": mask}
    diff = max_abs_diff_onnx_vs_pt2(onnx_path, pt2.path, inputs, ["roi_probs", "attention"])
    assert diff <= 1e-4


def test_pt2_export_refuses_examples_it_would_specialise(tmp_path: Path) -> None:
    wrapper, _ = _export_classifier(tmp_path)
    with pytest.raises(ValueError, match="a batch of at least 2"):
        export_pt2(
            wrapper,
            {"crops": torch.zeros(1, 3, 96, 96)},
            tmp_path / "c.pt2",
            ["probs", "features"],
            max_batch_size=8,
        )
    with pytest.raises(ValueError, match=r"returns 2 output\(s\) but the config lists 1"):
        export_pt2(
            wrapper,
            {"crops": torch.zeros(2, 3, 96, 96)},
            tmp_path / "c.pt2",
            ["probs"],
            max_batch_size=8,
        )


def test_card_records_the_pt2(tmp_path: Path) -> None:
    wrapper, onnx_path = _export_classifier(tmp_path)
    pt2 = export_pt2(
        wrapper,
        {"crops": torch.zeros(2, 3, 96, 96)},
        tmp_path / "cls.pt2",
        ["probs", "features"],
        max_batch_size=256,
    )
    repo = tmp_path / "repo"
    version_dir = write_model_version(
        repo,
        classifier_config(96, 0.5, LABELS, 64),
        onnx_path,
        {"seed": 0},
        pt2_path=pt2.path,
        pt2_checks={"onnx_vs_pytorch_max_abs_diff": 1e-6},
    )
    record = json.loads((version_dir / "card.json").read_text())["pytorch_artifact"]
    assert record["file"] == "model.pt2"
    assert record["sha256"] == sha256_of(version_dir / "model.pt2")
    assert record["bytes"] == (version_dir / "model.pt2").stat().st_size
    assert record["onnx_vs_pytorch_max_abs_diff"] == 1e-6


def test_engines_load_and_batch_the_export(tmp_path: Path) -> None:
    from engines.repository import ModelRepository

    _, cls_path = _export_classifier(tmp_path)
    repo = tmp_path / "repo"
    write_model_version(repo, classifier_config(96, 0.5, LABELS, 64), cls_path, {"seed": 0})
    model = ModelRepository(repo).load("cell_classifier")
    try:
        out = model.infer({"crops": np.zeros((300, 3, 96, 96), np.float32)})  # > max_batch_size
        assert out["probs"].shape == (300, 3) and out["features"].shape == (300, 64)
        np.testing.assert_allclose(out["probs"].sum(1), 1.0, atol=1e-5)
    finally:
        model.close()


@pytest.mark.slow
@pytest.mark.skipif(
    not (default_data_root() / "herlev").is_dir(), reason="../shared/data is absent"
)
def test_quick_defaults_end_to_end(tmp_path: Path) -> None:
    """`papscan train defaults --quick --from-scratch` writes a loadable three-model
    repository from the real sets (~5 min; from scratch, so napari-nuclephaser, which CI
    does not install, is not needed)."""
    out = tmp_path / "repository"
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics")}
    code = (
        "from train.cli import train_app; import sys; sys.argv=['papscan','train','defaults'];"
        f"train_app(['defaults','--out','{out}','--quick','--from-scratch',"
        f"'--work-dir','{tmp_path / 'work'}'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from engines.repository import ModelRepository

    repo = ModelRepository(out)
    assert sorted(repo.model_names()) == ["cell_classifier", "cell_detector", "roi_classifier"]
    detector = repo.load("cell_detector")
    try:
        raw = detector.infer({"images": np.zeros((2, 3, 512, 512), np.float32)})["output0"]
        assert raw.shape[:2] == (2, 5)
    finally:
        detector.close()
    for name in ("cell_detector", "cell_classifier", "roi_classifier"):
        card = json.loads((out / name / "1" / "card.json").read_text())
        assert card["artifact"]["sha256"] == sha256_of(out / name / "1" / "model.onnx")
        assert card["pytorch_artifact"]["sha256"] == sha256_of(out / name / "1" / "model.pt2")
        assert card["pytorch_artifact"]["onnx_vs_pytorch_max_abs_diff"] <= 1e-3
        assert card["quick"] is True and "metrics" in card
    cards = {n: json.loads((out / n / "1" / "card.json").read_text()) for n in repo.model_names()}
    assert cards["cell_detector"]["architecture"]["pretrained"] is None
    assert cards["cell_classifier"]["architecture"]["pretrained"] is None
    assert "cric_held_out" in cards["cell_classifier"]["metrics"]
    assert cards["roi_classifier"]["training_data"]["lbc"]["split"]["counts"]["test"] > 0
    assert "lbc_held_out" in cards["roi_classifier"]["metrics"]
