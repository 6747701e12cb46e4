"""Why this cell: an integrated-gradients heat map of the cell classifier, on demand.

For one cell of a scan, the crop the scanner classified is cut again from the slide file
the database records (same ROI, level, resampling, field and normalisation as
`worker.pipeline.scan`; the centre comes from the stored level-0 box, so it agrees to
within a level-0 pixel), and `engines.explain.integrated_gradients` runs the cell
classifier's exported PyTorch program over it. The picture shows the crop and the heat
map over it; the JSON adds the numbers, with the ROI model's attention weight for the
cell from the database.

A map takes about a second of CPU, so results are cached in memory and on disk, keyed by
the sha256 of the program that computed it (a new model version, or a new file for the
same version, is a miss), the scan, the cell and where it lies (slide fingerprint, ROI and
cell boxes), the target, the baseline and the steps.
Requests for the same key wait for one computation; computations run one at a time, and
beyond a few waiting a request is refused with 503 and Retry-After, so explanations never
hold all of the server's worker threads (the other routes share them).
A cached map is served without reopening the slide.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from worker.api.routes import NOT_FOUND, CellId, ScanId, _cell, _db
from worker.api.schemas import Error
from worker.api.slide_files import OpenSlides, SlideGone
from worker.db.models import Roi, Slide

__all__ = ["Busy", "CellSite", "WhyCache", "WhyService", "cut_scanned_crop", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

CELL_MODEL = "cell_classifier"
DETECTOR_MODEL = "cell_detector"
#: Bump when the maps or their numbers change for the same inputs: old cache entries miss.
ALGORITHM = "ig-trapezoid-adaptive-1"
Baseline = Literal["blur", "black", "white"]
DEFAULT_BASELINE = "blur"
DEFAULT_STEPS = 32
PANEL_PX = 288  # each picture panel: the 96 px crop, three times


@dataclass(frozen=True, slots=True)
class CellSite:
    """What it takes to cut one cell's crop again and say whose call it was.

    Boxes are level-0 px `(x, y, w, h)`; `roi` is the cell's ROI as the scan planned it.
    """

    scan_id: int
    cell_id: int
    slide: Slide  # the scanned slide's row (detached), to open its file by
    roi: tuple[int, int, int, int]
    roi_index: int
    box: tuple[int, int, int, int]
    label: str
    probability: float
    attention: float
    model_version: int | None
    model_sha256: str | None

    @property
    def place(self) -> str:
        """A digest of the slide's fingerprint and the ROI's and cell's boxes: ids alone are
        not enough, since another database (a test's, a reset one, PostgreSQL after SQLite)
        numbers other cells the same."""
        where = f"{self.slide.fingerprint}|{self.roi}|{self.box}"
        return hashlib.sha256(where.encode()).hexdigest()[:16]


class Busy(Exception):
    """Too many explanations are being computed or waiting: try again shortly."""


@dataclass(frozen=True, slots=True)
class WhyResult:
    """A computed (or cached) explanation: its numbers and its picture."""

    numbers: dict[str, Any]
    png: bytes
    cached: bool


# --- the crop ------------------------------------------------------------------------------


def cut_scanned_crop(
    site: CellSite, slides: OpenSlides, detector_mpp: float, roi_px: int, prep: Any
) -> np.ndarray:
    """The cell's crop as the scanner cut it: `H×W×3` uint8 at the classifier's mpp.

    The cell's ROI is read as the scan read it (`OpenSlideReader`, the level and resampling
    `plan_rois` chose for the detector's mpp), from the scanned file as `slides` keeps it
    open (only while it is still the scanned slide), and the classifier's field is cut
    from it around the cell's centre with `engines.preprocess.cut_crops`.

    Args:
        site: the cell.
        slides: the API's open scanned slides.
        detector_mpp: the detector's mpp (the ROIs' target mpp).
        roi_px: the detector's input side (the ROIs' side at that mpp).
        prep: the cell classifier's `Preprocessing`.

    Raises:
        SlideGone: the file is gone, changed, or cannot be read.
    """
    from engines.preprocess import cut_crops
    from worker.errors import SlideReadError
    from worker.pipeline.plan import Roi as PlannedRoi
    from worker.wsi.read import OpenSlideReader

    x, y, w, h = site.roi
    roi = PlannedRoi(site.roi_index, 0, 0, x, y, w, h, x, y, w, h)
    reader = OpenSlideReader(slides.get(site.slide).slide, detector_mpp, roi_px)
    try:
        image = reader.read(roi)
    except (SlideReadError, OSError):
        raise SlideGone("the slide file of this scan cannot be read.") from None
    field_px = round(prep.input_size[0] * prep.mpp / reader.mpp)
    l0_per_px = w / image.shape[1]
    cx, cy, cw, ch = site.box
    centre = np.array([[(cx + cw / 2 - x) / l0_per_px, (cy + ch / 2 - y) / l0_per_px]])
    return cut_crops(image, centre, field_px, prep.input_size[0])[0]


# --- the picture ---------------------------------------------------------------------------


def render_png(crop: np.ndarray, heat: np.ndarray, numbers: dict[str, Any]) -> bytes:
    """The crop and the heat map over it, side by side, a colour bar and two lines of text.

    Args:
        crop: `H×W×3` uint8 RGB.
        heat: `H×W` in [0, 1] (`engines.explain.heat_map`).
        numbers: the explanation's numbers (label, probability, target, …).
    """
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    def big(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, (PANEL_PX, PANEL_PX), interpolation=cv2.INTER_NEAREST)

    colours = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO)
    colours = colours[:, 0, ::-1]  # BGR to RGB, 256×3
    level = np.round(heat * 255).astype(np.uint8)
    alpha = (0.85 * heat)[..., None]  # a cold pixel shows the crop, a hot one the colour
    overlay = (crop * (1 - alpha) + colours[level] * alpha).round().astype(np.uint8)
    gap, legend_h = 8, 58
    canvas = Image.new("RGB", (2 * PANEL_PX + gap, PANEL_PX + legend_h), "white")
    canvas.paste(Image.fromarray(big(crop)), (0, 0))
    canvas.paste(Image.fromarray(big(overlay)), (PANEL_PX + gap, 0))
    bar = np.repeat(colours[None], 10, axis=0)
    canvas.paste(Image.fromarray(bar), (PANEL_PX + gap, PANEL_PX + 6))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((PANEL_PX + gap + 262, PANEL_PX + 4), "|attr|", fill="black", font=font)
    same = "" if numbers["target"] == numbers["label"] else f", explaining {numbers['target']}"
    lines = (
        f"{numbers['label']} p={numbers['probability']:.2f}{same}; "
        f"ROI attention {numbers['attention']:.3f}",
        f"integrated gradients, {numbers['baseline']} baseline, {numbers['steps']} steps: "
        f"f(x)-f(x')={numbers['output_difference']:+.3f}, "
        f"delta={numbers['convergence_delta']:+.4f}",
    )
    for i, line in enumerate(lines):
        draw.text((2, PANEL_PX + 22 + 16 * i), line, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the cache -----------------------------------------------------------------------------


class WhyCache:
    """Explanations by key, in memory (least recently used first out) and on disk.

    On disk: `<folder>/<algorithm>/<model sha256>/<scan>/<cell>-<place>-<target>-<baseline>-
    <steps>.{png,json}` (`CellSite.place`),
    each written to a temporary name and renamed, the JSON last, so a reader that finds
    the JSON finds a whole picture. Anything unreadable on disk counts as a miss.

    Args:
        folder: the disk cache; None keeps results in memory only.
        max_entries: results kept in memory.
    """

    def __init__(self, folder: Path | None, max_entries: int = 128) -> None:
        self.folder = folder
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple, tuple[dict[str, Any], bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[dict[str, Any], bytes] | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.folder is None:
            return None
        stem = self._stem(key)
        try:
            numbers = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
            png = stem.with_suffix(".png").read_bytes()
        except (OSError, ValueError):
            return None
        self._remember(key, numbers, png)
        return numbers, png

    def put(self, key: tuple, numbers: dict[str, Any], png: bytes) -> None:
        self._remember(key, numbers, png)
        if self.folder is None:
            return
        stem = self._stem(key)
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for suffix, data in ((".png", png), (".json", json.dumps(numbers).encode())):
                part = stem.with_name(f"{stem.name}.{os.getpid()}.{threading.get_ident()}.part")
                part.write_bytes(data)
                os.replace(part, stem.with_suffix(suffix))
        except OSError as exc:  # a full or read-only disk: keep serving from memory
            logger.warning("cannot write the explanation cache under %s: %s", self.folder, exc)

    def _remember(self, key: tuple, numbers: dict[str, Any], png: bytes) -> None:
        with self._lock:
            self._memory[key] = (numbers, png)
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    def _stem(self, key: tuple) -> Path:
        assert self.folder is not None
        algorithm, sha, place, scan_id, cell_id, target, baseline, steps = key
        name = f"{cell_id}-{place}-{target}-{baseline}-{steps}"
        return self.folder / algorithm / sha / str(scan_id) / name


class _KeyedLocks:
    """One lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[tuple, list[Any]] = {}

    @contextmanager
    def hold(self, key: tuple) -> Iterator[None]:
        with self._lock:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


# --- the service ---------------------------------------------------------------------------


class WhyService:
    """Explains cells with the cell classifier of one model repository, and caches them.

    The repository is read on each request (cheap: configs and file sizes), so a model
    written while the API runs is used, and its maps are new cache keys. The program is
    loaded once per file (by sha256) and kept.

    Args:
        models_dir: the model repository; None means the one shipped in `engines`.
        cache_dir: the disk cache; None keeps results in memory only.
        max_concurrent: computations at once (each uses every core torch is given).
        max_waiting: computations that may wait for one of those; more raise `Busy`.
    """

    def __init__(
        self,
        models_dir: Path | None,
        cache_dir: Path | None,
        max_concurrent: int = 1,
        max_waiting: int = 4,
    ) -> None:
        self.models_dir = models_dir
        self.cache = WhyCache(cache_dir)
        self.computations = 0
        self._locks = _KeyedLocks()
        self._compute = threading.Semaphore(max_concurrent)
        self._admitted = threading.Semaphore(max_concurrent + max_waiting)
        self._count_lock = threading.Lock()
        self._programs: OrderedDict[str, Any] = OrderedDict()
        self._programs_lock = threading.Lock()

    @classmethod
    def from_settings(cls) -> WhyService:
        """Models from `PAPSCAN_MODELS`, the disk cache in papscan's user cache folder."""
        from platformdirs import user_cache_dir

        from worker.settings import get_settings

        return cls(get_settings().models_dir, Path(user_cache_dir("papscan")) / "why")

    def repository(self) -> Any:
        from engines.repository import ModelRepository, default_repository_path

        return ModelRepository(self.models_dir or default_repository_path())

    def labels(self) -> tuple[str, ...]:
        """The cell classifier's labels (for checking a requested target)."""
        return tuple(self.repository().config(CELL_MODEL).labels)

    def explain(
        self, site: CellSite, target: str, baseline: str, steps: int, slides: OpenSlides
    ) -> WhyResult:
        """The explanation of `site`'s cell for class `target`, from the cache or computed
        (cutting the crop from `slides`).

        Raises:
            SlideGone: the crop cannot be cut again (cache misses only).
            ModelNotFoundError, ModelLoadError, BackendUnavailableError: no usable program.
        """
        from engines.explain import PROGRAM_NAME
        from engines.hashing import cached_file_sha256

        repository = self.repository()
        version = self._version(repository, site.model_version)
        sha = cached_file_sha256(repository.path / CELL_MODEL / str(version) / PROGRAM_NAME)
        key = (ALGORITHM, sha, site.place, site.scan_id, site.cell_id, target, baseline, steps)
        found = self.cache.get(key)
        if found is None:
            with self._locks.hold(key):
                found = self.cache.get(key)
                if found is None:
                    numbers, png = self._compute_one(repository, version, site, target,
                                                     baseline, steps, slides)  # fmt: skip
                    self.cache.put(key, numbers, png)
                    return WhyResult(self._with_site(numbers, site, repository), png, False)
        numbers, png = found
        return WhyResult(self._with_site(numbers, site, repository), png, True)

    def _compute_one(
        self,
        repository: Any,
        version: int,
        site: CellSite,
        target: str,
        baseline: str,
        steps: int,
        slides: OpenSlides,
    ) -> tuple[dict[str, Any], bytes]:
        from engines.explain import heat_map, integrated_gradients

        detector = repository.config(DETECTOR_MODEL).preprocessing
        program = self._program(repository, version)
        prep = program.config.preprocessing
        start = time.perf_counter()
        crop = cut_scanned_crop(site, slides, detector.mpp, detector.input_size[0], prep)
        if not self._admitted.acquire(blocking=False):
            raise Busy()
        try:
            with self._compute:
                with self._count_lock:
                    self.computations += 1
                attribution = integrated_gradients(program, crop, target, steps, baseline)
        finally:
            self._admitted.release()
        numbers = {
            "label": site.label,
            "probability": site.probability,
            "attention": site.attention,
            "target": attribution.label,
            "steps": attribution.steps,
            "baseline": baseline,
            "convergence_delta": attribution.convergence_delta,
            "output_difference": attribution.output_difference,
            "output_at_cell": attribution.output,
            "output_at_baseline": attribution.baseline_output,
            "model": {"name": CELL_MODEL, "version": version, "sha256": program.sha256},
            "compute_ms": round((time.perf_counter() - start) * 1e3),
        }
        png = render_png(crop, heat_map(attribution.values), numbers)
        logger.info(
            "explained cell %d of scan %d (%s@%d, %s, %d steps, delta %.4f) in %d ms",
            site.cell_id,
            site.scan_id,
            CELL_MODEL,
            version,
            baseline,
            attribution.steps,
            attribution.convergence_delta,
            numbers["compute_ms"],
        )
        return numbers, png

    def _with_site(self, numbers: dict[str, Any], site: CellSite, repository: Any) -> dict:
        """The cached numbers, with what may have changed since: the database's values and
        whether the model is the one the scan ran."""
        model = dict(numbers["model"])
        scanned = site.model_sha256
        model["same_as_scan"] = (
            None
            if scanned is None
            else repository.weights_sha256(CELL_MODEL, model["version"]) == scanned
        )
        return {
            **numbers,
            "label": site.label,
            "probability": site.probability,
            "attention": site.attention,
            "model": model,
        }

    @staticmethod
    def _version(repository: Any, scanned: int | None) -> int:
        """The version the scan ran where it is still served, else the newest served."""
        from engines.errors import ModelNotFoundError

        served = repository.versions(CELL_MODEL)
        if scanned in served:
            return int(scanned)
        if not served:
            raise ModelNotFoundError(f"model '{CELL_MODEL}' has no served version")
        return served[-1]

    def _program(self, repository: Any, version: int) -> Any:
        from engines.explain import PROGRAM_NAME, load_gradient_program
        from engines.hashing import cached_file_sha256

        sha = cached_file_sha256(repository.path / CELL_MODEL / str(version) / PROGRAM_NAME)
        with self._programs_lock:
            program = self._programs.get(sha)
            if program is None:
                program = self._programs[sha] = load_gradient_program(
                    repository, CELL_MODEL, version
                )
                while len(self._programs) > 2:  # scans of two versions; older files are done
                    self._programs.popitem(last=False)
            self._programs.move_to_end(sha)
            return program


# --- the routes ----------------------------------------------------------------------------

_service_lock = threading.Lock()
WHY_ERRORS: dict[int | str, dict[str, Any]] = {
    **NOT_FOUND,
    410: {"model": Error, "description": "The slide file is gone or changed."},
    422: {"model": Error},
    503: {"model": Error, "description": "Busy, or no usable PyTorch program for the model."},
}


def _service(request: Request) -> WhyService:
    """The app's service, made on first use (tests may set `app.state.why` beforehand)."""
    state = request.app.state
    with _service_lock:
        service = getattr(state, "why", None)
        if service is None:
            service = state.why = WhyService.from_settings()
    return service


def _site(request: Request, scan_id: int, cell_id: int) -> CellSite:
    with _db(request).session() as s:
        scan, cell, slide = _cell(s, scan_id, cell_id)
        s.expunge(slide)
        roi = s.get(Roi, cell.roi_id)
        versions = scan.model_versions or {}
        hashes = scan.model_sha256 or {}
        return CellSite(
            scan_id=scan_id,
            cell_id=cell_id,
            slide=slide,
            roi=(roi.x, roi.y, roi.w, roi.h),
            roi_index=roi.index,
            box=(cell.x, cell.y, cell.w, cell.h),
            label=cell.label,
            probability=cell.score,
            attention=cell.attention,
            model_version=versions.get(CELL_MODEL),
            model_sha256=hashes.get(CELL_MODEL),
        )


def _why(
    request: Request, scan_id: int, cell_id: int, target: str | None, baseline: str, steps: int
) -> WhyResult:
    from engines.errors import BackendUnavailableError, ModelLoadError, ModelNotFoundError

    site = _site(request, scan_id, cell_id)
    service = _service(request)
    try:
        labels = service.labels()
        if target is not None and target not in labels:
            raise HTTPException(422, f"target must be one of {', '.join(labels)}.")
        slides = request.app.state.open_slides
        return service.explain(site, target or site.label, baseline, steps, slides)
    except SlideGone as exc:
        raise HTTPException(410, str(exc)[:1].upper() + str(exc)[1:]) from None
    except Busy:
        raise HTTPException(
            503,
            "Too many explanations are being computed; try again in a few seconds.",
            headers={"Retry-After": "5"},
        ) from None
    except (ModelNotFoundError, ModelLoadError, BackendUnavailableError) as exc:
        logger.error("cannot explain cell %d of scan %d: %s", cell_id, scan_id, exc)
        raise HTTPException(
            503, "The cell classifier has no exported PyTorch program that can run here."
        ) from None


Target = Annotated[
    str | None, Query(max_length=32, description="A label; default the cell's own call.")
]
Steps = Annotated[
    int, Query(ge=1, le=256, description="Trapezoid intervals to start with (halved to 256).")
]


@router.get("/scans/{scan_id}/cells/{cell_id}/why", responses=WHY_ERRORS)
def cell_why(
    request: Request,
    scan_id: ScanId,
    cell_id: CellId,
    target: Target = None,
    baseline: Baseline = DEFAULT_BASELINE,
    steps: Steps = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Why the cell classifier called this cell what it did: integrated gradients over its
    crop (paper 001), with the ROI model's attention weight for the cell."""
    result = _why(request, scan_id, cell_id, target, baseline, steps)
    query = {"target": result.numbers["target"], "baseline": baseline, "steps": steps}
    image = request.url_for("cell_why_png", scan_id=scan_id, cell_id=cell_id).path
    return {
        "scan_id": scan_id,
        "cell_id": cell_id,
        **result.numbers,
        "image": f"{image}?{urlencode(query)}",
        "cached": result.cached,
    }


@router.get(
    "/scans/{scan_id}/cells/{cell_id}/why.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "Crop and heat map, PNG."},
        **WHY_ERRORS,
    },  # fmt: skip
)
def cell_why_png(
    request: Request,
    scan_id: ScanId,
    cell_id: CellId,
    target: Target = None,
    baseline: Baseline = DEFAULT_BASELINE,
    steps: Steps = DEFAULT_STEPS,
) -> Response:
    """The cell's crop beside its integrated-gradients heat map, PNG."""
    result = _why(request, scan_id, cell_id, target, baseline, steps)
    return Response(result.png, media_type="image/png")
