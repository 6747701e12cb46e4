"""The streaming slide pipeline: plan -> read -> detect -> classify cells -> classify ROIs.

Reads run ahead on a thread pool (bounded), detection runs on ROI batches, each ROI's
crops go to the cell classifier's dynamic batcher as soon as they are cut (it pools
them from many ROIs into full batches and runs them while detection goes on), each ROI is
classified from its cells' features or, for an ROI classifier of kind ``crops``
(`engines.contract.roi_kind`), from crops cut again at its own field and size, and results
leave in chunks of ROIs through a write-behind thread (bounded). Only a chunk's worth of
ROIs, the read-ahead queue and the review heap are ever held, so memory stays flat
whatever the slide size.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.batcher import DynamicBatcher
from engines.contract import (
    ROI_INPUTS,
    SCAN_MODELS,
    check_scan_models,
    check_scan_repository,
    roi_kind,
)
from engines.model import Model
from engines.postprocess import decode_yolo
from engines.preprocess import cut_crops, to_input
from engines.repository import ModelRepository, weights_sha256
from worker.pipeline.aggregate import SlideAggregator
from worker.pipeline.detect import CrossRoiDedup
from worker.pipeline.plan import RoiPlan, cellular_mask, plan_rois
from worker.pipeline.qc import QcResult, SlideQc, cellular_area_mm2
from worker.pipeline.records import CellResult, RoiResult, SlideSummary
from worker.pipeline.slide_call import OperatingPoint
from worker.wsi.read import make_reader, read_ahead
from worker.wsi.slide import Slide

if TYPE_CHECKING:
    from engines.config import Preprocessing
    from worker.settings import Settings

logger = logging.getLogger(__name__)

MODEL_NAMES = SCAN_MODELS

ChunkSink = Callable[[list[RoiResult], list[CellResult]], None]
Progress = Callable[[int, int], None]


@dataclass
class ScanModels:
    """The three engines a scan needs, loaded from one model repository, and the cell
    classifier's dynamic batcher (its threads live as long as the models)."""

    detector: Model
    cell_classifier: Model
    roi_classifier: Model
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    cell_batcher: DynamicBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.cell_batcher = DynamicBatcher(self.cell_classifier)

    @classmethod
    def load(cls, repository: ModelRepository) -> ScanModels:
        """Check that the three models fit together, then load each one's selected version.

        Raises:
            ModelNotFoundError, ModelConfigError, ModelLoadError: as `ModelRepository.load`.
            ModelContractError: the models do not fit together (labels, severity order,
                tensor names and sizes, mpp); checked from the configs before any loads.
        """
        check_scan_repository(repository, MODEL_NAMES)
        loaded: list[Model] = []
        try:
            for name in MODEL_NAMES:
                loaded.append(repository.load(name))
            # The files are read afresh per load: check what was actually loaded too.
            check_scan_models(*(m.config for m in loaded), repository.path)
            operating_point = OperatingPoint.for_repository(repository.path)
        except BaseException:
            for model in loaded:
                model.close()
            raise
        return cls(*loaded, operating_point=operating_point)

    def versions(self) -> dict[str, int]:
        """Model name -> version used, for the scan row."""
        return {m.config.name: m.version for m in self.all()}

    def weights_sha256(self) -> dict[str, str]:
        """Model name -> sha256 of its weights, the models' identity on the scan row."""
        return {m.config.name: weights_sha256(m.version_dir, m.config) for m in self.all()}

    def all(self) -> tuple[Model, Model, Model]:
        return (self.detector, self.cell_classifier, self.roi_classifier)

    def close(self) -> None:
        self.cell_batcher.close()
        for model in self.all():
            model.close()


@dataclass(frozen=True)
class ScanOptions:
    """Knobs of one scan; defaults suit a laptop.

    Args:
        overlap_px: ROI overlap at the detector's mpp; must be at least the classifiers'
            crop fields so every kept cell's crop lies inside its ROI image.
        reader: "auto" (raw JPEG tiles through DALI where the level allows, else OpenSlide),
            "dali" or "openslide".
        read_ahead: ROIs read ahead of the detector.
        chunk_rois: ROIs per result chunk (one database transaction each).
        top_k: cells marked for review.
        qc: measure slide QC (focus, colour, cellular area) as the ROIs pass.
    """

    overlap_px: int = 128
    reader: str = "auto"
    read_ahead: int = 4
    chunk_rois: int = 32
    top_k: int = 20
    qc: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ScanOptions:
        """The options `PAPSCAN_READ_AHEAD` and `PAPSCAN_DB_CHUNK_ROIS` set, plus `overrides`."""
        return cls(read_ahead=settings.read_ahead, chunk_rois=settings.db_chunk_rois, **overrides)


@dataclass
class ScanOutcome:
    """What a finished scan returns besides the rows it wrote."""

    summary: SlideSummary
    timings_ms: dict[str, float]
    rois_planned: int
    reader: str
    warnings: list[str] = field(default_factory=list)
    plan: RoiPlan | None = None
    qc: QcResult | None = None  # its dict travels on `summary.qc`; this draws the focus map


@dataclass
class _Pending:
    """An ROI whose cells are detected but not yet classified."""

    roi_index: int
    l0_box: tuple[int, int, int, int]
    l0_boxes: np.ndarray
    det_scores: np.ndarray
    cell_outputs: Future[dict[str, np.ndarray]]
    roi_crops: np.ndarray | None = None  # uint8, for an ROI classifier of kind "crops"


@dataclass
class StageClock:
    """Milliseconds spent per stage, summed over the scan (thread-safe)."""

    ms: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            with self._lock:
                self.ms[name] = self.ms.get(name, 0.0) + elapsed

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.ms.items()}


class ScanPipeline:
    """Runs the models over one opened slide and streams results to a sink.

    Args:
        models: the detector, cell classifier and ROI classifier.
        options: scan knobs.
    """

    def __init__(self, models: ScanModels, options: ScanOptions | None = None) -> None:
        self.models = models
        self.options = options or ScanOptions()
        det = models.detector.config
        cls = models.cell_classifier.config
        roi = models.roi_classifier.config
        self.target_mpp = det.preprocessing.mpp
        self.roi_px = det.preprocessing.input_size[0]
        self.crop_px = cls.preprocessing.input_size[0]
        # "features": the ROI classifier pools the cell classifier's features; "crops": it
        # takes crops of its own field and size.
        self.roi_kind = roi_kind(roi)
        self.roi_crop_px = roi.preprocessing.input_size[0] if self.roi_kind == "crops" else 0
        # The crop fields at the target mpp; a slide read as is (within 2 % of it) gets its
        # own, from the mpp its ROIs are delivered at (`crop_field_for`).
        self.crop_field_px = self.crop_field_for(self.target_mpp)
        self.roi_field_px = self.roi_field_for(self.target_mpp)
        self.labels = tuple(cls.labels)
        # The slide-level rules go from least to most severe: the declared order (the
        # model contract requires one), else the labels' own.
        self.severity = tuple(cls.severity or cls.labels)
        post = det.postprocessing
        self.conf_threshold = float(post.get("conf_threshold", 0.25))
        self.iou_threshold = float(post.get("iou_threshold", 0.5))

    def crop_field_for(self, mpp: float) -> int:
        """The classifier's field in ROI pixels at `mpp`: its input size at its own mpp.

        Raises:
            ValueError: the field is wider than the ROI overlap, so crops of cells near ROI
                borders would be cut.
        """
        return self._field_px(self.models.cell_classifier.config.preprocessing, mpp, "classifier")

    def roi_field_for(self, mpp: float) -> int:
        """A ``crops`` ROI classifier's field in ROI pixels at `mpp` (0 for ``features``).

        Raises:
            ValueError: as `crop_field_for`.
        """
        if self.roi_kind != "crops":
            return 0
        prep = self.models.roi_classifier.config.preprocessing
        return self._field_px(prep, mpp, "ROI classifier")

    def _field_px(self, prep: Preprocessing, mpp: float, who: str) -> int:
        field_px = round(prep.input_size[0] * prep.mpp / mpp)
        if self.options.overlap_px < field_px:
            raise ValueError(
                f"ROI overlap {self.options.overlap_px} px is smaller than the {who}'s "
                f"{field_px} px field: crops of cells near ROI borders would be cut"
            )
        return field_px

    def run(
        self,
        slide: Slide,
        sink: ChunkSink,
        progress: Progress | None = None,
        preparation: str | None = None,
        check_adequacy: bool = True,
    ) -> ScanOutcome:
        """Scan a slide; `sink` receives each chunk of ROIs and cells, in ROI order.

        `preparation` (one of `slide_call.SLIDE_PREPARATIONS`; None: not given, read as
        liquid-based with a note) picks the slide call's score rule and adequacy minimum;
        `check_adequacy=False` scores a field, not a slide.

        Raises:
            SlideReadError: a region could not be read or decoded.
        """
        clock = StageClock()
        start = time.perf_counter()
        with clock.stage("plan"):
            mask = cellular_mask(slide)
            plan = plan_rois(
                slide.info, mask, self.target_mpp, self.roi_px, self.options.overlap_px
            )
        rois = plan.rois
        fields_px = (self.crop_field_for(plan.mpp), self.roi_field_for(plan.mpp))  # as delivered
        reader = make_reader(slide, self.target_mpp, self.roi_px, prefer=self.options.reader)
        logger.info(
            "planned %d ROIs of %d px at %.3f mpp (level %d); reader %s",
            len(rois),
            self.roi_px,
            plan.mpp,
            plan.level,
            reader.name,
        )
        aggregator = SlideAggregator(
            self.severity,
            top_k=self.options.top_k,
            operating_point=self.models.operating_point,
            preparation=preparation,
            check_adequacy=check_adequacy,
        )
        dedup = CrossRoiDedup(plan)
        qc = SlideQc(plan.mpp) if self.options.qc else None
        done = 0
        if progress:
            progress(0, len(rois))
        pending: list[_Pending] = []
        try:
            with _WriteBehind(sink, clock) as writer:
                for batch in _batched(
                    read_ahead(_timed(reader, clock), rois, depth=self.options.read_ahead),
                    self._detector_batch(),
                ):
                    if qc is not None:
                        with clock.stage("qc"):
                            for roi, image in batch:
                                qc.add_roi(roi.index, image, roi)
                    pending.extend(self._detect(batch, fields_px, dedup, clock))
                    if (
                        len(pending) >= self.options.chunk_rois
                        or self._pending_cells(pending)
                        >= self.models.cell_classifier.config.max_batch_size
                    ):
                        writer.put(*self._classify(pending, aggregator, clock))
                        done += len(pending)
                        pending = []
                        if progress:
                            progress(done, len(rois))
                if pending:
                    writer.put(*self._classify(pending, aggregator, clock))
                    done += len(pending)
                    pending = []
                    if progress:
                        progress(done, len(rois))
        finally:
            # A failed, cancelled or timed-out scan must not leak its file handle and
            # decoder into a long-running worker, nor leave crops queued in the batcher.
            for p in pending:
                p.cell_outputs.cancel()
            reader.close()
        summary, qc_result = aggregator.summary(), None
        if qc is not None:  # flags travel with the result; they never change the category
            qc_result = qc.result(cellular_area_mm2(mask))
            summary = replace(summary, qc=qc_result.to_dict())
        clock.ms["total"] = (time.perf_counter() - start) * 1000
        return ScanOutcome(
            summary,
            clock.rounded(),
            len(rois),
            reader.name,
            list(plan.warnings),
            plan=plan,
            qc=qc_result,
        )

    def _detector_batch(self) -> int:
        return max(1, self.models.detector.config.max_batch_size)

    @staticmethod
    def _pending_cells(pending: list[_Pending]) -> int:
        return sum(len(p.det_scores) for p in pending)

    def _detect(
        self,
        batch: list,
        fields_px: tuple[int, int],
        dedup: CrossRoiDedup,
        clock: StageClock,
    ) -> list[_Pending]:
        """Detects the cells of a batch of ROIs, cuts their crops and submits them to the
        cell classifier; `fields_px` are the cell and ROI classifiers' crop fields. The
        batch's ROIs go through `dedup` in plan order, so the cells kept do not depend on
        how ROIs are batched."""
        crop_field_px, roi_field_px = fields_px
        images = np.stack([image for _, image in batch])
        det_model = self.models.detector
        with clock.stage("detect"):
            x = to_input(images, det_model.config.preprocessing)
            raw = det_model.infer({det_model.config.inputs[0].name: x})
            heads = raw[det_model.config.outputs[0].name]
            detections = decode_yolo(heads, self.conf_threshold, self.iou_threshold)
        out = []
        with clock.stage("crop"):
            for (roi, image), det in zip(batch, detections, strict=True):
                l0_per_px = roi.l0_w / image.shape[1]
                l0_boxes, scores, kept = dedup.select(roi, det, l0_per_px)
                centres = (det.boxes[kept, :2] + det.boxes[kept, 2:]) / 2
                crops = cut_crops(image, centres, crop_field_px, self.crop_px)
                roi_crops = None
                if self.roi_kind == "crops":
                    same_cut = (roi_field_px, self.roi_crop_px) == (crop_field_px, self.crop_px)
                    roi_crops = (
                        crops
                        if same_cut
                        else cut_crops(image, centres, roi_field_px, self.roi_crop_px)
                    )
                out.append(
                    _Pending(
                        roi.index,
                        (roi.l0_x, roi.l0_y, roi.l0_w, roi.l0_h),
                        l0_boxes,
                        scores,
                        self._submit_cells(crops),
                        roi_crops,
                    )
                )
        return out

    def _submit_cells(self, crops: np.ndarray) -> Future[dict[str, np.ndarray]]:
        """Hands one ROI's crops to the cell classifier's batcher; runs in the background."""
        config = self.models.cell_classifier.config
        return self.models.cell_batcher.submit(
            {config.inputs[0].name: to_input(crops, config.preprocessing)}
        )

    def _classify(
        self, pending: list[_Pending], aggregator: SlideAggregator, clock: StageClock
    ) -> tuple[list[RoiResult], list[CellResult]]:
        counts = [len(p.det_scores) for p in pending]
        with clock.stage("classify_cells"):  # waiting for the batcher's results
            outputs = [self.models.cell_batcher.wait(p.cell_outputs) for p in pending]
            probs = np.concatenate([o["probs"] for o in outputs])
        with clock.stage("classify_rois"):
            roi_probs, attention = self._classify_rois(pending, outputs)
        rois: list[RoiResult] = []
        cells: list[CellResult] = []
        offset = 0
        for i, p in enumerate(pending):
            n = counts[i]
            roi_cells = [
                self._cell(p, j, probs[offset + j], float(attention[i][j])) for j in range(n)
            ]
            offset += n
            label = self.labels[int(np.argmax(roi_probs[i]))]
            roi = RoiResult(
                p.roi_index, *p.l0_box, label=label, probs=self._named(roi_probs[i]), cell_count=n
            )
            aggregator.add_roi(roi, roi_cells)
            rois.append(roi)
            cells.extend(roi_cells)
        return rois, cells

    def _classify_rois(
        self, pending: list[_Pending], outputs: list[dict[str, np.ndarray]]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ROI probabilities `[R, C]` and per-ROI attention over its cells.

        An ROI without cells holds nothing abnormal: it is NILM with certainty and is not
        sent to the model (the attention pooling needs at least one cell).
        """
        counts = [len(p.det_scores) for p in pending]
        roi_probs = np.zeros((len(pending), len(self.labels)), np.float32)
        roi_probs[:, 0] = 1.0
        attention = [np.zeros(n, np.float32) for n in counts]
        with_cells = [i for i, n in enumerate(counts) if n]
        if not with_cells:
            return roi_probs, attention
        out = self.models.roi_classifier.infer(self._roi_feed(pending, outputs, with_cells))
        for row, i in enumerate(with_cells):
            roi_probs[i] = out["roi_probs"][row]
            attention[i] = out["attention"][row, : counts[i]]
        return roi_probs, attention

    def _roi_feed(
        self, pending: list[_Pending], outputs: list[dict[str, np.ndarray]], rows: list[int]
    ) -> dict[str, np.ndarray]:
        """The ROI classifier's inputs for the ROIs `rows` (each with cells), padded to the
        most cells among them: per cell, the cell classifier's `features` (kind
        ``features``: `cell_features`, `cell_mask`) or the ROI classifier's own crop,
        normalised per its preprocessing (kind ``crops``: `cells`, `mask`)."""
        if self.roi_kind == "features":
            cells = [outputs[i]["features"] for i in rows]
        else:
            prep = self.models.roi_classifier.config.preprocessing
            cells = [to_input(pending[i].roi_crops, prep) for i in rows]
        width = max(len(c) for c in cells)
        bags = np.zeros((len(rows), width, *cells[0].shape[1:]), np.float32)
        mask = np.zeros((len(rows), width), np.float32)
        for row, c in enumerate(cells):
            bags[row, : len(c)] = c
            mask[row, : len(c)] = 1.0
        cells_name, mask_name = ROI_INPUTS[self.roi_kind]
        return {cells_name: bags, mask_name: mask}

    def _cell(self, p: _Pending, j: int, probs: np.ndarray, attention: float) -> CellResult:
        k = int(np.argmax(probs))
        x, y, w, h = (int(v) for v in p.l0_boxes[j])
        return CellResult(
            roi_index=p.roi_index,
            x=x,
            y=y,
            w=w,
            h=h,
            detection_score=round(float(p.det_scores[j]), 5),
            label=self.labels[k],
            score=round(float(probs[k]), 5),
            probs=self._named(probs),
            suspicion=round(1.0 - float(probs[0]), 5),
            attention=round(attention, 5),
        )

    def _named(self, probs: np.ndarray) -> dict[str, float]:
        return {label: round(float(p), 5) for label, p in zip(self.labels, probs, strict=True)}


class _timed:
    """Wraps a reader so time spent reading (on the read-ahead threads) is counted."""

    def __init__(self, reader, clock: StageClock) -> None:
        self._reader = reader
        self._clock = clock

    def read(self, roi):
        with self._clock.stage("read"):
            return self._reader.read(roi)


class _WriteBehind:
    """Hands result chunks to the sink on a background thread, at most two in flight.

    The first error in the sink is re-raised in the scanning thread at the next `put` or at
    exit, so a failed write fails the scan instead of being lost.
    """

    def __init__(self, sink: ChunkSink, clock: StageClock) -> None:
        self._sink = sink
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="papscan-writer", daemon=True)

    def __enter__(self) -> _WriteBehind:
        self._thread.start()
        return self

    def put(self, rois: list[RoiResult], cells: list[CellResult]) -> None:
        self._raise_if_failed()
        self._queue.put((rois, cells))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc is None:
            self._raise_if_failed()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                with self._clock.stage("write"):
                    self._sink(*item)
            except BaseException as exc:  # re-raised in the scanning thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
