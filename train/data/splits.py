"""Stratified, group-aware splits: k folds, or train / validation / test by ratio.

Groups (the cells of one field, the fields of one slide) are never split: every item of a
group lands in the same part. Within that constraint each part gets close to its share of
every class. Groups are placed greedily, largest first (ties in a seeded random order),
each into the part where it brings the per-class shares closest to the targets, which is
the idea behind scikit-learn's `StratifiedGroupKFold` without the dependency. With one
group per item this is an ordinary stratified split, exact to within one item per class.
"""

from __future__ import annotations

import numpy as np


def _group_table(labels: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Return (group index of each item, [G, C] class counts per group)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if groups is None:
        groups = np.arange(len(labels))
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ in shape")
    _, y = np.unique(labels, return_inverse=True)
    _, g = np.unique(groups, return_inverse=True)
    counts = np.zeros((g.max() + 1 if len(g) else 0, y.max() + 1 if len(y) else 0), np.int64)
    np.add.at(counts, (g, y), 1)
    return g, counts


def _assign_groups(counts: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """Part of each group, filling parts towards `fractions` of every class."""
    n_groups = len(counts)
    class_totals = np.maximum(counts.sum(axis=0), 1).astype(np.float64)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    share = np.zeros((len(fractions), counts.shape[1]))  # fraction of each class in each part
    filled = np.zeros(len(fractions))  # fraction of all items in each part
    n_items = max(counts.sum(), 1)
    part_of = np.empty(n_groups, np.int64)
    for gi in order:
        add = counts[gi] / class_totals
        # Change in squared distance to the targets when this group joins each part.
        gain = ((share + add - fractions[:, None]) ** 2 - (share - fractions[:, None]) ** 2).sum(1)
        fill = filled / fractions
        best = np.lexsort((np.arange(len(fractions)), fill, np.round(gain, 12)))[0]
        part_of[gi] = best
        share[best] += add
        filled[best] += counts[gi].sum() / n_items
    return part_of


def _parts(
    labels: np.ndarray, groups: np.ndarray | None, fractions: np.ndarray, seed: int
) -> list[np.ndarray]:
    g, counts = _group_table(labels, groups)
    part_of_item = _assign_groups(counts, fractions, seed)[g]
    return [np.flatnonzero(part_of_item == p).astype(np.int64) for p in range(len(fractions))]


def kfold_splits(
    labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: every item is in exactly one test fold.

    Args:
        labels: [N] class of each item.
        groups: [N] group of each item, or None for one group per item.
        k: Number of folds (at least 2, at most the number of groups).
        seed: Seed of the order in which equal-sized groups are placed.

    Returns:
        k pairs `(train_idx, test_idx)` of sorted int64 indices. A class with fewer
        groups than folds is absent from some test folds.

    Raises:
        ValueError: k is out of range, or the arrays disagree in shape.
    """
    g, _ = _group_table(labels, groups)
    n_groups = g.max() + 1 if len(g) else 0
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n_groups:
        raise ValueError(f"k must be an integer from 2 to the number of groups ({n_groups})")
    folds = _parts(labels, groups, np.full(k, 1.0 / k), seed)
    everything = np.arange(len(g))
    return [(np.setdiff1d(everything, test), test) for test in folds]


def ratio_split(
    labels: np.ndarray,
    groups: np.ndarray | None,
    fractions: tuple[float, ...] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Stratified group split into parts of the given fractions (train, val, test).

    Args:
        labels: [N] class of each item.
        groups: [N] group of each item, or None for one group per item.
        fractions: Share of each part, each positive, summing to 1.
        seed: Seed of the order in which equal-sized groups are placed.

    Returns:
        One sorted int64 index array per fraction, disjoint, covering all items.

    Raises:
        ValueError: The fractions are not positive or do not sum to 1, or the arrays
            disagree in shape.
    """
    f = np.asarray(fractions, np.float64)
    if f.ndim != 1 or len(f) < 2 or (f <= 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"fractions must be two or more positive numbers summing to 1: {fractions}"
        )
    return tuple(_parts(labels, groups, f, seed))
