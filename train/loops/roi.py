"""Train and evaluate the `roi_classifier` (gated attention MIL over cell features).

A bag is one ROI: the 64-d features the trained cell classifier gives its cells' crops,
and the truth class of each cell. The ROI label is the worst cell class present
(NILM < LSIL < HSIL, i.e. the largest class index); an ROI without cells is NILM. Each
epoch drops a random share of every bag's cells (and relabels the bag from the cells
kept), so the model sees sparse and partial ROIs, and a few empty bags.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from train.loops.metrics import classification_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bag:
    """One ROI's cells.

    Attributes:
        features: [N, D] float32 cell features.
        cell_labels: [N] int64 truth class index per cell.
    """

    features: np.ndarray
    cell_labels: np.ndarray

    @property
    def label(self) -> int:
        """Worst class present; 0 (NILM) for an empty bag."""
        return int(self.cell_labels.max()) if len(self.cell_labels) else 0


@dataclass(frozen=True)
class RoiSettings:
    """ROI classifier training settings.

    Attributes:
        epochs: Passes over the bags.
        batch: Bags per batch.
        lr: AdamW learning rate (cosine decay).
        weight_decay: AdamW weight decay.
        max_drop: Largest share of a bag's cells dropped per epoch.
        empty_fraction: Share of extra empty (NILM) bags per epoch.
        balanced: Weight the loss by inverse class frequency (real ROI sets are mostly
            negative).
    """

    epochs: int = 40
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_drop: float = 0.5
    empty_fraction: float = 0.03
    balanced: bool = False


def pad_bags(bags: list[Bag], feature_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack bags into (features [B, Nmax, D], mask [B, Nmax], labels [B])."""
    n_max = max((len(b.features) for b in bags), default=0)
    x = np.zeros((len(bags), n_max, feature_dim), np.float32)
    m = np.zeros((len(bags), n_max), np.float32)
    for i, b in enumerate(bags):
        x[i, : len(b.features)] = b.features
        m[i, : len(b.features)] = 1.0
    y = np.array([b.label for b in bags], np.int64)
    return torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(y)


def _drop_cells(bag: Bag, rng: np.random.Generator, max_drop: float) -> Bag:
    if len(bag.features) < 2 or max_drop <= 0:
        return bag
    keep = rng.random(len(bag.features)) >= rng.uniform(0, max_drop)
    if not keep.any():
        keep[rng.integers(len(keep))] = True
    return Bag(bag.features[keep], bag.cell_labels[keep])


def predict_bags(
    model: nn.Module, bags: list[Bag], feature_dim: int, batch: int = 64
) -> tuple[np.ndarray, list[np.ndarray]]:
    """ROI probabilities [B, C] and per-bag attention (length N each)."""
    model.eval()
    probs, attn = [], []
    with torch.no_grad():
        for i in range(0, len(bags), batch):
            chunk = bags[i : i + batch]
            x, m, _ = pad_bags(chunk, feature_dim)
            logits, a = model(x, m)
            probs.append(torch.softmax(logits, 1).numpy())
            attn.extend(a[j, : len(b.features)].numpy() for j, b in enumerate(chunk))
    return (np.concatenate(probs) if probs else np.zeros((0, 3), np.float32)), attn


def evaluate_bags(
    model: nn.Module, bags: list[Bag], feature_dim: int, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Classification report of ROI labels, plus how often the top-attention cell is of the
    ROI's class (attention hits the lesion)."""
    probs, attn = predict_bags(model, bags, feature_dim)
    report = classification_report(np.array([b.label for b in bags]), probs.argmax(1), class_names)
    abnormal = [(b, a) for b, a in zip(bags, attn, strict=True) if b.label > 0]
    if abnormal:
        hits = [int(b.cell_labels[int(np.argmax(a))] == b.label) for b, a in abnormal]
        report["top_attention_cell_is_roi_class"] = round(float(np.mean(hits)), 4)
    return report


def train_roi_classifier(
    model: nn.Module,
    train_bags: list[Bag],
    val_bags: list[Bag],
    settings: RoiSettings,
    seed: int,
    class_names: tuple[str, ...],
) -> list[dict[str, float]]:
    """Train the MIL model in place; return the per-epoch log (loss, accuracies)."""
    feature_dim = int(model.in_dim)
    rng = np.random.default_rng((seed, 0xB46))
    torch.manual_seed(seed)
    steps_per_epoch = -(-int(len(train_bags) * (1 + settings.empty_fraction)) // settings.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs * steps_per_epoch)
    weight = None
    if settings.balanced:
        counts = np.bincount([b.label for b in train_bags], minlength=len(class_names))
        weight = torch.tensor(
            len(train_bags) / (len(class_names) * np.maximum(counts, 1)), dtype=torch.float32
        )
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    empty = Bag(np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64))
    log = []
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        bags = [_drop_cells(b, rng, settings.max_drop) for b in train_bags]
        bags += [empty] * int(len(train_bags) * settings.empty_fraction)
        order = rng.permutation(len(bags))
        model.train()
        loss_sum, correct, total = 0.0, 0, 0
        for i in range(0, len(order), settings.batch):
            x, m, y = pad_bags([bags[j] for j in order[i : i + settings.batch]], feature_dim)
            logits, _ = model(x, m)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        val = evaluate_bags(model, val_bags, feature_dim, class_names)
        line = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / total, 4),
            "train_accuracy": round(correct / total, 4),
            "val_accuracy": val["accuracy"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.append(line)
        if (epoch + 1) % 5 == 0 or epoch == 0 or epoch + 1 == settings.epochs:
            logger.info(
                "roi_classifier epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f",
                epoch + 1,
                settings.epochs,
                line["loss"],
                line["train_accuracy"],
                line["val_accuracy"],
            )
    model.eval()
    return log
