"""Evaluate a finished run's exported model (model.pt) on a data set: `evaluate_run`.

On the run's own data set the default is its test split of the exported fold (the figures
then equal that fold's in metrics.json); on another data set it is every item. A data set
whose classes differ from the run's is mapped onto them by name, or through one of the
maps of `train.data.labels` (e.g. Herlev's 7 classes onto NILM / LSIL / HSIL); the report
is over the run's classes. Results go to `<run>/eval-<dataset>/metrics.json` and
`confusion.png` (`eval-<dataset>-all` for the whole of the run's own data set).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import labels as label_maps
from train.loops.metrics import classification_report
from train.plots import confusion_png
from train.runs import (
    CONFUSION_PNG,
    METRICS_JSON,
    MODEL_PT,
    SPLITS_JSON,
    load_run,
    read_json,
    slug,
    utc_now,
    write_json,
)

logger = logging.getLogger(__name__)

# Maps from a data set's class names to a coarser scheme (train/data/labels.py).
LABEL_MAPS: dict[str, Mapping[str, str]] = {
    "HERLEV_TO_BINARY": label_maps.HERLEV_TO_BINARY,
    "HERLEV_TO_BETHESDA": label_maps.HERLEV_TO_BETHESDA,
    "CRIC_TO_BETHESDA": label_maps.CRIC_TO_BETHESDA,
    "BETHESDA_TO_PAPSCAN": label_maps.BETHESDA_TO_PAPSCAN,
    "SIPAKMED_TO_GROUP": label_maps.SIPAKMED_TO_GROUP,
    "LBC_TO_BETHESDA": label_maps.LBC_TO_BETHESDA,
}


def class_map(
    data_classes: tuple[str, ...], run_classes: tuple[str, ...]
) -> tuple[dict[int, int], list[str]]:
    """Index map from a data set's classes onto a run's, and the label maps it used.

    Tried in order: the same names (the data's classes a subset of the run's); one map of
    `LABEL_MAPS`; two of them in sequence (e.g. LBC -> Bethesda -> papscan's three).

    Returns:
        (data index -> run index, names of the maps applied, [] for names alone).

    Raises:
        ValueError: No way to map every data class onto a run class.
    """
    if set(data_classes) <= set(run_classes):
        return label_maps.class_index_map(data_classes, run_classes), []
    chains: list[list[str]] = [[a] for a in LABEL_MAPS]
    chains += [[a, b] for a in LABEL_MAPS for b in LABEL_MAPS if a != b]
    for chain in chains:
        names: dict[str, str] = {}
        for cls in data_classes:
            name: str | None = cls
            for step in chain:
                name = LABEL_MAPS[step].get(name) if name is not None else None
            if name is None or name not in run_classes:
                break
            names[cls] = name
        else:
            return label_maps.class_index_map(data_classes, run_classes, names), chain
    raise ValueError(
        f"the data's classes {list(data_classes)} cannot be mapped onto the run's "
        f"{list(run_classes)} by name or through train/data/labels.py"
    )


def _load_model(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    from train.loops.supervised import load_weights
    from train.models import create_model

    checkpoint = load_weights(run_dir / MODEL_PT, device)
    model = create_model(
        checkpoint["arch"], num_classes=checkpoint["num_classes"], **checkpoint["arch_kwargs"]
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), int(checkpoint["fold"])


def evaluate_run(
    run_dir: Path,
    data_spec: str | None = None,
    split: str | None = None,
    root: Path | None = None,
    device: str | None = None,
    cache_dir: Path = Path("runs/cache"),
) -> dict[str, Any]:
    """Re-run the metrics of a run's exported model on a data set.

    Args:
        run_dir: A finished `cells` or `rois` run folder.
        data_spec: A data set spec (`train.data.catalog`), default the run's own.
        split: `test` (the exported fold's test items; the run's own data set only) or
            `all`; default `test` on the run's data set, `all` on another.
        root: The shared data folder; default `train.data.paths.default_data_root()`.
        device: `cpu`, `cuda`, …; default CUDA where available.
        cache_dir: Cache of detected cell bags (`rois` runs).

    Returns:
        The report written to `<run>/eval-<dataset>/metrics.json`: a
        `classification_report` over the run's classes plus macro F1, the dataset, split,
        fold, items, data hash and any class maps used.

    Raises:
        FileNotFoundError: Not a run folder, or the data set is missing.
        ValueError: An unfinished run, a detector run, a bad split, a test split on
            another data set (or on changed data), classes that cannot be mapped, or a
            model.pt holding more than weights and plain values (never unpickled).
    """
    from train.loops.rois import BagLearner, open_cell_bags
    from train.loops.supervised import CellLearner, Learner, auto_device

    run = load_run(run_dir)
    if run.get("status") != "done":
        raise ValueError(f"run {run_dir} has not finished; resume it before evaluating")
    if run["task"] not in ("cells", "rois"):
        raise ValueError(f"evaluate_run handles cells and rois runs, not {run['task']!r} runs")
    spec = data_spec or run["dataset"]
    own = spec == run["dataset"]
    split = split or ("test" if own else "all")
    if split not in ("test", "all"):
        raise ValueError(f"split must be 'test' or 'all', got {split!r}")
    if split == "test" and not own:
        raise ValueError(
            f"the test split belongs to {run['dataset']!r}; use split 'all' on {spec!r}"
        )

    torch_device = auto_device(device)
    model, fold = _load_model(run_dir, torch_device)
    learner: Learner
    if run["task"] == "cells":
        from train.data.catalog import open_image_set

        images = open_image_set(spec, int(run["input_px"]), root)
        data_sha, data_classes = images.sha256(), images.classes
        learner = CellLearner(images, "none", torch_device)
    else:
        bags, groups = open_cell_bags(
            spec, int(run["cells_per_roi"]), int(run["crop_px"]), root, cache_dir
        )
        data_sha, data_classes = bags.sha256(), bags.classes
        learner = BagLearner(bags, groups, int(run["input_px"]), torch_device)

    run_classes = tuple(run["classes"])
    index_map, maps_used = class_map(tuple(data_classes), run_classes)
    if split == "test":
        if data_sha != run["data_sha256"]:
            raise ValueError(f"{spec!r} has changed since the run; evaluate it with split 'all'")
        index = np.asarray(read_json(run_dir / SPLITS_JSON)["folds"][fold]["test"], np.int64)
    else:
        index = np.arange(len(learner.labels))
    to_run = np.asarray([index_map[i] for i in range(len(data_classes))], np.int64)
    y_true = to_run[learner.labels[index]]
    y_pred = learner.predict(model, index)
    report = classification_report(y_true, y_pred, run_classes)
    f1s = [report["per_class"][c]["f1"] for c in run_classes]
    report["macro_f1"] = round(float(np.mean(f1s)), 4)
    report.update(
        {
            "run": str(run_dir),
            "dataset": spec,
            "split": split,
            "fold": fold,
            "items": len(index),
            "data_sha256": data_sha,
            "class_maps": maps_used,
            "evaluated_utc": utc_now(),
        }
    )
    out_dir = run_dir / (f"eval-{slug(spec)}" + ("-all" if own and split == "all" else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / METRICS_JSON, report)
    confusion_png(
        report["confusion"],
        run_classes,
        out_dir / CONFUSION_PNG,
        f"{run['arch']} on {slug(spec)} ({split}, n = {len(index)})",
    )
    logger.info(
        "evaluated %s on %s (%s, %d items): accuracy %.4f weighted F1 %.4f",
        run_dir,
        spec,
        split,
        len(index),
        report["accuracy"],
        report["weighted_f1"],
    )
    return report
