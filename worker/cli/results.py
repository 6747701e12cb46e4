"""`papscan results`: the morning worklist, or everything about one slide.

    papscan results [--since DATE] [--until DATE] [--status STATUS] [--category NAME]...
        [--adequacy satisfactory|unsatisfactory] [--reviewed | --not-reviewed] [--limit N]
        [--json | --csv]
    papscan results SLIDE|SCAN [--json]

Mounted at the top level of `papscan`; the queries live in `worker/db/worklist.py`.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any

import typer

from worker.cli.common import DbOption, fail, fails_in_one_sentence

results_app = typer.Typer(add_completion=False)


class Status(StrEnum):
    done = "done"
    failed = "failed"
    running = "running"
    queued = "queued"
    cancelled = "cancelled"


class AdequacyChoice(StrEnum):
    satisfactory = "satisfactory"
    unsatisfactory = "unsatisfactory"


DATE_HELP = "YYYY-MM-DD (local time), a date and time, 'today' or 'yesterday'"


@results_app.command()
@fails_in_one_sentence
def results(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="SLIDE|SCAN",
            help="One slide in full: a scan id, or a slide path or fingerprint (its newest "
            "finished scan). Without it: the worklist.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="DATE", help=f"Scans finished (or created) from DATE: {DATE_HELP}."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(metavar="DATE", help="Scans finished (or created) up to DATE, inclusive."),
    ] = None,
    status: Annotated[Status | None, typer.Option(help="The slide's newest scan status.")] = None,
    category: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Slide category (NILM, HSIL, …, Unsatisfactory); repeat for several.",
        ),
    ] = None,
    adequacy: Annotated[AdequacyChoice | None, typer.Option(help="Adequacy.")] = None,
    reviewed: Annotated[
        bool | None,
        typer.Option(
            "--reviewed/--not-reviewed",
            help="Slides whose newest scan has (or has not) a cytologist's decision.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N slides, the top.")] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Write the worklist as CSV.")] = False,
) -> None:
    """The worklist, one slide a row, those needing a person first: failed scans and
    unsatisfactory slides, then by P(abnormal); or one slide's result in full."""
    from worker.db.worklist import WorklistFilter

    if as_json and as_csv:
        fail("give --json or --csv, not both")
    filters = {"--since": since, "--until": until, "--status": status, "--category": category}
    filters.update({"--adequacy": adequacy, "--limit": limit})
    if reviewed is not None:
        filters["--reviewed" if reviewed else "--not-reviewed"] = True
    if target is not None:
        given = [name for name, value in filters.items() if value]
        if given or as_csv:
            given += ["--csv"] if as_csv else []
            verb = "works" if len(given) == 1 else "work"
            fail(f"{', '.join(given)} only {verb} on the worklist, not with a SLIDE|SCAN")
        return _one_slide(target, db, as_json)
    start, end = _date(since, "--since"), _date(until, "--until", end=True)
    if start and end and start >= end:
        fail(f"--since {since} is not before --until {until}")
    f = WorklistFilter(
        since=start,
        until=end,
        status=status.value if status else None,
        categories=tuple(_category(c) for c in category or ()),
        adequacy=adequacy.value if adequacy else None,
        reviewed=reviewed,
        limit=limit,
    )
    _worklist(f, db, "json" if as_json else "csv" if as_csv else "table")


@contextmanager
def _session(url: str | None) -> Iterator[Any]:
    """A session on the results database (its schema brought up to date), closed after."""
    from worker.db.session import Database
    from worker.settings import get_settings

    database = Database(url or get_settings().db_url)
    try:
        database.create_schema()
        with database.session() as s:
            yield s
    finally:
        database.dispose()


def _date(text: str | None, option: str, *, end: bool = False) -> datetime | None:
    """A user's date as an aware time; a bare date (local) ends at the next midnight."""
    if text is None:
        return None
    word = text.strip().lower()
    named = {"today": date.today(), "yesterday": date.today() - timedelta(days=1)}
    try:
        day = named.get(word) or date.fromisoformat(word)
    except ValueError:
        day = None
    if day is not None:
        return datetime.combine(day + timedelta(days=int(end)), time()).astimezone()
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"{option} takes {DATE_HELP} (as 2024-05-01 or 2024-05-01T18:00), not {text!r}")
    return when if when.tzinfo else when.astimezone()


def _category(name: str) -> str:
    """A category as stored, from any case; 'unsatisfactory' names the long one."""
    from worker.db.worklist import CATEGORIES

    by_key = {c.lower(): c for c in CATEGORIES}
    by_key["unsatisfactory"] = CATEGORIES[-1]
    found = by_key.get(name.strip().lower())
    if found is None:
        fail(f"--category takes {', '.join(CATEGORIES)}, not {name!r}")
    return found


def _worklist(f: Any, url: str | None, fmt: str) -> None:
    from worker.db.worklist import WORKLIST_COLUMNS, iter_worklist

    with _session(url) as s:
        rows = iter_worklist(s, f)
        if fmt == "csv":
            writer = csv.writer(sys.stdout)
            writer.writerow(WORKLIST_COLUMNS)
            for row in rows:
                row["qc_flags"] = " | ".join(row["qc_flags"])
                writer.writerow([_plain(row[c]) for c in WORKLIST_COLUMNS])
        elif fmt == "json":
            print(json.dumps(list(rows), default=_plain))
        else:
            _print_table(list(rows))


def _plain(value: Any) -> Any:
    """Times as ISO 8601 text; everything else as it is."""
    return value.isoformat() if isinstance(value, datetime) else value


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    from worker.cli.console import out

    if not rows:
        out.print("no slides match", highlight=False)
        return
    table = Table(
        header_style="bold", box=None, title=f"worklist: {len(rows)} slide{'s' * (len(rows) != 1)}"
    )
    for name in ("scan", "slide", "barcode", "category", "P(abnormal)", "adequacy"):
        table.add_column(name, justify="right" if name in ("scan", "P(abnormal)") else "left")
    for name in ("QC flags", "status", "finished", "reviewed"):
        table.add_column(name, overflow="fold")
    for r in rows:
        category = r["category"] or ""
        style = "green" if category == "NILM" else "bold red" if category else ""
        if r["status"] == "failed" or category.startswith("Unsatisfactory"):
            style = "bold yellow"
        table.add_row(
            str(r["scan_id"]),
            Text(r["slide_path"], overflow="fold"),
            Text(r["barcode"] or ""),
            Text(category, style=style),
            "" if r["score"] is None else f"{r['score']:.3f}",
            Text(r["adequacy"] or ""),
            Text("\n".join(r["qc_flags"]), style="magenta"),
            Text(r["status"], style="bold yellow" if r["status"] == "failed" else ""),
            _local(r["finished_at"]),
            Text("yes" if r["reviewed"] else "", style="green"),
        )
    out.print(table)


def _local(when: datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else ""


def _one_slide(ref: str, url: str | None, as_json: bool) -> None:
    from worker.db.worklist import slide_detail

    with _session(url) as s:
        detail = slide_detail(s, ref)
    if as_json:
        print(json.dumps(detail, default=_plain))
    else:
        _print_detail(detail)


def _print_detail(d: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from worker.cli.console import STAGE_ORDER, labelled, out

    barcode = f"  barcode {escape(d['barcode'])}" if d["barcode"] else ""
    out.print(
        f"[bold]{escape(d['slide_path'] or '')}[/]  scan {d['scan_id']} {d['status']}"
        f"{barcode}  {d['width']}×{d['height']} px at {d['mpp']:.3f} µm/px",
        highlight=False,
        soft_wrap=True,
    )
    if d["error"]:
        labelled(out, "error", "bold red", d["error"])
    for warning in d["warnings"]:
        labelled(out, "warning", "bold yellow", warning)
    if d["category"] is not None:
        style = "green" if d["category"] == "NILM" else "bold red"
        out.print(
            f"category [{style}]{escape(d['category'])}[/]   P(abnormal) {d['score']:.3f}"
            f"   cells found {d['cell_count']} in {d['roi_count']} ROIs"
            f"   operating point {escape(str(d['operating_point']))}",
            highlight=False,
        )
    if d["adequacy"] is not None:
        out.print(
            f"adequacy {escape(d['adequacy'])}: about {d['squamous_estimate']} squamous cells "
            f"of the {d['adequacy_minimum']} a {escape(str(d['preparation']))} slide needs",
            highlight=False,
        )
    for note in d["notes"]:
        labelled(out, "note", "bold yellow", note)
    for flag in d["qc_flags"]:
        labelled(out, "QC", "bold magenta", flag)
    measures = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in (d["qc"] or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    if measures:
        out.print(f"QC measures: {escape(', '.join(measures))}", highlight=False, soft_wrap=True)
    for title, values, fmt in (
        ("cells per class", d["class_counts"] or {}, str),
        (
            "stage timings (ms)",
            {k: d["stage_timings_ms"][k] for k in STAGE_ORDER if k in d["stage_timings_ms"]},
            lambda v: f"{v:.0f}",
        ),
    ):
        if values:
            out.print(f"{title}:", highlight=False)
            table = Table(header_style="bold", box=None)
            for name in values:
                table.add_column(escape(name), justify="right")
            table.add_row(*(fmt(v) for v in values.values()))
            out.print(table)
    for engine, version in d["model_versions"].items():
        sha = d["model_sha256"].get(engine)
        sha = f"  sha256 {escape(sha)}" if sha else ""
        out.print(f"model {escape(engine)} v{escape(str(version))}{sha}", highlight=False)
    if d["top_cells"]:
        out.print("cells to review first:", highlight=False)
        top = Table(header_style="bold", box=None)
        for col in ("rank", "x", "y", "w", "h", "label", "score"):
            top.add_column(col, justify="right")
        for c in d["top_cells"]:
            box = (str(c[k]) for k in ("x", "y", "w", "h"))
            top.add_row(str(c["review_rank"]), *box, escape(c["label"]), f"{c['score']:.3f}")
        out.print(top)
