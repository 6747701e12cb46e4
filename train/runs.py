"""Run folders: what one training run wrote, with its provenance.

Layout (train/export/run_export.py reads it):

    <run>/run.json       task, arch, arch_kwargs, dataset, classes, input_px, mean, std
                         (0-255 scale), protocol (preset + overrides), seed, data_sha256,
                         git_commit, command, software, started_utc, finished_utc,
                         duration_s, status (`running` | `done`)
    <run>/metrics.json   {"folds": [report + fold, epochs, train_s], "summary": mean ± std}
    <run>/model.pt       {"arch", "arch_kwargs", "num_classes", "state_dict", "fold"}
    <run>/splits.json    {"folds": [{"train", "val", "test"}], "exported_fold": k}
    <run>/confusion.png, <run>/curves.png, <run>/log.txt
    <run>/fold<k>/last.pt      resumable checkpoint, rewritten every epoch
    <run>/fold<k>/report.json  the fold's test report, written when the fold finishes

JSON files are written to a temporary name and renamed, so an interrupted run never
leaves half a file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
MODEL_PT = "model.pt"
SPLITS_JSON = "splits.json"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "curves.png"
LOG_TXT = "log.txt"
LAST_PT = "last.pt"
REPORT_JSON = "report.json"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def fold_dir(run_dir: Path, fold: int) -> Path:
    """`<run>/fold<k>` (created)."""
    path = run_dir / f"fold{fold}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file of a run folder."""
    return json.loads(path.read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def slug(text: str) -> str:
    """A file-name-safe form of a dataset spec or path (`sipakmed+cric` -> `sipakmed+cric`)."""
    name = Path(text).name if ("/" in text or os.sep in text) else text
    return re.sub(r"[^A-Za-z0-9+._-]+", "_", name).strip("_") or "data"


def auto_run_name(task: str, arch: str, dataset: str, protocol: str, seed: int) -> str:
    """`<task>-<arch>-<dataset>-p<protocol>-s<seed>-<UTC yyyymmddThhmmss>`."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{task}-{arch}-{slug(dataset)}-p{protocol}-s{seed}-{stamp}"


def software_versions() -> dict[str, str]:
    """Python and the versions of the packages a run used (those already imported)."""
    import platform

    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "timm", "ultralytics", "PIL"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = str(module.__version__)
    return versions


def command_line() -> str:
    """The command that started this process, as the user typed it (best effort)."""
    import shlex

    prog = Path(sys.argv[0]).name if sys.argv else ""
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])]).strip()


def start_run(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Create a run folder and write run.json with `status: running` and the provenance.

    Args:
        run_dir: The folder; it must not exist, or be empty.
        info: The run's own fields (task, arch, arch_kwargs, dataset, classes, input_px,
            mean, std, protocol, seed, data_sha256, command, and task extras).

    Returns:
        The run.json written.

    Raises:
        ValueError: The folder already holds files (resume it instead).
    """
    from train.export.repository import git_commit

    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run folder {run_dir} is not empty; resume it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {
        **info,
        "git_commit": git_commit(),
        "software": software_versions(),
        "started_utc": utc_now(),
        "finished_utc": None,
        "duration_s": None,
        "status": "running",
    }
    write_json(run_dir / RUN_JSON, run)
    return run


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read `<run>/run.json`.

    Raises:
        FileNotFoundError: The folder is not a run folder.
    """
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {RUN_JSON}")
    return read_json(path)


def finish_run(run_dir: Path, run: dict[str, Any], duration_s: float) -> dict[str, Any]:
    """Mark run.json `done` with the finish time and the training time (summed over resumes)."""
    run = {
        **run,
        "software": {**run.get("software", {}), **software_versions()},
        "finished_utc": utc_now(),
        "duration_s": round(duration_s, 1),
        "status": "done",
    }
    write_json(run_dir / RUN_JSON, run)
    return run


@contextlib.contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Append the `train.*` log records to `<run>/log.txt` while the block runs."""
    handler = logging.FileHandler(run_dir / LOG_TXT, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("train")
    log.addHandler(handler)
    previous = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
        handler.close()


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std()), 4)}


def summarise_folds(reports: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over folds (population std, ddof 0; 0 for one fold).

    Args:
        reports: One `classification_report` per fold, each with `macro_f1` added.
        classes: Class names.

    Returns:
        {"accuracy", "weighted_f1", "macro_f1": {"mean", "std"},
         "per_class": {name: {"precision", "recall", "f1": {"mean", "std"}}}, "folds": n}
    """
    summary: dict[str, Any] = {
        key: _mean_std([r[key] for r in reports]) for key in ("accuracy", "weighted_f1", "macro_f1")
    }
    summary["per_class"] = {
        name: {
            m: _mean_std([r["per_class"][name][m] for r in reports])
            for m in ("precision", "recall", "f1")
        }
        for name in classes
    }
    summary["folds"] = len(reports)
    return summary
