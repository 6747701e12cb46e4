"""Cells of a scan, out to other tools: CSV (one row per cell) or GeoJSON (QuPath)."""

from __future__ import annotations

import csv
import json
from typing import TextIO

from sqlalchemy.orm import Session

from worker.db import queries


def write_cells(s: Session, slide_or_scan: str, fmt: str, stream: TextIO) -> int:
    """Stream every cell of a scan to `stream`; returns the number of cells written.

    Args:
        s: an open session.
        slide_or_scan: a scan id, or a slide path / fingerprint (its latest finished scan).
        fmt: "csv" or "geojson"; boxes are level-0 pixels.
    """
    scan = queries.resolve_scan(s, slide_or_scan)
    rows = queries.iter_cells(s, scan.id)
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(queries.CELL_EXPORT_COLUMNS)
        n = 0
        for row in rows:
            writer.writerow([getattr(row, c) for c in queries.CELL_EXPORT_COLUMNS])
            n += 1
        return n
    if fmt == "geojson":
        return _write_geojson(rows, stream)
    raise ValueError(f"unknown export format {fmt!r}; expected csv or geojson")


def _write_geojson(rows, stream: TextIO) -> int:
    """A FeatureCollection of cell boxes, written feature by feature (constant memory)."""
    stream.write('{"type": "FeatureCollection", "features": [\n')
    n = 0
    for n, row in enumerate(rows, start=1):
        x0, y0, x1, y1 = row.x, row.y, row.x + row.w, row.y + row.h
        feature = {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
            },
            "properties": {
                "objectType": "detection",
                "classification": {"name": row.label},
                "measurements": {
                    "score": row.score,
                    "suspicion": row.suspicion,
                    "detection_score": row.detection_score,
                },
            },
        }
        stream.write(("," if n > 1 else "") + json.dumps(feature) + "\n")
    stream.write("]}\n")
    return n
