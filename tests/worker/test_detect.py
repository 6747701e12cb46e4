"""Detections into level-0 cells, each kept by exactly one of the ROIs that see it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engines.postprocess import Detections, pairwise_iou
from tests.worker.test_plan import fake_info, full_mask
from worker.pipeline.detect import CrossRoiDedup, l0_boxes_in_core
from worker.pipeline.plan import Roi, RoiPlan, plan_rois


def test_core_keeps_each_cell_once_across_overlapping_rois() -> None:
    """Two ROIs overlapping by 128 px see the same cell; exactly one keeps it."""
    cell_l0 = np.array([[500.0, 300.0, 520.0, 320.0]])  # centre (510, 310)
    roi_a = dict(origin=(0, 0), core=(0, 0, 448, 512))  # stride 384: cores split at 448
    roi_b = dict(origin=(384, 0), core=(448, 0, 384, 512))
    kept = 0
    for roi in (roi_a, roi_b):
        ox, oy = roi["origin"]
        local = cell_l0 - [ox, oy, ox, oy]
        det = Detections(local.astype(np.float32), np.array([0.9], np.float32))
        boxes, scores, idx = l0_boxes_in_core(det, roi["origin"], 1.0, roi["core"])
        if len(boxes):
            np.testing.assert_array_equal(boxes[0], [500, 300, 20, 20])
        kept += len(boxes)
    assert kept == 1


def test_core_maps_scaled_rois_to_level0() -> None:
    det = Detections(np.array([[10.0, 20.0, 30.0, 40.0]], np.float32), np.array([0.5], np.float32))
    boxes, _, _ = l0_boxes_in_core(det, (1000, 2000), 2.0, (1000, 2000, 1024, 1024))
    np.testing.assert_array_equal(boxes, [[1020, 2040, 40, 40]])


# --- across ROIs: cells whose boxes from neighbouring ROIs straddle a core border ----------

# A 4 x 4 grid at 1 level-0 px per ROI px: ROIs of 512 at x, y = 0, 384, 768, 1152 and
# inner core borders at 448, 832, 1216.
Views = Callable[[Roi], list[tuple[int, np.ndarray]]]


def grid_plan(side: int = 1536) -> RoiPlan:
    info = fake_info(side, side)
    return plan_rois(info, full_mask(info), 0.5, 512, 128)


def inside(roi: Roi, box: np.ndarray) -> bool:
    x, y, w, h = roi.l0_box
    return bool(box[0] >= x and box[1] >= y and box[2] <= x + w and box[3] <= y + h)


def run_dedup(plan: RoiPlan, views: Views) -> dict[int, list[int]]:
    """Feeds each ROI's views `(cell id, level-0 box)` through a `CrossRoiDedup` in plan
    order; returns cell id -> the ROIs that kept it."""
    dedup = CrossRoiDedup(plan)
    kept_by: dict[int, list[int]] = {}
    for roi in plan.rois:
        seen = views(roi)
        ids = [cell for cell, _ in seen]
        boxes = np.array([box for _, box in seen], np.float64).reshape(-1, 4)
        local = boxes - [roi.l0_x, roi.l0_y, roi.l0_x, roi.l0_y]
        det = Detections(
            local.astype(np.float32), np.linspace(0.9, 0.5, len(ids), dtype=np.float32)
        )
        l0_boxes, scores, kept = dedup.select(roi, det, 1.0)
        np.testing.assert_array_equal(scores, det.scores[kept])
        np.testing.assert_array_equal(l0_boxes[:, :2], np.round(boxes[kept, :2]))
        for k in kept:
            kept_by.setdefault(ids[k], []).append(roi.index)
    return kept_by


def views_of(cells: np.ndarray, shift: Callable[[Roi, int], tuple[float, float]]) -> Views:
    """Each ROI sees every cell that lies inside its image, moved by `shift(roi, cell)`."""

    def views(roi: Roi) -> list[tuple[int, np.ndarray]]:
        out = []
        for i, box in enumerate(cells):
            if inside(roi, box):
                dx, dy = shift(roi, i)
                out.append((i, box + [dx, dy, dx, dy]))
        return out

    return views


def cell_at(cx: float, cy: float, size: float = 24.0) -> np.ndarray:
    return np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])


# Where an ROI sees a cell's centre: 1.5 px into one of the four quadrants around it (two
# views then differ by up to 3 px in x and y: IoU 0.62 for a 24 px cell).
QUADRANTS = [(-1.5, -1.5), (1.5, -1.5), (-1.5, 1.5), (1.5, 1.5)]


@pytest.mark.parametrize(
    ("where", "point"),
    [("vertical border", (448, 200)), ("horizontal border", (200, 448)), ("corner", (448, 448))],
)
def test_a_cell_on_a_core_border_is_kept_once_however_each_roi_sees_it(
    where: str, point: tuple[int, int]
) -> None:
    """Every way the two ROIs at a border (four at a corner) can place the cell's centre on
    either side of it: each ROI's own core, the others', all the same one. The core rule
    keeps the cell twice where each ROI sees it in its own core and drops it where each
    sees it in another's."""
    plan = grid_plan()
    cells = np.array([cell_at(*point)])
    seers = [roi for roi in plan.rois if inside(roi, cells[0])]
    assert len(seers) == (4 if where == "corner" else 2)
    for choice in itertools.product(QUADRANTS, repeat=len(seers)):
        shifts = {roi.index: q for roi, q in zip(seers, choice, strict=True)}
        kept_by = run_dedup(plan, views_of(cells, lambda roi, _, s=shifts: s[roi.index]))
        assert len(kept_by.get(0, [])) == 1, (where, choice, kept_by)


def test_every_cell_is_kept_once_in_a_field_of_jittered_boxes() -> None:
    """Cells of 20 to 40 px all over a 4 x 4 grid, many on core borders and corners; each
    ROI sees each box moved by up to 1.5 px in x and y."""
    plan = grid_plan()
    rng = np.random.default_rng(7)
    borders = [448, 832, 1216]
    points = [(b + rng.uniform(-4, 4), rng.uniform(20, 1516)) for b in borders for _ in range(8)]
    points += [(rng.uniform(20, 1516), b + rng.uniform(-4, 4)) for b in borders for _ in range(8)]
    points += [
        (bx + rng.uniform(-4, 4), by + rng.uniform(-4, 4)) for bx in borders for by in borders
    ]
    points += [tuple(rng.uniform(20, 1516, 2)) for _ in range(60)]
    cells = np.array([cell_at(x, y, rng.uniform(20, 40)) for x, y in points])
    cells = cells[_non_overlapping(cells)]
    jitter = rng.uniform(-1.5, 1.5, size=(len(plan), len(cells), 2))
    kept_by = run_dedup(plan, views_of(cells, lambda roi, i: tuple(jitter[roi.index, i])))
    assert sorted(kept_by) == list(range(len(cells)))
    assert {i: rois for i, rois in kept_by.items() if len(rois) != 1} == {}


def _non_overlapping(cells: np.ndarray) -> np.ndarray:
    """Indices of cells to keep so that no two overlap (IoU 0): distinct cells, as a field."""
    iou = pairwise_iou(cells, cells)
    keep: list[int] = []
    for i in range(len(cells)):
        if all(iou[i, j] == 0 for j in keep):
            keep.append(i)
    return np.array(keep)


def test_cells_clear_of_core_borders_are_kept_as_the_core_rule_keeps_them() -> None:
    """Cells in the overlaps (seen by two or four ROIs) but with every view's centre in the
    same core: the same boxes, scores and indices as the core rule, ROI by ROI."""
    plan = grid_plan()
    rng = np.random.default_rng(3)
    points = [(448 + s * rng.uniform(8, 60), rng.uniform(20, 1516)) for s in (-1, 1) * 6]
    points += [(rng.uniform(20, 1516), 832 + s * rng.uniform(8, 60)) for s in (-1, 1) * 6]
    points += [(1216 + sx * 20, 448 + sy * 20) for sx in (-1, 1) for sy in (-1, 1)]
    points += [tuple(rng.uniform(20, 1516, 2)) for _ in range(30)]
    cells = np.array([cell_at(x, y, 16) for x, y in points])
    cells = cells[_non_overlapping(cells)]
    jitter = rng.uniform(-2, 2, size=(len(plan), len(cells), 2))
    views = views_of(cells, lambda roi, i: tuple(jitter[roi.index, i]))
    dedup = CrossRoiDedup(plan)
    for roi in plan.rois:
        boxes = np.array([box for _, box in views(roi)]).reshape(-1, 4)
        local = boxes - [roi.l0_x, roi.l0_y, roi.l0_x, roi.l0_y]
        det = Detections(local.astype(np.float32), np.full(len(boxes), 0.8, np.float32))
        ours = dedup.select(roi, det, 1.0)
        core = l0_boxes_in_core(det, (roi.l0_x, roi.l0_y), 1.0, roi.l0_core)
        for a, b in zip(ours, core, strict=True):
            np.testing.assert_array_equal(a, b)
    kept_by = run_dedup(plan, views)
    assert all(len(rois) == 1 for rois in kept_by.values()) and len(kept_by) == len(cells)


def test_two_touching_cells_on_a_border_are_both_kept() -> None:
    """Two distinct cells side by side, one centred on the border between ROIs 0 and 1 and
    seen on the other side of it by each, its neighbour touching it: two cells, not one."""
    plan = grid_plan()
    cells = np.array([cell_at(448, 200), cell_at(472, 200)])  # 24 px wide: they touch
    left, right = plan.rois[0], plan.rois[1]
    shifts = {(left.index, 0): (2, 1), (right.index, 0): (-2, -1)}
    shifts |= {(left.index, 1): (-2, 1), (right.index, 1): (2, 0)}
    kept_by = run_dedup(plan, views_of(cells, lambda roi, i: shifts.get((roi.index, i), (0, 0))))
    assert kept_by == {0: [kept_by[0][0]], 1: [kept_by[1][0]]}


def test_remembers_only_the_rows_a_later_roi_can_neighbour() -> None:
    """On a 10 x 10 grid with cells on every border, only the previous and the current row's
    border boxes are held, and only those a later ROI can see."""
    plan = grid_plan(384 * 10 + 128)
    assert (plan.grid_cols, plan.grid_rows) == (10, 10)
    borders = [448 + 384 * k for k in range(9)]
    cells = np.array([cell_at(b, 200 + 384 * r) for b in borders for r in range(10)])
    dedup = CrossRoiDedup(plan)
    views = views_of(cells, lambda roi, i: (0, 0))
    for roi in plan.rois:
        boxes = np.array([box for _, box in views(roi)]).reshape(-1, 4)
        local = boxes - [roi.l0_x, roi.l0_y, roi.l0_x, roi.l0_y]
        dedup.select(
            roi, Detections(local.astype(np.float32), np.ones(len(boxes), np.float32)), 1.0
        )
        held = dedup._border
        assert {row for row, _ in held} <= {roi.row - 1, roi.row}
        assert all(len(boxes) <= 2 for boxes, _ in held.values())


def test_rois_must_come_in_plan_order() -> None:
    plan = grid_plan()
    dedup = CrossRoiDedup(plan)
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    dedup.select(plan.rois[1], empty, 1.0)
    with pytest.raises(ValueError, match="ROI 0 given after ROI 1"):
        dedup.select(plan.rois[0], empty, 1.0)


# --- through the scan ------------------------------------------------------------------


@pytest.mark.slow
def test_scan_keeps_each_border_cell_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ScanPipeline.run` on a synthetic slide, the detector replaced by one that reports
    cells on every inner core border and corner, each ROI seeing a cell's centre 2 px past
    the border, away from its own core (the core rule would drop them all); the detector's
    batches of 8 ROIs hold two grid rows each."""
    from engines.repository import ModelRepository, default_repository_path
    from train.synth import write_synthetic_slide
    from worker.pipeline import scan
    from worker.pipeline.scan import ScanModels, ScanOptions, ScanPipeline
    from worker.wsi.slide import open_slide

    path = tmp_path / "slide.tiff"
    write_synthetic_slide(path, width=1536, height=1536, mpp=0.5, seed=3, cells=100)
    plans: list[RoiPlan] = []

    def plan_and_keep(*args) -> RoiPlan:
        plans.append(plan_rois(*args))
        return plans[-1]

    monkeypatch.setattr(scan, "plan_rois", plan_and_keep)
    rois_done: list[Roi] = []

    def detections(heads: np.ndarray, *_: float) -> list[Detections]:
        (plan,) = plans
        cells = border_cells(plan)
        out = []
        for roi in plan.rois[len(rois_done) : len(rois_done) + len(heads)]:
            rois_done.append(roi)
            seen = [away_from_core(roi, box) for box in cells if inside(roi, box)]
            boxes = np.array(seen, np.float64).reshape(-1, 4) - [roi.l0_x, roi.l0_y] * 2
            out.append(Detections(boxes.astype(np.float32), np.full(len(seen), 0.9, np.float32)))
        return out

    monkeypatch.setattr(scan, "decode_yolo", detections)
    models = ScanModels.load(ModelRepository(default_repository_path()))
    try:
        name = models.detector.config.outputs[0].name
        monkeypatch.setattr(
            models.detector,
            "infer",
            lambda feed: {name: np.zeros((len(next(iter(feed.values()))), 5, 0))},
        )
        written: list = []
        with open_slide(path) as slide:
            ScanPipeline(models, ScanOptions(reader="openslide")).run(
                slide, lambda rois, cells: written.extend(cells)
            )
    finally:
        models.close()
    (plan,) = plans
    assert len(plan) == 16 and len(rois_done) == 16
    truth = border_cells(plan)
    found = np.array([[c.x, c.y, c.x + c.w, c.y + c.h] for c in written], np.float64)
    assert len(truth) == 9 + 2 * 3 * 4
    iou = pairwise_iou(found.reshape(-1, 4), truth)
    assert (iou.max(axis=1) > 0.5).all()
    assert sorted(iou.argmax(axis=1)) == list(range(len(truth)))


def border_cells(plan: RoiPlan) -> np.ndarray:
    """A 32 px cell on every inner core border of each grid row and column (level with the
    ROIs' centres), and on each corner."""
    borders = sorted({r.core_x for r in plan.rois} - {0})
    mids = sorted({r.l0_x + r.l0_w // 2 for r in plan.rois})
    points = [(b, m) for b in borders for m in mids] + [(m, b) for b in borders for m in mids]
    points += [(bx, by) for bx in borders for by in borders]
    return np.array([cell_at(x, y, 32) for x, y in points])


def away_from_core(roi: Roi, box: np.ndarray) -> np.ndarray:
    """`box` moved 2 px in x and y away from the ROI's centre (not at all where level)."""
    x, y, w, h = roi.l0_box
    step = 2 * np.sign((box[:2] + box[2:]) / 2 - [x + w / 2, y + h / 2])
    return box + np.tile(step, 2)
