"""`papscan models …`: look into a model repository, check it, warm it up, time it.

    papscan models list [REPO]
    papscan models describe MODEL [REPO] [--version N] [--json]
    papscan models verify [REPO] [--model M] [--device cpu] [--atol 1e-3]
    papscan models warmup [REPO] [--device auto]
    papscan models bench [REPO] [--model M] [--batch-sizes 1,8,64] [--seconds 2]

REPO defaults to `PAPSCAN_MODELS`, else the bundled repository.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli.common import fail, fails_in_one_sentence, repository

models_app = typer.Typer(no_args_is_help=True, add_completion=False)

RepoArgument = Annotated[
    Path | None,
    typer.Argument(help="Model repository (default: PAPSCAN_MODELS, else the bundled one)."),
]
ModelFilter = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="Only this model (repeatable).")
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
_CARD_SUMMARY = ("task", "architecture", "date_utc", "git_commit")


@models_app.command("list")
@fails_in_one_sentence
def list_models(repo: RepoArgument = None) -> None:
    """List the models, their versions, backends and batching."""
    from rich.table import Table

    from engines.backends import BACKENDS
    from worker.cli.console import out

    repo_ = repository(repo)
    if not repo_.model_names():
        fail(f"the model repository {repo_.path} holds no models (folders with a config.yaml)")
    table = Table(title=f"model repository {repo_.path}")
    _name_column(table, "model", repo_.model_names())
    for column in ("served", "policy", "backends (first usable here)", "max batch"):
        table.add_column(column)
    table.add_column("dynamic batching")
    for name in repo_.model_names():
        config = repo_.config(name)
        version_dir = repo_.path / name / str(max(repo_.versions(name), default=0))
        usable = [
            b
            for b in config.backend
            if BACKENDS[b].find_artifact(version_dir) is not None
            and BACKENDS[b].unavailable_reason(_device("auto")) is None
        ]
        backends = ", ".join(f"[bold]{b}[/]" if usable[:1] == [b] else b for b in config.backend)
        batching = config.dynamic_batching
        table.add_row(
            name,
            ", ".join(map(str, repo_.versions(name))) or "none",
            str(config.version_policy),
            backends,
            str(config.max_batch_size),
            (
                f"preferred {list(batching.preferred_batch_size)}, "
                f"delay {batching.max_queue_delay_ms:g} ms"
                if batching
                else "off"
            ),
        )
    out.print(table)


@models_app.command()
@fails_in_one_sentence
def describe(
    model: Annotated[str, typer.Argument(help="The model's name (its folder).")],
    repo: RepoArgument = None,
    version: Annotated[
        int | None, typer.Option(help="Version (default: the newest served).")
    ] = None,
    device: DeviceOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Describe one model: config, chosen backend and why, artifacts, card."""
    from worker.cli.console import out

    repo_ = repository(repo)
    with repo_.load(model, version, device=device, warmup=False) as loaded:
        info = _description(loaded)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    out.print(f"[bold]{info['model']}[/] version {info['version']}  ({info['version_dir']})")
    for key in ("backend", "selection", "artifact", "providers", "runtime_version"):
        if info["runtime"].get(key) is not None:
            out.print(f"  {key:<16} {info['runtime'][key]}")
    out.print(f"  {'artifacts':<16} {', '.join(info['artifacts'])}")
    for key, value in info["config"].items():
        out.print(f"  {key:<16} {value}")
    for key, value in info["card"].items():
        out.print(f"  card.{key:<11} {value}")


def _description(model: Any) -> dict[str, Any]:
    config = model.config
    card = model.card
    architecture = card.get("architecture")
    return {
        "model": model.name,
        "version": model.version,
        "version_dir": str(model.version_dir),
        "runtime": {"backend": model.backend_name, **model.describe()},
        "artifacts": sorted(p.name for p in model.version_dir.iterdir() if p.is_file()),
        "config": {
            "backend": list(config.backend),
            "max_batch_size": config.max_batch_size,
            "inputs": [f"{s.name} {s.data_type} {list(s.dims)}" for s in config.inputs],
            "outputs": [f"{s.name} {s.data_type} {list(s.dims)}" for s in config.outputs],
            "version_policy": str(config.version_policy),
            "dynamic_batching": _plain(config.dynamic_batching),
            "instance_count": config.instance_count,
            "precision": config.precision,
            "warmup": _plain(config.warmup),
            "preprocessing": _plain(config.preprocessing),
            "labels": list(config.labels),
            "postprocessing": config.postprocessing,
        },
        "card": {
            "task": card.get("task"),
            "architecture": architecture.get("name")
            if isinstance(architecture, dict)
            else architecture,
            "trained": card.get("date_utc"),
            "git_commit": card.get("git_commit"),
        },
    }


def _name_column(table: Any, title: str, names: list[str]) -> None:
    """A column never cut short, even at the 80 columns rich assumes when output is piped."""
    table.add_column(title, no_wrap=True, min_width=max(map(len, [title, *names])))


def _plain(value: Any) -> Any:
    """A config dataclass as a plain mapping (None stays None), for printing and JSON."""
    if value is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}


@models_app.command()
@fails_in_one_sentence
def verify(
    repo: RepoArgument = None,
    model: ModelFilter = None,
    device: DeviceOption = "cpu",
    atol: Annotated[
        float, typer.Option(help="Largest |difference| allowed between FP32 backends.")
    ] = 1e-3,
) -> None:
    """Check that every artifact loads, matches its card, and that backends agree; and,
    for a repository holding the three scan models, that they fit together."""
    from rich.table import Table

    from engines.contract import SCAN_MODELS, check_scan_repository
    from engines.diagnostics import verify_repository
    from engines.errors import ModelContractError
    from worker.cli.console import out

    repo_ = repository(repo)
    checks = verify_repository(repo_, model, device=device, atol=atol)
    table = Table(title=f"verify {repo_.path} on {device}")
    _name_column(table, "model", [f"{c.model}@{c.version}" for c in checks])
    _name_column(table, "backend", ["onnxruntime"])
    for column in ("status", "max |diff|", "load ms", "detail"):
        table.add_column(column)
    for check in checks:
        hashes = f"sha256 ok: {', '.join(check.hashes)}" if check.hashes else "no card hashes"
        table.add_row(
            f"{check.model}@{check.version}",
            "card",
            "failed" if check.hash_errors else "ok",
            "",
            "",
            "; ".join(check.hash_errors) or hashes,
        )
        for b in check.backends:
            diff = max(b.max_abs_diff.values(), default=None)
            table.add_row(
                "",
                b.backend,
                _colour(b.status),
                "" if diff is None else f"{diff:.1e}",
                "" if b.load_ms is None else f"{b.load_ms:.0f}",
                b.detail,
            )
    out.print(table)
    failed = [f"{c.model}@{c.version}" for c in checks if not c.ok]
    if failed:
        fail(f"verification failed for {', '.join(failed)}")
    fit = ""
    if not model and set(SCAN_MODELS) <= set(repo_.model_names()):
        try:
            check_scan_repository(repo_)
        except ModelContractError as exc:
            fail(str(exc))
        fit = "; the scan models fit together"
    out.print(f"{len(checks)} model version(s) verified{fit}")


def _colour(status: str) -> str:
    colour = {"failed": "red", "disagrees": "red", "unavailable": "yellow"}.get(status, "green")
    return f"[{colour}]{status}[/]"


@models_app.command()
@fails_in_one_sentence
def warmup(
    repo: RepoArgument = None, model: ModelFilter = None, device: DeviceOption = "auto"
) -> None:
    """Load and warm up every served version, as a worker does before taking work."""
    from worker.cli.console import out

    repo_ = repository(repo)
    for name in model or repo_.model_names():
        for version in repo_.versions(name):
            start = time.perf_counter()
            with repo_.load(name, version, device=device) as loaded:
                ms = (time.perf_counter() - start) * 1e3
                sizes = list(loaded.config.warmup.batch_sizes) or "1 and max"
                out.print(
                    f"{name}@{version}: ready on {loaded.backend_name} in {ms:.0f} ms "
                    f"(warm-up batches {sizes}, {loaded.config.warmup.data} data)"
                )


@models_app.command()
@fails_in_one_sentence
def bench(
    repo: RepoArgument = None,
    model: ModelFilter = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,64",
    seconds: Annotated[float, typer.Option(help="Seconds per batch size.")] = 2.0,
    device: DeviceOption = "auto",
) -> None:
    """Time each model at a few batch sizes: latency (mean, p50, p95) and items/s.

    Each size runs for about --seconds after one untimed run, one caller at a time;
    `bench/batcher_perf.py` measures many concurrent callers with the batcher.
    """
    from rich.table import Table

    from engines.diagnostics import time_model
    from worker.cli.console import out

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        fail(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}")
        return
    if not sizes or min(sizes) < 1:
        fail(f"--batch-sizes must be positive, got {batch_sizes!r}")
    repo_ = repository(repo)
    table = Table(title=f"bench {repo_.path}")
    names = [f"{name}@{repo_.versions(name)[-1]}" for name in model or repo_.model_names()]
    _name_column(table, "model", names)
    _name_column(table, "backend", ["onnxruntime"])
    for column in ("batch", "mean ms", "p50 ms", "p95 ms", "items/s"):
        table.add_column(column, justify="right", no_wrap=True)
    for name in model or repo_.model_names():
        with repo_.load(name, device=device) as loaded:
            usable = [b for b in sizes if b <= max(loaded.config.max_batch_size, 1)]
            for t in time_model(loaded, usable, seconds):
                table.add_row(
                    f"{name}@{loaded.version}",
                    loaded.backend_name,
                    str(t.batch_size),
                    f"{t.mean_ms:.2f}",
                    f"{t.p50_ms:.2f}",
                    f"{t.p95_ms:.2f}",
                    f"{t.items_per_s:,.0f}",
                )
    out.print(table)


def _device(value: str) -> Any:
    from engines.backends.base import Device

    return Device.parse(value)
