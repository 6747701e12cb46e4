"""Train and evaluate the `cell_classifier` (SE CNN over 96x96 fixed-field crops).

Training data per epoch: fresh crops of every training cell of the synthetic fields (a new
Gaussian centre jitter each epoch mimics detector error) plus the Herlev training images
at a reduced loss weight; random flips, 90-degree rotations and a small per-channel gain.
Logs one line per epoch (loss, train accuracy, held-out synthetic accuracy).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from train.data.crops import normalise
from train.export.configs import CLASSIFIER_MEAN, CLASSIFIER_STD
from train.loops.metrics import classification_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSettings:
    """Cell classifier training settings.

    Attributes:
        model_name: Registered model name.
        epochs: Passes over the (re-cut) training crops.
        batch: Crops per batch.
        lr: Peak AdamW learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        label_smoothing: Cross-entropy label smoothing.
        herlev_weight: Loss weight of a Herlev image relative to a synthetic crop.
        herlev_repeats: Times the Herlev training images appear per epoch.
        jitter_px: Std of the nucleus-centre jitter of synthetic crops, px.
        copies: Crops per synthetic cell per epoch.
        input_px: Crop side, px.
    """

    model_name: str = "se_cellnet_small"
    epochs: int = 6
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    herlev_weight: float = 0.5
    herlev_repeats: int = 2
    jitter_px: float = 2.5
    copies: int = 1
    input_px: int = 96


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips, 90-degree rotations and a per-channel gain of +-6 %, per sample.

    Args:
        x: [B, 3, H, W] normalised crops (H == W).
        gen: Torch random generator.
    """
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    k = torch.randint(0, 4, (b,), generator=gen)
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    gain = 1.0 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12
    mean = torch.tensor(CLASSIFIER_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLASSIFIER_STD).view(1, 3, 1, 1)
    # gain applies to transmitted light (0-255 scale), then re-normalise
    return ((out * std + mean) * gain - mean) / std


def predict(
    model: nn.Module, crops_nhwc: np.ndarray, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [N, C] and features [N, D] of uint8 NHWC crops."""
    model.eval()
    probs, feats = [], []
    with torch.no_grad():
        for i in range(0, len(crops_nhwc), batch):
            x = torch.from_numpy(
                normalise(crops_nhwc[i : i + batch], CLASSIFIER_MEAN, CLASSIFIER_STD)
            )
            logits, f = model(x)
            probs.append(torch.softmax(logits, 1).numpy())
            feats.append(f.numpy())
    if not probs:
        return np.zeros((0, 3), np.float32), np.zeros(
            (0, getattr(model, "embed_dim", 64)), np.float32
        )
    return np.concatenate(probs), np.concatenate(feats)


def evaluate(
    model: nn.Module, crops_nhwc: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Classification report of the model on crops."""
    probs, _ = predict(model, crops_nhwc)
    return classification_report(labels, probs.argmax(1), class_names)


def train_classifier(
    model: nn.Module,
    sample_synthetic: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    herlev_images: np.ndarray,
    herlev_labels: np.ndarray,
    val_crops: np.ndarray,
    val_labels: np.ndarray,
    settings: ClassifierSettings,
    seed: int,
    class_names: tuple[str, ...],
) -> list[dict[str, float]]:
    """Train `model` in place; return the per-epoch log.

    Args:
        model: A `SeCellNet` (returns logits and features).
        sample_synthetic: rng -> (crops [N, H, W, 3] uint8, labels [N]) of every training
            cell, freshly jittered (called once per epoch).
        herlev_images: [M, H, W, 3] uint8 Herlev training images (M may be 0).
        herlev_labels: [M] class indices.
        val_crops: Held-out synthetic crops for the per-epoch line.
        val_labels: Their labels.
        settings: Training settings.
        seed: Random seed.
        class_names: Class names (index order).
    """
    rng = np.random.default_rng((seed, 0xC1A55))
    gen = torch.Generator().manual_seed(seed)
    first_x, first_y = sample_synthetic(rng)
    per_epoch = len(first_x) + settings.herlev_repeats * len(herlev_images)
    steps = settings.epochs * math.ceil(per_epoch / settings.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=settings.label_smoothing)
    log = []
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        sx, sy = (first_x, first_y) if epoch == 0 else sample_synthetic(rng)
        hx = (
            np.concatenate([herlev_images] * settings.herlev_repeats)
            if len(herlev_images)
            else sx[:0]
        )
        hy = (
            np.concatenate([herlev_labels] * settings.herlev_repeats)
            if len(herlev_images)
            else sy[:0]
        )
        x_all = np.concatenate([sx, hx])
        y_all = np.concatenate([sy, hy])
        w_all = np.concatenate(
            [np.ones(len(sx), np.float32), np.full(len(hx), settings.herlev_weight, np.float32)]
        )
        order = rng.permutation(len(x_all))
        model.train()
        total = correct = 0
        loss_sum = 0.0
        for i in range(0, len(order), settings.batch):
            idx = order[i : i + settings.batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = augment(
                torch.from_numpy(normalise(x_all[idx], CLASSIFIER_MEAN, CLASSIFIER_STD)), gen
            )
            y = torch.from_numpy(y_all[idx])
            w = torch.from_numpy(w_all[idx])
            logits, _ = model(x)
            loss = (loss_fn(logits, y) * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < steps - 1:
                sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
        val = (
            evaluate(model, val_crops, val_labels, class_names)
            if len(val_crops)
            else {"accuracy": float("nan")}
        )
        line = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / max(total, 1), 4),
            "train_accuracy": round(correct / max(total, 1), 4),
            "val_synthetic_accuracy": val["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.append(line)
        logger.info(
            "cell_classifier epoch %d/%d loss %.4f train_acc %.4f val_synth_acc %.4f (%.0f s)",
            epoch + 1,
            settings.epochs,
            line["loss"],
            line["train_accuracy"],
            line["val_synthetic_accuracy"],
            line["seconds"],
        )
    model.eval()
    return log
