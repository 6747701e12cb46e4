"""Where to look on a slide: a cellular-area mask and the ROI grid laid over it.

The grid is regular at the detector's resolution: ROIs of `roi_px` with stride
`roi_px - overlap_px`. Each ROI owns a *core*, its stride cell (the ROI less half the
overlap on each inner side; the outermost cores reach the slide's edges), and the cores
partition the slide exactly. A detection is kept by the ROI whose core holds its centre,
except where overlapping ROIs see one cell with boxes whose centres fall in different
cores: near core borders `worker.pipeline.detect.CrossRoiDedup` matches boxes across
neighbouring ROIs so each cell is kept once. Only ROIs whose core meets the mask are kept.

Frames: `l0_` level-0 pixels; mask pixels are `mask_mpp` microns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from worker.wsi.slide import MPP_TOLERANCE, Slide, SlideInfo, coarse_slide_warning, level_for_mpp

logger = logging.getLogger(__name__)

# Largest region read at once while building the mask, in level pixels per side: keeps
# memory bounded (~50 MB) even on a single-level slide.
_MASK_READ_LVL_PX = 4096


@dataclass(frozen=True, slots=True)
class TissueMask:
    """Cellular area of a slide at low resolution.

    Attributes:
        mask: (rows, cols) bool, True where there are cells; pixel (r, c) covers level-0
            [c * l0_per_px, (c + 1) * l0_per_px) x [r * l0_per_px, (r + 1) * l0_per_px).
        mpp: microns per mask pixel.
        l0_per_px: level-0 pixels per mask pixel (the mask's downsample).
        threshold_od: the optical-density threshold used.
    """

    mask: np.ndarray
    mpp: float
    l0_per_px: float
    threshold_od: float

    @property
    def fraction(self) -> float:
        """Fraction of mask pixels that are cellular."""
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass(frozen=True, slots=True)
class Roi:
    """One region of interest: a square of `roi_px` at the target mpp.

    Attributes:
        index: dense position in the plan, 0..n-1, row-major; stable for a given slide
            and geometry (it is the unit of progress and retry).
        row, col: position in the full grid (before filtering by the mask).
        l0_x, l0_y, l0_w, l0_h: the ROI in level-0 pixels; may run past the right and
            bottom edges of the slide (read as white).
        core_x, core_y, core_w, core_h: the ROI's core in level-0 pixels, inside the
            slide; cores of all grid cells partition the slide.
    """

    index: int
    row: int
    col: int
    l0_x: int
    l0_y: int
    l0_w: int
    l0_h: int
    core_x: int
    core_y: int
    core_w: int
    core_h: int

    @property
    def l0_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the ROI in level-0 pixels."""
        return (self.l0_x, self.l0_y, self.l0_w, self.l0_h)

    @property
    def l0_core(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the core in level-0 pixels."""
        return (self.core_x, self.core_y, self.core_w, self.core_h)

    def core_contains(self, l0_x: float, l0_y: float) -> bool:
        """Whether a level-0 point lies in the core (half-open on the right and bottom)."""
        return (
            self.core_x <= l0_x < self.core_x + self.core_w
            and self.core_y <= l0_y < self.core_y + self.core_h
        )


@dataclass(frozen=True, slots=True)
class RoiPlan:
    """The ROIs to scan on one slide, and the geometry they were laid out with.

    Attributes:
        rois: kept ROIs, `index` 0..n-1 in row-major grid order.
        target_mpp: microns per ROI pixel wanted by the detector.
        roi_px: ROI side in target pixels.
        overlap_px: overlap between neighbouring ROIs in target pixels.
        level: the level ROIs are read from (see `level_for_mpp`).
        l0_per_px: level-0 pixels per ROI pixel (level downsample x remaining scale).
        mpp: microns per ROI pixel as delivered: the level's own mpp where it is within
            tolerance (2 %) of the target (read without resampling), else `target_mpp`
            exactly (resampled). Sizes in ROI pixels (the cell crop field) follow it.
        grid_cols, grid_rows: size of the full grid.
        warnings: sentences about the slide a person should see with its result (a
            slide much coarser than the models expect).
    """

    rois: tuple[Roi, ...]
    target_mpp: float
    roi_px: int
    overlap_px: int
    level: int
    l0_per_px: float
    mpp: float
    grid_cols: int
    grid_rows: int
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rois)


def cellular_mask(
    slide: Slide,
    mask_mpp: float = 16.0,
    od_floor: float = 0.05,
    min_object_um2: float = 300.0,
    dilate_um: float = 64.0,
) -> TissueMask:
    """Find the parts of a slide that hold cells, at low resolution.

    Optical density (max over R, G, B of -log10(I / 255)) is thresholded at Otsu's
    threshold, but never below `od_floor`, so a slide of bare glass (where Otsu would
    split noise) yields an empty mask. Objects smaller than `min_object_um2` go (by default
    only lone mask pixels: an isolated abnormal cell must not be dropped, and a speck of
    dust costs one ROI); the rest is dilated by `dilate_um` so cells at the edge of a
    cluster are not cut off.

    Args:
        slide: the open slide.
        mask_mpp: microns per mask pixel.
        od_floor: lowest optical density counted as cellular (blank glass is ~0.02-0.04).
        min_object_um2: smallest kept object, square microns.
        dilate_um: dilation radius, microns.

    Returns:
        The mask and its scale.
    """
    if not mask_mpp > 0:
        raise ValueError(f"mask_mpp must be > 0, got {mask_mpp}")
    info = slide.info
    l0_per_px = mask_mpp / info.mpp
    rgb = _read_low_res(slide, l0_per_px)
    od = _optical_density(rgb)
    if od.size == 0:
        raise ValueError(f"slide {info.path} is empty at {mask_mpp} mpp")
    otsu = _otsu_threshold(od)
    threshold = max(otsu, od_floor)
    mask = _remove_small_objects(od > threshold, min_object_um2 / mask_mpp**2)
    radius = round(dilate_um / mask_mpp)
    if radius > 0 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    logger.debug(
        "mask %dx%d at %.1f mpp: OD threshold %.3f (otsu %.3f), %.1f%% cellular",
        mask.shape[1],
        mask.shape[0],
        mask_mpp,
        threshold,
        otsu,
        100 * mask.mean(),
    )
    return TissueMask(mask=mask, mpp=mask_mpp, l0_per_px=l0_per_px, threshold_od=threshold)


def _read_low_res(slide: Slide, l0_per_px: float) -> np.ndarray:
    """The whole slide at `l0_per_px` level-0 pixels per output pixel, RGB on white.

    Read in pieces of at most `_MASK_READ_LVL_PX` level pixels a side, each shrunk with
    INTER_AREA, so memory stays bounded even when only level 0 exists.
    """
    info = slide.info
    cols = max(1, math.ceil(info.width / l0_per_px))
    rows = max(1, math.ceil(info.height / l0_per_px))
    choice = level_for_mpp(info, info.mpp * l0_per_px, tolerance=0.0)
    ds = choice.downsample
    lvl_per_px = l0_per_px / ds
    chunk = max(1, int(_MASK_READ_LVL_PX / lvl_per_px))
    out = np.empty((rows, cols, 3), np.uint8)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        for c0 in range(0, cols, chunk):
            c1 = min(cols, c0 + chunk)
            lvl_x0, lvl_y0 = round(c0 * lvl_per_px), round(r0 * lvl_per_px)
            lvl_w = max(1, round(c1 * lvl_per_px) - lvl_x0)
            lvl_h = max(1, round(r1 * lvl_per_px) - lvl_y0)
            piece = slide.read_region(
                (round(lvl_x0 * ds), round(lvl_y0 * ds)), choice.level, (lvl_w, lvl_h)
            )
            out[r0:r1, c0:c1] = cv2.resize(piece, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
    return out


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Max over channels of -log10(I / 255), I clipped to >= 1; (H, W) float32."""
    lut = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
    return lut[rgb].max(axis=2)


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an array (the value maximising between-class variance)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _remove_small_objects(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected objects with fewer than `min_area_px` pixels."""
    if min_area_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels]


def plan_rois(
    info: SlideInfo,
    mask: TissueMask,
    target_mpp: float,
    roi_px: int = 512,
    overlap_px: int = 128,
    tolerance: float = MPP_TOLERANCE,
) -> RoiPlan:
    """Lay a regular ROI grid over the slide and keep the ROIs whose core meets the mask.

    Args:
        info: the slide.
        mask: its cellular mask (`cellular_mask`).
        target_mpp: microns per ROI pixel the detector wants.
        roi_px: ROI side in target pixels.
        overlap_px: overlap of neighbouring ROIs in target pixels, even, < roi_px.
        tolerance: relative mpp tolerance, as in `level_for_mpp` (the reader must use
            the same value): a level this close to `target_mpp` is read as is, any other
            is resampled to exactly `target_mpp`.

    Returns:
        The plan; ROIs in row-major order with dense indices.

    Raises:
        ValueError: bad geometry.
    """
    if roi_px <= 0:
        raise ValueError(f"roi_px must be > 0, got {roi_px}")
    if not 0 <= overlap_px < roi_px:
        raise ValueError(f"overlap_px must be in [0, roi_px), got {overlap_px} for {roi_px}")
    if overlap_px % 2:
        raise ValueError(f"overlap_px must be even (half goes to each side), got {overlap_px}")
    choice = level_for_mpp(info, target_mpp, tolerance)
    f = choice.l0_per_px
    stride = roi_px - overlap_px
    half = overlap_px // 2
    l0_roi = round(roi_px * f)
    col_bounds = _core_bounds(info.width, f, roi_px, stride, half)
    row_bounds = _core_bounds(info.height, f, roi_px, stride, half)
    grid_cols, grid_rows = len(col_bounds) - 1, len(row_bounds) - 1
    m = mask.mask
    d = mask.l0_per_px
    rois: list[Roi] = []
    for row in range(grid_rows):
        cy0, cy1 = row_bounds[row], row_bounds[row + 1]
        my0, my1 = int(cy0 // d), min(m.shape[0], math.ceil(cy1 / d))
        for col in range(grid_cols):
            cx0, cx1 = col_bounds[col], col_bounds[col + 1]
            mx0, mx1 = int(cx0 // d), min(m.shape[1], math.ceil(cx1 / d))
            if cy1 <= cy0 or cx1 <= cx0 or not m[my0:my1, mx0:mx1].any():
                continue
            rois.append(
                Roi(
                    index=len(rois),
                    row=row,
                    col=col,
                    l0_x=round(col * stride * f),
                    l0_y=round(row * stride * f),
                    l0_w=l0_roi,
                    l0_h=l0_roi,
                    core_x=cx0,
                    core_y=cy0,
                    core_w=cx1 - cx0,
                    core_h=cy1 - cy0,
                )
            )
    logger.debug(
        "ROI grid %dx%d at %.3f mpp (level %d, scale %.3f): %d of %d kept",
        grid_cols,
        grid_rows,
        target_mpp,
        choice.level,
        choice.scale,
        len(rois),
        grid_cols * grid_rows,
    )
    warning = coarse_slide_warning(info, target_mpp)
    if warning:
        logger.warning("%s", warning)
    return RoiPlan(
        rois=tuple(rois),
        target_mpp=target_mpp,
        roi_px=roi_px,
        overlap_px=overlap_px,
        level=choice.level,
        l0_per_px=f,
        mpp=choice.mpp,
        grid_cols=grid_cols,
        grid_rows=grid_rows,
        warnings=(warning,) if warning else (),
    )


def _core_bounds(l0_size: int, f: float, roi_px: int, stride: int, half: int) -> list[int]:
    """Core boundaries along one axis, level-0 px: [0, b_1, ..., b_{n-1}, l0_size].

    n is the fewest ROIs whose last one reaches the slide's edge; inner boundary c sits
    half an overlap into ROI c: round((c * stride + half) * f), which lies inside both
    ROI c - 1 and ROI c.
    """
    size_px = l0_size / f
    n = max(1, math.ceil((size_px - roi_px) / stride) + 1) if size_px > roi_px else 1
    inner = [round((c * stride + half) * f) for c in range(1, n)]
    return [0, *[min(b, l0_size) for b in inner], l0_size]
