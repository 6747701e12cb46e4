"""Plain records the pipeline produces and the database layer writes.

Boxes are level-0 slide pixels, `(x, y)` top-left and `(w, h)` size, integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pipeline.slide_call import SlideCall, SlideEvidence


@dataclass(frozen=True, slots=True)
class RoiResult:
    """One scanned ROI.

    Attributes:
        index: position of the ROI in the scan's plan (0-based, stable across retries).
        x, y, w, h: the ROI's box in level-0 pixels.
        label: the ROI classifier's most likely class.
        probs: class name -> probability, from the ROI classifier.
        cell_count: cells kept for this ROI (after de-duplication across overlaps).
    """

    index: int
    x: int
    y: int
    w: int
    h: int
    label: str
    probs: dict[str, float]
    cell_count: int


@dataclass(frozen=True, slots=True)
class CellResult:
    """One detected, classified cell.

    Attributes:
        roi_index: index of the ROI it was kept in (see `RoiResult.index`).
        x, y, w, h: the detected (nucleus-centred) box in level-0 pixels.
        detection_score: the detector's confidence, 0..1.
        label: the cell classifier's most likely class.
        score: probability of `label`.
        probs: class name -> probability.
        suspicion: probability that the cell is abnormal (1 - P(NILM)), used for ranking.
        attention: the ROI classifier's attention weight for this cell within its ROI.
        review_rank: 1..K for the slide's top-K cells to review, else None.
    """

    roi_index: int
    x: int
    y: int
    w: int
    h: int
    detection_score: float
    label: str
    score: float
    probs: dict[str, float]
    suspicion: float
    attention: float
    review_rank: int | None = None


@dataclass(frozen=True, slots=True)
class SlideSummary:
    """Slide-level result of one scan.

    Attributes:
        category: the Bethesda category (NILM, ASC-US, LSIL, ASC-H, HSIL, as far as the
            models' classes reach) or "Unsatisfactory for evaluation".
        score: calibrated probability that the slide is abnormal; sorts the worklist.
        cell_count: cells found on the slide.
        class_counts: class name -> number of cells.
        roi_count: ROIs scanned.
        top_cells: the review cells, most suspicious first.
        call: the slide call in full (adequacy, notes, operating point).
        evidence: what the call was made from.
        qc: slide QC (focus, colour, cellular area) with its flags; it never changes
            the category.
    """

    category: str
    score: float
    cell_count: int
    class_counts: dict[str, int]
    roi_count: int
    top_cells: list[CellResult] = field(default_factory=list)
    call: SlideCall | None = None
    evidence: SlideEvidence | None = None
    qc: dict | None = None
