"""Train the global-local ROI network (paper 002) on bags of cell crops, into a run folder.

An ROI is a `CellBags` bag: N cell crops (padded, with a mask) and one ROI label. The
loss is the paper's `L_ROI + 0.25 L_cell` (`global_local_loss`: the cell branches learn
from the cells the cross attention ranks highest and lowest); metrics are at ROI level.
Folds, checkpoints, resume and the run folder are `train.loops.supervised.run_protocol`'s.

Crops are cut at `crop_px` (the bags' size) and resized to the protocol's `input_px` per
batch when the two differ (the paper resizes each detected cell to 224x224).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines.preprocess import normalise
from train.data.types import CellBags
from train.export.configs import CLASSIFIER_MEAN, CLASSIFIER_STD
from train.loops.supervised import EpochCallback, Learner, auto_device, run_protocol
from train.protocols import Protocol

EVAL_BAGS = 8


class BagLearner(Learner):
    """ROIs as bags of cells for a model returning a `GlobalLocalOutput`.

    Args:
        bags: The ROIs.
        groups: [R] group of each ROI (e.g. its slide), or None for one group per ROI.
        input_px: Side the crops are resized to before the network.
        device: Where the model runs.
        cell_weight: lambda of `L_ROI + lambda L_cell`.
        pseudo_fraction: Share of each bag's cells taken as top / least attentive.
    """

    def __init__(
        self,
        bags: CellBags,
        groups: np.ndarray | None,
        input_px: int,
        device: torch.device,
        cell_weight: float = 0.25,
        pseudo_fraction: float = 0.1,
    ) -> None:
        if groups is not None and len(groups) != len(bags):
            raise ValueError(f"{len(groups)} groups for {len(bags)} bags")
        self.bags = bags
        self.classes = bags.classes
        self.labels = bags.labels
        self.groups = np.arange(len(bags)) if groups is None else np.asarray(groups)
        self.input_px = input_px
        self.device = device
        self.cell_weight = cell_weight
        self.pseudo_fraction = pseudo_fraction

    def inputs(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags `index` as network inputs: normalised cells resized to `input_px`, and masks."""
        crops = self.bags.crops[index]
        b, n, s = crops.shape[:3]
        x = torch.from_numpy(
            normalise(crops.reshape(b * n, s, s, 3), CLASSIFIER_MEAN, CLASSIFIER_STD)
        )
        if s != self.input_px:
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False
            )
        x = x.reshape(b, n, 3, self.input_px, self.input_px)
        mask = torch.from_numpy(self.bags.mask[index])
        return x.to(self.device), mask.to(self.device)

    def epoch_size(self, index: np.ndarray) -> int:
        return len(index)

    def batches(
        self, index: np.ndarray, batch: int, rng: np.random.Generator, gen: torch.Generator
    ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        order = index[rng.permutation(len(index))]
        for start in range(0, len(order), batch):
            items = order[start : start + batch]
            if len(items) < 2:  # BatchNorm in the heads needs two samples
                continue
            y = torch.from_numpy(self.labels[items].astype(np.int64)).to(self.device)
            yield self.inputs(items), y

    def loss(
        self, model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from train.models.global_local import GlobalLocalOutput, global_local_loss

        cells, mask = inputs
        out = model(cells, mask)
        if not isinstance(out, GlobalLocalOutput):
            raise ValueError(f"{type(model).__name__} does not return a GlobalLocalOutput")
        loss, _ = global_local_loss(out, targets, mask, self.cell_weight, self.pseudo_fraction)
        return loss, out.roi_logits

    def predict(self, model: nn.Module, index: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(index), EVAL_BAGS):
                cells, mask = self.inputs(index[start : start + EVAL_BAGS])
                out.append(model(cells, mask).roi_logits.argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def open_cell_bags(
    spec: str,
    cells_per_roi: int,
    crop_px: int,
    root: Path | None = None,
    cache_dir: Path = Path("runs/cache"),
) -> tuple[CellBags, np.ndarray]:
    """Open ROIs as bags of detected cells, with the group (slide) of each ROI.

    Args:
        spec: `lbc` (the Mendeley LBC fields through `lbc_cell_bags`).
        cells_per_roi: Cells kept per ROI (N).
        crop_px: Side of the cut around each cell, px at the detector's scale.
        root: The shared data folder; default `train.data.paths.default_data_root()`.
        cache_dir: Where the detected bags are cached.

    Returns:
        (bags, [R] group ids).

    Raises:
        ValueError: A spec with no ROI bags.
    """
    from train.data.lbc import lbc_cell_bags, slide_of
    from train.data.paths import default_data_root

    if spec != "lbc":
        raise ValueError(f"no ROI bags for dataset {spec!r}; ROI training reads 'lbc'")
    bags = lbc_cell_bags(
        default_data_root() if root is None else root,
        crop_px=crop_px,
        cells_per_field=cells_per_roi,
        cache_dir=cache_dir,
    )
    _, groups = np.unique(np.asarray([slide_of(s) for s in bags.sources]), return_inverse=True)
    return bags, groups.astype(np.int64)


def train_rois(
    bags: CellBags,
    run_dir: Path,
    *,
    protocol: Protocol,
    arch: str = "global_local_roi",
    arch_kwargs: dict[str, Any] | None = None,
    groups: np.ndarray | None = None,
    seed: int = 0,
    resume: bool = False,
    command: str = "",
    device: str | None = None,
    cell_weight: float = 0.25,
    pseudo_fraction: float = 0.1,
    on_epoch_end: EpochCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train an ROI network under `protocol` into `run_dir`; metrics at ROI level.

    Args:
        bags: The ROIs as bags of cell crops (e.g. `lbc_cell_bags`).
        run_dir: The run folder (new, or the one to resume).
        protocol: A `rois` preset (`002`), with any overrides.
        arch: Registered model taking (cells [B, N, 3, S, S], mask [B, N]) and returning a
            `GlobalLocalOutput`.
        arch_kwargs: Extra builder arguments (backbone, embed_dim, …).
        groups: [R] group of each ROI, never split across parts (fields of one slide).
        seed: Seed of splits, initialisation and shuffles.
        resume: Continue the run in `run_dir`.
        command: The command line, for run.json.
        device: `cpu`, `cuda`, …; default CUDA where available.
        cell_weight: lambda of the paper's loss (0.25).
        pseudo_fraction: Share of cells taken as pseudo-labelled (0.1).
        on_epoch_end: Called with (fold, epochs done) after each epoch's checkpoint.
        show_progress: Draw a progress bar per epoch (on a terminal).

    Returns:
        The metrics.json content.

    Raises:
        ValueError: A protocol for another task.
    """
    if protocol.task != "rois":
        raise ValueError(f"protocol {protocol.name} trains {protocol.task}, not rois")
    learner = BagLearner(
        bags, groups, protocol.input_px, auto_device(device), cell_weight, pseudo_fraction
    )
    extra = {
        "cells_per_roi": int(bags.crops.shape[1]),
        "crop_px": int(bags.crops.shape[2]),
        "cell_weight": cell_weight,
        "pseudo_fraction": pseudo_fraction,
    }
    return run_protocol(
        learner,
        run_dir,
        task="rois",
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        dataset=bags.name,
        data_sha256=bags.sha256(),
        input_px=protocol.input_px,
        protocol=protocol,
        seed=seed,
        resume=resume,
        command=command,
        run_extra=extra,
        on_epoch_end=on_epoch_end,
        show_progress=show_progress,
    )
