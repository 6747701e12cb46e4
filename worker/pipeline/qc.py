"""Slide QC: focus, colour and cellular area, measured on the ROIs a scan reads anyway.

The measures and the flags they raise travel with the slide's result; they never change
its category. Thresholds live in one file, `qc_thresholds.yaml` beside this module, each
with its meaning and the data it was set on.

Focus. Per ROI, on its strong edges only (so glass neither blurs nor sharpens an ROI): the
energy of the grey image's gradient at a fine scale over that at a coarse scale. An edge
blurred by a Gaussian of sigma b gives sqrt((b² + c²) / (b² + f²)) for fine and coarse
scales f and c: about 2 when sharp, falling to 1 as the blur grows, whatever the contrast.
An ROI with too few edges (mostly glass) is not measured and never counts as blurred.

Colour. Nuclei are a slide's compact dark blobs, and what they absorb over their
surroundings (each channel's optical density against a morphological closing) is the
haematoxylin of every Pap (and H&E) stain: all three channels absorb, blue the least.
- no colour: the blobs absorb every channel alike (a greyscale image);
- misdecoded: green and blue hardly absorb where red does (Y'CbCr planes read as RGB);
- swapped: the darkest blobs absorb more blue than red (red and blue exchanged).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from worker.pipeline.plan import Roi, RoiPlan, TissueMask

THRESHOLDS_PATH = Path(__file__).with_name("qc_thresholds.yaml")

# log10(v + 1) for v in 0..255: optical densities from uint8 without a division.
_LOG_LUT = np.log10(np.arange(256, dtype=np.float32) + 1.0).astype(np.float32)
_CHANNEL_SUM = np.ones((1, 3), np.float32)  # cv2.transform: R + G + B


@dataclass(frozen=True)
class FocusThresholds:
    """The `focus` section of `qc_thresholds.yaml`."""

    fine_sigma_um: float
    coarse_sigma_um: float
    edge_floor_per_um: float
    min_edge_fraction: float
    blurred_below: float
    blurred_fraction: float


@dataclass(frozen=True)
class ColourThresholds:
    """The `colour` section of `qc_thresholds.yaml`."""

    analysis_mpp: float
    blob_kernel_um: float
    blob_contrast: float
    nuclear_excess_od: float
    min_nuclear_weight: float
    no_colour_below: float
    misdecoded_below: float
    swap_excess_od: float
    swap_hue_margin: float
    min_swap_weight: float
    swapped_below: float


@dataclass(frozen=True)
class QcThresholds:
    """Every QC threshold, as `qc_thresholds.yaml` sets them (see its comments)."""

    focus: FocusThresholds
    colour: ColourThresholds
    min_cellular_area_mm2: float

    @classmethod
    def load(cls, path: str | Path | None = None) -> QcThresholds:
        """Read the thresholds file (default: the one beside this module).

        Raises:
            ValueError: a section or key is missing, unknown or not a number.
        """
        path = Path(path) if path is not None else THRESHOLDS_PATH
        raw = yaml.safe_load(path.read_text()) or {}
        _check_keys(raw, {"focus", "colour", "area"}, str(path))
        area = raw["area"] or {}
        _check_keys(area, {"min_cellular_area_mm2"}, f"{path}: area")
        return cls(
            focus=_section(FocusThresholds, raw["focus"], f"{path}: focus"),
            colour=_section(ColourThresholds, raw["colour"], f"{path}: colour"),
            min_cellular_area_mm2=_number(area["min_cellular_area_mm2"], f"{path}: area"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_keys(raw: Any, expected: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if set(raw) != expected:
        missing, unknown = expected - set(raw), set(raw) - expected
        raise ValueError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _section(kind: type, raw: Any, where: str):
    names = {f.name for f in fields(kind)}
    _check_keys(raw, names, where)
    return kind(**{name: _number(raw[name], f"{where}.{name}") for name in names})


@dataclass(frozen=True)
class RoiColour:
    """What one ROI's nuclear blobs absorb, as sums that add up over a slide.

    Attributes:
        excess: summed excess OD per channel (R, G, B) of blob pixels whose excess over
            the channels is at least `nuclear_excess_od`.
        spread: summed (max - min over channels) excess of the same pixels.
        swap_blue, swap_red, swap_total: weights (summed excess) of the darkest blob
            pixels (at least `swap_excess_od`) absorbing clearly more red than blue
            (bluish), clearly more blue than red, and in all.
    """

    excess: tuple[float, float, float]
    spread: float
    swap_blue: float
    swap_red: float
    swap_total: float


def roi_sharpness(grey: np.ndarray, mpp: float, t: FocusThresholds) -> float | None:
    """Gradient-energy ratio (fine over coarse scale) on the strong edges of a grey image
    at `mpp`; None when edges cover less than `min_edge_fraction` of it."""
    grey = grey.astype(np.float32, copy=False)
    fine = cv2.GaussianBlur(grey, (0, 0), t.fine_sigma_um / mpp)
    coarse = cv2.GaussianBlur(grey, (0, 0), t.coarse_sigma_um / mpp)
    fine_gx, fine_gy = _sobel(fine)
    coarse_gx, coarse_gy = _sobel(coarse)
    coarse_sq = coarse_gx * coarse_gx + coarse_gy * coarse_gy
    # A 3x3 Sobel is 8x the gradient per pixel; the floor is in grey levels per µm.
    floor = (8.0 * t.edge_floor_per_um * mpp) ** 2
    edges = coarse_sq > floor
    if edges.sum() < max(1.0, t.min_edge_fraction * grey.size):
        return None
    fine_sq = fine_gx * fine_gx + fine_gy * fine_gy
    return float(math.sqrt(fine_sq[edges].sum() / coarse_sq[edges].sum()))


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)


def roi_colour(rgb: np.ndarray, mpp: float, t: ColourThresholds) -> RoiColour:
    """The nuclear-absorption sums of one RGB uint8 image at `mpp` (see `RoiColour`)."""
    scale = mpp / t.analysis_mpp
    if scale < 1.0:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    side = max(3, round(t.blob_kernel_um / max(mpp, t.analysis_mpp)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    # The closing paints each blob over with its surroundings (never darker, per channel).
    surround = cv2.morphologyEx(rgb, cv2.MORPH_CLOSE, kernel)
    contrast = cv2.transform(cv2.subtract(surround, rgb).astype(np.float32), _CHANNEL_SUM)
    excess = cv2.LUT(surround, _LOG_LUT) - cv2.LUT(rgb, _LOG_LUT)
    np.maximum(excess, 0.0, out=excess)
    total = cv2.transform(excess, _CHANNEL_SUM)
    blob = contrast > 3 * t.blob_contrast
    nuclear = excess[blob & (total >= t.nuclear_excess_od)]  # (n, 3)
    dark = excess[blob & (total >= t.swap_excess_od)]
    dark_total = dark.sum(axis=1)
    hue = (dark[:, 0] - dark[:, 2]) / np.maximum(dark_total, 1e-6)
    return RoiColour(
        excess=tuple(float(v) for v in nuclear.sum(axis=0)),
        spread=float((nuclear.max(axis=1) - nuclear.min(axis=1)).sum()) if len(nuclear) else 0.0,
        swap_blue=float(dark_total[hue > t.swap_hue_margin].sum()),
        swap_red=float(dark_total[hue < -t.swap_hue_margin].sum()),
        swap_total=float(dark_total.sum()),
    )


@dataclass(frozen=True)
class ColourVerdict:
    """The slide's colour check: `ok` False only for a flagged slide."""

    ok: bool
    code: str  # "ok", "undecided", "no_colour", "misdecoded", "swapped"
    reason: str
    nuclear_weight: float
    nuclear_chroma: float | None
    absorption_breadth: float | None
    swap_balance: float | None


def judge_colour(
    excess: np.ndarray,
    spread: float,
    swap: tuple[float, float, float],
    t: ColourThresholds,
    area_scale: float = 1.0,
) -> ColourVerdict:
    """Decide from summed nuclear absorption (`RoiColour` sums over the slide).

    `area_scale` turns pixel weights into µm² at `analysis_mpp` (1 where pixels are that
    size already)."""
    excess = np.asarray(excess, np.float64)
    weight = float(excess.sum()) * area_scale
    swap_blue, swap_red, swap_total = swap
    if weight < t.min_nuclear_weight:
        return ColourVerdict(
            True,
            "undecided",
            "Too few dark nuclei to judge the colours.",
            weight,
            None,
            None,
            None,
        )
    chroma = spread / float(excess.sum())
    red = max(float(excess[0]), 1e-12)
    breadth = math.sqrt(max(float(excess[1]), 0.0) / red * max(float(excess[2]), 0.0) / red)
    balance = (swap_blue - swap_red) / swap_total if swap_total * area_scale > 0 else None
    enough_dark = swap_total * area_scale >= t.min_swap_weight
    measures = (weight, round(chroma, 4), round(breadth, 4), _round(balance, 4))
    if chroma < t.no_colour_below:
        return ColourVerdict(
            False,
            "no_colour",
            "No colour: nuclei absorb every channel alike, as in a greyscale scan.",
            *measures,
        )
    if breadth < t.misdecoded_below:
        return ColourVerdict(
            False,
            "misdecoded",
            "Colours look misdecoded: green and blue hardly absorb where nuclei are dark, as "
            "when Y'CbCr is read as RGB.",
            *measures,
        )
    if enough_dark and balance is not None and balance < t.swapped_below:
        return ColourVerdict(
            False,
            "swapped",
            "Colours look swapped: the darkest nuclei absorb more blue than red, as when red "
            "and blue are exchanged.",
            *measures,
        )
    return ColourVerdict(True, "ok", "Nuclei absorb as a haematoxylin stain does.", *measures)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class QcResult:
    """A slide's QC: flags (one sentence each), what they were judged on, the thresholds.

    Attributes:
        flags: one-sentence messages, one per raised flag.
        focus_flag, colour_flag, no_colour_flag, low_area_flag: the flags raised.
        focus_blurred_fraction: blurred ROIs over measured ROIs (None when none measured).
        median_sharpness: median over measured ROIs (None when none measured).
        rois, rois_measured, rois_blurred: ROIs added, measured (not mostly glass), blurred.
        colour_ok, colour_code, colour_reason: the colour check (`ColourVerdict`).
        nuclear_weight, nuclear_chroma, absorption_breadth, swap_balance: its measures.
        cellular_area_mm2: as given to `SlideQc.result` (None when not given).
        roi_sharpness: per ROI index, None where not measured (for `focus_map_png`).
        thresholds: the thresholds used.
    """

    flags: list[str]
    focus_flag: bool
    colour_flag: bool
    no_colour_flag: bool
    low_area_flag: bool
    focus_blurred_fraction: float | None
    median_sharpness: float | None
    rois: int
    rois_measured: int
    rois_blurred: int
    colour_ok: bool
    colour_code: str
    colour_reason: str
    nuclear_weight: float
    nuclear_chroma: float | None
    absorption_breadth: float | None
    swap_balance: float | None
    cellular_area_mm2: float | None
    roi_sharpness: list[float | None]
    thresholds: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain floats, ints, strings, lists and dicts)."""
        return asdict(self)


class SlideQc:
    """Accumulates QC over a scan's ROIs in plan order; `result()` judges the slide.

    Keeps a float per ROI (its sharpness) and a few sums, whatever the slide's size.

    Args:
        roi_mpp: microns per ROI pixel as delivered (`RoiPlan.mpp`).
        thresholds: default `QcThresholds.load()`.
    """

    def __init__(self, roi_mpp: float, thresholds: QcThresholds | None = None) -> None:
        if not roi_mpp > 0:
            raise ValueError(f"roi_mpp must be > 0, got {roi_mpp}")
        self.roi_mpp = float(roi_mpp)
        self.thresholds = thresholds or QcThresholds.load()
        self._sharpness = array("f")
        self._added = 0
        self._excess = np.zeros(3, np.float64)
        self._spread = 0.0
        self._swap = np.zeros(3, np.float64)  # blue, red, total

    def add_roi(self, index: int, image: np.ndarray, roi: Roi | None = None) -> None:
        """Measure one ROI: (H, W, 3) uint8 RGB at `roi_mpp`, cut to its core when `roi`
        is given (so overlaps are not counted twice and white beyond the slide is left out).
        """
        self._added += 1
        core = core_of(image, roi) if roi is not None else image
        if core.size == 0:
            return
        grey = cv2.cvtColor(np.ascontiguousarray(core), cv2.COLOR_RGB2GRAY)
        sharpness = roi_sharpness(grey, self.roi_mpp, self.thresholds.focus)
        if index >= len(self._sharpness):
            self._sharpness.extend([math.nan] * (index + 1 - len(self._sharpness)))
        self._sharpness[index] = math.nan if sharpness is None else sharpness
        colour = roi_colour(np.ascontiguousarray(core), self.roi_mpp, self.thresholds.colour)
        self._excess += colour.excess
        self._spread += colour.spread
        self._swap += (colour.swap_blue, colour.swap_red, colour.swap_total)

    @property
    def sharpness(self) -> np.ndarray:
        """Per ROI index, NaN where not measured (or not added)."""
        return np.asarray(self._sharpness, np.float64)

    def result(self, cellular_area_mm2: float | None = None) -> QcResult:
        """The slide's QC from everything added so far.

        Args:
            cellular_area_mm2: the slide's cellular area (`cellular_area_mm2` of its mask,
                or `planned_area_mm2`), flagged when below the threshold.
        """
        t = self.thresholds
        values = self.sharpness
        measured = values[~np.isnan(values)]
        blurred = int((measured < t.focus.blurred_below).sum())
        fraction = blurred / len(measured) if len(measured) else None
        focus_flag = fraction is not None and fraction > t.focus.blurred_fraction
        area_scale = (self._analysis_mpp()) ** 2
        colour = judge_colour(
            self._excess, self._spread, tuple(self._swap), t.colour, area_scale=area_scale
        )
        low_area = cellular_area_mm2 is not None and cellular_area_mm2 < t.min_cellular_area_mm2
        flags = []
        if focus_flag:
            flags.append(
                f"Out of focus: {blurred} of {len(measured)} measured ROIs "
                f"({100 * fraction:.0f} %) are blurred."
            )
        if not colour.ok:
            flags.append(colour.reason)
        if low_area:
            flags.append(
                f"Little to screen: only {cellular_area_mm2:.2f} mm² of the slide holds cells."
            )
        return QcResult(
            flags=flags,
            focus_flag=focus_flag,
            colour_flag=colour.code in ("misdecoded", "swapped"),
            no_colour_flag=colour.code == "no_colour",
            low_area_flag=low_area,
            focus_blurred_fraction=_round(fraction, 4),
            median_sharpness=_round(float(np.median(measured)) if len(measured) else None, 4),
            rois=self._added,
            rois_measured=int(len(measured)),
            rois_blurred=blurred,
            colour_ok=colour.ok,
            colour_code=colour.code,
            colour_reason=colour.reason,
            nuclear_weight=round(colour.nuclear_weight, 2),
            nuclear_chroma=colour.nuclear_chroma,
            absorption_breadth=colour.absorption_breadth,
            swap_balance=colour.swap_balance,
            cellular_area_mm2=_round(cellular_area_mm2, 4),
            roi_sharpness=[None if math.isnan(v) else round(float(v), 4) for v in values],
            thresholds=t.to_dict(),
        )

    def _analysis_mpp(self) -> float:
        """Microns per pixel the colour sums were taken at."""
        return max(self.roi_mpp, self.thresholds.colour.analysis_mpp)


def core_of(image: np.ndarray, roi: Roi) -> np.ndarray:
    """The part of an ROI image inside its core (level-0 box `roi.l0_core`)."""
    per_l0 = image.shape[1] / roi.l0_w
    x0 = round((roi.core_x - roi.l0_x) * per_l0)
    y0 = round((roi.core_y - roi.l0_y) * per_l0)
    x1 = round((roi.core_x + roi.core_w - roi.l0_x) * per_l0)
    y1 = round((roi.core_y + roi.core_h - roi.l0_y) * per_l0)
    return image[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]


def cellular_area_mm2(mask: TissueMask) -> float:
    """Area of a slide's cellular mask, mm²."""
    return float(mask.mask.sum()) * mask.mpp**2 / 1e6


def planned_area_mm2(plan: RoiPlan) -> float:
    """Area of the kept ROIs' cores (the slide area actually scanned), mm²."""
    l0_mpp = plan.mpp / plan.l0_per_px
    return sum(r.core_w * r.core_h for r in plan.rois) * l0_mpp**2 / 1e6


# Map colours, BGR: blurred ROIs in a red nobody misses, sharp ones from yellow-green to
# green as sharpness grows, unmeasured ROIs pale grey, grid cells not scanned white.
_BLURRED_BGR = (40, 40, 220)
_UNMEASURED_BGR = (215, 215, 215)
_SHARP_LOW_BGR = np.array([60, 210, 200], np.float32)
_SHARP_HIGH_BGR = np.array([60, 150, 20], np.float32)
_CAPTION_PX = 18
_MIN_MAP_WIDTH_PX = 300


def focus_map_png(
    source: QcResult | SlideQc, plan: RoiPlan, path: str | Path, max_side_px: int = 512
) -> Path:
    """Draw per-ROI sharpness on the ROI grid as a small PNG with a one-line caption.

    Blurred ROIs are red, sharp ones yellow-green (just sharp enough) to green (sharpest),
    ROIs too empty to measure pale grey, grid cells without an ROI white. Returns `path`.
    """
    if isinstance(source, SlideQc):
        values = source.sharpness
        thresholds = source.thresholds.focus
    else:
        values = np.array([math.nan if v is None else v for v in source.roi_sharpness])
        thresholds = FocusThresholds(**source.thresholds["focus"])
    low, high = thresholds.blurred_below, 2.0
    cell = max(1, min(32, max_side_px // max(plan.grid_cols, plan.grid_rows, 1)))
    grid_h, grid_w = plan.grid_rows * cell, plan.grid_cols * cell
    image = np.full((grid_h + _CAPTION_PX, max(grid_w, _MIN_MAP_WIDTH_PX), 3), 255, np.uint8)
    blurred = measured = 0
    for roi in plan.rois:
        value = values[roi.index] if roi.index < len(values) else math.nan
        if math.isnan(value):
            colour = _UNMEASURED_BGR
        else:
            measured += 1
            if value < low:
                blurred += 1
                colour = _BLURRED_BGR
            else:
                w = min(1.0, (value - low) / (high - low))
                colour = tuple(int(c) for c in (1 - w) * _SHARP_LOW_BGR + w * _SHARP_HIGH_BGR)
        y, x = roi.row * cell, roi.col * cell
        image[y : y + cell, x : x + cell] = colour
        if cell >= 4:  # a hairline between ROIs keeps the grid readable
            image[y + cell - 1, x : x + cell] = 255
            image[y : y + cell, x + cell - 1] = 255
    caption = f"{blurred}/{measured} ROIs blurred (red); grey: too empty"
    cv2.putText(
        image, caption, (3, grid_h + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1,
        cv2.LINE_AA,
    )  # fmt: skip
    path = Path(path)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write the focus map to {path}")
    return path
