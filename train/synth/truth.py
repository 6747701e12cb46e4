"""Ground truth beside a synthetic slide: ``<stem>.cells.csv`` and ``<stem>.truth.json``.

The CSV has one row per cell, ``id,label,kind,x,y,w,h,nx,ny,nw,nh`` (boxes in level-0 px).
The JSON holds the slide parameters (size, mpp, seed, class mix, levels) and class counts;
with them :func:`train.synth.plan_cells` re-creates cells and debris exactly.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from train.synth.cells import CELL_CLASSES, CELL_KINDS, KIND_LABEL, SynthCell

logger = logging.getLogger(__name__)

CSV_FIELDS: tuple[str, ...] = ("id", "label", "kind", "x", "y", "w", "h", "nx", "ny", "nw", "nh")
TRUTH_FORMAT = "papscan-synth/1"


def _stem_base(path: str | os.PathLike[str]) -> Path:
    """The slide path a truth path belongs to (accepts the slide, CSV or JSON path)."""
    p = Path(path)
    for suffix in (".cells.csv", ".truth.json"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + ".tiff")
    return p


def cells_csv_path(path: str | os.PathLike[str]) -> Path:
    """``<stem>.cells.csv`` for a slide path (or its truth JSON path)."""
    return _stem_base(path).with_suffix(".cells.csv")


def truth_json_path(path: str | os.PathLike[str]) -> Path:
    """``<stem>.truth.json`` for a slide path (or its cells CSV path)."""
    return _stem_base(path).with_suffix(".truth.json")


def write_truth(
    slide_path: str | os.PathLike[str], cells: Iterable[SynthCell], params: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write the cells CSV and the truth JSON beside ``slide_path``.

    Args:
        slide_path: the slide file the truth describes.
        cells: the slide's cells.
        params: slide parameters to store in the JSON (must be JSON-serialisable).

    Returns:
        (cells CSV path, truth JSON path).
    """
    cells = list(cells)
    csv_path = cells_csv_path(slide_path)
    json_path = truth_json_path(slide_path)
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for c in cells:
            writer.writerow([getattr(c, f) for f in CSV_FIELDS])
    class_counts = {label: 0 for label in CELL_CLASSES}
    kind_counts = {kind: 0 for kind in CELL_KINDS}
    for c in cells:
        class_counts[c.label] += 1
        kind_counts[c.kind] += 1
    doc = {
        "format": TRUTH_FORMAT,
        "slide": Path(slide_path).name,
        "cells_csv": csv_path.name,
        **dict(params),
        "class_counts": class_counts,
        "kind_counts": kind_counts,
    }
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def read_truth(path: str | os.PathLike[str]) -> list[SynthCell]:
    """Read the cells of a synthetic slide.

    Args:
        path: the slide path, or its ``.cells.csv`` / ``.truth.json`` path.

    Returns:
        Cells ordered as in the file (by id).

    Raises:
        FileNotFoundError: no cells CSV beside the slide.
        ValueError: the CSV is not a synthetic-slide cell table.
    """
    csv_path = cells_csv_path(path)
    out: list[SynthCell] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{csv_path} is not a synthetic cell table (columns {CSV_FIELDS})")
        for row in reader:
            kind = row["kind"]
            if KIND_LABEL.get(kind) != row["label"]:
                raise ValueError(f"{csv_path}: bad label/kind {row['label']}/{kind} in row {row}")
            ints = {f: int(row[f]) for f in CSV_FIELDS if f not in ("label", "kind")}
            out.append(SynthCell(label=row["label"], kind=kind, **ints))
    return out


def read_truth_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the truth JSON of a synthetic slide (slide path, CSV or JSON path)."""
    json_path = truth_json_path(path)
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    if doc.get("format") != TRUTH_FORMAT:
        raise ValueError(f"{json_path} is not a {TRUTH_FORMAT} truth file")
    return doc
