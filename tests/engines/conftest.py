"""Tiny real ONNX models (built with onnx.helper) in temporary model repositories."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from engines.metrics import InferenceMetrics
from engines.model import Model
from engines.repository import ModelRepository

# Opset and IR version every ONNX Runtime since 1.16 reads.
_OPSET = 17
_IR_VERSION = 8

CLASSIFIER_CONFIG: dict[str, Any] = {
    "name": "tiny_classifier",
    "backend": ["onnxruntime"],
    "max_batch_size": 8,
    "version_policy": {"latest": 1},
    "input": [{"name": "crops", "data_type": "TYPE_FP32", "dims": [3, 4, 4]}],
    "output": [
        {"name": "probs", "data_type": "TYPE_FP32", "dims": [3]},
        {"name": "features", "data_type": "TYPE_FP32", "dims": [8]},
    ],
    "preprocessing": {
        "mpp": 0.5,
        "input_size": [4, 4],
        "mean": [123.7, 116.3, 103.5],
        "std": [58.4, 57.1, 57.4],
        "channel_order": "RGB",
        "layout": "NCHW",
    },
    "labels": ["NILM", "LSIL", "HSIL"],
}

ROI_CONFIG: dict[str, Any] = {
    "name": "tiny_roi",
    "backend": ["onnxruntime"],
    "max_batch_size": 4,
    "input": [
        {"name": "cell_features", "data_type": "TYPE_FP32", "dims": [-1, 8]},
        {"name": "cell_mask", "data_type": "TYPE_FP32", "dims": [-1]},
    ],
    "output": [
        {"name": "roi_probs", "data_type": "TYPE_FP32", "dims": [3]},
        {"name": "attention", "data_type": "TYPE_FP32", "dims": [-1]},
    ],
    "labels": ["NILM", "LSIL", "HSIL"],
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_classifier_onnx(
    path: Path,
    *,
    seed: int = 0,
    batch: int | str = "N",
    input_name: str = "crops",
) -> Path:
    """crops (N,3,4,4) -> features = relu(flatten @ W1) (N,8), probs = softmax(features @ W2)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(48, 8)).astype(np.float32) / 7, "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["features"]),
        helper.make_node("MatMul", ["features", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 4, 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 8]),
        ],
        initializer=[w1, w2],
    )
    return _save(graph, path)


def build_roi_onnx(path: Path, *, seed: int = 1) -> Path:
    """Masked attention pooling over a dynamic number of cells.

    cell_features (N,M,8), cell_mask (N,M) -> attention = softmax over real cells (N,M),
    roi_probs = softmax(sum_m attention * features @ W) (N,3).
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w")
    inits = [
        w,
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(1e9, dtype=np.float32), "big"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["cell_features", "axis2"], ["score"], keepdims=0),
        helper.make_node("Sub", ["cell_mask", "one"], ["mask_m1"]),
        helper.make_node("Mul", ["mask_m1", "big"], ["penalty"]),
        helper.make_node("Add", ["score", "penalty"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["soft"], axis=1),
        helper.make_node("Mul", ["soft", "cell_mask"], ["attention"]),
        helper.make_node("Unsqueeze", ["attention", "axis2"], ["att3"]),
        helper.make_node("Mul", ["cell_features", "att3"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["roi_probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_roi",
        [
            helper.make_tensor_value_info("cell_features", TensorProto.FLOAT, ["N", "M", 8]),
            helper.make_tensor_value_info("cell_mask", TensorProto.FLOAT, ["N", "M"]),
        ],
        [
            helper.make_tensor_value_info("roi_probs", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("attention", TensorProto.FLOAT, ["N", "M"]),
        ],
        initializer=inits,
    )
    return _save(graph, path)


def write_config(model_dir: Path, config: dict[str, Any]) -> Path:
    """Writes `config` as `model_dir/config.yaml`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def classifier_config() -> dict[str, Any]:
    """A fresh, valid config of the tiny classifier, to modify."""
    return copy.deepcopy(CLASSIFIER_CONFIG)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """Builds a repository with the tiny classifier and ROI models.

    Call with `classifier_versions` / `roi_versions` (version folders holding a model.onnx),
    `classifier_overrides` (config fields replaced), and `card` (written for every version).
    """

    def make(
        classifier_versions: tuple[int, ...] = (1,),
        roi_versions: tuple[int, ...] = (1,),
        classifier_overrides: dict[str, Any] | None = None,
        card: dict[str, Any] | None = None,
    ) -> Path:
        repo = tmp_path / "repo"
        classifier = {**copy.deepcopy(CLASSIFIER_CONFIG), **(classifier_overrides or {})}
        write_config(repo / "tiny_classifier", classifier)
        for version in classifier_versions:
            version_dir = repo / "tiny_classifier" / str(version)
            build_classifier_onnx(version_dir / "model.onnx", seed=version)
            if card is not None:
                (version_dir / "card.json").write_text(json.dumps({**card, "version": version}))
        write_config(repo / "tiny_roi", copy.deepcopy(ROI_CONFIG))
        for version in roi_versions:
            build_roi_onnx(repo / "tiny_roi" / str(version) / "model.onnx", seed=version)
        return repo

    return make


@pytest.fixture
def build_classifier() -> Callable[..., Path]:
    """`build_classifier_onnx(path, seed=, batch=, input_name=)`."""
    return build_classifier_onnx


@pytest.fixture
def config_writer() -> Callable[[Path, dict[str, Any]], Path]:
    """`write_config(model_dir, config)` -> the config.yaml path."""
    return write_config


@pytest.fixture
def metrics() -> InferenceMetrics:
    """Counters of this test alone (not the process-wide ones)."""
    return InferenceMetrics()


@pytest.fixture
def repo(make_repo: Callable[..., Path], metrics: InferenceMetrics) -> ModelRepository:
    """The tiny classifier and ROI models, counting into `metrics`."""
    return ModelRepository(make_repo(), metrics=metrics)


@pytest.fixture
def classifier(repo: ModelRepository) -> Iterator[Model]:
    with repo.load("tiny_classifier", device="cpu") as model:
        yield model


@pytest.fixture
def roi(repo: ModelRepository) -> Iterator[Model]:
    with repo.load("tiny_roi", device="cpu") as model:
        yield model
