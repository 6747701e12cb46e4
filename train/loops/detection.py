"""Score detections against truth boxes (decoding and NMS are `engines.postprocess`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engines.postprocess import pairwise_iou
from train.loops.metrics import detection_report


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
        iou = pairwise_iou(boxes, truth) if len(truth) else np.zeros((len(boxes), 0))
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
            overlap = pairwise_iou(boxes[unmatched], ign).max(axis=1)
            n_pred -= int((overlap >= 0.3).sum())
        n_true += len(truth)
    return detection_report(n_true, n_pred, n_matched)
