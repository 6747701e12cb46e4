"""Train a classifier under a paper's protocol: k-fold or ratio splits, into a run folder.

`run_protocol` is the fold loop every supervised task shares (cell classifiers here, the
global-local ROI network in `train.loops.rois`); a `Learner` supplies the task's data,
batches, loss and predictions. For each fold it builds the model (seeded per fold), trains
with the preset's optimiser and per-epoch schedule, and after every epoch

- measures accuracy on the validation split when the protocol has one (ratio splits: it
  selects the epoch that is tested), else on the fold's test split for the log only (k-fold:
  the last epoch is tested, never a chosen one);
- writes `<run>/fold<k>/last.pt`: model, optimiser, scheduler, epoch, the numpy / torch /
  python RNG states, the history and the best-so-far, so `resume=True` continues exactly
  where the run stopped. With one CPU thread and deterministic kernels, a resumed run ends
  with the same weights as an uninterrupted one.

A finished fold writes `fold<k>/report.json` and is skipped on resume. At the end the run
folder gets metrics.json (per fold and mean ± std), model.pt, splits.json, the summed
confusion matrix and the training curves (see `train.runs` for the layout).
"""

from __future__ import annotations

import abc
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.data.crops import normalise
from train.data.types import ImageSet
from train.export.configs import CLASSIFIER_MEAN, CLASSIFIER_STD
from train.loops.metrics import classification_report
from train.plots import confusion_png, curves_png
from train.protocols import Protocol
from train.runs import (
    CONFUSION_PNG,
    CURVES_PNG,
    LAST_PT,
    METRICS_JSON,
    MODEL_PT,
    REPORT_JSON,
    SPLITS_JSON,
    finish_run,
    fold_dir,
    load_run,
    log_to_file,
    read_json,
    start_run,
    summarise_folds,
    write_json,
)

logger = logging.getLogger(__name__)

BEST_PT = "best.pt"
EVAL_BATCH = 128
# Called after each epoch's checkpoint is on disk, with (fold, epochs done in that fold).
EpochCallback = Callable[[int, int], None]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, the first of a tuple (the seed CNNs'
    `(logits, features)`), or the `roi_logits` of a `GlobalLocalOutput`."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "roi_logits"):
        return output.roi_logits
    return output[0]


def auto_device(device: str | None) -> torch.device:
    """`device`, or CUDA where available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Learner(abc.ABC):
    """What the fold loop needs from a task.

    Attributes:
        classes: Class names, index order.
        labels: [N] class of every item.
        groups: [N] group of every item (kept on one side of every split).
        device: Where the model runs.
    """

    classes: tuple[str, ...]
    labels: np.ndarray
    groups: np.ndarray
    device: torch.device

    @abc.abstractmethod
    def epoch_size(self, index: np.ndarray) -> int:
        """Training items one epoch over `index` yields (after any fixed augmentation)."""

    @abc.abstractmethod
    def batches(
        self, index: np.ndarray, batch: int, rng: np.random.Generator, gen: torch.Generator
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        """One shuffled, augmented epoch over `index`: (inputs, targets) on the device."""

    @abc.abstractmethod
    def loss(
        self, model: nn.Module, inputs: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and the logits [B, C] (for the training accuracy)."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, index: np.ndarray) -> np.ndarray:
        """Predicted class of the items at `index` (model in eval mode, no augmentation)."""


class CellLearner(Learner):
    """Single images, one class each (`ImageSet`), normalised as the exported classifier is.

    Args:
        images: The data set; its images must already be `input_px` square.
        augmentation: The protocol's augmentation (`none`, `flips4`, `hflip`).
        device: Where the model runs.
    """

    def __init__(self, images: ImageSet, augmentation: str, device: torch.device) -> None:
        self.images = images
        self.classes = images.classes
        self.labels = images.labels
        self.groups = images.group_ids
        self.augmentation = augmentation
        self.device = device
        self._copies = 4 if augmentation == "flips4" else 1

    def _tensor(self, index: np.ndarray) -> torch.Tensor:
        x = normalise(self.images.images[index], CLASSIFIER_MEAN, CLASSIFIER_STD)
        return torch.from_numpy(x)

    def epoch_size(self, index: np.ndarray) -> int:
        return len(index) * self._copies

    def batches(
        self, index: np.ndarray, batch: int, rng: np.random.Generator, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(index)
        order = rng.permutation(n * self._copies)
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            if len(chunk) < 2:  # BatchNorm needs two samples
                continue
            items = index[chunk % n]
            x = self._tensor(items)
            if self.augmentation == "flips4":
                # Copy 0 is the image, 1 flipped horizontally, 2 vertically, 3 both ways.
                code = torch.from_numpy(chunk // n)
                x = torch.where(((code == 1) | (code == 3))[:, None, None, None], x.flip(3), x)
                x = torch.where(((code == 2) | (code == 3))[:, None, None, None], x.flip(2), x)
            elif self.augmentation == "hflip":
                flip = torch.rand(len(chunk), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            y = torch.from_numpy(self.labels[items].astype(np.int64))
            yield x.to(self.device), y.to(self.device)

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(model(inputs))
        return nn.functional.cross_entropy(logits, targets), logits

    def predict(self, model: nn.Module, index: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(index), EVAL_BATCH):
                x = self._tensor(index[start : start + EVAL_BATCH]).to(self.device)
                out.append(logits_of(model(x)).argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def build_optimizer(protocol: Protocol, params: Any) -> torch.optim.Optimizer:
    """The protocol's optimiser over `params`."""
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
        )
    if protocol.optimizer == "adam":
        return torch.optim.Adam(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    raise ValueError(f"unknown optimizer {protocol.optimizer!r}")


def build_scheduler(
    protocol: Protocol, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """The protocol's learning-rate schedule, stepped once per epoch."""
    if protocol.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=protocol.step_epochs, gamma=protocol.gamma
        )
    if protocol.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=protocol.epochs)
    if protocol.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown schedule {protocol.schedule!r}")


def fold_seed(seed: int, fold: int) -> int:
    """Seed of one fold's model initialisation and random streams."""
    return seed * 1000 + fold


def make_splits(
    labels: np.ndarray, groups: np.ndarray, protocol: Protocol, seed: int
) -> list[dict[str, list[int]]]:
    """The protocol's splits, each `{"train", "val", "test"}` (val empty for k-fold).

    With `protocol.limit`, each part of each fold keeps at most that many items (a seeded
    random subset, in index order): smoke runs only.
    """
    from train.data.splits import kfold_splits, ratio_split

    if protocol.split == "kfold":
        parts = [
            (tr, np.zeros(0, np.int64), te)
            for tr, te in kfold_splits(labels, groups, int(protocol.folds), seed)
        ]
    else:
        parts = [ratio_split(labels, groups, protocol.fractions, seed)]
    rng = np.random.default_rng((seed, 0x11A1))

    def cap(index: np.ndarray) -> list[int]:
        index = np.asarray(index, np.int64)
        if protocol.limit is not None and len(index) > protocol.limit:
            index = np.sort(rng.choice(index, protocol.limit, replace=False))
        return [int(i) for i in index]

    return [{"train": cap(tr), "val": cap(va), "test": cap(te)} for tr, va, te in parts]


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` of weights only: tensors and plain values (dicts, lists, str, numbers),
    never pickled objects, whose loading could run any code.

    Raises:
        ValueError: the file holds something else; one sentence.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds Python objects besides weights, so it was not loaded (loading "
            "them could run code); use a file papscan wrote, or train the run again."
        ) from exc


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_states(rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    states = {
        "numpy": rng.bit_generator.state,
        "torch_generator": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    gen.set_state(states["torch_generator"])
    torch.set_rng_state(states["torch_global"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _progress(show: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (show and console.is_terminal),
    )


def _train_fold(
    learner: Learner,
    build_model: Callable[[], nn.Module],
    protocol: Protocol,
    split: dict[str, list[int]],
    fold: int,
    n_folds: int,
    run_dir: Path,
    seed: int,
    on_epoch_end: EpochCallback | None,
    show_progress: bool,
) -> dict[str, Any]:
    """Train one fold (continuing from its last.pt if there is one); return its report."""
    fdir = fold_dir(run_dir, fold)
    train_idx = np.asarray(split["train"], np.int64)
    val_idx = np.asarray(split["val"], np.int64)
    test_idx = np.asarray(split["test"], np.int64)
    has_val = len(val_idx) > 0
    watch_idx, watch_key = (val_idx, "val_accuracy") if has_val else (test_idx, "test_accuracy")

    torch.manual_seed(fold_seed(seed, fold))
    model = build_model().to(learner.device)
    optimizer = build_optimizer(protocol, model.parameters())
    scheduler = build_scheduler(protocol, optimizer)
    rng = np.random.default_rng(fold_seed(seed, fold))
    gen = torch.Generator().manual_seed(fold_seed(seed, fold))
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "accuracy": -1.0}
    train_s = 0.0
    start_epoch = 0
    last_path = fdir / LAST_PT
    if last_path.exists():
        ckpt = load_weights(last_path, learner.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        train_s = ckpt["train_s"]
        _restore_rng(ckpt["rng"], rng, gen)
        logger.info("fold %d: resuming after epoch %d", fold, start_epoch)

    n_batches = math.ceil(learner.epoch_size(train_idx) / protocol.batch)
    for epoch in range(start_epoch, protocol.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, seen, correct = 0.0, 0, 0
        label = f"fold {fold + 1}/{n_folds} epoch {epoch + 1}/{protocol.epochs}"
        with _progress(show_progress) as bar:
            task = bar.add_task(label, total=n_batches)
            for inputs, targets in learner.batches(train_idx, protocol.batch, rng, gen):
                loss, logits = learner.loss(model, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(targets)
                seen += len(targets)
                correct += int((logits.detach().argmax(1) == targets).sum())
                bar.advance(task)
        scheduler.step()
        watched = learner.predict(model, watch_idx)
        accuracy = float((watched == learner.labels[watch_idx]).mean()) if len(watch_idx) else 0.0
        seconds = time.perf_counter() - t0
        train_s += seconds
        line = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / max(seen, 1), 5),
            "train_accuracy": round(correct / max(seen, 1), 4),
            watch_key: round(accuracy, 4),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 2),
        }
        history.append(line)
        if has_val and accuracy > best["accuracy"]:
            best = {"epoch": epoch + 1, "accuracy": accuracy}
            _save_atomic(model.state_dict(), fdir / BEST_PT)
        logger.info(
            "fold %d/%d epoch %d/%d loss %.4f train_acc %.4f %s %.4f%s (%.1f s)",
            fold + 1,
            n_folds,
            epoch + 1,
            protocol.epochs,
            line["loss"],
            line["train_accuracy"],
            watch_key,
            accuracy,
            "" if has_val else " (log only)",
            seconds,
        )
        _save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "train_s": train_s,
                "rng": _rng_states(rng, gen),
            },
            last_path,
        )
        if on_epoch_end is not None:
            on_epoch_end(fold, epoch + 1)

    if has_val:
        model.load_state_dict(load_weights(fdir / BEST_PT, learner.device))
    y_pred = learner.predict(model, test_idx)
    report = classification_report(learner.labels[test_idx], y_pred, learner.classes)
    f1s = [report["per_class"][c]["f1"] for c in learner.classes]
    report["macro_f1"] = round(float(np.mean(f1s)), 4)
    report.update({"fold": fold, "epochs": protocol.epochs, "train_s": round(train_s, 1)})
    if has_val:
        report["selected_epoch"] = best["epoch"]
        report["selected_val_accuracy"] = round(best["accuracy"], 4)
    write_json(fdir / REPORT_JSON, {**report, "history": history})
    logger.info(
        "fold %d/%d test accuracy %.4f weighted F1 %.4f (%d items)",
        fold + 1,
        n_folds,
        report["accuracy"],
        report["weighted_f1"],
        len(test_idx),
    )
    return report


def fold_weights(run_dir: Path, fold: int, selected_on_val: bool) -> dict[str, torch.Tensor]:
    """A finished fold's weights: best-on-validation for ratio splits, else the last epoch."""
    fdir = run_dir / f"fold{fold}"
    if selected_on_val:
        return load_weights(fdir / BEST_PT)
    return load_weights(fdir / LAST_PT)["model"]


def median_fold(accuracies: list[float]) -> int:
    """Index of the fold whose test accuracy is the median (the lower one for an even count;
    ties broken by fold index). Exporting it, rather than the best fold, avoids reporting
    the mean over folds while shipping the luckiest one."""
    order = sorted(range(len(accuracies)), key=lambda k: (accuracies[k], k))
    return order[(len(order) - 1) // 2]


def run_protocol(
    learner: Learner,
    run_dir: Path,
    *,
    task: str,
    arch: str,
    arch_kwargs: dict[str, Any],
    dataset: str,
    data_sha256: str,
    input_px: int,
    protocol: Protocol,
    seed: int,
    resume: bool = False,
    command: str = "",
    run_extra: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train every fold of `protocol` and write the run folder.

    Args:
        learner: The task's data, batches, loss and predictions.
        run_dir: The run folder (new and empty, or the one to resume).
        task: `cells` or `rois` (run.json's `task`).
        arch: Registered model name.
        arch_kwargs: Extra builder arguments (`create_model(arch, num_classes=C, **kw)`).
        dataset: The data spec (run.json's `dataset`).
        data_sha256: Hash of the data (a resumed run must see the same).
        input_px: Network input side, px.
        protocol: The preset with its overrides.
        seed: Seed of the splits, initialisations and shuffles.
        resume: Continue the run in `run_dir`: finished folds are kept, the current fold
            continues from its last epoch.
        command: The command line, for run.json.
        run_extra: More run.json fields (e.g. `cells_per_roi`, `crop_px`).
        on_epoch_end: Called with (fold, epochs done) after each epoch's checkpoint.
        show_progress: Draw a progress bar per epoch (on a terminal).

    Returns:
        The metrics.json content.

    Raises:
        ValueError: A resumed run's settings or data differ from the ones given.
    """
    from train.models import create_model

    t_start = time.perf_counter()
    info = {
        "task": task,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "dataset": dataset,
        "classes": list(learner.classes),
        "input_px": input_px,
        "mean": list(CLASSIFIER_MEAN),
        "std": list(CLASSIFIER_STD),
        "protocol": protocol.to_dict(),
        "seed": seed,
        "data_sha256": data_sha256,
        "command": command,
        **(run_extra or {}),
    }
    if resume:
        run = load_run(run_dir)
        for key, value in info.items():
            if key != "command" and _jsonish(run.get(key)) != _jsonish(value):
                raise ValueError(f"cannot resume {run_dir}: its {key} differs from this run's")
        splits = read_json(run_dir / SPLITS_JSON)["folds"]
        logger.info("resuming run %s", run_dir)
    else:
        run = start_run(run_dir, info)
        splits = make_splits(learner.labels, learner.groups, protocol, seed)
        write_json(run_dir / SPLITS_JSON, {"folds": splits, "exported_fold": None})

    def build_model() -> nn.Module:
        return create_model(arch, num_classes=len(learner.classes), **arch_kwargs)

    with log_to_file(run_dir):
        logger.info(
            "run %s: %s on %s (%d items, %d classes), protocol %s, %d fold(s), seed %d",
            run_dir,
            arch,
            dataset,
            len(learner.labels),
            len(learner.classes),
            protocol.name,
            len(splits),
            seed,
        )
        reports, histories = [], []
        for k, split in enumerate(splits):
            report_path = run_dir / f"fold{k}" / REPORT_JSON
            if report_path.exists():
                report = read_json(report_path)
                history = report.pop("history")
                logger.info("fold %d/%d already finished", k + 1, len(splits))
            else:
                report = _train_fold(
                    learner,
                    build_model,
                    protocol,
                    split,
                    k,
                    len(splits),
                    run_dir,
                    seed,
                    on_epoch_end,
                    show_progress,
                )
                history = read_json(report_path)["history"]
            reports.append(report)
            histories.append(history)

        selected_on_val = protocol.split == "ratio"
        exported = 0 if selected_on_val else median_fold([r["accuracy"] for r in reports])
        torch.save(
            {
                "arch": arch,
                "arch_kwargs": arch_kwargs,
                "num_classes": len(learner.classes),
                "state_dict": fold_weights(run_dir, exported, selected_on_val),
                "fold": exported,
            },
            run_dir / MODEL_PT,
        )
        write_json(run_dir / SPLITS_JSON, {"folds": splits, "exported_fold": exported})
        metrics = {
            "folds": reports,
            "summary": summarise_folds(reports, learner.classes),
            "exported_fold": exported,
        }
        write_json(run_dir / METRICS_JSON, metrics)
        confusion = np.sum([np.asarray(r["confusion"]) for r in reports], axis=0)
        confusion_png(
            confusion,
            learner.classes,
            run_dir / CONFUSION_PNG,
            f"{arch} on {dataset}: test, summed over {len(reports)} fold(s)",
        )
        curves_png(
            histories,
            run_dir / CURVES_PNG,
            "val_accuracy" if selected_on_val else "test_accuracy",
            f"{arch} on {dataset}, protocol {protocol.name}",
        )
        s = metrics["summary"]
        logger.info(
            "run %s done: accuracy %.4f ± %.4f, weighted F1 %.4f ± %.4f; exported fold %d",
            run_dir,
            s["accuracy"]["mean"],
            s["accuracy"]["std"],
            s["weighted_f1"]["mean"],
            s["weighted_f1"]["std"],
            exported,
        )
    run = load_run(run_dir)
    finish_run(run_dir, run, _duration(run, t_start, resume))
    return metrics


def _jsonish(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    import json

    return json.loads(json.dumps(value, default=str))


def _duration(run: dict[str, Any], t_start: float, resume: bool) -> float:
    """Wall-clock seconds from the run's start (its started_utc when resumed) to now."""
    if not resume:
        return time.perf_counter() - t_start
    import datetime as dt

    started = dt.datetime.fromisoformat(run["started_utc"])
    return (dt.datetime.now(dt.UTC) - started).total_seconds()


def train_cells(
    images: ImageSet,
    run_dir: Path,
    *,
    arch: str,
    protocol: Protocol,
    arch_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    resume: bool = False,
    command: str = "",
    device: str | None = None,
    on_epoch_end: EpochCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a cell classifier under `protocol` into `run_dir` (see `run_protocol`).

    Args:
        images: The data set, opened at `protocol.input_px` (`open_image_set(spec, S)`).
        run_dir: The run folder.
        arch: Registered model name; its forward returns logits, or (logits, features).
        protocol: A `cells` preset, with any overrides.
        arch_kwargs: Extra builder arguments; `cvm_cervix` gets `img_size=input_px`
            unless given.
        seed: Seed of splits, initialisation and shuffles.
        resume: Continue the run in `run_dir`.
        command: The command line, for run.json.
        device: `cpu`, `cuda`, …; default CUDA where available.
        on_epoch_end: Called with (fold, epochs done) after each epoch's checkpoint.
        show_progress: Draw a progress bar per epoch (on a terminal).

    Returns:
        The metrics.json content.

    Raises:
        ValueError: A protocol for another task, or images not `input_px` square.
    """
    if protocol.task != "cells":
        raise ValueError(f"protocol {protocol.name} trains {protocol.task}, not cells")
    side = protocol.input_px
    if images.images.shape[1:3] != (side, side):
        raise ValueError(
            f"{images.name} images are {images.images.shape[2]}x{images.images.shape[1]} px; "
            f"the protocol's input is {side}x{side}"
        )
    kwargs = dict(arch_kwargs or {})
    if arch == "cvm_cervix":
        kwargs.setdefault("img_size", side)  # DeiT's patch grid is fixed at build time
    learner = CellLearner(images, protocol.augmentation, auto_device(device))
    return run_protocol(
        learner,
        run_dir,
        task="cells",
        arch=arch,
        arch_kwargs=kwargs,
        dataset=images.name,
        data_sha256=images.sha256(),
        input_px=side,
        protocol=protocol,
        seed=seed,
        resume=resume,
        command=command,
        on_epoch_end=on_epoch_end,
        show_progress=show_progress,
    )
