"""Cells of a scan, out to other tools: CSV (one row per cell) or GeoJSON (QuPath).

Both stream: rows are fetched from the database in batches and written as they come, so a
scan's 200,000 cells never sit in memory at once.

The GeoJSON is what QuPath (0.4 to 0.6) reads back from its own "Export as GeoJSON"
(qupath-core `PathObjectTypeAdapters`), so a file dropped on the open slide in QuPath
imports as one detection per cell:

* a `FeatureCollection`; each cell a `Feature` with a `Polygon` of its box (closed ring,
  5 integer points) in QuPath's image space: level-0 pixels, origin at the image's top left;
* `id`: a UUID (QuPath keeps it as the object's id and ignores ids that are not UUIDs),
  stable for a cell across exports, so re-imports can be matched;
* `properties.objectType = "detection"`;
* `properties.classification = {"name": label, "color": [r, g, b]}`, a fixed colour per
  class (`CLASS_COLOURS`), so every slide shows NILM green and HSIL red;
* `properties.measurements`: a flat name -> number object (QuPath >= 0.4) with the CSV's
  column names; nulls and non-finite values are left out (JSON has no NaN, and QuPath
  reads every measurement as a number).

QuPath's OpenSlide reader crops a slide to its `openslide.bounds-*` rectangle when the
file has one (MIRAX, for one), moving the image origin to (bounds-x, bounds-y); papscan's
boxes are in OpenSlide's uncropped level-0 frame. `write_cells` therefore reads the
bounds from the slide file and shifts the GeoJSON by them (no shift for files without
bounds, such as generic TIFF and Aperio SVS), so the boxes land on their cells in QuPath.
The CSV keeps papscan's frame.
"""

from __future__ import annotations

import colorsys
import csv
import json
import logging
import math
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from worker.db import queries
from worker.db.models import Cell, Slide

__all__ = [
    "CLASS_COLOURS",
    "CLASS_ORDER",
    "GEOJSON_MEASUREMENTS",
    "class_colour",
    "qupath_origin",
    "write_cells",
    "write_geojson",
]

logger = logging.getLogger(__name__)

#: Fixed display colour of each Bethesda cell class (RGB): normal green, low grade
#: yellow to orange, high grade red, carcinoma dark red.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "NILM": (40, 160, 70),
    "ASC-US": (235, 195, 0),
    "LSIL": (245, 130, 0),
    "ASC-H": (235, 70, 60),
    "HSIL": (200, 0, 0),
    "SCC": (110, 0, 20),
}

#: Cell classes from least to most severe, for tables.
CLASS_ORDER: tuple[str, ...] = tuple(CLASS_COLOURS)

#: GeoJSON measurement names, in order: the CSV's columns of the same values.
GEOJSON_MEASUREMENTS = ("score", "suspicion", "detection_score", "attention", "review_rank")

_ID_NAMESPACE = uuid.UUID("6f1d3c2e-9a57-4b8e-8c2d-5e0b7a4f1c93")
_BOUNDS = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width",
           "openslide.bounds-height")  # fmt: skip


def class_colour(label: str) -> tuple[int, int, int]:
    """The fixed RGB colour of a cell class; a label outside `CLASS_COLOURS` gets a colour
    made from its name (the same on every run and machine)."""
    colour = CLASS_COLOURS.get(label)
    if colour is not None:
        return colour
    hue = (zlib.crc32(label.encode()) % 360) / 360.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.55)
    return round(r * 255), round(g * 255), round(b * 255)


def write_cells(
    s: Session,
    slide_or_scan: str,
    fmt: str,
    stream: TextIO,
    *,
    origin: tuple[int, int] | None = None,
    batch_rows: int = 2000,
) -> int:
    """Stream every cell of a scan to `stream`; returns the number of cells written.

    Args:
        s: an open session.
        slide_or_scan: a scan id, or a slide path / fingerprint (its latest finished scan).
        fmt: "csv" (papscan's level-0 frame) or "geojson" (QuPath's image space).
        stream: a text stream (a file opened with newline="" for CSV, or stdout).
        origin: GeoJSON only: the level-0 point that is (0, 0) in QuPath; default
            `qupath_origin` of the slide file, (0, 0) when it cannot be read.
        batch_rows: rows fetched per round trip.

    Raises:
        ScanNotFoundError: nothing matches `slide_or_scan`.
        ValueError: an unknown format.
    """
    if fmt not in ("csv", "geojson"):
        raise ValueError(f"unknown export format {fmt!r}; expected csv or geojson")
    scan = queries.resolve_scan(s, slide_or_scan)
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(queries.CELL_EXPORT_COLUMNS)
        n = 0
        for row in queries.iter_cells(s, scan.id, batch_rows=batch_rows):
            writer.writerow([getattr(row, c) for c in queries.CELL_EXPORT_COLUMNS])
            n += 1
        return n
    slide = s.get(Slide, scan.slide_id)
    if origin is None:
        origin = qupath_origin(slide.path) if slide is not None else (0, 0)
    fingerprint = slide.fingerprint if slide is not None else ""
    return write_geojson(
        _geojson_rows(s, scan.id, batch_rows),
        stream,
        origin=origin,
        id_prefix=_id_prefix(fingerprint, scan.id),
    )


def qupath_origin(slide_path: str | Path) -> tuple[int, int]:
    """Where QuPath's image origin lies in OpenSlide's level-0 frame for this file.

    QuPath's OpenSlide server crops to `openslide.bounds-*` when the file has all four,
    so its (0, 0) is (bounds-x, bounds-y); otherwise (0, 0). A file that cannot be read
    gives (0, 0) and a warning (the export is then right only for files without bounds).
    """
    import openslide

    try:
        if not Path(slide_path).exists():
            raise FileNotFoundError("no longer there")
        with openslide.OpenSlide(str(slide_path)) as osr:
            props = osr.properties
            if not all(k in props for k in _BOUNDS):
                return 0, 0
            return int(props[_BOUNDS[0]]), int(props[_BOUNDS[1]])
    except (OSError, ValueError, openslide.OpenSlideError) as exc:
        logger.warning(
            "slide file %s cannot be read (%s): the GeoJSON boxes are in OpenSlide's level-0 "
            "frame, which is QuPath's unless the file has openslide.bounds-* (e.g. MIRAX).",
            slide_path,
            " ".join(str(exc).split()).rstrip(".") or type(exc).__name__,
        )
        return 0, 0


def write_geojson(
    rows: Iterator[Sequence[Any]],
    stream: TextIO,
    *,
    origin: tuple[int, int] = (0, 0),
    id_prefix: str | None = None,
    flush_every: int = 1000,
) -> int:
    """Write cells as a QuPath FeatureCollection, one feature a line, as rows arrive.

    Args:
        rows: (id, x, y, w, h, label, score, suspicion, detection_score, attention,
            review_rank) per cell, boxes in level-0 px.
        stream: where to write.
        origin: subtracted from every point (see `qupath_origin`).
        id_prefix: the first 24 characters of the features' UUIDs (the cell id is the
            last 12 hex digits); default a random one.
        flush_every: features joined into one `stream.write`.

    Returns:
        The number of features written.
    """
    if id_prefix is None:
        id_prefix = str(uuid.uuid4())[:24]
    ox, oy = origin
    head = '{"type":"Feature","id":"' + id_prefix
    classes: dict[str, str] = {}  # label -> its geometry-to-classification glue, JSON-escaped
    isfinite = math.isfinite
    stream.write('{"type":"FeatureCollection","features":[\n')
    parts: list[str] = []
    sep = ""  # between features: a comma ending the line before
    n = 0
    for cid, x, y, w, h, label, score, suspicion, det, attention, rank in rows:
        glue = classes.get(label)
        if glue is None:
            r, g, b = class_colour(label)
            glue = classes[label] = (
                ']]},"properties":{"objectType":"detection","classification":{"name":'
                f'{json.dumps(label)},"color":[{r},{g},{b}]}},"measurements":{{'
            )
        x0, y0 = x - ox, y - oy
        x1, y1 = x0 + w, y0 + h
        if isfinite(score) and isfinite(suspicion) and isfinite(det) and isfinite(attention):
            measured = (
                f'"score":{score!r},"suspicion":{suspicion!r},'
                f'"detection_score":{det!r},"attention":{attention!r}'
            )
            if rank is not None:
                measured += f',"review_rank":{rank:d}'
        else:
            measured = _measurements(score, suspicion, det, attention, rank)
        parts.append(
            f'{sep}{head}{cid & 0xFFFFFFFFFFFF:012x}","geometry":{{"type":"Polygon","coordinates":'
            f"[[[{x0},{y0}],[{x1},{y0}],[{x1},{y1}],[{x0},{y1}],[{x0},{y0}]"
            f"{glue}{measured}}}}}}}"
        )
        sep = ",\n"
        n += 1
        if len(parts) >= flush_every:
            stream.write("".join(parts))
            parts.clear()
    stream.write("".join(parts))
    stream.write("\n]}\n")
    return n


def _measurements(*values: float | int | None) -> str:
    """The measurements object's inside, leaving out nulls and non-finite values."""
    return ",".join(
        f"{json.dumps(name)}:{value!r}"
        for name, value in zip(GEOJSON_MEASUREMENTS, values, strict=True)
        if value is not None and math.isfinite(value)
    )


def _geojson_rows(s: Session, scan_id: int, batch_rows: int) -> Iterator[Row[Any]]:
    """A scan's cells for `write_geojson`, by id, fetched `batch_rows` at a time.

    A Core query on the session's connection (no ORM row processing, no ROI join; about
    1.2x the rows/s of `queries.iter_cells`) that also gives the cell id for the feature id.
    """
    t = Cell.__table__.c
    stmt = (
        select(
            t.id,
            t.x,
            t.y,
            t.w,
            t.h,
            t.label,
            t.score,
            t.suspicion,
            t.detection_score,
            t.attention,
            t.review_rank,
        )  # fmt: skip
        .where(t.scan_id == scan_id)
        .order_by(t.id)
    )
    result = s.connection().execution_options(yield_per=batch_rows).execute(stmt)
    for partition in result.partitions():
        yield from partition


def _id_prefix(fingerprint: str, scan_id: int) -> str:
    """The first 24 characters of a scan's feature UUIDs (a UUID5 of slide and scan)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{fingerprint}/{scan_id}"))[:24]
