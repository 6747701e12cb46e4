"""Submitting slides: check every file, record slides and queued scans, send the jobs.

Order matters, so a mistake costs nothing: every path is opened and checked first (one
bad path and nothing is queued), then the broker and the database are reached, then the
slides and scans are recorded in one transaction, and only after it commits are the jobs
sent. A job that cannot be sent leaves its scan failed with a sentence saying how to send
it again (`papscan retry --failed`), never queued in the database but absent from Redis
(`control.send_jobs`).

A slide already queued, running or done with the same model versions is skipped unless
`force` (which records a new scan beside the old one).
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.repository import ModelRepository
from worker.db import jobs, queries
from worker.db.session import Database
from worker.errors import SlideOpenError
from worker.pipeline.scan import MODEL_NAMES
from worker.pipeline.slide_call import SLIDE_PREPARATIONS
from worker.queue.app import QUEUES
from worker.queue.broker import check_broker, send_scan
from worker.queue.control import send_jobs
from worker.wsi.slide import SlideInfo, check_mpp, open_slide

__all__ = [
    "ManifestError",
    "SlideRequest",
    "SubmitReport",
    "check_slides",
    "model_sha256",
    "model_versions",
    "read_manifest",
    "submit_slides",
]

logger = logging.getLogger(__name__)

# Properties in which OpenSlide exposes a slide label's barcode, and whether the value
# is Base64 (Philips stores it encoded; OpenSlide decodes Leica's itself).
_BARCODE_PROPERTIES = (("leica.barcode", False), ("philips.PIM_DP_UFS_BARCODE", True))


class ManifestError(SlideOpenError):
    """A manifest CSV cannot be read, or lacks its `path` column."""


@dataclass(frozen=True)
class SlideRequest:
    """A slide to submit: its file, its barcode (from a manifest), the microns per pixel
    to use instead of the file's own (`--mpp` or the manifest), if any, and its
    preparation (`--preparation` or the manifest; None: not given)."""

    path: Path
    barcode: str | None = None
    mpp: float | None = None
    preparation: str | None = None


@dataclass(frozen=True)
class CheckedSlide:
    """A slide file that opened and passed the checks, with its barcode and preparation."""

    info: SlideInfo
    barcode: str | None
    preparation: str | None = None


@dataclass(frozen=True)
class QueuedScan:
    """A scan this submission queued."""

    scan_id: int
    slide_id: int
    path: str
    priority: str
    barcode: str | None


@dataclass(frozen=True)
class SkippedSlide:
    """A slide this submission did not queue, and why."""

    path: str
    reason: str
    scan_id: int | None = None


@dataclass
class SubmitReport:
    """What `papscan submit` prints."""

    queued: list[QueuedScan]
    skipped: list[SkippedSlide]


def read_manifest(
    path: Path, mpp: float | None = None, preparation: str | None = None
) -> list[SlideRequest]:
    """Read a manifest CSV: a `path` column (relative paths are from the CSV's folder), and
    optional `barcode`, `mpp` and `preparation` columns; other columns are ignored.

    Args:
        path: the CSV file.
        mpp: microns per pixel for rows whose `mpp` is empty or absent (`--mpp`).
        preparation: for rows whose `preparation` is empty or absent (`--preparation`).

    Raises:
        ManifestError: the file cannot be read, has no `path` column, names no slide, or
            has an `mpp` that is not a number in `MPP_RANGE` or a preparation papscan does
            not know (the sentence names the line).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "path" not in columns:
                raise ManifestError(f"the manifest {path} has no 'path' column.")
            requests = []
            for row in reader:
                raw = (row.get(columns["path"]) or "").strip()
                if not raw:
                    continue
                slide_path = Path(raw).expanduser()
                if not slide_path.is_absolute():
                    slide_path = path.parent / slide_path
                barcode = (row.get(columns.get("barcode", ""), "") or "").strip() or None
                row_mpp = _manifest_mpp(row.get(columns.get("mpp", ""), ""), path, reader)
                row_prep = _manifest_preparation(
                    row.get(columns.get("preparation", ""), ""), path, reader
                )
                requests.append(
                    SlideRequest(
                        slide_path,
                        barcode,
                        mpp if row_mpp is None else row_mpp,
                        row_prep or preparation,
                    )
                )
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}.") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ManifestError(f"the manifest {path} is not a readable CSV file: {exc}.") from exc
    if not requests:
        raise ManifestError(f"the manifest {path} names no slides.")
    return requests


def _manifest_mpp(raw: str | None, path: Path, reader: csv.DictReader) -> float | None:
    """A manifest row's `mpp`, None where it is empty."""
    raw = (raw or "").strip()
    if not raw:
        return None
    where = f"line {reader.line_num} of the manifest {path}"
    try:
        value = float(raw)
    except ValueError:
        raise ManifestError(
            f"the mpp on {where}, {raw!r}, is not a number; give microns per pixel, e.g. 0.25."
        ) from None
    try:
        return check_mpp(value, f"the mpp on {where}")
    except SlideOpenError as exc:
        raise ManifestError(str(exc)) from None


def _manifest_preparation(raw: str | None, path: Path, reader: csv.DictReader) -> str | None:
    """A manifest row's `preparation`, None where it is empty."""
    raw = (raw or "").strip().lower().replace("_", "-")
    if not raw:
        return None
    if raw not in SLIDE_PREPARATIONS:
        raise ManifestError(
            f"the preparation on line {reader.line_num} of the manifest {path}, {raw!r}, is"
            f" not one of {', '.join(SLIDE_PREPARATIONS)}."
        )
    return raw


def check_slides(requests: Sequence[SlideRequest]) -> list[CheckedSlide]:
    """Open every slide and check it can be scanned, before anything is recorded.

    Raises:
        SlideOpenError: the first path that cannot be scanned, in one sentence (with the
            number of other bad paths, if any).
    """
    checked: list[CheckedSlide] = []
    errors: list[SlideOpenError] = []
    for request in requests:
        try:
            with open_slide(request.path, mpp=request.mpp) as slide:
                barcode = request.barcode or _barcode(slide.osr.properties)
                checked.append(CheckedSlide(slide.info, barcode, request.preparation))
        except SlideOpenError as exc:
            errors.append(exc)
    if errors:
        more = len(errors) - 1
        tail = f" ({more} other path{'s' if more > 1 else ''} also bad)" if more else ""
        raise SlideOpenError(f"{str(errors[0]).rstrip('.')}{tail}; nothing was queued.")
    return checked


def model_versions(repository: ModelRepository) -> dict[str, int]:
    """The version of each engine a worker with this repository would load (the newest
    served), read from the configs without loading anything.

    Raises:
        ModelNotFoundError, ModelConfigError: the repository lacks a model or is invalid.
    """
    from engines.errors import ModelNotFoundError

    versions = {}
    for name in MODEL_NAMES:
        served = repository.versions(name)
        if not served:
            raise ModelNotFoundError(
                f"the model repository {repository.path} serves no version of '{name}'"
            )
        versions[name] = max(served)
    return versions


def model_sha256(repository: ModelRepository, versions: dict[str, int]) -> dict[str, str]:
    """The sha256 of each engine's weights at these versions: the models' identity."""
    return {name: repository.weights_sha256(name, version) for name, version in versions.items()}


def submit_slides(
    db: Database,
    broker_url: str,
    slides: Sequence[CheckedSlide],
    versions: dict[str, int],
    *,
    priority: str = "routine",
    force: bool = False,
    send: Callable[[int, str], None] = send_scan,
    hashes: dict[str, str] | None = None,
) -> SubmitReport:
    """Record checked slides and queued scans, then send their jobs.

    Args:
        db: the results database.
        broker_url: the Redis broker, checked before anything is written.
        slides: slides from `check_slides`.
        versions: engine name -> version the scans will use (`model_versions`).
        priority: "stat" or "routine".
        force: queue a new scan even where an equivalent one is queued, running or done.
        send: sends one job (scan id, priority); `broker.send_scan` by default.
        hashes: engine name -> sha256 of its weights (`model_sha256`): "already scanned
            with these models" then means the same weights, not just the same numbers.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (before anything is recorded, or
            while sending: then the sentence says how many were sent).
        DatabaseUnavailableError: the database cannot be reached.
    """
    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {', '.join(QUEUES)}, not {priority!r}")
    check_broker(broker_url)
    db.create_schema()
    queued: list[QueuedScan] = []
    skipped: list[SkippedSlide] = []
    seen: dict[str, str] = {}
    with db.session() as s, s.begin():
        for slide in slides:
            info = slide.info
            path = str(info.path)
            if info.fingerprint in seen:
                skipped.append(SkippedSlide(path, f"same slide as {seen[info.fingerprint]}"))
                continue
            seen[info.fingerprint] = path
            row = queries.record_slide(
                s, info, barcode=slide.barcode, preparation=slide.preparation
            )
            existing = None if force else jobs.find_equivalent_scan(s, row.id, versions, hashes)
            if existing is not None:
                skipped.append(
                    SkippedSlide(
                        path,
                        f"scan {existing.id} is {existing.status} with the same models",
                        existing.id,
                    )
                )
                continue
            scan = queries.create_scan(s, row.id, versions, priority=priority, model_sha256=hashes)
            queued.append(QueuedScan(scan.id, row.id, path, priority, row.barcode))
    send_jobs(db, [(q.scan_id, q.priority) for q in queued], send)
    return SubmitReport(queued, skipped)


def _barcode(properties: object) -> str | None:
    """The label's barcode from a slide's OpenSlide properties, where the format has one."""
    for name, is_base64 in _BARCODE_PROPERTIES:
        value = properties.get(name)  # type: ignore[attr-defined]
        if not value:
            continue
        if is_base64:
            try:
                value = base64.b64decode(value, validate=True).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                pass
        return value.strip() or None
    return None
