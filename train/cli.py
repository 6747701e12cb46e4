"""`papscan train …`: the training commands (a Typer sub-app the `papscan` CLI mounts).

Commands are thin: they set up logging to the terminal and call a library function.
Heavy modules (torch, ultralytics) are imported inside the commands.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from engines.errors import PapscanError

train_app = typer.Typer(no_args_is_help=True, help="Train models and write a model repository.")


@train_app.callback()
def train() -> None:
    """Train models and write a model repository."""


def _log_to_terminal() -> None:
    """Show `train.*` progress lines (epochs, losses, metrics) on stderr."""
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("train")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


@train_app.command("defaults")
def defaults(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Model repository to write (the three model folders are replaced)."
        ),
    ] = Path("engines/repository"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice.")] = 0,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Smoke run: tiny data and epochs, about 2 minutes; metrics meaningless."
        ),
    ] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Working files (datasets, ultralytics runs); "
            "default runs/train_defaults[_quick]_seed<seed>.",
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root",
            help="Real data folder (ISBI 2014, Herlev); "
            "default ../shared/data or $PAPSCAN_DATA_ROOT.",
        ),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads.")] = 2,
) -> None:
    """Train, evaluate and export the default cell_detector, cell_classifier and roi_classifier."""
    _log_to_terminal()
    from rich.console import Console
    from rich.table import Table

    from train.loops.defaults import train_defaults

    command = "papscan " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    try:
        summary = train_defaults(
            out,
            seed=seed,
            quick=quick,
            work_dir=work_dir,
            data_root=data_root,
            command=command,
            num_threads=threads,
        )
    except (PapscanError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]papscan:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"default models -> {out}")
    table.add_column("model")
    table.add_column("held-out figures")
    det = summary["cell_detector"]["metrics"]
    s, s25 = det["synthetic_held_out"], det["synthetic_held_out_at_conf_0.25"]
    table.add_row(
        "cell_detector",
        f"synthetic at conf {det['conf_threshold_shipped']:.2f}: recall {s['recall']:.3f} "
        f"precision {s['precision']:.3f}; at conf 0.25: recall {s25['recall']:.3f} "
        f"precision {s25['precision']:.3f}; mAP50 "
        f"{det['synthetic_held_out_ultralytics']['map50']:.3f}",
    )
    cls = summary["cell_classifier"]["metrics"]
    herlev = cls.get("herlev_held_out", {}).get("accuracy")
    table.add_row(
        "cell_classifier",
        f"synthetic accuracy {cls['synthetic_held_out']['accuracy']:.3f}"
        + (f", Herlev accuracy {herlev:.3f}" if herlev is not None else ""),
    )
    roi = summary["roi_classifier"]["metrics"]["synthetic_held_out"]
    table.add_row("roi_classifier", f"synthetic ROI accuracy {roi['accuracy']:.3f}")
    Console().print(table)
    Console().print(f"total {summary['timings']['total_s']:.0f} s; timings {summary['timings']}")
