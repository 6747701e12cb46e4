"""What the CLI shows a person: the scan report, progress bars, one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from worker.lifecycle import ScanReport

err = Console(stderr=True)
out = Console()

STAGE_ORDER = (
    "plan",
    "read",
    "detect",
    "crop",
    "qc",
    "classify_cells",
    "classify_rois",
    "write",
    "total",
)


def labelled(console: Console, label: str, style: str, message: str) -> None:
    """Print `label: message` on one line, the label in `style`; the message is text, never
    markup, so its square brackets (`papscan[tensorrt]`, `slide[2].svs`) print as they are."""
    console.print(f"[{style}]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def roi_progress(description: str, enabled: bool = True) -> Iterator:
    """A progress bar over ROIs on stderr; yields a `(done, planned)` callback.

    The bar appears at the first callback, once the slide is open and its ROIs planned, so a
    file refused at open shows only its error.
    """
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ROIs"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = None

    def update(done: int, planned: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=planned)
        bar.update(task, completed=done, total=planned)

    try:
        yield update
    finally:
        bar.stop()


def print_report(report: ScanReport) -> None:
    """The slide-level result as a person reads it."""
    s = report.summary
    out.print(
        f"[bold]{escape(report.path)}[/]  scan {report.scan_id}  "
        f"{report.width}×{report.height} px at {report.mpp:.3f} µm/px, "
        f"{report.rois_planned} ROIs via {report.reader}"
    )
    for warning in report.warnings:
        labelled(out, "warning", "bold yellow", warning)
    style = "green" if s.category == "NILM" else "bold red"
    out.print(
        f"category [{style}]{escape(s.category)}[/]   P(abnormal) {s.score:.3f}   "
        f"cells found {s.cell_count}"
    )
    if s.call is not None:
        a = s.call.adequacy
        state = "satisfactory" if a.satisfactory else "[bold yellow]below the minimum[/]"
        out.print(
            f"adequacy {state}: about {a.squamous_estimate} squamous cells of the"
            f" {a.minimum} a {a.preparation} slide needs   operating point"
            f" {escape(s.call.operating_point)}"
        )
        for note in s.call.notes:
            labelled(out, "note", "bold yellow", note)
    for flag in (s.qc or {}).get("flags", []):
        labelled(out, "QC", "bold magenta", flag)
    if report.focus_map:
        out.print(f"focus map: {escape(report.focus_map)}")
    counts = Table(show_header=True, header_style="bold", box=None)
    for label in s.class_counts:
        counts.add_column(label, justify="right")
    counts.add_row(*(str(n) for n in s.class_counts.values()))
    out.print(counts)
    if s.top_cells:
        top = Table(title="cells to review first", header_style="bold", box=None)
        for col in ("rank", "x", "y", "w", "h", "label", "score"):
            top.add_column(col, justify="right")
        for c in s.top_cells[:5]:
            top.add_row(
                str(c.review_rank),
                str(c.x),
                str(c.y),
                str(c.w),
                str(c.h),
                c.label,
                f"{c.score:.3f}",
            )
        out.print(top)
    total = report.timings_ms.get("total", 0.0)
    timings = Table(
        title="stage timings (ms; read/write overlap compute)", header_style="bold", box=None
    )
    stages = [k for k in STAGE_ORDER if k in report.timings_ms]
    for stage in stages:
        timings.add_column(stage, justify="right")
    timings.add_row(*(f"{report.timings_ms[k]:.0f}" for k in stages))
    out.print(timings)
    if total:
        mpx = report.width * report.height / 1e6
        out.print(
            f"{s.cell_count / total * 1000:.0f} cells/s, {mpx / total * 1000:.1f} "
            f"megapixels/s (level 0), models {report.model_versions}"
        )
