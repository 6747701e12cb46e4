"""`papscan train …`: the training commands (a Typer sub-app the `papscan` CLI mounts).

Commands are thin: they set up logging to the terminal and call a library function.
Heavy modules (torch, ultralytics) are imported inside the commands.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from engines.errors import PapscanError

if TYPE_CHECKING:
    from train.protocols import Protocol

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
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch",
            help="Random initial weights for the detector (pico YAML) and the cell encoder, "
            "instead of the packaged nucleus (AGPL-3.0) and ImageNet (Apache-2.0) starts.",
        ),
    ] = False,
    detector_weights: Annotated[
        Path | None,
        typer.Option(
            "--detector-weights",
            help="Export and evaluate these trained ultralytics weights instead of training "
            "the detector (e.g. runs/train_defaults_seed0/detector/detector/weights/last.pt).",
        ),
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            help="Only these models, in order (detector, classifier, roi; repeatable). "
            "The roi stage reads the detector and classifier already in --out.",
        ),
    ] = None,
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
            from_scratch=from_scratch,
            detector_weights=detector_weights,
            **({"stages": tuple(stage)} if stage else {}),
        )
    except (PapscanError, FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[bold red]papscan:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"default models -> {out}")
    table.add_column("model")
    table.add_column("held-out figures")
    for model in ("cell_detector", "cell_classifier", "roi_classifier"):
        if model in summary:
            table.add_row(model, held_out_line(summary[model]["metrics"]))
    Console().print(table)
    Console().print(f"total {summary['timings']['total_s']:.0f} s; timings {summary['timings']}")


def held_out_line(metrics: dict) -> str:
    """One line of a model's held-out figures (recall/precision or accuracy per data set)."""
    parts = []
    for name, m in metrics.items():
        if not (isinstance(m, dict) and name.endswith("held_out")):
            continue
        set_name = name.removesuffix("_held_out")
        if "recall" in m:
            parts.append(f"{set_name} recall {m['recall']:.3f} precision {m['precision']:.3f}")
        elif "accuracy" in m:
            parts.append(f"{set_name} accuracy {m['accuracy']:.3f}")
    return "; ".join(parts)


# --- protocol runs: `train cells`, `train rois`, `train detector`, `evaluate` -------------

ProtocolOption = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="Paper preset: 000 (su2021), 001, 002, 004; default 000 for cells, 002 for rois.",
    ),
]
ArchOption = Annotated[
    str | None, typer.Option("--arch", help="Registered model; default the protocol's.")
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Dataset spec (herlev, herlev:binary, herlev:bethesda, sipakmed, cric, "
        "sipakmed+cric, lbc) or a folder of class subfolders; default the protocol's.",
    ),
]
EpochsOption = Annotated[int | None, typer.Option("--epochs", help="Override: epochs.")]
InputPxOption = Annotated[
    int | None, typer.Option("--input-px", help="Override: network input side, px.")
]
BatchOption = Annotated[int | None, typer.Option("--batch", help="Override: batch size.")]
FoldsOption = Annotated[
    int | None, typer.Option("--folds", help="Override: k of a k-fold protocol.")
]
LrOption = Annotated[float | None, typer.Option("--lr", help="Override: learning rate.")]
LimitOption = Annotated[
    int | None,
    typer.Option("--limit", help="Smoke run: at most N items in each split of each fold."),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of splits, weights and shuffles.")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Run folder to create; default runs/<task-arch-data-protocol-…>."),
]
ResumeOption = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help="Continue this run folder (finished folds kept, the current one from its last "
        "epoch); its run.json gives every other setting.",
    ),
]
ThreadsOption = Annotated[int, typer.Option("--threads", help="Torch CPU threads.")]
DataRootOption = Annotated[
    Path | None,
    typer.Option("--data-root", help="Shared data folder; default ../shared/data."),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1…; default CUDA if present.")
]

_USER_ERRORS = (PapscanError, FileNotFoundError, ValueError)


def _fail(exc: Exception) -> typer.Exit:
    """Print a user error as one sentence on stderr; return the exit to raise."""
    from rich.console import Console
    from rich.markup import escape

    # Text, not markup (a sentence may hold square brackets), on one line however wide.
    Console(stderr=True).print(
        f"[bold red]papscan:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
    )
    return typer.Exit(1)


def _command() -> str:
    return "papscan " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""


def _print_summary(metrics: dict, run_dir: Path, title: str) -> None:
    """A rich table of mean ± std over folds: accuracy, F1s, per-class P/R/F1."""
    from rich.console import Console
    from rich.table import Table

    s = metrics["summary"]
    n = s["folds"]

    def pm(d: dict) -> str:
        return f"{d['mean']:.4f} ± {d['std']:.4f}" if n > 1 else f"{d['mean']:.4f}"

    table = Table(title=f"{title} ({n} fold{'s' if n > 1 else ''}) -> {run_dir}")
    table.add_column("class")
    for column in ("precision", "recall", "F1"):
        table.add_column(column, justify="right")
    for name, m in s["per_class"].items():
        table.add_row(name, pm(m["precision"]), pm(m["recall"]), pm(m["f1"]))
    table.add_section()
    table.add_row("accuracy", "", "", pm(s["accuracy"]))
    table.add_row("weighted F1", "", "", pm(s["weighted_f1"]))
    table.add_row("macro F1", "", "", pm(s["macro_f1"]))
    Console().print(table)


def _protocol_for(
    name: str | None, default: str, task: str, **overrides: int | float | None
) -> Protocol:
    from train.protocols import get_protocol

    protocol = get_protocol(name or default)
    if protocol.task != task:
        raise ValueError(f"protocol {protocol.name} trains {protocol.task}, not {task}")
    return protocol.with_overrides(**overrides)


def _resumed(resume: Path, task: str, given: dict[str, object]) -> dict:
    """The run.json of a run to resume; refuses settings given beside --resume."""
    from train.runs import load_run

    clashing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if clashing:
        raise ValueError(f"--resume takes every setting from the run; drop {', '.join(clashing)}")
    run = load_run(resume)
    if run["task"] != task:
        raise ValueError(f"{resume} is a {run['task']} run, not a {task} run")
    if run["status"] == "done":
        raise ValueError(f"{resume} has already finished")
    return run


@train_app.command("cells")
def cells(
    arch: ArchOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    epochs: EpochsOption = None,
    input_px: InputPxOption = None,
    batch: BatchOption = None,
    folds: FoldsOption = None,
    lr: LrOption = None,
    limit: LimitOption = None,
    seed: SeedOption = 0,
    out: OutOption = None,
    resume: ResumeOption = None,
    threads: ThreadsOption = 2,
    data_root: DataRootOption = None,
    device: DeviceOption = None,
) -> None:
    """Train a cell classifier under a paper's protocol; write a run folder."""
    _log_to_terminal()
    from train.data.catalog import open_image_set
    from train.loops.defaults import set_determinism
    from train.loops.supervised import train_cells
    from train.protocols import Protocol
    from train.runs import auto_run_name

    overrides = dict(epochs=epochs, input_px=input_px, batch=batch, folds=folds, lr=lr, limit=limit)
    try:
        if resume is not None:
            run = _resumed(
                resume,
                "cells",
                {"arch": arch, "data": data, "protocol": protocol, "out": out, **overrides},
            )
            preset = Protocol.from_dict(run["protocol"])
            arch_name, spec, run_dir, seed = run["arch"], run["dataset"], resume, run["seed"]
            arch_kwargs = run["arch_kwargs"]
        else:
            preset = _protocol_for(protocol, "000", "cells", **overrides)
            arch_name, spec, arch_kwargs = (
                arch or preset.default_arch,
                data or preset.default_data,
                {},
            )
            run_dir = out or Path("runs") / auto_run_name(
                "cells", arch_name, spec, preset.name, seed
            )
        set_determinism(seed, threads)
        images = open_image_set(spec, preset.input_px, data_root)
        metrics = train_cells(
            images,
            run_dir,
            arch=arch_name,
            protocol=preset,
            arch_kwargs=arch_kwargs,
            seed=seed,
            resume=resume is not None,
            command=_command(),
            device=device,
        )
    except _USER_ERRORS as exc:
        raise _fail(exc) from None
    _print_summary(metrics, run_dir, f"{arch_name} on {spec}, protocol {preset.name}")


@train_app.command("rois")
def rois(
    arch: ArchOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    epochs: EpochsOption = None,
    input_px: InputPxOption = None,
    batch: BatchOption = None,
    folds: FoldsOption = None,
    lr: LrOption = None,
    limit: LimitOption = None,
    backbone: Annotated[
        str, typer.Option("--backbone", help="Cell CNN of global_local_roi: resnet50 or resnet18.")
    ] = "resnet50",
    embed_dim: Annotated[
        int, typer.Option("--embed-dim", help="Token width D of the local ViT (paper: 768).")
    ] = 768,
    attn_dim: Annotated[
        int,
        typer.Option("--attn-dim", help="ROI feature and cross-attention width d (paper: 1024)."),
    ] = 1024,
    cells_per_roi: Annotated[
        int, typer.Option("--cells-per-roi", help="Detected cells kept per ROI.")
    ] = 32,
    crop_px: Annotated[
        int, typer.Option("--crop-px", help="Cut around each cell, px at the detector's scale.")
    ] = 96,
    seed: SeedOption = 0,
    out: OutOption = None,
    resume: ResumeOption = None,
    threads: ThreadsOption = 2,
    data_root: DataRootOption = None,
    device: DeviceOption = None,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Cache of detected cell bags.")
    ] = Path("runs/cache"),
) -> None:
    """Train the global-local ROI network on bags of detected cells (paper 002)."""
    _log_to_terminal()
    from train.loops.defaults import set_determinism
    from train.loops.rois import open_cell_bags, train_rois
    from train.protocols import Protocol
    from train.runs import auto_run_name

    overrides = dict(epochs=epochs, input_px=input_px, batch=batch, folds=folds, lr=lr, limit=limit)
    try:
        if resume is not None:
            run = _resumed(
                resume,
                "rois",
                {"arch": arch, "data": data, "protocol": protocol, "out": out, **overrides},
            )
            preset = Protocol.from_dict(run["protocol"])
            arch_name, spec, run_dir, seed = run["arch"], run["dataset"], resume, run["seed"]
            arch_kwargs = run["arch_kwargs"]
            cells_per_roi, crop_px = run["cells_per_roi"], run["crop_px"]
        else:
            preset = _protocol_for(protocol, "002", "rois", **overrides)
            arch_name, spec = arch or preset.default_arch, data or preset.default_data
            arch_kwargs = {"backbone": backbone, "embed_dim": embed_dim, "attn_dim": attn_dim}
            run_dir = out or Path("runs") / auto_run_name(
                "rois", arch_name, spec, preset.name, seed
            )
        set_determinism(seed, threads)
        bags, groups = open_cell_bags(spec, cells_per_roi, crop_px, data_root, cache_dir)
        metrics = train_rois(
            bags,
            run_dir,
            protocol=preset,
            arch=arch_name,
            arch_kwargs=arch_kwargs,
            groups=groups,
            seed=seed,
            resume=resume is not None,
            command=_command(),
            device=device,
        )
    except _USER_ERRORS as exc:
        raise _fail(exc) from None
    _print_summary(metrics, run_dir, f"{arch_name} on {spec} ROIs, protocol {preset.name}")


def evaluate_command(
    run: Annotated[Path, typer.Argument(help="A finished cells or rois run folder.")],
    data: Annotated[
        str | None,
        typer.Option("--data", help="Dataset spec or class folder; default the run's own."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="test (the exported fold's, own data only) or all; default test "
            "on the run's data, all on another.",
        ),
    ] = None,
    data_root: DataRootOption = None,
    threads: ThreadsOption = 2,
    device: DeviceOption = None,
) -> None:
    """Re-run the metrics of a run's exported model on a data set."""
    _log_to_terminal()
    import torch
    from rich.console import Console
    from rich.table import Table

    from train.evaluate import evaluate_run

    torch.set_num_threads(threads)
    try:
        report = evaluate_run(run, data, split, data_root, device)
    except _USER_ERRORS as exc:
        raise _fail(exc) from None
    table = Table(
        title=f"{run} on {report['dataset']} ({report['split']}, {report['items']} items)"
    )
    table.add_column("class")
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for name, m in report["per_class"].items():
        table.add_row(
            name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"])
        )
    table.add_section()
    table.add_row("accuracy", "", "", f"{report['accuracy']:.4f}", str(report["n"]))
    table.add_row("weighted F1", "", "", f"{report['weighted_f1']:.4f}", "")
    table.add_row("macro F1", "", "", f"{report['macro_f1']:.4f}", "")
    Console().print(table)


@train_app.command("detector")
def detector(
    data: Annotated[
        str,
        typer.Option("--data", help="isbi, sipakmed, cric, synth, or a YOLO folder."),
    ] = "isbi",
    epochs: EpochsOption = None,
    input_px: Annotated[
        int | None, typer.Option("--input-px", help="Override: training image size, px.")
    ] = None,
    batch: BatchOption = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Smoke run: at most N ROIs in each split.")
    ] = None,
    seed: SeedOption = 0,
    out: OutOption = None,
    threads: ThreadsOption = 2,
    data_root: DataRootOption = None,
) -> None:
    """Train the YOLO cell detector through ultralytics; mAP50 and recall at IoU 0.5."""
    _log_to_terminal()
    from rich.console import Console

    from train.loops.defaults import set_determinism
    from train.loops.detector_runs import train_detector_run
    from train.runs import auto_run_name

    run_dir = out or Path("runs") / auto_run_name("detector", "yolo11", data, "det", seed)
    set_determinism(seed, threads)
    try:
        metrics = train_detector_run(
            data,
            run_dir,
            epochs=epochs,
            imgsz=input_px,
            batch=batch,
            limit=limit,
            seed=seed,
            root=data_root,
            command=_command(),
        )
    except _USER_ERRORS as exc:
        raise _fail(exc) from None
    fold = metrics["folds"][0]
    Console().print(
        f"detector on {data} -> {run_dir}: test mAP50 {fold['ultralytics']['map50']:.4f}, "
        f"recall {fold['iou50']['recall']:.4f} / precision {fold['iou50']['precision']:.4f} "
        f"at IoU 0.5 (conf 0.25, {fold['test_rois']} ROIs)"
    )
