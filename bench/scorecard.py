"""The scorecard: a model repository scored end to end on the held-out real data.

    python bench/scorecard.py                                  # shipped models, test part
    python bench/scorecard.py --models runs/my-repo --limit 20 # a quick look at another one
    python bench/scorecard.py --part val --fit-operating-point # fit the slide call on val

Every real field image of the chosen part (`test` by default, `--part val`; the fixed split
of train/data/heldout.py) is written as a small JPEG-tiled pyramidal TIFF at the field's
own mpp and scanned by papscan's own streaming pipeline (plan -> read -> detect -> classify
cells -> classify ROIs -> aggregate), with the three models loaded once for all fields.
From those scans:

1. nuclei: the detected cells' level-0 boxes against the annotated nuclei. A point is found
   when it lies inside a box enlarged by 2 µm, each box matched once (nearest first).
   Recall on ISBI 2014, Cervix93, the LBC nucleus tiles and CRIC (its labelled squamous
   nuclei only, so no precision there); precision on the exhaustively marked sets.
2. fields as slides: each field's slide category and suspicion score against its grade,
   for the Mendeley LBC fields, CRIC fields, Cervix93 frames and the benign SIPaKMeD
   metaplastic fields (sensitivity and specificity for abnormal, ROC AUC of the score,
   3-grade accuracy, fields where nothing was found).

And, without the detector, the cell classifier on crops cut exactly as the scanner cuts
them (the classifier's field at the detector's mpp, from its config): CRIC's labelled
cells of the same fields and Herlev's held-out part.

Fields are called by the repository's own operating point (`slide_call.yaml`, see
worker/pipeline/slide_call.py), as a scan calls a slide, with no adequacy minimum (a field
is not a slide), each set under its own preparation (`PREPARATION_OF`).
`--part val --fit-operating-point` fits it (bench/operating_point_fit.py: per preparation
a calibrated score and the threshold for sensitivity >= 0.95, on the val LBC fields for
liquid-based and the val CRIC and SIPaKMeD fields for conventional; the grading counts)
and writes it into the repository; scoring `test` afterwards applies it unchanged.

Writes `scorecard.json` (every figure with its counts, the models and their card hashes,
the data, the held-out groups, per-field results, timings) and `roc.png` into `--out`
(default `runs/scorecard/<repository-name>-<part>`), and prints one table with the
issue's targets beside the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from engines.errors import PapscanError
from engines.repository import ModelRepository, default_repository_path
from train.data.field_bags import classify_crops
from train.data.heldout import assign_parts, split_record
from train.data.labels import BETHESDA_TO_PAPSCAN, PAPSCAN_CLASSES
from train.data.paths import PROJECT_ROOT, default_data_root
from train.data.real_fields import REAL_SETS, SEVERITY, RealField, field_parts, load_real_set
from train.data.scanner_crops import field_cell_crops, herlev_scanner_crops
from train.loops.metrics import best_specificity_at_sensitivity, roc_auc, roc_curve
from train.synth.slide import level_dimensions_for
from worker.pipeline.records import CellResult, RoiResult
from worker.pipeline.scan import ScanModels, ScanOptions, ScanPipeline
from worker.pipeline.slide_call import OPERATING_POINT_FILE
from worker.settings import get_settings
from worker.wsi.slide import open_slide

# bench/ is not a package: its modules import each other by name, whether this file runs
# as a script (bench/ is sys.path[0]) or is loaded from its path (the tests).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard_metrics as sm  # noqa: E402

logger = logging.getLogger(__name__)

SCAN_ORDER = ("cric_fields", "cervix93", "isbi2014", "lbc_nuclei", "lbc", "sipakmed_metaplastic")
NUCLEUS_SETS = ("cric_fields", "isbi2014", "cervix93", "lbc_nuclei")
FIELD_SETS = ("lbc", "cric_fields", "cervix93", "sipakmed_metaplastic")
CELL_SETS = ("cric_cells", "herlev")
# Each set's preparation: it picks the slide call's score rule, and the rule of a
# preparation is fitted on that preparation's val fields (sets with slide grades only).
PREPARATION_OF = {
    "lbc": "liquid-based",
    "lbc_nuclei": "liquid-based",
    "cervix93": "liquid-based",
    "cric_fields": "conventional",
    "sipakmed_metaplastic": "conventional",
    "isbi2014": "conventional",
}
FIT_SETS = {"liquid-based": ("lbc",), "conventional": ("cric_fields", "sipakmed_metaplastic")}
MATCH_MARGIN_UM = 2.0
CELL_ROC_SENSITIVITY = 0.90
SLIDE_TILE_PX = 256
SLIDE_JPEG_QUALITY = 95
NORMAL_GRADE = PAPSCAN_CLASSES[0]

# The targets, by (set, figure key).
TARGETS: dict[tuple[str, str], sm.Target] = {
    ("lbc", "sensitivity"): sm.Target(0.98),
    ("lbc", "specificity"): sm.Target(0.95),
    ("lbc", "grade_accuracy"): sm.Target(0.93),
    ("cric_fields", "recall"): sm.Target(0.90),
    ("cric_cells", "sensitivity"): sm.Target(0.90),
    ("cric_cells", "specificity"): sm.Target(0.90),
    ("cric_cells", "best_specificity_at_sensitivity"): sm.Target(0.90),
    ("herlev", "accuracy"): sm.Target(0.97),
    ("isbi2014", "recall"): sm.Target(0.90),
    ("isbi2014", "precision"): sm.Target(0.80),
    ("sipakmed_metaplastic", "specificity"): sm.Target(1.0, "= 1 (all negative)"),
}

# Piped output (logs, CI) gets a table wide enough to read; a terminal keeps its width.
console = Console(width=None if sys.stdout.isatty() else 175)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scorecard.py",
        description="Score a model repository end to end on the held-out real data.",
    )
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="model repository (default: the shipped engines/repository)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data root (default: $PAPSCAN_DATA_ROOT or ../shared/data)",
    )
    p.add_argument(
        "--part",
        choices=("test", "val"),
        default="test",
        help="held-out part to score (default test)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/scorecard/<repository-name>-<part>)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N fields per set (Herlev: N fields' cells), spread over classes",
    )
    p.add_argument(
        "--fit-operating-point",
        action="store_true",
        help="with --part val: fit the slide call on the val fields and write it into the"
        " repository as slide_call.yaml",
    )
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.fit_operating_point and args.part != "val":
        p.error("--fit-operating-point fits on the val part: add --part val")
    return args


# --------------------------------------------------------------------------- scanning


def write_field_slide(path: Path, image: np.ndarray, mpp: float) -> Path:
    """Write an RGB field as a JPEG-tiled pyramidal TIFF that OpenSlide opens (generic-tiff).

    Level 0 is the image at `mpp`; smaller levels (each half the one before, each its own
    page) are added while the smallest side is 1000 px or more, as for synthetic slides.
    """
    dims = level_dimensions_for(image.shape[1], image.shape[0])
    with tifffile.TiffWriter(path) as tw:
        level = image
        for k, (w, h) in enumerate(dims):
            if k:
                level = cv2.resize(level, (w, h), interpolation=cv2.INTER_AREA)
            res = 1e4 / (mpp * 2**k)
            tw.write(
                np.ascontiguousarray(level),
                tile=(SLIDE_TILE_PX, SLIDE_TILE_PX),
                compression="jpeg",
                compressionargs={"level": SLIDE_JPEG_QUALITY},
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                metadata=None,
            )
    return path


class FieldScanner:
    """Scans field images as slides through papscan's pipeline, reusing one set of models.

    Each call writes the field as a small slide in `workdir`, opens it as `papscan scan`
    does (`open_slide`), runs `ScanPipeline.run` (plan, read, detect, classify cells and
    ROIs, aggregate) and keeps the chunks it streams out in memory instead of SQL.
    """

    def __init__(self, models: ScanModels, workdir: Path) -> None:
        self.pipeline = ScanPipeline(models, ScanOptions.from_settings(get_settings()))
        self.workdir = workdir
        self.stage_ms: dict[str, float] = {}
        self._n = 0

    def scan(self, image: np.ndarray, mpp: float, preparation: str) -> dict[str, Any]:
        self._n += 1
        path = write_field_slide(self.workdir / f"field-{self._n}.tiff", image, mpp)
        cells: list[CellResult] = []

        def sink(rois: list[RoiResult], chunk: list[CellResult]) -> None:
            cells.extend(chunk)

        try:
            with open_slide(path) as slide:
                outcome = self.pipeline.run(
                    slide, sink, preparation=preparation, check_adequacy=False
                )
        finally:
            path.unlink(missing_ok=True)
        for stage, ms in outcome.timings_ms.items():
            self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + ms
        boxes = np.array([(c.x, c.y, c.x + c.w, c.y + c.h) for c in cells], np.float64)
        return {
            "summary": outcome.summary,
            "boxes": boxes.reshape(-1, 4),
            "rois": outcome.rois_planned,
            "reader": outcome.reader,
        }


def grade_of(label: str | None) -> str | None:
    """A class name (the models' or Bethesda's) on papscan's three grades, or None."""
    if label is None:
        return None
    if label in PAPSCAN_CLASSES:
        return label
    return BETHESDA_TO_PAPSCAN.get(label)


def to_crop_px(crops: np.ndarray, out_px: int) -> np.ndarray:
    """Crops resized to the classifier's input side (as `cut_crops` resizes a field)."""
    if crops.shape[1] == out_px or not len(crops):
        return crops.reshape(-1, out_px, out_px, 3)
    return np.stack(
        [cv2.resize(c, (out_px, out_px), interpolation=cv2.INTER_AREA) for c in crops]
    ).reshape(-1, out_px, out_px, 3)


def field_record(field: RealField, scan: dict[str, Any], seconds: float) -> dict:
    """One field's results: the slide call, and its nuclei matched to the detections."""
    summary = scan["summary"]
    boxes = scan["boxes"]
    rec: dict[str, Any] = {
        "set": field.set_name,
        "name": field.name,
        "group": field.group,
        "label": field.label,
        "grade": field.grade,
        "category": summary.category,
        "called_grade": grade_of(summary.category),
        "called_abnormal": summary.call.abnormal,
        "score": summary.score,
        "evidence": asdict(summary.evidence),
        "cells": summary.cell_count,
        "rois": scan["rois"],
        "seconds": round(seconds, 3),
    }
    if field.set_name in NUCLEUS_SETS:
        found, matched = sm.match_points_to_boxes(field.points, boxes, MATCH_MARGIN_UM / field.mpp)
        rec.update(
            points=len(field.points),
            found=int(found.sum()),
            recall=sm.ratio(found.sum(), len(found)),
            detections=len(boxes),
            matched_detections=int(matched.sum()),
            exhaustive=field.exhaustive,
        )
        if field.exhaustive:
            rec["precision"] = sm.ratio(matched.sum(), len(boxes))
    return rec


def _rank(label: str | None) -> int:
    """Classes least severe first (NILM, then the abnormal grades); None for unlabelled."""
    return SEVERITY.index(label) if label in SEVERITY else -1


def select_fields(root: Path, part: str, limit: int | None) -> dict[str, list[RealField]]:
    """The fields of each scanned set in `part`, at most `limit` spread over their labels."""
    return {
        name: sm.interleave_by(load_real_set(root, name, part), lambda f: f.label, limit, _rank)
        for name in SCAN_ORDER
    }


def herlev_part(root: Path, target_mpp: float, field_px: int, part: str, limit: int | None):
    """Herlev's cells of `part` (by field group), cut as the scanner cuts them.

    Returns:
        `(crops, grades, n_fields, split)`: `[N, field_px, field_px, 3]` uint8, the cells'
        papscan grades, how many Herlev fields they come from, and the split record of all
        Herlev groups (ids, and the fields' names for `test` and `val`).
    """
    cells = herlev_scanner_crops(root, target_mpp, field_px, PAPSCAN_CLASSES)
    groups = [str(g) for g in cells.groups]
    strata = [cells.classes[label] for label in cells.labels]
    parts = assign_parts("herlev", zip(groups, strata, strict=True))
    chosen = sm.interleave_by(
        sorted(
            {(g, s) for g, s in zip(groups, strata, strict=True) if parts[g] == part},
            key=lambda gs: int(gs[0]),
        ),
        lambda gs: gs[1],
        limit,
        _rank,
    )
    keep_groups = {g for g, _ in chosen}
    keep = np.array([g in keep_groups for g in groups], bool)
    grades = [s for s, k in zip(strata, keep, strict=True) if k]
    record = split_record("herlev", parts)
    # Group ids are positions in Herlev's sorted field names: name the held-out fields too.
    names = {
        g: Path(src).stem.rsplit("-", 1)[0] for g, src in zip(groups, cells.sources, strict=True)
    }
    for p in ("test", "val"):
        record[f"{p}_fields"] = sorted(names[g] for g in record[p])
    return cells.images[keep], grades, len(keep_groups), record


# --------------------------------------------------------------------------- figures


def nucleus_figures(records: list[dict]) -> dict[str, Any]:
    points = sum(r["points"] for r in records)
    found = sum(r["found"] for r in records)
    dets = sum(r["detections"] for r in records)
    matched = sum(r["matched_detections"] for r in records)
    exhaustive = bool(records) and all(r["exhaustive"] for r in records)
    return {
        "recall": sm.ratio(found, points),
        "precision": sm.ratio(matched, dets) if exhaustive else None,
        "false_detection_rate": sm.ratio(dets - matched, dets) if exhaustive else None,
        "exhaustive": exhaustive,
        "n_fields": len(records),
        "n_points": points,
        "n_found": found,
        "n_detections": dets,
        "n_matched_detections": matched,
        "fields_recall_mean": sm.ratio(
            sum(r["recall"] for r in records if r["recall"] is not None),
            sum(r["recall"] is not None for r in records),
        ),
    }


def cell_figures(
    truth_grades: list[str], probs: np.ndarray, labels: tuple[str, ...], n_fields: int
) -> dict[str, Any]:
    """The classifier's figures on cells of known grade; abnormal = not `labels[0]`."""
    truth_abn = np.array([g != NORMAL_GRADE for g in truth_grades], bool)
    p_abn = 1.0 - probs[:, 0] if len(probs) else np.zeros(0)
    pred = [labels[i] for i in np.argmax(probs, axis=1)] if len(probs) else []
    called_abn = np.array([p != labels[0] for p in pred], bool)
    rates = sm.binary_rates(truth_abn, called_abn)
    best = best_specificity_at_sensitivity(truth_abn, p_abn, CELL_ROC_SENSITIVITY)
    grade_hits = [grade_of(p) == t for p, t in zip(pred, truth_grades, strict=True)]
    return {
        "accuracy": rates.accuracy,
        "sensitivity": rates.sensitivity,
        "specificity": rates.specificity,
        "auc": roc_auc(truth_abn, p_abn),
        "best_specificity_at_sensitivity": None if best is None else best[0],
        "best_specificity_threshold": None if best is None else best[1],
        "best_specificity_min_sensitivity": CELL_ROC_SENSITIVITY,
        "grade_accuracy": sm.ratio(sum(grade_hits), len(grade_hits)),
        "n_cells": len(truth_grades),
        "n_fields": n_fields,
        "n_abnormal": int(truth_abn.sum()),
        "n_per_grade": {g: truth_grades.count(g) for g in PAPSCAN_CLASSES},
        "confusion": {
            "rows_true": list(PAPSCAN_CLASSES),
            "columns_predicted": list(labels),
            "counts": sm.confusion(truth_grades, pred, PAPSCAN_CLASSES, labels),
        },
    }


def field_figures(records: list[dict]) -> dict[str, Any]:
    truth = np.array([r["grade"] != NORMAL_GRADE for r in records], bool)
    called = np.array([r["called_abnormal"] for r in records], bool)
    scores = np.array([r["score"] for r in records], np.float64)
    rates = sm.binary_rates(truth, called)
    hits = [r["called_grade"] == r["grade"] for r in records]
    per_class: dict[str, dict[str, Any]] = {}
    for label in sorted({r["label"] for r in records}, key=SEVERITY.index):
        mine = [h for h, r in zip(hits, records, strict=True) if r["label"] == label]
        per_class[label] = {"accuracy": sm.ratio(sum(mine), len(mine)), "n_fields": len(mine)}
    out: dict[str, Any] = {
        "sensitivity": rates.sensitivity,
        "specificity": rates.specificity,
        "accuracy": rates.accuracy,
        "auc": roc_auc(truth, scores),
        "grade_accuracy": sm.ratio(sum(hits), len(hits)),
        "per_class_accuracy": per_class,
        "n_fields": len(records),
        "n_abnormal": int(truth.sum()),
        "n_zero_cells": sum(r["cells"] == 0 for r in records),
        "n_cells": sum(r["cells"] for r in records),
    }
    return out


def operating_point_section(
    args: argparse.Namespace, records: list[dict], models: ScanModels, repo_path: Path
) -> dict[str, Any]:
    """The slide call used: fitted here on val (and written into the repository), or the
    repository's own."""
    op = models.operating_point
    section: dict[str, Any] = {"source": "the repository's slide_call.yaml"}
    if args.fit_operating_point:
        from operating_point_fit import fit_operating_point

        pools = {prep: [r for r in records if r["set"] in sets] for prep, sets in FIT_SETS.items()}
        fitted_on = {
            "part": args.part,
            "limit": args.limit,
            "models_sha256": models.weights_sha256(),
        }
        cls = models.cell_classifier.config
        severity = tuple(cls.severity or cls.labels)
        op, fit = fit_operating_point(pools, op, severity, fitted_on)
        (repo_path / OPERATING_POINT_FILE).write_text(op.to_yaml())
        section = {"source": f"fitted on {args.part}, written to {repo_path}", "fit": fit}
    elif op.fitted_on and op.fitted_on.get("models_sha256") != models.weights_sha256():
        console.print("[yellow]warning: the operating point was fitted on other models")
    return {
        **section,
        "version": op.version,
        "abnormal_threshold": {p: r.abnormal_threshold for p, r in op.rules.items()},
        "fitted_on": op.fitted_on,
        "min_cells": op.min_cells,
    }


# --------------------------------------------------------------------------- provenance


def model_info(models: ScanModels) -> dict[str, dict[str, Any]]:
    out = {}
    for m in models.all():
        card_path = m.version_dir / "card.json"
        card_sha = (
            hashlib.sha256(card_path.read_bytes()).hexdigest() if card_path.is_file() else None
        )
        out[m.name] = {
            "version": m.version,
            "backend": m.backend_name,
            "version_dir": str(m.version_dir),
            "card_sha256": card_sha,
            "artifact_sha256": (m.card.get("artifact") or {}).get("sha256"),
            "git_commit": m.card.get("git_commit"),
        }
    return out


def split_records(root: Path) -> dict[str, Any]:
    return {name: split_record(name, field_parts(REAL_SETS[name](root))) for name in SCAN_ORDER}


# --------------------------------------------------------------------------- table and plot


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: set, measure, value, n, target, pass."""
    rows: list[dict[str, Any]] = []

    def add(set_name: str, measure: str, key: str, value: Any, n: str) -> None:
        target = TARGETS.get((set_name, key))
        rows.append(
            {
                "set": set_name,
                "measure": measure,
                "key": key,
                "value": value,
                "n": n,
                "target": target.describe() if target else None,
                "pass": target.passes(value) if target else None,
            }
        )

    for name, f in report["nuclei"].items():
        n = f"{f['n_points']} nuclei / {f['n_fields']} fields"
        what = "labelled nucleus recall" if name == "cric_fields" else "nucleus recall"
        add(name, what, "recall", f["recall"], n)
        if f["exhaustive"]:
            add(
                name,
                "nucleus precision",
                "precision",
                f["precision"],
                f"{f['n_detections']} detections",
            )
    for name, f in report["cells"].items():
        n = f"{f['n_cells']} cells, {f['n_fields']} fields"
        add(
            name,
            f"cells normal-vs-abnormal acc. ({f['n_abnormal']} abn)",
            "accuracy",
            f["accuracy"],
            n,
        )
        add(name, "cells abnormal sens. (own call)", "sensitivity", f["sensitivity"], n)
        add(name, "cells abnormal spec. (own call)", "specificity", f["specificity"], n)
        add(name, "cells ROC AUC", "auc", f["auc"], n)
        add(
            name,
            f"cells best spec. at sens >= {f['best_specificity_min_sensitivity']:.2f}",
            "best_specificity_at_sensitivity",
            f["best_specificity_at_sensitivity"],
            n,
        )
        add(name, "cells 3-grade acc.", "grade_accuracy", f["grade_accuracy"], n)
        c = f["confusion"]
        text = " ".join(
            f"{t}[{' '.join(map(str, row))}]"
            for t, row in zip(c["rows_true"], c["counts"], strict=True)
        )
        add(
            name,
            "confusion (rows true, cols called)",
            "confusion",
            text,
            n,
        )
    for name, f in report["fields"].items():
        n = f"{f['n_fields']} fields ({f['n_abnormal']} abn)"
        if f["n_abnormal"]:
            add(name, "fields abnormal sens. (category)", "sensitivity", f["sensitivity"], n)
        add(name, "fields abnormal spec. (category)", "specificity", f["specificity"], n)
        if f["n_abnormal"]:
            add(name, "fields ROC AUC (score)", "auc", f["auc"], n)
            add(name, "fields 3-grade acc.", "grade_accuracy", f["grade_accuracy"], n)
        if name == "lbc":
            for label, pc in f["per_class_accuracy"].items():
                add(
                    name,
                    f"fields acc. {label}",
                    f"accuracy_{label}",
                    pc["accuracy"],
                    f"{pc['n_fields']} fields",
                )
        add(name, "fields with 0 cells", "n_zero_cells", f["n_zero_cells"], n)
    op = report["operating_point"]
    for prep, value in op["abnormal_threshold"].items():
        add("slides", f"{prep} abnormal threshold ({op['version']})", "threshold", value, "")
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, show_lines=False)
    for col, justify in (
        ("set", "left"),
        ("measure", "left"),
        ("value", "right"),
        ("n", "right"),
        ("target", "left"),
        ("pass", "center"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "measure")
    for r in rows:
        verdict = {True: "[green]pass", False: "[red]miss", None: ""}[r["pass"]]
        digits = 4 if r["key"] == "threshold" else 3
        value = _fmt(r["value"], digits)
        table.add_row(r["set"], r["measure"], value, r["n"], r["target"] or "", verdict)
    console.print(table)


def plot_roc(
    path: Path,
    fields: dict[str, tuple[np.ndarray, np.ndarray]],
    cells: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
) -> None:
    """One PNG: slides (suspicion score) on the left, cells (P(abnormal)) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, curves, what in (
        (axes[0], fields, "fields as slides (suspicion score)"),
        (axes[1], cells, "cells (1 - P(normal))"),
    ):
        for name, (truth, scores) in curves.items():
            curve = roc_curve(truth, scores)
            if curve is None:
                continue
            fpr, tpr, _ = curve
            auc = roc_auc(truth, scores)
            ax.plot(
                fpr,
                tpr,
                label=f"{name}: AUC {auc:.3f} (n={len(truth)}, {int(truth.sum())} abn.)",
            )
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
        ax.set(
            xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=what
        )
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    repo_path = (args.models or default_repository_path()).resolve()
    root = (args.data or default_data_root()).resolve()
    if not root.is_dir():
        raise SystemExit(f"The data folder {root} does not exist; pass --data ROOT.")
    repository = ModelRepository(repo_path)
    out_dir = args.out or PROJECT_ROOT / "runs" / "scorecard" / f"{repo_path.name}-{args.part}"
    out_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    fields_by_set = select_fields(root, args.part, args.limit)
    splits = split_records(root)
    timings["list_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    models = ScanModels.load(repository)
    timings["load_models_s"] = time.perf_counter() - t
    labels = tuple(models.cell_classifier.config.labels)
    records: list[dict] = []
    cric_crops: list[np.ndarray] = []
    cric_grades: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="papscan-scorecard-") as tmp, _progress() as bar:
            scanner = FieldScanner(models, Path(tmp))
            pipe = scanner.pipeline
            n_total = sum(len(v) for v in fields_by_set.values())
            task = bar.add_task("scanning fields", total=n_total)
            t = time.perf_counter()
            for set_name, fields in fields_by_set.items():
                bar.update(task, description=f"scanning {set_name}")
                t_set = time.perf_counter()
                for field in fields:
                    t_field = time.perf_counter()
                    image = field.load()
                    try:
                        scan = scanner.scan(image, field.mpp, PREPARATION_OF[set_name])
                    except PapscanError as exc:
                        raise SystemExit(f"Scanning {set_name}/{field.name} failed: {exc}") from exc
                    records.append(field_record(field, scan, time.perf_counter() - t_field))
                    if set_name == "cric_fields" and len(field.points):
                        crops, _ = field_cell_crops(
                            field, pipe.target_mpp, pipe.crop_field_px, image
                        )
                        cric_crops.append(to_crop_px(crops, pipe.crop_px))
                        cric_grades.extend(BETHESDA_TO_PAPSCAN[x] for x in field.point_labels)
                    bar.advance(task)
                timings[f"scan_{set_name}_s"] = time.perf_counter() - t_set
            timings["scan_s"] = time.perf_counter() - t

            cell_task = bar.add_task("classifying cells", total=2)
            t = time.perf_counter()
            crops = (
                np.concatenate(cric_crops)
                if cric_crops
                else np.zeros((0, pipe.crop_px, pipe.crop_px, 3), np.uint8)
            )
            cric_probs = classify_crops(models.cell_classifier, crops)[1]
            bar.advance(cell_task)
            herlev_crops, herlev_grades, herlev_fields, herlev_split = herlev_part(
                root, pipe.target_mpp, pipe.crop_field_px, args.part, args.limit
            )
            herlev_probs = classify_crops(
                models.cell_classifier, to_crop_px(herlev_crops, pipe.crop_px)
            )[1]
            bar.advance(cell_task)
            timings["cells_s"] = time.perf_counter() - t
            stage_ms = {k: round(v, 1) for k, v in scanner.stage_ms.items()}
        info = model_info(models)
        operating_point = operating_point_section(args, records, models, repo_path)
    finally:
        models.close()
    splits["herlev"] = herlev_split

    by_set = {name: [r for r in records if r["set"] == name] for name in SCAN_ORDER}
    report: dict[str, Any] = {
        "repository": str(repo_path),
        "models": info,
        "data_root": str(root),
        "part": args.part,
        "limit": args.limit,
        "matching": {
            "margin_um": MATCH_MARGIN_UM,
            "rule": "point inside a detection box "
            "enlarged by the margin; each detection matched once, nearest first",
        },
        "cell_crops": {
            "mpp": pipe.target_mpp,
            "field_px": pipe.crop_field_px,
            "input_px": pipe.crop_px,
            "labels": list(labels),
        },
        "operating_point": operating_point,
        "nuclei": {name: nucleus_figures(by_set[name]) for name in NUCLEUS_SETS},
        "cells": {
            "cric_cells": cell_figures(cric_grades, cric_probs, labels, len(cric_crops)),
            "herlev": cell_figures(herlev_grades, herlev_probs, labels, herlev_fields),
        },
        "fields": {name: field_figures(by_set[name]) for name in FIELD_SETS},
        "splits": splits,
        "per_field": records,
    }
    report["table"] = table_rows(report)
    title = f"papscan scorecard: {repo_path.name}, {args.part} part" + (
        f" (--limit {args.limit})" if args.limit else ""
    )
    timings["total_s"] = time.perf_counter() - start
    report["timings"] = {
        **{k: round(v, 2) for k, v in timings.items()},
        "fields_scanned": len(records),
        "ms_per_field": round(1000 * timings["scan_s"] / max(1, len(records)), 1),
        "pipeline_stage_ms": stage_ms,
    }

    def curves(pairs: dict[str, list[dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            name: (
                np.array([r["grade"] != NORMAL_GRADE for r in rs], bool),
                np.array([r["score"] for r in rs], np.float64),
            )
            for name, rs in pairs.items()
        }

    plot_roc(
        out_dir / "roc.png",
        curves({name: by_set[name] for name in FIELD_SETS}),
        {
            "cric_cells": (
                np.array([g != NORMAL_GRADE for g in cric_grades], bool),
                1.0 - cric_probs[:, 0],
            ),
            "herlev": (
                np.array([g != NORMAL_GRADE for g in herlev_grades], bool),
                1.0 - herlev_probs[:, 0],
            ),
        },
        title,
    )
    (out_dir / "scorecard.json").write_text(json.dumps(report, indent=1, default=_json_default))
    print_table(report["table"], title)
    console.print(
        f"wrote {out_dir / 'scorecard.json'} and {out_dir / 'roc.png'} "
        f"({report['timings']['total_s']:.0f} s, {len(records)} fields)"
    )
    report["out_dir"] = str(out_dir)
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scorecard; returns the exit status (0, or 2 after a one-sentence error)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (PapscanError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}")
        return 2
    except SystemExit as exc:
        if isinstance(exc.code, str):
            console.print(f"[red]{exc.code}")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
