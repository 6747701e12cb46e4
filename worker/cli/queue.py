"""The overnight queue's commands: `worker`, `submit`, `status`, `cancel`, `retry`, `watch`.

    papscan worker [--gpu N] [--queues stat,routine] [--concurrency 1] [--name NODE]
    papscan submit PATH... | --manifest CSV [--priority stat|routine] [--force] [--mpp 0.25]
        [--preparation liquid-based|conventional]
    papscan status [--watch] [--json]
    papscan cancel SCAN
    papscan retry SCAN... | --failed
    papscan watch DIR [--settle 30] [--interval 2] [--priority routine] [--mpp 0.25]

The broker is `PAPSCAN_BROKER_URL` (Redis); results go to `PAPSCAN_DB_URL` (PostgreSQL
when several workers write) or `--db`. Mounted at the top level of `papscan`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli.common import (
    DbOption,
    ModelsOption,
    PreparationOption,
    fail,
    fails_in_one_sentence,
    metrics_port_option,
    repository,
)

queue_app = typer.Typer(no_args_is_help=True, add_completion=False)

logger = logging.getLogger(__name__)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


class Priority(StrEnum):
    stat = "stat"
    routine = "routine"


def _serve_metrics(port: int, settings) -> None:
    """Serves the process's Prometheus registry (the engines' `nv_inference_*`, the
    worker's `papscan_*`, the queue's and database's gauges) on `port`, from a daemon
    thread; one sentence if the port is taken."""
    from worker.metrics import serve

    try:
        serve(port, settings.broker_url, settings.db_url, gpu=True)
    except OSError as exc:
        fail(f"cannot serve metrics on port {port} ({exc.strerror or exc})")


def _settings(db: str | None = None, models: Path | None = None):
    from worker.settings import get_settings

    settings = get_settings()
    if db:
        settings = dataclasses.replace(settings, db_url=db)
    if models:
        settings = dataclasses.replace(settings, models_dir=models)
    return settings


def _database(url: str):
    from worker.db.session import Database

    return Database(url)


# --- worker ---------------------------------------------------------------------------


@queue_app.command()
@fails_in_one_sentence
def worker(
    gpu: Annotated[
        int | None,
        typer.Option(
            help="GPU index this worker owns (sets CUDA_VISIBLE_DEVICES; default: "
            "whatever the process sees)."
        ),
    ] = None,
    queues: Annotated[
        str, typer.Option(help="Queues to consume, comma-separated, in priority order.")
    ] = "stat,routine",
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            help="Slides scanned at once in this process: 1 runs Celery's solo pool, more "
            "its threads pool, sharing one set of models.",
        ),
    ] = 1,
    name: Annotated[
        str | None,
        typer.Option(help="Worker name (default: papscan-gpuN@host, or papscan-cpu-PID@host)."),
    ] = None,
    db: DbOption = None,
    models: ModelsOption = None,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    metrics_port: metrics_port_option(
        "scans, stages, queue depth, the engines' Triton-style counters"
    ) = 0,
) -> None:
    """Run one worker process: load and warm up the models, then scan queued slides."""
    if gpu is not None:
        # Before any CUDA library initialises: the process then sees only its own GPU,
        # as device 0, which is where the engines and DALI put their work.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    level = getattr(logging, loglevel.upper(), None)
    if not isinstance(level, int):
        fail(f"--loglevel must be debug, info, warning or error, not {loglevel!r}")
    logging.getLogger().setLevel(level)
    logging.getLogger("papscan").setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))

    from worker.queue.app import QUEUES
    from worker.queue.broker import check_broker

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if unknown or not wanted:
        fail(f"--queues takes {' and/or '.join(QUEUES)}, not {queues!r}")
    settings = _settings(db, models)
    check_broker(settings.broker_url)
    database = _database(settings.db_url)
    database.check()
    database.create_schema()
    database.dispose()
    node = name or _node_name(gpu)
    if settings.visibility_timeout_s <= settings.scan_hard_limit_s:
        logger.warning(
            "the visibility timeout (%d s) is not longer than the hard time limit (%d s): a "
            "slide scanning longer than %d s is handed to a second worker as well",
            settings.visibility_timeout_s,
            settings.scan_hard_limit_s,
            settings.visibility_timeout_s,
        )
    import warnings

    from celery.exceptions import CPendingDeprecationWarning
    from celery.signals import worker_ready

    from worker.queue.tasks import app, load_runtime

    # papscan sets worker_cancel_long_running_tasks_on_connection_loss=False on purpose
    # (see worker/queue/app.py); Celery warns on every reconnect all the same.
    warnings.filterwarnings(
        "ignore",
        message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
        category=CPendingDeprecationWarning,
    )

    if metrics_port:
        _serve_metrics(metrics_port, settings)
    start = time.perf_counter()
    runtime = load_runtime(node, settings)  # loaded and warmed up before taking any job
    logger.info(
        "%s: models %s ready in %.1f s",
        node,
        runtime.models.versions(),
        time.perf_counter() - start,
    )

    @worker_ready.connect(weak=False)
    def _ready(**kwargs: Any) -> None:
        logger.info("worker %s ready, consuming %s", node, ",".join(wanted))

    celery_worker = app.Worker(
        hostname=node,
        # See worker/queue/tasks.py: never prefork with CUDA in the process.
        pool="solo" if concurrency == 1 else "threads",
        concurrency=concurrency,
        queues=wanted,
        loglevel=level,
        optimization="fair",
        # One worker per GPU reports through the database; Celery's worker-to-worker
        # chatter over Redis (gossip, mingle, heartbeats) is not needed.
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
    )
    celery_worker.start()
    runtime.models.close()
    code = celery_worker.exitcode or 0
    if code:
        raise typer.Exit(code)


def _node_name(gpu: int | None) -> str:
    host = socket.gethostname()
    return f"papscan-gpu{gpu}@{host}" if gpu is not None else f"papscan-cpu-{os.getpid()}@{host}"


# --- submit ---------------------------------------------------------------------------


@queue_app.command()
@fails_in_one_sentence
def submit(
    paths: Annotated[list[Path] | None, typer.Argument(help="Slide files to scan.")] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="CSV with a 'path' column, and optionally 'barcode', 'mpp' and"
            " 'preparation' columns."
        ),
    ] = None,
    priority: Annotated[Priority, typer.Option(help="Queue: stat goes first.")] = (
        Priority.routine
    ),
    force: Annotated[
        bool,
        typer.Option(help="Queue a new scan even if one with the same models exists."),
    ] = False,
    mpp: Annotated[
        float | None,
        typer.Option(
            help="Microns per pixel, for files that do not record it: every PATH, and "
            "manifest rows with no mpp of their own."
        ),
    ] = None,
    preparation: PreparationOption = None,
    db: DbOption = None,
    models: ModelsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue slides for the workers; every path is checked before anything is queued."""
    from worker.cli.console import out
    from worker.queue.submit import (
        SlideRequest,
        check_slides,
        model_sha256,
        model_versions,
        read_manifest,
        submit_slides,
    )
    from worker.wsi.slide import check_mpp

    if not paths and manifest is None:
        fail("give slide paths or --manifest CSV")
    if mpp is not None:
        check_mpp(mpp, "--mpp")
    prep = preparation.value if preparation else None
    requests = [SlideRequest(p, mpp=mpp, preparation=prep) for p in paths or []]
    if manifest is not None:
        requests += read_manifest(manifest, mpp=mpp, preparation=prep)
    checked = check_slides(requests)
    settings = _settings(db, models)
    repo = repository(settings.models_dir)
    versions = model_versions(repo)
    report = submit_slides(
        _database(settings.db_url),
        settings.broker_url,
        checked,
        versions,
        priority=priority.value,
        force=force,
        hashes=model_sha256(repo, versions),
    )
    if as_json:
        print(json.dumps(dataclasses.asdict(report)))
        return
    for q in report.queued:
        barcode = f"  barcode {q.barcode}" if q.barcode else ""
        out.print(
            f"queued  scan {q.scan_id}  {q.priority}  {q.path}{barcode}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    for k in report.skipped:
        out.print(f"skipped {k.path}: {k.reason}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"{len(report.queued)} queued, {len(report.skipped)} skipped", highlight=False)


# --- status, cancel, retry ------------------------------------------------------------


@queue_app.command()
@fails_in_one_sentence
def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes.")] = 5.0,
    window_h: Annotated[
        float, typer.Option("--window-h", min=0.01, help="Hours of finished scans to rate.")
    ] = 1.0,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue depth per priority, running scans, per-worker throughput, recent failures."""
    from worker.cli.console import out
    from worker.queue.status import collect_status, render_status

    settings = _settings(db)
    database = _database(settings.db_url)
    database.create_schema()
    window = timedelta(hours=window_h)

    def snapshot():
        return collect_status(database, settings.broker_url, window)

    if as_json:
        print(json.dumps(snapshot().to_dict()))
        return
    if not watch:
        out.print(render_status(snapshot()))
        return
    from rich.live import Live

    try:
        with Live(render_status(snapshot()), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(snapshot()), refresh=True)
    except KeyboardInterrupt:
        return


@queue_app.command()
@fails_in_one_sentence
def cancel(
    scan_id: Annotated[int, typer.Argument(help="The scan to cancel.")],
    db: DbOption = None,
) -> None:
    """Cancel a queued or running scan (a running one stops at its next chunk)."""
    from worker.cli.console import out
    from worker.queue.control import cancel as cancel_scan

    was = cancel_scan(_database(_settings(db).db_url), scan_id)
    out.print(f"scan {scan_id} cancelled (it was {was})", highlight=False)


@queue_app.command()
@fails_in_one_sentence
def retry(
    scan_ids: Annotated[list[int] | None, typer.Argument(help="Scans to queue again.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed scan.")] = False,
    db: DbOption = None,
) -> None:
    """Queue failed or cancelled scans again, under their own ids and priorities."""
    from worker.cli.console import out
    from worker.queue.control import failed_scans
    from worker.queue.control import retry as retry_scans

    settings = _settings(db)
    database = _database(settings.db_url)
    ids = list(scan_ids or [])
    if failed:
        ids += [i for i in failed_scans(database) if i not in ids]
    if not ids:
        if failed:
            out.print("no failed scans")
            return
        fail("give scan ids or --failed")
    for item in retry_scans(database, settings.broker_url, ids):
        out.print(f"queued  scan {item.scan_id}  {item.priority}  (was {item.was})")
    out.print(f"{len(ids)} queued again", highlight=False)


# --- watch ----------------------------------------------------------------------------


@queue_app.command()
@fails_in_one_sentence
def watch(
    folder: Annotated[Path, typer.Argument(help="Folder the scanner writes slides into.")],
    settle: Annotated[
        float, typer.Option(min=0, help="Seconds a file must stop growing before it is queued.")
    ] = 30.0,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between looks.")] = 2.0,
    priority: Annotated[Priority, typer.Option(help="Queue for what it submits.")] = (
        Priority.routine
    ),
    mpp: Annotated[
        float | None,
        typer.Option(
            help="Microns per pixel of every slide it submits, for files that do not record it."
        ),
    ] = None,
    preparation: PreparationOption = None,
    db: DbOption = None,
    models: ModelsOption = None,
) -> None:
    """Queue each slide written into FOLDER once it has stopped growing."""
    from worker.cli.console import out
    from worker.queue.broker import check_broker
    from worker.queue.submit import model_sha256, model_versions, submit_slides
    from worker.queue.watch import FolderWatcher, WatchEvent
    from worker.wsi.slide import check_mpp

    if not folder.is_dir():
        fail(f"the watch folder {folder} is not a folder")
    if mpp is not None:
        check_mpp(mpp, "--mpp")
    settings = _settings(db, models)
    repo = repository(settings.models_dir)
    versions = model_versions(repo)
    hashes = model_sha256(repo, versions)
    database = _database(settings.db_url)
    check_broker(settings.broker_url)
    database.check()

    def submit_checked(checked: list) -> list[WatchEvent]:
        report = submit_slides(
            database,
            settings.broker_url,
            checked,
            versions,
            priority=priority.value,
            hashes=hashes,
        )
        events = [
            WatchEvent(Path(q.path), "queued", f"queued  scan {q.scan_id}  {q.path}")
            for q in report.queued
        ]
        events += [
            WatchEvent(Path(k.path), "skipped", f"skipped {k.path}: {k.reason}")
            for k in report.skipped
        ]
        return events

    def show(event: WatchEvent) -> None:
        text = event.message
        if event.kind == "not-a-slide":  # the sentence names the file
            text = f"ignored {event.message}"
        elif event.kind == "error":
            text = f"waiting: {event.message}"
        out.print(text, markup=False, highlight=False, soft_wrap=True)

    watcher = FolderWatcher(
        folder,
        settle,
        submit_checked,
        show,
        mpp=mpp,
        preparation=preparation.value if preparation else None,
    )
    out.print(
        f"watching {folder} (a file is queued {settle:g} s after it stops growing)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    try:
        watcher.run(interval)
    except KeyboardInterrupt:
        return
