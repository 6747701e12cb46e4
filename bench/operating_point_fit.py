"""Fit the slide call's operating point on the scorecard's validation fields.

The scorecard scans each validation field as a slide and keeps its `SlideEvidence`. From
those, per preparation (liquid-based on the LBC fields, conventional on the CRIC and
SIPaKMeD fields: the models' scores are distributed differently on the two):

1. the calibrated score: logistic regression of "the field is abnormal" on the logits of
   the three features, with a strong ridge (`RIDGE`) and no negative weight (more
   evidence never lowers the score): the validation sets are small (about 120 and 30
   fields), and on them a free fit put large opposite weights on correlated features and
   lost a third of its held-out sensitivity;
2. the abnormal threshold: the highest calibrated score that keeps sensitivity >= 0.95
   (the best specificity that sensitivity allows);

and over all of them, `min_cells` per abnormal class: the confident-cell counts that grade
abnormal fields best (grid search over 1..8 each, most agreement with the fields' grades).
Everything else (`cell_confidence`, `top_n`, `roi_min_cells`) shaped the features when
the fields were scanned, so it is kept as it was.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import scorecard_metrics as sm

from train.loops.metrics import roc_auc
from worker.pipeline.slide_call import (
    FEATURES,
    OperatingPoint,
    ScoreRule,
    SlideEvidence,
    _logit,
)

MIN_SENSITIVITY = 0.95
RIDGE = 10.0


def evidence_of(record: dict[str, Any]) -> SlideEvidence:
    return SlideEvidence(**record["evidence"])


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
    """Ridge logistic regression by Newton's method: (coefficients, intercept)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(design.shape[1])
    penalty = ridge * np.eye(design.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -50, 50)))
        gradient = design.T @ (p - y) + penalty @ w
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[1:], float(w[0])


def fit_monotone(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """`fit_logistic` with no negative coefficient: more evidence never lowers the score.

    A feature whose fitted weight comes out negative (correlated features trading off on
    a small set) is dropped and the rest refitted, until every weight is >= 0.
    """
    active = list(range(x.shape[1]))
    while True:
        coef, intercept = fit_logistic(x[:, active], y)
        if (coef >= 0).all():
            full = np.zeros(x.shape[1])
            full[active] = coef
            return full, intercept
        active = [a for a, c in zip(active, coef, strict=True) if c >= 0]


def fit_rule(records: list[dict[str, Any]], normal: str) -> tuple[ScoreRule, dict[str, Any]]:
    """One preparation's score rule, and what its fit saw."""
    evidence = [evidence_of(r) for r in records]
    truth = np.array([r["grade"] != normal for r in records], bool)
    if not truth.any():
        raise SystemExit("The validation fields of a preparation hold no abnormal field.")
    x = np.array([[_logit(v) for v in e.features()] for e in evidence], np.float64)
    coef, intercept = fit_monotone(x, truth.astype(np.float64))
    rule = ScoreRule(coef=tuple(float(c) for c in coef), intercept=intercept)
    scores = np.array([rule.score(e) if e.cell_count else 0.0 for e in evidence])
    threshold = sm.fit_threshold(truth, scores, MIN_SENSITIVITY)
    sets = sorted({r["set"] for r in records})
    rule = replace(
        rule,
        abnormal_threshold=threshold,
        fitted_on={"sets": sets, "fields": len(records), "abnormal": int(truth.sum())},
    )
    fit = {
        "sets": sets,
        "fields": len(records),
        "abnormal": int(truth.sum()),
        "features": list(FEATURES),
        "ridge": RIDGE,
        "val_rates_at_threshold": sm.rates_at_threshold(truth, scores, threshold).as_dict(),
        "val_auc": roc_auc(truth, scores),
    }
    return rule, fit


def fit_operating_point(
    pools: dict[str, list[dict[str, Any]]],
    base: OperatingPoint,
    severity: tuple[str, ...],
    fitted_on: dict[str, Any],
) -> tuple[OperatingPoint, dict[str, Any]]:
    """Fit on validation field records (each with `evidence` and `grade`), by preparation.

    Returns:
        The operating point and what each fit saw.
    """
    rules, fits = {}, {}
    for preparation, records in pools.items():
        rules[preparation], fits[preparation] = fit_rule(records, severity[0])
    op = replace(base, rules=rules)
    graded = [
        (evidence_of(r), r["grade"])
        for prep, records in pools.items()
        for r in records
        if r["grade"] != severity[0]
        and rules[prep].score(evidence_of(r)) >= rules[prep].abnormal_threshold
    ]
    op = replace(op, min_cells=_fit_min_cells(op, graded, severity))
    n = sum(len(r) for r in pools.values())
    version = f"val-{dt.date.today().isoformat()}-{n}f"
    op = replace(op, version=version, fitted_on={**fitted_on, "date": dt.date.today().isoformat()})
    return op, {"rules": fits, "min_cells": op.min_cells, "graded_fields": len(graded)}


def _fit_min_cells(
    op: OperatingPoint, graded: list[tuple[SlideEvidence, str]], severity: tuple[str, ...]
) -> dict[str, int]:
    abnormal = severity[1:]
    best, best_hits = dict(op.min_cells), -1
    for counts in itertools.product(range(1, 9), repeat=len(abnormal)):
        trial = replace(op, min_cells=dict(zip(abnormal, counts, strict=True)))
        hits = sum(trial.grade(e, severity) == grade for e, grade in graded)
        if hits > best_hits:
            best, best_hits = dict(trial.min_cells), hits
    return best
