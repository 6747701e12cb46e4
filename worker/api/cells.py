"""A scan's cells by filter, and one cell's field cut from the slide as PNG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select

from worker.api.slide_files import OpenSlides, SlideGone
from worker.db import queries
from worker.db.models import Cell, Slide

__all__ = ["MAX_REGION_PX", "CellFilter", "cell_png", "cells_statement", "region"]

#: A region may be at most this many level-0 px a side.
MAX_REGION_PX = 100_000


@dataclass(frozen=True, slots=True)
class CellFilter:
    """Which cells to list; None keeps everything. `region` is (x, y, w, h), level-0 px."""

    label: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    region: tuple[int, int, int, int] | None = None
    review_rank_max: int | None = None


def region(text: str, slide: Slide) -> tuple[int, int, int, int]:
    """Parse `x,y,w,h` and check it lies on the slide.

    Raises:
        ValueError: one sentence saying what is wrong.
    """
    try:
        x, y, w, h = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("region must be four integers x,y,w,h in level-0 pixels.") from None
    if w < 1 or h < 1 or w > MAX_REGION_PX or h > MAX_REGION_PX:
        raise ValueError(f"region width and height must be 1 to {MAX_REGION_PX:,} pixels.")
    if x < 0 or y < 0 or x + w > slide.width or y + h > slide.height:
        raise ValueError(
            f"region lies outside the slide ({slide.width} x {slide.height} level-0 pixels)."
        )
    return x, y, w, h


def cells_statement(scan_id: int, f: CellFilter) -> Select:
    """The scan's cells that pass `f`, in id order (cells overlapping the region)."""
    stmt = queries.cells_statement(scan_id, Cell.id)
    if f.label is not None:
        stmt = stmt.where(Cell.label == f.label)
    if f.min_score is not None:
        stmt = stmt.where(Cell.score >= f.min_score)
    if f.max_score is not None:
        stmt = stmt.where(Cell.score <= f.max_score)
    if f.review_rank_max is not None:
        stmt = stmt.where(Cell.review_rank <= f.review_rank_max)
    if f.region is not None:
        x, y, w, h = f.region
        stmt = stmt.where(Cell.x < x + w, Cell.x + Cell.w > x, Cell.y < y + h, Cell.y + Cell.h > y)
    return stmt


def cell_png(slide: Slide, cell: Any, field_um: float, slides: OpenSlides | None = None) -> bytes:
    """The cell's field (`field_um` a side, level 0) with its box drawn, as PNG.

    The slide is read at the path the database records, and only if its fingerprint is
    still the scanned slide's; `slides` keeps it open for the next request.

    Raises:
        SlideGone: the file is gone, changed, or cannot be read.
    """
    from worker.db.report import _tile
    from worker.errors import SlideReadError

    opened = (slides or OpenSlides(size=1)).get(slide)
    fw = max(1, round(field_um / slide.mpp_x))
    fh = max(1, round(field_um / slide.mpp_y))
    try:
        return _tile(opened.slide, cell, fw, fh).png
    except (SlideReadError, OSError):
        raise SlideGone("the slide file of this scan cannot be read.") from None
