"""One scan lifecycle, for `papscan scan` and for the queue: claim -> stream -> write -> end.

Both an in-process scan and a queued job run a scan row through the same steps, so both
are fenced and recorded the same way:

1. **claim** the row (`jobs.claim_scan`): status running, attempt + 1, a lease for this
   worker, the previous attempt's partial rows deleted. A scan that is done, failed or
   cancelled is skipped; one running under someone else's live lease is left alone.
2. **stream** the slide through the pipeline; a lease keeper renews the lease while the
   scan runs, and every chunk of ROIs and cells is written in one transaction that first
   checks the row is still this attempt's (`jobs.hold_scan`) and renews the lease too,
   so a slide never ends with duplicate or missing cells whatever deliveries overlap.
3. **end**: finish (slide result, review ranks, models' hashes, warnings, status done), or
   fail with the error's one sentence and no rows, or stop quietly when superseded
   (cancelled, re-queued by a reaper, claimed again).

Transient errors (the database unreachable) are raised to the caller to retry; the next
claim clears what this one wrote.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from engines.errors import PapscanError
from worker import metrics
from worker.db import jobs, queries
from worker.db.session import Database
from worker.errors import (
    ScanSupersededError,
    ScanTimeLimitError,
    SlideOpenError,
    TransientError,
)
from worker.pipeline.qc import focus_map_png
from worker.pipeline.records import CellResult, RoiResult, SlideSummary
from worker.pipeline.scan import ScanModels, ScanOptions, ScanOutcome, ScanPipeline
from worker.wsi.slide import Slide, open_slide

__all__ = [
    "DEFAULT_LEASE_S",
    "Outcome",
    "ScanReport",
    "ScanRun",
    "ScanRuntime",
    "run_scan",
    "scan_file",
]

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 120.0
Progress = Callable[[int, int], None]


class Outcome(StrEnum):
    """How one run of a scan ended."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # done, failed, cancelled or gone before this run
    HELD = "held"  # running under another delivery's live lease: left alone
    SUPERSEDED = "superseded"  # cancelled, re-queued or claimed again while this run ran


@dataclass
class ScanRuntime:
    """What a scanning process holds between scans: models, database, who it is.

    Attributes:
        db: the results database.
        models: the three engines, loaded and warmed up once per process.
        options: pipeline knobs.
        worker: this process's name on the scans it runs (unique per process).
        soft_limit_s: a scan still running after this many seconds is stopped and failed.
        lease_s: how long a claim holds without renewal; renewed every quarter of it.
        running: scan id -> attempt of the scans this process runs now.
    """

    db: Database
    models: ScanModels
    options: ScanOptions
    worker: str
    soft_limit_s: float = math.inf
    lease_s: float = DEFAULT_LEASE_S
    running: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class ScanRun:
    """One run of a scan: how it ended and, when done, the pipeline's outcome.

    Attributes:
        error: the exception a FAILED run ended with (its sentence is on the row).
    """

    outcome: Outcome
    scan_id: int
    attempt: int | None = None
    result: ScanOutcome | None = None
    error: BaseException | None = None


def run_scan(
    runtime: ScanRuntime,
    scan_id: int,
    *,
    slide: Slide | None = None,
    progress: Progress | None = None,
) -> ScanRun:
    """Claim scan `scan_id`, scan its slide under the claim, and record how it ended.

    Args:
        slide: the slide, already opened (`papscan scan`); None opens the recorded path
            and checks it is still the same file.
        progress: called with `(rois_done, rois_planned)` as the scan goes.

    Returns:
        The run; a slide papscan cannot scan ends FAILED with its sentence on the row.

    Raises:
        TransientError: the database could not be reached; nothing is lost, retry later.
        BaseException: an interrupt (Ctrl-C) fails the scan, then goes on up.
    """
    db = runtime.db
    with runtime._lock:
        running_here = set(runtime.running)
    with db.transaction() as s:
        claim = jobs.claim_scan(
            s, scan_id, runtime.worker, runtime.lease_s, running_here=running_here
        )
    if claim is None:
        logger.info("scan %d: nothing to do (done, failed, cancelled or gone)", scan_id)
        return ScanRun(Outcome.SKIPPED, scan_id)
    if isinstance(claim, jobs.Held):
        logger.info(
            "scan %d: dropped this delivery; it is running on %s under a lease until %s",
            scan_id,
            claim.worker,
            claim.lease_expires_at.isoformat(timespec="seconds"),
        )
        return ScanRun(Outcome.HELD, scan_id)
    logger.info("scan %d: attempt %d on %s", scan_id, claim.attempt, runtime.worker)
    with runtime._lock:
        runtime.running[scan_id] = claim.attempt
    metrics.scan_started(scan_id)
    started = time.monotonic()
    try:
        with _LeaseKeeper(db, claim, runtime.lease_s) as lease:
            result = _stream(runtime, claim, slide, progress, lease)
        metrics.slide_ended("done", time.monotonic() - started, result.timings_ms)
        return ScanRun(Outcome.DONE, scan_id, claim.attempt, result=result)
    except ScanSupersededError as exc:
        logger.info("scan %d: attempt %d stopped: %s", scan_id, claim.attempt, exc)
        if exc.status == "cancelled":
            with db.transaction() as s:
                jobs.discard_cancelled_rows(s, scan_id, claim.attempt)
        return ScanRun(Outcome.SUPERSEDED, scan_id, claim.attempt, error=exc)
    except TransientError:
        raise
    except BaseException as exc:
        sentence = _sentence(exc)
        if _expected(exc):  # the sentence is on the row (and printed by `papscan scan`)
            logger.info("scan %d failed: %s", scan_id, sentence)
        else:
            logger.warning("scan %d failed: %s", scan_id, sentence, exc_info=True)
        try:
            with db.transaction() as s:
                jobs.give_up_scan(s, scan_id, sentence, attempt=claim.attempt)
        except Exception:  # the database may be what failed; the original error wins
            logger.exception("scan %d: could not record its failure", scan_id)
        metrics.slide_ended("failed", time.monotonic() - started)
        if not isinstance(exc, Exception):
            raise
        return ScanRun(Outcome.FAILED, scan_id, claim.attempt, error=exc)
    finally:
        with runtime._lock:
            runtime.running.pop(scan_id, None)
        metrics.scan_stopped(scan_id)


def _stream(
    runtime: ScanRuntime,
    claim: jobs.Claim,
    slide: Slide | None,
    progress: Progress | None,
    lease: _LeaseKeeper,
) -> ScanOutcome:
    db, scan_id, attempt = runtime.db, claim.scan_id, claim.attempt
    deadline = time.monotonic() + runtime.soft_limit_s

    def write(rois: list[RoiResult], cells: list[CellResult]) -> None:
        with db.transaction() as s:
            jobs.hold_scan(s, scan_id, attempt, runtime.lease_s)
            queries.write_chunk(s, scan_id, rois, cells)
        metrics.lease_renewed(scan_id)
        metrics.cells_written(len(cells))

    def on_progress(done: int, planned: int) -> None:
        # Runs in the scanning thread between chunks: raising here stops the scan.
        lease.raise_if_lost()
        if done == 0:
            with db.transaction() as s:
                jobs.plan_scan(s, scan_id, attempt, planned)
        if time.monotonic() > deadline:
            raise ScanTimeLimitError(
                f"scan {scan_id} ran past its soft time limit of {runtime.soft_limit_s:.0f} s"
                f" after {done} of {planned} ROIs (PAPSCAN_SCAN_SOFT_LIMIT_S)."
            )
        if progress:
            progress(done, planned)

    pipeline = ScanPipeline(runtime.models, runtime.options)
    preparation = claim.preparation
    if slide is not None:
        outcome = pipeline.run(slide, write, on_progress, preparation)
    else:
        opening = time.perf_counter()
        with open_slide(claim.slide_path, mpp=claim.mpp) as opened:
            open_ms = (time.perf_counter() - opening) * 1000
            if opened.info.fingerprint != claim.fingerprint:
                raise SlideOpenError(
                    f"{claim.slide_path} is no longer the slide submitted as scan {scan_id}"
                    " (its fingerprint changed); submit the new file."
                )
            outcome = pipeline.run(opened, write, on_progress, preparation)
        outcome.timings_ms["open"] = round(open_ms, 1)
    with db.transaction() as s:
        scan = jobs.hold_scan(s, scan_id, attempt)
        scan.model_versions = runtime.models.versions()  # what actually ran
        scan.model_sha256 = runtime.models.weights_sha256()
        scan.warnings = list(outcome.warnings) or None
        queries.finish_scan(s, scan_id, outcome.summary, outcome.timings_ms, outcome.reader)
    logger.info(
        "scan %d done: %s, %d cells, %.0f ms",
        scan_id,
        outcome.summary.category,
        outcome.summary.cell_count,
        outcome.timings_ms["total"],
    )
    return outcome


class _LeaseKeeper:
    """Renews a claimed scan's lease every quarter of `lease_s` on its own thread.

    The scan's own chunk writes renew it too; this keeps the lease while one chunk takes
    long (a dense slide on a slow device). When the row turns out superseded, the scan
    stops at its next chunk (`raise_if_lost`); a renewal that fails for a transient
    reason is tried again next tick (the lease outlives three missed renewals).
    """

    def __init__(self, db: Database, claim: jobs.Claim, lease_s: float) -> None:
        self._db, self._claim, self._lease_s = db, claim, lease_s
        self._stop = threading.Event()
        self._lost: ScanSupersededError | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"papscan-lease-{claim.scan_id}", daemon=True
        )

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def raise_if_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    def _run(self) -> None:
        claim = self._claim
        while not self._stop.wait(self._lease_s / 4):
            try:
                with self._db.transaction(timeout_s=self._lease_s / 4) as s:
                    jobs.renew_lease(s, claim.scan_id, claim.attempt, self._lease_s)
                metrics.lease_renewed(claim.scan_id)
            except ScanSupersededError as exc:
                self._lost = exc
                return
            except Exception as exc:  # transient: the next tick tries again
                logger.warning("scan %d: could not renew its lease: %s", claim.scan_id, exc)


# --- `papscan scan`: one file, in this process --------------------------------------------


@dataclass
class ScanReport:
    """What `papscan scan` prints: the slide-level result and how the scan went."""

    scan_id: int
    slide_id: int
    path: str
    fingerprint: str
    width: int
    height: int
    mpp: float
    reader: str
    rois_planned: int
    model_versions: dict[str, int]
    summary: SlideSummary
    timings_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    focus_map: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict; review cells are reduced to their box, label and scores."""
        data = asdict(self)
        data["summary"]["top_cells"] = [
            {
                k: getattr(c, k)
                for k in ("x", "y", "w", "h", "label", "score", "suspicion", "review_rank")
            }
            for c in self.summary.top_cells
        ]
        return data


def scan_file(
    path: str | Path,
    db: Database,
    repository,
    *,
    mpp: float | None = None,
    preparation: str | None = None,
    options: ScanOptions | None = None,
    progress: Progress | None = None,
    focus_map: Path | None = None,
) -> ScanReport:
    """Scan one slide file in this process, recorded as a new scan like a queued one.

    Everything a user can get wrong (the slide, the models, the database URL) is checked
    before a row is written.

    Args:
        path: the slide file.
        db: the results database (its schema is brought up to date here).
        repository: the `ModelRepository` to load the three engines from.
        mpp: microns per pixel to assume when the file does not record it.
        preparation: liquid-based or conventional (adequacy's minimum); None: not given,
            liquid-based assumed with a note.
        options: pipeline knobs.
        progress: called with `(rois_done, rois_planned)` as the scan goes.
        focus_map: write the QC focus map (per-ROI sharpness on the ROI grid) here.

    Raises:
        SlideOpenError, ModelNotFoundError, ModelConfigError, ModelLoadError,
        DatabaseUnavailableError, SlideReadError: each with a one-sentence message.
    """
    with open_slide(path, mpp=mpp) as slide:
        models = ScanModels.load(repository)
        try:
            db.create_schema()
            info = slide.info
            with db.transaction() as s:
                row = queries.record_slide(s, info, preparation=preparation)
                scan = queries.create_scan(
                    s, row.id, models.versions(), model_sha256=models.weights_sha256()
                )
                slide_id, scan_id = row.id, scan.id
            runtime = ScanRuntime(
                db=db,
                models=models,
                options=options or ScanOptions(),
                worker=f"{socket.gethostname()}:{os.getpid()}",
            )
            try:
                run = run_scan(runtime, scan_id, slide=slide, progress=progress)
            except TransientError:
                _give_up_quietly(db, scan_id, "the results database became unreachable.")
                raise
        finally:
            models.close()
    if run.outcome is not Outcome.DONE:
        raise run.error or ScanSupersededError(scan_id, run.outcome.value)
    outcome = run.result
    if focus_map is not None and outcome.qc is not None:
        focus_map = focus_map_png(outcome.qc, outcome.plan, focus_map)
    return ScanReport(
        scan_id=scan_id,
        slide_id=slide_id,
        path=str(info.path),
        fingerprint=info.fingerprint,
        width=info.width,
        height=info.height,
        mpp=info.mpp_x,
        reader=outcome.reader,
        rois_planned=outcome.rois_planned,
        model_versions=models.versions(),
        summary=outcome.summary,
        timings_ms=outcome.timings_ms,
        warnings=outcome.warnings,
        focus_map=str(focus_map) if focus_map is not None and outcome.qc is not None else None,
    )


def _give_up_quietly(db: Database, scan_id: int, sentence: str) -> None:
    try:
        with db.transaction() as s:
            jobs.give_up_scan(s, scan_id, sentence)
    except Exception:
        logger.exception("scan %d: could not record its failure", scan_id)


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, PapscanError)


def _sentence(exc: BaseException) -> str:
    """The one sentence stored on a failed scan."""
    if _expected(exc):
        return str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return "the scan was interrupted (Ctrl-C)."
    return f"internal error ({type(exc).__name__}: {exc}); see the worker's log."
