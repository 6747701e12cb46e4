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


def roc_curve(
    truth: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """False- and true-positive rates at every distinct score used as a threshold.

    Returns:
        `(fpr, tpr, thresholds)`, thresholds descending from +inf (nothing called), so the
        curve runs from (0, 0) to (1, 1); None without both positives and negatives.
    """
    truth = np.asarray(truth, bool)
    scores = np.asarray(scores, np.float64)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if not pos or not neg:
        return None
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # ties move together
    tps = np.cumsum(t)[last_of_value]
    fps = np.cumsum(~t)[last_of_value]
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    thresholds = np.r_[np.inf, s[last_of_value]]
    return fpr, tpr, thresholds


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half), or None without both classes."""
    curve = roc_curve(truth, scores)
    if curve is None:
        return None
    fpr, tpr, _ = curve
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def best_specificity_at_sensitivity(
    truth: np.ndarray, scores: np.ndarray, min_sensitivity: float
) -> tuple[float, float] | None:
    """The highest specificity any threshold reaches with sensitivity >= `min_sensitivity`.

    Returns:
        `(specificity, threshold)`, or None without both classes.
    """
    curve = roc_curve(truth, scores)
    if curve is None:
        return None
    fpr, tpr, thresholds = curve
    ok = np.flatnonzero(tpr >= min_sensitivity - 1e-12)
    best = ok[np.argmin(fpr[ok])]  # the first (highest threshold) of the lowest fpr
    return float(1.0 - fpr[best]), float(thresholds[best])


def abnormal_report(
    positive: np.ndarray, score: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Normal-vs-abnormal figures of a score (P(abnormal)): accuracy, sensitivity and
    specificity at `threshold`, ROC AUC, and the best specificity at sensitivity >= 0.90."""
    positive = np.asarray(positive, bool)
    called = np.asarray(score) >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    auc = roc_auc(positive, score)
    spec90, thr90 = best_specificity_at_sensitivity(positive, score, 0.90) or (np.nan, np.nan)

    def r(v: float) -> float:
        return round(float(v), 4)

    return {
        "n": len(positive),
        "n_abnormal": n_pos,
        "threshold": threshold,
        "accuracy": r((called == positive).mean()) if len(positive) else float("nan"),
        "sensitivity": r((called & positive).sum() / n_pos) if n_pos else float("nan"),
        "specificity": r((~called & ~positive).sum() / n_neg) if n_neg else float("nan"),
        "roc_auc": r(np.nan if auc is None else auc),
        "specificity_at_sensitivity_0.90": r(spec90),
        "threshold_at_sensitivity_0.90": r(thr90),
    }
