"""Train the `cell_classifier` on real cells, cut as the scanner cuts them.

Data (`real_cell_sets`): every labelled squamous cell of the CRIC fields (Bethesda classes
mapped to papscan's grades), the Herlev cells (on a white field at their true size), the
annotated SIPaKMeD metaplastic cells (benign: NILM), and synthetic crops as a minority.
Each set is split by its fixed groups (train/data/heldout.py): the model learns from
`train`, the best epoch is chosen on `val`, and the card reports `test`.

Training: class-balanced sampling (CRIC is three-quarters NILM), AdamW with a one-cycle
schedule, and augmentation for what differs between labs and scans: stain (per-channel
optical-density gain and a brightness shift), scale (±10 %: the scale estimates of the
sets are good to perhaps ±20 %), any rotation, flips and a nucleus-centre shift (the
detector's error). The field outside the crop stays glass white.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.data.heldout import assign_parts, split_record
from train.data.labels import BETHESDA_TO_PAPSCAN
from train.data.real_fields import field_parts, load_real_set
from train.data.scanner_crops import field_cell_crops, herlev_scanner_crops
from train.loops.metrics import abnormal_report, classification_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealCellSettings:
    """Real-cell classifier training settings.

    Attributes:
        model_name: Registered model name (an ImageNet EfficientNet-Lite by default).
        epochs: Epochs (each draws `samples_per_epoch` crops, class-balanced).
        samples_per_epoch: Crops per epoch.
        batch: Crops per batch.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        label_smoothing: Cross-entropy label smoothing.
        synthetic_fraction: Share of each epoch drawn from synthetic crops.
        stain_jitter: Std of the per-channel optical-density gain.
        scale_jitter: Largest relative rescale of a crop.
        shift_px: Largest nucleus-centre shift, px.
        pretrained: Start from ImageNet weights.
    """

    model_name: str = "efficientnet_lite0_cell"
    epochs: int = 8
    samples_per_epoch: int = 4096
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    synthetic_fraction: float = 0.1
    stain_jitter: float = 0.12
    scale_jitter: float = 0.1
    shift_px: float = 3.0
    pretrained: bool = True


@dataclass
class CellPart:
    """Crops of one part of the real sets, with where each came from."""

    crops: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one per block, for counts

    def add(self, source: str, crops: np.ndarray, labels: np.ndarray) -> None:
        if len(crops):
            self.crops.append(crops)
            self.labels.append(labels.astype(np.int64))
            self.sources.append(source)

    def arrays(self, px: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.crops:
            return np.zeros((0, px, px, 3), np.uint8), np.zeros(0, np.int64)
        return np.concatenate(self.crops), np.concatenate(self.labels)

    def by_source(self, source: str, px: int) -> tuple[np.ndarray, np.ndarray]:
        idx = [i for i, s in enumerate(self.sources) if s == source]
        if not idx:
            return np.zeros((0, px, px, 3), np.uint8), np.zeros(0, np.int64)
        return (
            np.concatenate([self.crops[i] for i in idx]),
            np.concatenate([self.labels[i] for i in idx]),
        )


def real_cell_sets(
    root: Path, classes: tuple[str, ...], mpp: float, px: int
) -> tuple[dict[str, CellPart], dict[str, Any]]:
    """Every real labelled cell, as the scanner would cut it, by part.

    Returns:
        Part (`train`, `val`, `test`) -> its crops tagged by set (`cric`, `herlev`,
        `sipakmed`), and the card's record of the data and splits.
    """
    parts = {p: CellPart() for p in ("train", "val", "test")}
    record: dict[str, Any] = {}
    for set_name, tag in (("cric_fields", "cric"), ("sipakmed_metaplastic", "sipakmed")):
        try:
            fields_all = load_real_set(root, set_name)
        except FileNotFoundError as exc:
            logger.warning("%s skipped: %s", set_name, exc)
            continue
        assignment = field_parts(fields_all)
        for f in fields_all:
            crops, _ = field_cell_crops(f, mpp, px)
            if f.point_labels:
                grades = [BETHESDA_TO_PAPSCAN[b] for b in f.point_labels]
            else:
                grades = [f.grade or classes[0]] * len(crops)
            parts[assignment[f.group]].add(tag, crops, np.array([classes.index(g) for g in grades]))
        record[tag] = split_record(set_name, assignment)
    try:
        herlev = herlev_scanner_crops(root, mpp, px, classes)
        groups = [str(g) for g in herlev.group_ids]
        assignment = assign_parts(
            "herlev", [(g, classes[y]) for g, y in zip(groups, herlev.labels, strict=True)]
        )
        part_of = np.array([assignment[g] for g in groups])
        for p in parts:
            idx = np.flatnonzero(part_of == p)
            parts[p].add("herlev", herlev.images[idx], herlev.labels[idx])
        record["herlev"] = split_record("herlev", assignment)
    except (FileNotFoundError, ValueError) as exc:
        logger.warning("Herlev skipped: %s", exc)
    for p, part in parts.items():
        _, y = part.arrays(px)
        record.setdefault("cells", {})[p] = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    return parts, record


def _augment(x: torch.Tensor, gen: torch.Generator, settings: RealCellSettings) -> torch.Tensor:
    """Stain, scale, rotation, flip and shift of [B, 3, H, W] crops on the 0..255 scale."""
    b, _, h, _ = x.shape
    od = -torch.log((x + 1.0) / 256.0)
    gain = 1.0 + settings.stain_jitter * torch.randn(b, 3, 1, 1, generator=gen)
    bright = 1.0 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (torch.exp(-od * gain.clamp(0.6, 1.4)) * 256.0 - 1.0) * bright
    angle = torch.rand(b, generator=gen) * 2 * math.pi
    scale = 1.0 + settings.scale_jitter * (2 * torch.rand(b, generator=gen) - 1)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    shift = settings.shift_px * (2 * torch.rand(b, 2, generator=gen) - 1) * 2 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample the difference from glass so the field beyond the crop comes out white.
    out = F.grid_sample(x - 255.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + 255.0).clamp(0.0, 255.0)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _to_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).float()


def predict_probs(
    model: nn.Module,
    crops: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and features of uint8 NHWC crops."""
    model.eval()
    probs, feats = [], []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            logits, f = model(_normalise(_to_tensor(crops[i : i + batch]), mean, std))
            probs.append(torch.softmax(logits, 1).numpy())
            feats.append(f.numpy())
    return np.concatenate(probs), np.concatenate(feats)


def cell_metrics(
    model: nn.Module,
    crops: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    """Grade report and normal-vs-abnormal report of the model on crops."""
    probs, _ = predict_probs(model, crops, mean, std)
    return {
        **classification_report(labels, probs.argmax(1), classes),
        "abnormal": abnormal_report(labels != 0, 1.0 - probs[:, 0]),
    }


def train_real_classifier(
    model: nn.Module,
    train_x: np.ndarray,
    train_y: np.ndarray,
    synth_x: np.ndarray,
    synth_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    classes: tuple[str, ...],
    settings: RealCellSettings,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[list[dict[str, float]], int]:
    """Train `model` in place, keeping the weights of the epoch best on `val`.

    The validation score is the abnormal-cell ROC AUC plus the balanced grade accuracy
    (the first ranks the slide's suspicion, the second names its grade).

    Returns:
        The per-epoch log and the best epoch (1-based).
    """
    rng = np.random.default_rng((seed, 0xCE11))
    gen = torch.Generator().manual_seed(seed)
    k = len(classes)
    class_idx = [np.flatnonzero(train_y == c) for c in range(k)]
    n_synth = int(settings.samples_per_epoch * settings.synthetic_fraction) if len(synth_x) else 0
    n_real = settings.samples_per_epoch - n_synth
    steps = settings.epochs * math.ceil(settings.samples_per_epoch / settings.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    log, best, best_state, best_epoch = [], -1.0, None, 0
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        per_class = n_real // k
        idx = np.concatenate([rng.choice(ix, per_class) for ix in class_idx if len(ix)])
        xs = [train_x[idx]]
        ys = [train_y[idx]]
        if n_synth:
            s = rng.choice(len(synth_x), n_synth)
            xs.append(synth_x[s])
            ys.append(synth_y[s])
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        order = rng.permutation(len(x_all))
        model.train()
        loss_sum = correct = total = 0.0
        for i in range(0, len(order), settings.batch):
            sel = order[i : i + settings.batch]
            if len(sel) < 2:
                continue
            x = _normalise(_augment(_to_tensor(x_all[sel]), gen, settings), mean, std)
            y = torch.from_numpy(y_all[sel])
            logits, _ = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch < steps - 1:
                sched.step()
            loss_sum += loss.item() * len(sel)
            total += len(sel)
            correct += int((logits.argmax(1) == y).sum())
        val = cell_metrics(model, val_x, val_y, classes, mean, std)
        recalls = [v["recall"] for v in val["per_class"].values() if v["support"]]
        score = val["abnormal"]["roc_auc"] + float(np.mean(recalls))
        line = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / max(total, 1), 4),
            "train_accuracy": round(correct / max(total, 1), 4),
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": round(float(np.mean(recalls)), 4),
            "val_abnormal_auc": val["abnormal"]["roc_auc"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.append(line)
        logger.info("cell_classifier epoch %d/%d %s", epoch + 1, settings.epochs, line)
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return log, best_epoch
