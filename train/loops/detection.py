"""Decode an ultralytics raw head and score detections against truth boxes.

The same decoding as the scanning pipeline (raw `[B, 4 + C, A]` head, confidence filter,
greedy class-agnostic NMS), written here because `train` never imports `worker`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from train.loops.metrics import box_iou, detection_report


def decode_raw_head(
    raw: np.ndarray, conf_threshold: float, iou_threshold: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`[B, 4 + C, A]` head -> per image `(boxes [K, 4] xyxy input px, scores [K])` after NMS."""
    out = []
    for head in raw:
        scores = head[4:].max(axis=0)
        keep = scores >= conf_threshold
        cx, cy, w, h = head[:4, keep]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = scores[keep]
        kept = greedy_nms(boxes, scores, iou_threshold)
        out.append((boxes[kept], scores[kept]))
    return out


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of boxes kept by greedy NMS, strongest first."""
    if len(boxes) == 0:
        return np.empty(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), bool)
    for i in range(len(order)):
        if not suppressed[i]:
            suppressed[i + 1 :] |= iou[i, i + 1 :] > iou_threshold
    return order[~suppressed]


def score_detections(
    preds: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[np.ndarray],
    ignores: Sequence[np.ndarray] | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """Recall and precision at `iou_threshold` over a set of images.

    Greedy matching, strongest prediction first, each truth box matched once. A prediction
    left unmatched that overlaps an *ignored* truth (a nucleus mostly outside the image,
    IoU >= 0.3) counts neither way.

    Args:
        preds: Per image `(boxes [K, 4], scores [K])`, xyxy px.
        truths: Per image truth boxes `[T, 4]`.
        ignores: Per image ignored truth boxes `[I, 4]`, or None.
        iou_threshold: Match threshold.

    Returns:
        Counts, recall, precision and F1.
    """
    n_true = n_pred = n_matched = 0
    for i, ((boxes, scores), truth) in enumerate(zip(preds, truths, strict=True)):
        order = np.argsort(-scores)
        boxes = boxes[order]
        iou = box_iou(boxes, truth) if len(truth) else np.zeros((len(boxes), 0))
        taken = np.zeros(len(truth), bool)
        unmatched = []
        for k in range(len(boxes)):
            row = np.where(taken, -1.0, iou[k]) if len(truth) else np.zeros(0)
            j = int(np.argmax(row)) if len(row) else -1
            if j >= 0 and row[j] >= iou_threshold:
                taken[j] = True
                n_matched += 1
            else:
                unmatched.append(k)
        n_pred += len(boxes)
        ign = ignores[i] if ignores is not None else np.zeros((0, 4))
        if unmatched and len(ign):
            overlap = box_iou(boxes[unmatched], ign).max(axis=1)
            n_pred -= int((overlap >= 0.3).sum())
        n_true += len(truth)
    return detection_report(n_true, n_pred, n_matched)
