"""The three default models' `config.yaml` contents, per the shared contract.

Values come from training (labels, mpp, sizes, mean/std, thresholds); the layout is the
contract's: Triton field names, `dims` without the batch dimension, -1 for dynamic.
"""

from __future__ import annotations

from typing import Any

CLASSIFIER_MEAN = (123.7, 116.3, 103.5)
CLASSIFIER_STD = (58.4, 57.1, 57.4)
#: Backends by preference: a TensorRT engine where a GPU and TensorRT are there, else ONNX
#: Runtime, else the exported PyTorch program.
BACKEND_PREFERENCE = ("tensorrt", "onnxruntime", "pytorch")
#: The cell classifier gets crops from many ROIs at once: the batcher runs them in these.
CLASSIFIER_PREFERRED_BATCH_SIZES = (32, 64, 128)
CLASSIFIER_MAX_QUEUE_DELAY_MS = 2


def _execution(max_batch_size: int, precision: str = "FP16") -> dict[str, Any]:
    """One instance, `precision` engines, warm-up on zeros at batch 1 and `max_batch_size`."""
    return {
        "instance_count": 1,
        "precision": precision,
        "warmup": {"batch_sizes": [1, max_batch_size], "data": "zero"},
    }


def _preprocessing(
    input_px: int, mpp: float, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Any]:
    """An image input's `preprocessing` block: square RGB NCHW at `mpp`, `(x - mean) / std`."""
    return {
        "mpp": mpp,
        "input_size": [input_px, input_px],
        "mean": list(mean),
        "std": list(std),
        "channel_order": "RGB",
        "layout": "NCHW",
    }


def detector_config(
    input_px: int,
    mpp: float,
    labels: list[str],
    conf_threshold: float,
    iou_threshold: float,
    max_batch_size: int = 8,
) -> dict[str, Any]:
    """`cell_detector`: ultralytics YOLO raw head `output0` [B, 4 + nc, N]."""
    return {
        "name": "cell_detector",
        "backend": list(BACKEND_PREFERENCE),
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": 1},
        **_execution(max_batch_size),
        "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": [3, input_px, input_px]}],
        "output": [{"name": "output0", "data_type": "TYPE_FP32", "dims": [4 + len(labels), -1]}],
        "preprocessing": _preprocessing(input_px, mpp, (0.0,) * 3, (255.0,) * 3),
        "labels": list(labels),
        "postprocessing": {
            "kind": "yolo",
            "conf_threshold": conf_threshold,
            "iou_threshold": iou_threshold,
        },
    }


def classifier_config(
    input_px: int,
    mpp: float,
    labels: list[str],
    embed_dim: int,
    mean: tuple[float, ...] = CLASSIFIER_MEAN,
    std: tuple[float, ...] = CLASSIFIER_STD,
    max_batch_size: int = 256,
    *,
    name: str = "cell_classifier",
    precision: str = "FP16",
    severity: list[str] | None = None,
) -> dict[str, Any]:
    """A cell classifier (`cell_classifier` by default): `crops` -> `probs` (softmax) and
    `features`; `precision` is what TensorRT builds (and ONNX Runtime runs on CUDA).
    `severity` orders the labels from least to most severe, normal first (default: the
    labels' own order); the ROI classifier it works with must declare the same."""
    return {
        "name": name,
        "backend": list(BACKEND_PREFERENCE),
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": 1},
        "dynamic_batching": {
            "preferred_batch_size": list(CLASSIFIER_PREFERRED_BATCH_SIZES),
            "max_queue_delay_ms": CLASSIFIER_MAX_QUEUE_DELAY_MS,
        },
        **_execution(max_batch_size, precision),
        "input": [{"name": "crops", "data_type": "TYPE_FP32", "dims": [3, input_px, input_px]}],
        "output": [
            {"name": "probs", "data_type": "TYPE_FP32", "dims": [len(labels)]},
            {"name": "features", "data_type": "TYPE_FP32", "dims": [embed_dim]},
        ],
        "preprocessing": _preprocessing(input_px, mpp, mean, std),
        "labels": list(labels),
        "severity": list(labels if severity is None else severity),
    }


def roi_config(
    labels: list[str],
    feature_dim: int,
    max_batch_size: int = 16,
    severity: list[str] | None = None,
) -> dict[str, Any]:
    """`roi_classifier`: (`cell_features`, `cell_mask`) -> `roi_probs`, `attention`;
    `severity` as in `classifier_config` (default: the labels' own order)."""
    return {
        "name": "roi_classifier",
        "backend": list(BACKEND_PREFERENCE),
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": 1},
        **_execution(max_batch_size),
        "input": [
            {"name": "cell_features", "data_type": "TYPE_FP32", "dims": [-1, feature_dim]},
            {"name": "cell_mask", "data_type": "TYPE_FP32", "dims": [-1]},
        ],
        "output": [
            {"name": "roi_probs", "data_type": "TYPE_FP32", "dims": [len(labels)]},
            {"name": "attention", "data_type": "TYPE_FP32", "dims": [-1]},
        ],
        "labels": list(labels),
        "severity": list(labels if severity is None else severity),
    }


def global_local_config(
    input_px: int,
    labels: list[str],
    cell_classes: int,
    max_batch_size: int = 16,
    *,
    mpp: float,
    mean: tuple[float, ...] = CLASSIFIER_MEAN,
    std: tuple[float, ...] = CLASSIFIER_STD,
    name: str = "roi_classifier",
    precision: str = "FP16",
    severity: list[str] | None = None,
) -> dict[str, Any]:
    """The global-local ROI network on cell crops: (`cells` [N, 3, S, S] normalised crops,
    `mask` [N] 1.0 on real cells, 0.0 on padding) -> `roi_probs`, `cell_probs` [N, cell_classes] and
    `attention` [N] (cross-attention score per cell). N, the cells per ROI, is dynamic.

    `preprocessing` describes each crop as the scan cuts it: `input_px` square at `mpp`
    (so a field of `input_px * mpp` µm around each cell), normalised with `mean` / `std`.
    `severity` as in `classifier_config` (default: the labels' own order).
    """
    return {
        "name": name,
        "backend": list(BACKEND_PREFERENCE),
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": 1},
        **_execution(max_batch_size, precision),
        "input": [
            {"name": "cells", "data_type": "TYPE_FP32", "dims": [-1, 3, input_px, input_px]},
            {"name": "mask", "data_type": "TYPE_FP32", "dims": [-1]},
        ],
        "output": [
            {"name": "roi_probs", "data_type": "TYPE_FP32", "dims": [len(labels)]},
            {"name": "cell_probs", "data_type": "TYPE_FP32", "dims": [-1, cell_classes]},
            {"name": "attention", "data_type": "TYPE_FP32", "dims": [-1]},
        ],
        "preprocessing": _preprocessing(input_px, mpp, mean, std),
        "labels": list(labels),
        "severity": list(labels if severity is None else severity),
    }
