"""Detector outputs into boxes: YOLO raw-head decoding and NMS, vectorised in numpy.

The detector is an ultralytics YOLO exported without NMS, so its single output is the raw
head `[B, 4 + C, A]`: for each of `A` anchors, a box `(cx, cy, w, h)` in input pixels and
`C` class scores. Decoding and NMS are ours, vectorised in numpy, so every backend
(ONNX Runtime, TensorRT, PyTorch) feeds the same post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Detections:
    """Boxes found in one ROI image, in that image's pixels.

    Attributes:
        boxes: `[N, 4]` float32 `(x1, y1, x2, y2)` in ROI-image pixels.
        scores: `[N]` float32 detection confidence.
    """

    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def decode_yolo(
    raw: np.ndarray, conf_threshold: float, iou_threshold: float, max_detections: int = 1000
) -> list[Detections]:
    """Turn a raw YOLO head into per-image detections.

    Args:
        raw: `[B, 4 + C, A]` head output; boxes are `(cx, cy, w, h)` in input pixels.
        conf_threshold: minimum best-class score to keep an anchor.
        iou_threshold: NMS overlap above which the weaker box is suppressed.
        max_detections: cap per image, strongest first.

    Returns:
        One `Detections` per image in the batch (class-agnostic: every class is a cell).
    """
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"expected a YOLO head of shape [B, 4 + C, A], got {raw.shape}")
    results = []
    for head in raw:
        scores = head[4:].max(axis=0)
        keep = scores >= conf_threshold
        cx, cy, w, h = head[:4, keep]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = scores[keep]
        kept = nms(boxes, scores, iou_threshold)[:max_detections]
        results.append(Detections(boxes[kept].astype(np.float32), scores[kept].astype(np.float32)))
    return results


# Candidates NMS compares at most, the strongest: the shipped detector leaves 6-8
# candidates above its confidence threshold per nucleus it keeps, and its densest real
# field (a 256 um ROI) holds a few hundred nuclei (a monolayer of squamous cells about 25,
# crowded groups and inflammatory fields a few hundred), so 4096 holds every candidate of
# about 500 nuclei, and beyond that still each nucleus's best box but for the weakest
# (decode_yolo keeps 1000 at most anyway). Without a cap the IoU matrix grows as N^2: a
# head of 50 000 candidates would need 10 GB.
MAX_NMS_CANDIDATES = 4096
# Rows of the IoU matrix computed at once: about ten float32 arrays of this many rows by
# the candidates are alive at a time (~80 MB at the cap), not the whole matrix.
_NMS_BLOCK_ROWS = 512


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    max_candidates: int = MAX_NMS_CANDIDATES,
) -> np.ndarray:
    """Greedy non-maximum suppression over the `max_candidates` strongest boxes.

    Walks boxes strongest first, each step a vector operation on a row of the IoU matrix,
    which is computed a block of rows at a time (each row against the boxes after it).

    Args:
        boxes: `[N, 4]` `(x1, y1, x2, y2)`.
        scores: `[N]`.
        iou_threshold: suppress a box whose IoU with a kept, stronger box exceeds this.
        max_candidates: only this many strongest boxes are considered; the rest are dropped.

    Returns:
        Indices of the kept boxes, strongest first.
    """
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    ordered = boxes[order]
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    for start in range(0, n, _NMS_BLOCK_ROWS):
        stop = min(n, start + _NMS_BLOCK_ROWS)
        iou = pairwise_iou(ordered[start:stop], ordered[start:])
        for i in range(start, stop):
            if not suppressed[i]:
                suppressed[i + 1 :] |= iou[i - start, i - start + 1 :] > iou_threshold
    return order[~suppressed]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` `[N, 4]` with every box in `b` `[M, 4]`, as `[N, M]`."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def box_centres(boxes_xyxy: np.ndarray) -> np.ndarray:
    """`[N, 2]` float32 centres `(x, y)` of `[N, 4]` boxes `(x0, y0, x1, y1)`."""
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
