"""One slide, end to end: open it, run the pipeline, keep the results in the database.

Used by `papscan scan` in-process and by the Celery task on a worker. The order matters:
everything a user can get wrong (the slide, the models, the database URL) is checked
before a row is written, and a scan that fails midway removes its own partial rows and
ends `failed` with the one-sentence error.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.repository import ModelRepository
from worker.db import queries
from worker.db.session import Database
from worker.pipeline.records import CellResult, RoiResult, SlideSummary
from worker.pipeline.scan import Progress, ScanModels, ScanOptions, ScanPipeline
from worker.wsi.slide import open_slide

logger = logging.getLogger(__name__)


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
    repository: ModelRepository,
    *,
    mpp: float | None = None,
    options: ScanOptions | None = None,
    progress: Progress | None = None,
) -> ScanReport:
    """Scan one slide file in this process and record it as a new scan.

    Args:
        path: the slide file.
        db: the results database (its schema is brought up to date here).
        repository: the model repository to load the three engines from.
        mpp: microns per pixel to assume when the file does not record it.
        options: pipeline knobs.
        progress: called with `(rois_done, rois_planned)` as the scan goes.

    Raises:
        SlideOpenError, ModelNotFoundError, ModelConfigError, ModelLoadError,
        DatabaseUnavailableError, SlideReadError: each with a one-sentence message.
    """
    with open_slide(path, mpp=mpp) as slide:
        models = ScanModels.load(repository)
        try:
            db.create_schema()
            info = slide.info
            with db.session() as s, s.begin():
                row = queries.record_slide(s, info)
                scan = queries.create_scan(s, row.id, models.versions())
                slide_id, scan_id = row.id, scan.id
            pipeline = ScanPipeline(models, options)
            outcome = _run(pipeline, slide, db, scan_id, progress)
        finally:
            models.close()
    logger.info(
        "scan %d done: %s, %d cells, %.0f ms",
        scan_id,
        outcome.summary.category,
        outcome.summary.cell_count,
        outcome.timings_ms["total"],
    )
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
    )


def _run(pipeline: ScanPipeline, slide, db: Database, scan_id: int, progress: Progress | None):
    """Run the pipeline for an existing scan row; on any failure leave no partial rows."""

    def write(rois: list[RoiResult], cells: list[CellResult]) -> None:
        with db.session() as s, s.begin():
            queries.write_chunk(s, scan_id, rois, cells)

    def on_progress(done: int, planned: int) -> None:
        if done == 0:  # the plan is known: the scan is running from here
            with db.session() as s, s.begin():
                queries.start_scan(s, scan_id, rois_planned=planned, worker=socket.gethostname())
        if progress:
            progress(done, planned)

    try:
        with db.session() as s, s.begin():
            queries.clear_scan_rows(s, scan_id)  # a retried scan starts clean
        outcome = pipeline.run(slide, write, on_progress)
        with db.session() as s, s.begin():
            queries.finish_scan(
                s, scan_id, outcome.summary, outcome.timings_ms, reader=outcome.reader
            )
        return outcome
    except BaseException as exc:
        sentence = str(exc) or type(exc).__name__
        try:
            with db.session() as s, s.begin():
                queries.clear_scan_rows(s, scan_id)
                queries.fail_scan(s, scan_id, sentence)
        except Exception:  # the database itself may be what failed; the original error wins
            logger.exception("could not mark scan %d failed", scan_id)
        raise
