"""YOLO raw-head decoding and NMS, checked against torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from engines.postprocess import decode_yolo, nms, pairwise_iou


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 400, size=(n, 2))
    wh = rng.uniform(5, 60, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(seed: int, iou: float) -> None:
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 300)
    scores = rng.uniform(size=300).astype(np.float32)
    ours = nms(boxes, scores, iou)
    theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_pairwise_iou_matches_torchvision() -> None:
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 20), random_boxes(rng, 30)
    expected = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(pairwise_iou(a, b), expected, atol=1e-6)


def test_nms_empty() -> None:
    assert len(nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)) == 0


def test_decode_yolo_filters_and_suppresses() -> None:
    # One image, 4 anchors: two overlapping boxes on one cell, one weak box, one far cell.
    cx = [100, 102, 300, 50]
    cy = [100, 101, 300, 50]
    w = [20, 20, 20, 20]
    h = [20, 20, 20, 20]
    score = [0.9, 0.8, 0.7, 0.1]
    raw = np.array([[cx, cy, w, h, score]], dtype=np.float32)
    (det,) = decode_yolo(raw, conf_threshold=0.25, iou_threshold=0.5)
    assert len(det) == 2
    np.testing.assert_allclose(det.boxes[0], [90, 90, 110, 110])
    np.testing.assert_allclose(det.scores, [0.9, 0.7])


def test_decode_yolo_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="YOLO head"):
        decode_yolo(np.zeros((1, 3, 10), np.float32), 0.25, 0.5)
