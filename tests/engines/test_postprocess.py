"""YOLO raw-head decoding and NMS, checked against torchvision."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torchvision

from engines import postprocess
from engines.postprocess import MAX_NMS_CANDIDATES, decode_yolo, nms, pairwise_iou


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


def test_nms_matches_torchvision_on_a_crowded_field() -> None:
    """3000 boxes on 400 x 400 px: several blocks of IoU rows, below the candidate cap."""
    rng = np.random.default_rng(11)
    boxes = random_boxes(rng, 3000)
    scores = rng.uniform(size=3000).astype(np.float32)
    ours = nms(boxes, scores, 0.5)
    theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_nms_compares_only_the_strongest_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """50 000 candidates: no IoU matrix larger than the cap's is built (50 000^2 would take
    10 GB), memory stays under 100 MB, and the result is NMS over the strongest
    `MAX_NMS_CANDIDATES`."""
    rng = np.random.default_rng(5)
    n = 50_000
    xy = rng.uniform(0, 512, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, size=(n, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(size=n).astype(np.float32)
    shapes: list[tuple[int, int]] = []

    def bounded_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        shapes.append((len(a), len(b)))
        assert len(a) * len(b) <= MAX_NMS_CANDIDATES**2, f"IoU matrix {len(a)} x {len(b)}"
        return pairwise_iou(a, b)

    monkeypatch.setattr(postprocess, "pairwise_iou", bounded_iou)
    tracemalloc.start()
    try:
        ours = nms(boxes, scores, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(b for _, b in shapes) == MAX_NMS_CANDIDATES
    assert peak < 100 * 2**20
    top = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
    theirs = torchvision.ops.nms(torch.from_numpy(boxes[top]), torch.from_numpy(scores[top]), 0.5)
    np.testing.assert_array_equal(ours, top[theirs.numpy()])


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
