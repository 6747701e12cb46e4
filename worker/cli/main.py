"""The `papscan` command line: thin commands over library functions.

The CLI is papscan's composition root: besides the worker's commands it mounts `train`'s
(`papscan train …`, `papscan synth`) so a lab has one tool. The pipeline itself never
imports `train`; heavy modules are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import (
    DbOption,
    ModelsOption,
    PreparationOption,
    fail,
    fails_in_one_sentence,
    repository,
)

app = typer.Typer(
    name="papscan",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Screen cervical cytology whole-slide images: scan, inspect and export results.",
)


class Reader(StrEnum):
    auto = "auto"
    dali = "dali"
    openslide = "openslide"


class ExportFormat(StrEnum):
    csv = "csv"
    geojson = "geojson"
    report = "report"


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress and tracebacks to stderr.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("papscan").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _database(url: str | None):
    from worker.db.session import Database
    from worker.settings import get_settings

    return Database(url or get_settings().db_url)


@app.command()
@fails_in_one_sentence
def scan(
    slide: Annotated[Path, typer.Argument(help="The whole-slide image to scan.")],
    db: DbOption = None,
    models: ModelsOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object.")
    ] = False,
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel, for files that do not record it.")
    ] = None,
    preparation: PreparationOption = None,
    focus_map: Annotated[
        Path | None,
        typer.Option(help="Write the QC focus map (per-ROI sharpness on the ROI grid) as PNG."),
    ] = None,
    reader: Annotated[Reader, typer.Option(help="How ROIs are read.")] = Reader.auto,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Scan one slide in this process and write the results to the database."""
    from worker.cli.console import out, print_report, roi_progress
    from worker.lifecycle import scan_file
    from worker.pipeline.scan import ScanOptions
    from worker.settings import get_settings
    from worker.wsi.slide import check_mpp

    if mpp is not None:
        check_mpp(mpp, "--mpp")
    with roi_progress(slide.name, enabled=progress and not as_json) as on_progress:
        report = scan_file(
            slide,
            _database(db),
            repository(models),
            mpp=mpp,
            preparation=preparation.value if preparation else None,
            options=ScanOptions.from_settings(get_settings(), reader=reader.value),
            progress=on_progress,
            focus_map=focus_map,
        )
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        print_report(report)


class PlanPrecision(StrEnum):
    fp16 = "fp16"
    int8 = "int8"


@app.command()
@fails_in_one_sentence
def export(
    target: Annotated[
        str,
        typer.Argument(
            help="A scan id, or a slide path or fingerprint (its latest finished scan); "
            "with --repository, a training run folder.",
            metavar="SCAN|SLIDE|RUN",
        ),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="csv: one row per cell; geojson: cell boxes for QuPath (drop the .geojson "
            "on the open slide); report: one printable, self-contained HTML page (the slide "
            "result and its review cells, cut from the slide).",
        ),
    ] = ExportFormat.csv,
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write (default: stdout).")
    ] = None,
    db: DbOption = None,
    model_repository: Annotated[
        Path | None,
        typer.Option(
            "--repository",
            help="Write the training run TARGET into this model repository as a new version.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Model name (default: cell_classifier or roi_classifier)."),
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Version number (default: the next free one).")
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16/--no-fp16", help="Also write model.fp16.onnx.")
    ] = True,
    tensorrt: Annotated[
        PlanPrecision | None,
        typer.Option(help="Also build a TensorRT plan here (needs TensorRT and a GPU)."),
    ] = None,
) -> None:
    """Write a scan's cells for other tools, or a trained model into a model repository."""
    if model_repository is not None:
        if output is not None:
            fail("--out writes cells of a scan; a model goes to --repository alone.")
        from train.export.run_export import export_run

        try:
            report = export_run(
                Path(target),
                model_repository,
                name=name,
                version=version,
                fp16=fp16,
                tensorrt=tensorrt.value if tensorrt else None,
            )
        except (ValueError, FileNotFoundError) as exc:  # a bad run folder or argument
            fail(str(exc))
        for line in report.summary_lines():
            typer.echo(line)
        return
    database = _database(db)
    with database.session() as s:
        if fmt is ExportFormat.report:
            from worker.cli.console import err, labelled
            from worker.db.report import write_report

            if output is None:
                info = write_report(s, target, sys.stdout)
            else:
                with output.open("w", encoding="utf-8") as f:
                    info = write_report(s, target, f)
            if info.note is not None:
                labelled(err, "note", "yellow", info.note)
            return
        from worker.db.export import write_cells

        if output is None:
            write_cells(s, target, fmt.value, sys.stdout)
        else:
            with output.open("w", newline="", encoding="utf-8") as f:
                write_cells(s, target, fmt.value, f)


@app.command()
@fails_in_one_sentence
def synth(
    out_path: Annotated[
        Path, typer.Argument(help="Slide to write (.tiff); its ground truth is written beside it.")
    ],
    width: Annotated[int, typer.Option(help="Level-0 width in px.")] = 8192,
    height: Annotated[int, typer.Option(help="Level-0 height in px.")] = 8192,
    mpp: Annotated[float, typer.Option(help="Microns per pixel at level 0.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same slide.")] = 0,
    cells: Annotated[int, typer.Option(help="Number of cells.")] = 600,
) -> None:
    """Write a synthetic liquid-based cytology slide and its ground truth."""
    from train.synth import write_synthetic_slide
    from worker.cli.console import out

    made = write_synthetic_slide(
        out_path, width=width, height=height, mpp=mpp, seed=seed, cells=cells
    )
    out.print(
        f"wrote {out_path} ({width}×{height} px at {mpp} µm/px, {len(made.cells)} cells) "
        f"and its ground truth {made.cells_csv}"
    )


@app.command()
@fails_in_one_sentence
def demo(
    db: DbOption = None,
    size: Annotated[int, typer.Option(help="Side of the synthetic slide in px.")] = 8192,
    cells: Annotated[int, typer.Option(help="Cells on the synthetic slide.")] = 600,
) -> None:
    """Make a synthetic slide, scan it, and compare the result with its ground truth."""
    from platformdirs import user_cache_dir

    from train.evaluation import match_cells
    from train.synth import read_truth, write_synthetic_slide
    from worker.cli.console import out, print_report, roi_progress
    from worker.lifecycle import scan_file

    path = Path(user_cache_dir("papscan")) / f"demo-{size}-{cells}.tiff"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        out.print(f"writing a synthetic slide to {path} …")
        write_synthetic_slide(path, width=size, height=size, mpp=0.5, seed=0, cells=cells)
    with roi_progress(path.name) as on_progress:
        report = scan_file(path, _database(db), repository(None), progress=on_progress)
    print_report(report)
    database = _database(db)
    from worker.db import queries

    with database.session() as s:
        found = list(queries.iter_cells(s, report.scan_id))
    m = match_cells(read_truth(path), found)
    out.print(
        f"against the ground truth: recall {m.recall:.3f}, precision {m.precision:.3f}, "
        f"correct class {m.accuracy:.3f} of {m.matched} matched cells"
    )


from train.cli import evaluate_command, train_app  # noqa: E402  (composition root: mounted after the app exists)
from train.export.guards import guard_overwrites  # noqa: E402
from worker.cli.models import models_app  # noqa: E402

app.add_typer(train_app, name="train", help="Train models and write a model repository.")


def _refuse_overwriting_scanned_weights(version_dir: Path, name: str, sha256: str) -> None:
    """`train` and `export` never replace weights that scans in the results database ran."""
    from worker.db import jobs

    db = _database(None)
    try:
        jobs.refuse_overwrite_of_scanned_weights(db, version_dir, name, sha256)
    finally:
        db.dispose()


guard_overwrites(_refuse_overwriting_scanned_weights)
app.command("evaluate")(evaluate_command)
app.add_typer(
    models_app, name="models", help="Inspect, verify, warm up and time a model repository."
)
from worker.cli.queue import queue_app  # noqa: E402

# `papscan worker|submit|status|cancel|retry|watch`: the overnight queue, at the top level.
app.add_typer(queue_app)
from worker.cli.results import results_app  # noqa: E402

app.add_typer(results_app)  # `papscan results`: the worklist, or one slide in full
from worker.cli.serve import serve_app  # noqa: E402

app.add_typer(serve_app)  # `papscan serve`, `papscan token create|list|revoke`
