"""A queued scan, run on a worker: claim the row, open the slide, scan it under the claim.

This is what the Celery task `scan_slide(scan_id)` does, as plain Python (no Celery
import), so it can be tested and reused directly. A delivery of the job:

1. claims the scan (status running, attempt + 1, the previous attempt's partial rows
   deleted) or, if the scan is done, failed or cancelled, does nothing;
2. opens the slide at its recorded path and checks it is still the same file;
3. runs the pipeline; every chunk of ROIs and cells is written in one transaction that
   first checks the row is still this attempt's (`jobs.hold_scan`), so a slide never ends
   with duplicate or missing cells whatever deliveries overlap;
4. finishes the scan (slide result, review ranks, status done), or fails it with the
   error's sentence and no rows.

Transient errors (the database unreachable) are raised to the caller to retry; the next
delivery's claim clears what this one wrote.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from worker.db import jobs, queries
from worker.db.session import Database
from worker.errors import (
    ScanSupersededError,
    ScanTimeLimitError,
    SlideOpenError,
    TransientError,
)
from worker.pipeline.records import CellResult, RoiResult
from worker.pipeline.scan import ScanModels, ScanOptions, ScanPipeline
from worker.wsi.slide import open_slide

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How one delivery of a scan job ended."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # the scan was done, failed or cancelled before this delivery
    SUPERSEDED = "superseded"  # cancelled or claimed again while this delivery ran


@dataclass
class ScanRuntime:
    """What a worker process holds between jobs: loaded models and the database.

    Attributes:
        db: the results database.
        models: the three engines, loaded and warmed up once per process.
        options: pipeline knobs.
        worker: this worker's name, recorded on the scans it runs.
        soft_limit_s: a scan still running after this many seconds is stopped and failed.
    """

    db: Database
    models: ScanModels
    options: ScanOptions
    worker: str
    soft_limit_s: float


def run_queued_scan(runtime: ScanRuntime, scan_id: int) -> Outcome:
    """Run one delivery of the job of scan `scan_id`.

    Returns:
        How it ended; a slide papscan cannot scan ends FAILED (the sentence is on the row).

    Raises:
        TransientError: the database could not be reached; nothing is lost, retry later.
    """
    db = runtime.db
    with db.session() as s, s.begin():
        claim = jobs.claim_scan(s, scan_id, runtime.worker)
    if claim is None:
        logger.info("scan %d: nothing to do (done, failed, cancelled or gone)", scan_id)
        return Outcome.SKIPPED
    logger.info("scan %d: attempt %d on %s", scan_id, claim.attempt, runtime.worker)
    try:
        _scan(runtime, claim)
    except ScanSupersededError as exc:
        logger.info("scan %d: attempt %d stopped: %s", scan_id, claim.attempt, exc)
        if exc.status == "cancelled":
            with db.session() as s, s.begin():
                jobs.discard_cancelled_rows(s, scan_id, claim.attempt)
        return Outcome.SUPERSEDED
    except TransientError:
        raise
    except Exception as exc:
        sentence = _sentence(exc)
        logger.warning("scan %d failed: %s", scan_id, sentence, exc_info=not _expected(exc))
        with db.session() as s, s.begin():
            jobs.give_up_scan(s, scan_id, sentence, attempt=claim.attempt)
        return Outcome.FAILED
    return Outcome.DONE


def _scan(runtime: ScanRuntime, claim: jobs.Claim) -> None:
    db, scan_id, attempt = runtime.db, claim.scan_id, claim.attempt
    deadline = time.monotonic() + runtime.soft_limit_s

    def write(rois: list[RoiResult], cells: list[CellResult]) -> None:
        with db.session() as s, s.begin():
            jobs.hold_scan(s, scan_id, attempt)
            queries.write_chunk(s, scan_id, rois, cells)

    def on_progress(done: int, planned: int) -> None:
        # Runs in the scanning thread between chunks: raising here stops the scan.
        if done == 0:
            with db.session() as s, s.begin():
                jobs.plan_scan(s, scan_id, attempt, planned)
        if time.monotonic() > deadline:
            raise ScanTimeLimitError(
                f"scan {scan_id} ran past its soft time limit of {runtime.soft_limit_s:.0f} s"
                f" after {done} of {planned} ROIs (PAPSCAN_SCAN_SOFT_LIMIT_S)."
            )

    with open_slide(claim.slide_path) as slide:
        if slide.info.fingerprint != claim.fingerprint:
            raise SlideOpenError(
                f"{claim.slide_path} is no longer the slide submitted as scan {scan_id}"
                " (its fingerprint changed); submit the new file."
            )
        outcome = ScanPipeline(runtime.models, runtime.options).run(slide, write, on_progress)
    with db.session() as s, s.begin():
        scan = jobs.hold_scan(s, scan_id, attempt)
        scan.model_versions = runtime.models.versions()  # what actually ran
        queries.finish_scan(s, scan_id, outcome.summary, outcome.timings_ms, outcome.reader)
    logger.info(
        "scan %d done: %s, %d cells, %.0f ms",
        scan_id,
        outcome.summary.category,
        outcome.summary.cell_count,
        outcome.timings_ms["total"],
    )


def _expected(exc: BaseException) -> bool:
    from engines.errors import PapscanError

    return isinstance(exc, PapscanError)


def _sentence(exc: BaseException) -> str:
    """The one sentence stored on a failed scan."""
    if _expected(exc):
        return str(exc) or type(exc).__name__
    return f"internal error ({type(exc).__name__}: {exc}); see the worker's log."
