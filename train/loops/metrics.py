"""Metrics: classification report (accuracy, per-class P/R/F1, weighted F1, confusion) and
detection recall/precision at an IoU threshold with greedy matching."""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.postprocess import pairwise_iou


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, weighted F1 and the confusion matrix.

    Args:
        y_true: [N] true class indices.
        y_pred: [N] predicted class indices.
        labels: Class names, index order.

    Returns:
        A JSON-ready dict; `confusion[i][j]` counts true class i predicted as j.
    """
    k = len(labels)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    per_class = {}
    f1s, supports = [], []
    for i, name in enumerate(labels):
        tp = cm[i, i]
        p = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp / cm[i].sum() if cm[i].sum() else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {
            "precision": round(float(p), 4),
            "recall": round(float(r), 4),
            "f1": round(float(f1), 4),
            "support": int(cm[i].sum()),
        }
        f1s.append(f1)
        supports.append(cm[i].sum())
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": round(float(np.trace(cm) / n), 4) if n else 0.0,
        "weighted_f1": round(float(np.average(f1s, weights=supports)), 4) if n else 0.0,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "confusion_axes": "rows true, columns predicted, order " + "/".join(labels),
    }


def match_detections(
    pred_xyxy: np.ndarray, scores: np.ndarray, true_xyxy: np.ndarray, iou_threshold: float = 0.5
) -> int:
    """Greedy matching, strongest prediction first, each truth used once; returns matches."""
    if len(pred_xyxy) == 0 or len(true_xyxy) == 0:
        return 0
    order = np.argsort(-np.asarray(scores))
    iou = pairwise_iou(np.asarray(pred_xyxy, np.float64)[order], np.asarray(true_xyxy, np.float64))
    taken = np.zeros(iou.shape[1], bool)
    matched = 0
    for row in iou:
        row = np.where(taken, -1.0, row)
        j = int(np.argmax(row))
        if row[j] >= iou_threshold:
            taken[j] = True
            matched += 1
    return matched


def detection_report(n_true: int, n_pred: int, n_matched: int) -> dict[str, float | int]:
    """Recall, precision and F1 from counts."""
    recall = n_matched / n_true if n_true else 1.0
    precision = n_matched / n_pred if n_pred else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "n_matched": n_matched,
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "f1": round(f1, 4),
    }


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (the probability a positive outranks a negative; ties half).

    NaN where either class is absent.
    """
    positive = np.asarray(positive, bool)
    score = np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(
    positive: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, threshold) at each distinct score, from
    the highest threshold down (a case is called positive when its score >= threshold)."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, np.float64)
    thresholds = np.unique(score)[::-1]
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    tpr = np.array([(positive & (score >= t)).sum() / n_pos for t in thresholds])
    fpr = np.array([(~positive & (score >= t)).sum() / n_neg for t in thresholds])
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def specificity_at_sensitivity(
    positive: np.ndarray, score: np.ndarray, min_sensitivity: float
) -> tuple[float, float]:
    """The best specificity reachable with sensitivity >= `min_sensitivity`, and the
    (highest) score threshold that reaches it; (nan, nan) where a class is absent."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_points(positive, score)
    ok = np.flatnonzero(tpr >= min_sensitivity)
    i = ok[np.argmin(fpr[ok])]
    return float(1.0 - fpr[i]), float(thr[i])


def abnormal_report(
    positive: np.ndarray, score: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Normal-vs-abnormal figures of a score (P(abnormal)): accuracy, sensitivity and
    specificity at `threshold`, ROC AUC, and the best specificity at sensitivity >= 0.90."""
    positive = np.asarray(positive, bool)
    called = np.asarray(score) >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    spec90, thr90 = specificity_at_sensitivity(positive, score, 0.90)

    def r(v: float) -> float:
        return round(float(v), 4)

    return {
        "n": len(positive),
        "n_abnormal": n_pos,
        "threshold": threshold,
        "accuracy": r((called == positive).mean()) if len(positive) else float("nan"),
        "sensitivity": r((called & positive).sum() / n_pos) if n_pos else float("nan"),
        "specificity": r((~called & ~positive).sum() / n_neg) if n_neg else float("nan"),
        "roc_auc": r(roc_auc(positive, score)),
        "specificity_at_sensitivity_0.90": r(spec90),
        "threshold_at_sensitivity_0.90": r(thr90),
    }
