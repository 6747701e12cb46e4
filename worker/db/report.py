"""A scan as one printable HTML page for the person who reads it in the morning.

`write_report` writes a self-contained file (inline CSS, images as `data:` URIs; nothing
is fetched from anywhere): the slide result (category, P(abnormal), adequacy with the
squamous estimate and the minimum, notes, QC flags, cells per class, operating point,
model versions, scan date) and a gallery of the review cells in review-rank order, each
a fixed field (48 µm) around the cell cut from the slide at level 0 with OpenSlide, its
box drawn in its class colour, with label and score under it.

The slide is read where the database last saw it. If the file is gone, unreadable, or is
no longer the scanned slide (another fingerprint), the report still renders, with a
one-line note where the gallery would be.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from worker.db import queries
from worker.db.export import CLASS_ORDER, class_colour
from worker.db.models import Cell, Scan, Slide, SlideResult
from worker.errors import ScanNotFoundError

__all__ = ["FIELD_UM", "GALLERY_CELLS", "ReportInfo", "write_report"]

#: Side of the square field cut around each gallery cell, µm.
FIELD_UM = 48.0
#: At most this many review cells in the gallery.
GALLERY_CELLS = 20


@dataclass(frozen=True, slots=True)
class ReportInfo:
    """What `write_report` wrote.

    Attributes:
        scan_id: the scan reported.
        gallery_cells: cells shown in the gallery.
        note: why the gallery is missing or empty (one sentence), else None.
    """

    scan_id: int
    gallery_cells: int
    note: str | None


@dataclass(frozen=True, slots=True)
class _Tile:
    rank: int
    label: str
    score: float
    png: bytes


def write_report(
    s: Session,
    slide_or_scan: str,
    stream: TextIO,
    *,
    top: int = GALLERY_CELLS,
    field_um: float = FIELD_UM,
) -> ReportInfo:
    """Write the HTML report of a finished scan to `stream`.

    Args:
        s: an open session.
        slide_or_scan: a scan id, or a slide path / fingerprint (its latest finished scan).
        stream: a text stream (write it as UTF-8).
        top: gallery cells, at most (review-rank order).
        field_um: side of each gallery field, µm.

    Raises:
        ScanNotFoundError: nothing matches, or the scan has no result (not finished).
    """
    scan = queries.resolve_scan(s, slide_or_scan)
    result = s.get(SlideResult, scan.id)
    if result is None:
        raise ScanNotFoundError(
            f"scan {scan.id} is {scan.status} and has no slide result; a report needs a "
            "finished scan."
        )
    slide = s.get(Slide, scan.slide_id)
    cells = _review_cells(s, scan.id, top)
    tiles, note = _gallery(slide, cells, field_um)
    if note is None and not cells:
        note = "This scan has no review cells to show."
    stream.write(_page(scan, slide, result, tiles, note, field_um))
    return ReportInfo(scan_id=scan.id, gallery_cells=len(tiles), note=note)


def _review_cells(s: Session, scan_id: int, top: int) -> list[Row[Any]]:
    """The scan's review cells, review rank first (the partial index on review_rank)."""
    return list(
        s.execute(
            select(Cell.x, Cell.y, Cell.w, Cell.h, Cell.label, Cell.score, Cell.review_rank)
            .where(Cell.scan_id == scan_id, Cell.review_rank.is_not(None))
            .order_by(Cell.review_rank, Cell.id)
            .limit(top)
        )
    )


def _gallery(
    slide: Slide, cells: Sequence[Row[Any]], field_um: float
) -> tuple[list[_Tile], str | None]:
    """Cut each cell's field from the slide; ([], note) when the slide cannot serve them."""
    if not cells:
        return [], None
    from worker.errors import SlideOpenError, SlideReadError
    from worker.wsi.slide import open_slide

    path = Path(slide.path)
    left_out = "the gallery of cells is left out."
    if not path.exists():
        return [], f"The slide file {path} is no longer there: {left_out}"
    try:
        with open_slide(path, mpp=(slide.mpp_x + slide.mpp_y) / 2) as opened:
            if opened.info.fingerprint != slide.fingerprint:
                return [], (
                    f"The file at {path} is no longer the scanned slide (its fingerprint "
                    f"differs): {left_out}"
                )
            fw = max(1, round(field_um / slide.mpp_x))
            fh = max(1, round(field_um / slide.mpp_y))
            return [_tile(opened, c, fw, fh) for c in cells], None
    except (SlideOpenError, SlideReadError, OSError) as exc:
        reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        return [], f"The slide file {path} cannot be read ({reason}): {left_out}"


def _tile(opened: Any, cell: Row[Any], fw: int, fh: int) -> _Tile:
    """A level-0 field of fw x fh px centred on the cell, its box drawn, as PNG."""
    from PIL import Image, ImageDraw

    x0 = round(cell.x + cell.w / 2 - fw / 2)
    y0 = round(cell.y + cell.h / 2 - fh / 2)
    image = Image.fromarray(opened.read_region((x0, y0), 0, (fw, fh)))
    line = max(2, round(min(fw, fh) / 64))
    bx, by = cell.x - x0, cell.y - y0
    ImageDraw.Draw(image).rectangle(
        (bx - line, by - line, bx + cell.w - 1 + line, by + cell.h - 1 + line),
        outline=class_colour(cell.label),
        width=line,
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _Tile(cell.review_rank, cell.label, cell.score, buffer.getvalue())


# --- the page ----------------------------------------------------------------------------

_CSS = """
@page { size: A4; margin: 14mm; }
* { box-sizing: border-box; }
body { font: 10pt/1.4 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  color: #111; max-width: 190mm; margin: 0 auto; padding: 6mm 0; }
h1 { font-size: 15pt; margin: 0 0 1mm; }
h2 { font-size: 11.5pt; margin: 6mm 0 2mm; border-bottom: 1px solid #bbb; }
.sub { color: #444; margin: 0 0 3mm; word-break: break-all; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 1mm 2mm 1mm 0; }
th { width: 34%; font-weight: 600; color: #333; }
td.n { text-align: right; font-variant-numeric: tabular-nums; width: 5em; }
.counts th { width: auto; }
.category { font-size: 14pt; font-weight: 700; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em;
  border: 1px solid rgba(0,0,0,.3); vertical-align: -0.05em;
  -webkit-print-color-adjust: exact; print-color-adjust: exact; }
ul { margin: 0; padding-left: 1.1em; }
.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 8.5pt;
  word-break: break-all; }
.note { border-left: 3px solid #c60; padding: 1mm 3mm; background: #fff6ec; }
.gallery { display: grid; grid-template-columns: repeat(5, 1fr); gap: 3mm; }
figure { margin: 0; break-inside: avoid; page-break-inside: avoid; text-align: center; }
figure img { width: 100%; aspect-ratio: 1 / 1; object-fit: contain; border: 1px solid #999;
  -webkit-print-color-adjust: exact; print-color-adjust: exact; }
figcaption { font-size: 8.5pt; line-height: 1.25; margin-top: .5mm; }
footer { margin-top: 8mm; color: #555; font-size: 8pt; border-top: 1px solid #bbb;
  padding-top: 2mm; }
"""


def _page(
    scan: Scan,
    slide: Slide,
    result: SlideResult,
    tiles: Sequence[_Tile],
    note: str | None,
    field_um: float,
) -> str:
    e = html.escape
    name = Path(slide.path).name
    category = _swatch(result.category, known_only=True) + e(result.category)
    result_rows = [
        ("Category", f'<span class="category">{category}</span>'),
        ("P(abnormal)", f"{result.score:.3f}" + (
            "" if result.abnormal is None
            else f" &mdash; called {'abnormal' if result.abnormal else 'negative'}")),
        ("Adequacy", _adequacy(result)),
        ("Notes", _list(result.notes)),
        ("QC flags", _list((result.qc or {}).get("flags"), empty="none")),
        ("Operating point", e(result.operating_point or "not recorded")),
    ]  # fmt: skip
    scan_rows = [
        ("Slide file", f'<span class="mono">{e(slide.path)}</span>'),
        ("Barcode", e(slide.barcode or "not read")),
        ("Fingerprint", f'<span class="mono">{e(slide.fingerprint)}</span>'),
        ("Size", f"{slide.width:,} &times; {slide.height:,} px at "
         f"{slide.mpp_x:.3g} &times; {slide.mpp_y:.3g} µm/px ({e(slide.vendor)})"),
        ("Scan", f"{scan.id}, {e(scan.status)}, {_when(scan.finished_at or scan.started_at)}"),
        ("Model versions", _models(scan)),
    ]  # fmt: skip
    if note is not None:
        gallery = f'<p class="note">{e(note)}</p>'
    else:
        gallery = '<div class="gallery">\n' + "\n".join(_figure(t) for t in tiles) + "\n</div>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>papscan report &ndash; {e(name)} (scan {scan.id})</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Cervical cytology screening &ndash; {e(name)}</h1>
<p class="sub">Scan {scan.id} of {_when(scan.finished_at or scan.started_at)}</p>
<h2>Slide result</h2>
{_table(result_rows)}
<h2>Cells per class</h2>
{_counts(result)}
<h2>Slide and scan</h2>
{_table(scan_rows)}
<h2>Review cells ({len(tiles)}, in review order; {field_um:g} µm field at level 0)</h2>
{gallery}
<footer>Written by papscan {e(_version())} on {_when(datetime.now(UTC))}. A screening aid:
the category and the cells shown are machine calls, for a cytologist to review.</footer>
</body>
</html>
"""


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>\n{body}\n</table>"


def _swatch(label: str, known_only: bool = False) -> str:
    """A square of the class colour (none for a category that is no class, if asked)."""
    if known_only and label not in CLASS_ORDER:
        return ""
    r, g, b = class_colour(label)
    return f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'


def _list(items: Sequence[str] | None, empty: str = "none") -> str:
    if not items:
        return html.escape(empty)
    return "<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items) + "</ul>"


def _adequacy(result: SlideResult) -> str:
    if result.adequacy is None:
        return "not assessed"
    text = html.escape(result.adequacy.capitalize())
    if result.squamous_estimate is not None:
        text += f" &mdash; about {result.squamous_estimate:,} squamous cells"
        if result.adequacy_minimum is not None:
            text += f" (minimum {result.adequacy_minimum:,}"
            text += f", {html.escape(result.preparation)})" if result.preparation else ")"
    return text


def _counts(result: SlideResult) -> str:
    counts = dict(result.class_counts or {})
    order = [c for c in CLASS_ORDER if c in counts] + sorted(set(counts) - set(CLASS_ORDER))
    total = sum(counts.values())
    rows = [
        f"<tr><th>{_swatch(c)}{html.escape(c)}</th><td class='n'>{counts[c]:,}</td>"
        f"<td class='n'>{100 * counts[c] / total:.1f} %</td></tr>"
        for c in order
    ]
    rows.append(
        f"<tr><th>All cells ({result.roi_count:,} ROIs)</th>"
        f"<td class='n'>{result.cell_count:,}</td><td></td></tr>"
    )
    return '<table class="counts">\n' + "\n".join(rows) + "\n</table>"


def _models(scan: Scan) -> str:
    sha = scan.model_sha256 or {}
    parts = []
    for name, version in sorted((scan.model_versions or {}).items()):
        digest = sha.get(name)
        part = f"{html.escape(name)} {html.escape(str(version))}"
        if digest:
            part += f' <span class="mono">({html.escape(str(digest)[:12])})</span>'
        parts.append(part)
    return "; ".join(parts) or "not recorded"


def _figure(tile: _Tile) -> str:
    data = base64.b64encode(tile.png).decode("ascii")
    label = html.escape(tile.label)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="cell {tile.rank}: {label}">'
        f"<figcaption>#{tile.rank} {_swatch(tile.label)}<b>{label}</b> "
        f"{tile.score:.2f}</figcaption></figure>"
    )


def _when(moment: datetime | None) -> str:
    """A database time as `YYYY-MM-DD HH:MM UTC` (SQLite returns naive UTC)."""
    if moment is None:
        return "an unknown date"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("papscan")
    except PackageNotFoundError:
        return "(version unknown)"
