"""Synthetic training material from `train.synth`: rendered fields, detector ROIs, cell crops.

A *field* is a square synthetic slide (default 2048 px at 0.5 mpp) planned with
`plan_cells` and rendered whole with `render_region`, then passed through JPEG (as the
slides `write_synthetic_slide` writes are JPEG-tiled). Its cellular area is an ellipse, so
its corners are empty glass: windows there are the empty-background ROIs. Debris (dots,
neutrophil-like clusters, fragments) is planned with the cells and carries no box, so the
detector learns not to fire on it.

Train and held-out fields come from disjoint seed ranges (`FieldSpec.seed`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engines.preprocess import cut_crops
from train.data.isbi import BoxedImage
from train.synth import CELL_CLASSES, Debris, SynthCell, plan_cells, render_region
from train.synth.cells import cell_geometry

logger = logging.getLogger(__name__)

# Class mixes the fields are drawn from: NILM-only and NILM+one-abnormal fields make
# ROIs of every worst-class label for the ROI classifier; balanced fields even out the
# cell classes for the cell classifier.
CLASS_MIXES: tuple[dict[str, float], ...] = (
    {"NILM": 0.6, "LSIL": 0.2, "HSIL": 0.2},
    {"NILM": 0.34, "LSIL": 0.33, "HSIL": 0.33},
    {"NILM": 1.0},
    {"NILM": 0.6, "LSIL": 0.4},
    {"NILM": 0.75, "HSIL": 0.25},
    {"NILM": 0.2, "LSIL": 0.4, "HSIL": 0.4},
)
HELD_OUT_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class FieldSpec:
    """How to make one field.

    Attributes:
        seed: Slide seed (plans and renders the field).
        size_px: Field side, px at `mpp`.
        n_cells: Cells planned in its cellular ellipse.
        class_mix: Class weights (see `train.synth.plan_cells`).
        jpeg_quality: JPEG quality applied after rendering (None: none).
        mpp: Microns per pixel.
        debris_per_cell: Debris pieces planned per cell (the slide writer's default is 1).
    """

    seed: int
    size_px: int
    n_cells: int
    class_mix: dict[str, float]
    jpeg_quality: int | None
    mpp: float = 0.5
    debris_per_cell: float = 1.0


@dataclass(frozen=True)
class SynthField:
    """A rendered field and its truth (boxes in field px)."""

    spec: FieldSpec
    image: np.ndarray
    cells: list[SynthCell]
    debris: list[Debris]


def field_specs(
    n_fields: int,
    seed: int,
    held_out: bool,
    size_px: int = 2048,
    mpp: float = 0.5,
    density_range: tuple[int, int] = (30, 150),
    debris_range: tuple[float, float] = (1.0, 1.0),
) -> list[FieldSpec]:
    """Draw `n_fields` field specs: cell counts in `density_range` (30 per 2048 px field is
    about the default synthetic slide's density), debris per cell uniform in
    `debris_range`, class mixes cycled from `CLASS_MIXES`, JPEG quality 80-95 for training
    fields and 90 (the slide writer's default) held out.
    """
    rng = np.random.default_rng((seed, 0xF1E1D, int(held_out)))
    base = seed * 10_000 + (HELD_OUT_SEED_OFFSET if held_out else 0)
    scale = (size_px / 2048) ** 2
    specs = []
    for i in range(n_fields):
        n_cells = int(rng.integers(density_range[0], density_range[1] + 1) * scale)
        mix = CLASS_MIXES[(i + int(held_out)) % len(CLASS_MIXES)]
        quality = 90 if held_out else int(rng.integers(80, 96))
        debris = round(float(rng.uniform(*debris_range)), 2)
        specs.append(FieldSpec(base + i, size_px, n_cells, dict(mix), quality, mpp, debris))
    return specs


def render_field(spec: FieldSpec) -> SynthField:
    """Plan and render one field (HxWx3 uint8 RGB), JPEG round-tripped if asked."""
    cells, debris = plan_cells(
        spec.size_px,
        spec.size_px,
        spec.mpp,
        spec.n_cells,
        spec.seed,
        spec.class_mix,
        debris_per_cell=spec.debris_per_cell,
    )
    image = render_region(cells, debris, 0, 0, spec.size_px, spec.size_px, spec.mpp, spec.seed)
    if spec.jpeg_quality is not None:
        image = jpeg_roundtrip(image, spec.jpeg_quality)
    return SynthField(spec, image, cells, debris)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG (4:2:0, as tiled slide writers do)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def nucleus_boxes_xyxy(cells: Sequence[SynthCell]) -> np.ndarray:
    """[N, 4] nucleus boxes (x0, y0, x1, y1), level-0 px."""
    return np.array([(c.nx, c.ny, c.nx + c.nw, c.ny + c.nh) for c in cells], np.float32).reshape(
        -1, 4
    )


def nucleus_centres(cells: Sequence[SynthCell]) -> np.ndarray:
    """[N, 2] nucleus-box centres (x, y), level-0 px."""
    b = nucleus_boxes_xyxy(cells)
    return (b[:, :2] + b[:, 2:]) / 2


def window_truth(
    cells: Sequence[SynthCell], x0: int, y0: int, size_px: int, min_visible: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus boxes in a window, in window px: (kept [K, 4], ignored [I, 4]).

    Kept boxes have at least `min_visible` of their area inside (clipped to the window);
    nuclei cut more than that are returned as ignored (not scored either way).
    """
    b = nucleus_boxes_xyxy(cells) - np.array([x0, y0, x0, y0], np.float32)
    clipped = np.clip(b, 0, size_px)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    kept = inside >= min_visible * np.maximum(area, 1e-6)
    ignored = (inside > 0) & ~kept
    return clipped[kept], clipped[ignored]


def cells_in_window(cells: Sequence[SynthCell], x0: int, y0: int, size_px: int) -> np.ndarray:
    """Indices of cells whose nucleus centre lies inside the window."""
    c = nucleus_centres(cells)
    inside = (c[:, 0] >= x0) & (c[:, 0] < x0 + size_px) & (c[:, 1] >= y0) & (c[:, 1] < y0 + size_px)
    return np.flatnonzero(inside)


def random_windows(
    field: SynthField, n: int, size_px: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """`n` random window origins (x0, y0) inside the field."""
    hi = field.image.shape[0] - size_px
    return [(int(rng.integers(0, hi + 1)), int(rng.integers(0, hi + 1))) for _ in range(n)]


def detector_rois(
    field: SynthField,
    n: int,
    size_px: int,
    rng: np.random.Generator,
    focus: Sequence[int] = (),
) -> tuple[list[BoxedImage], list[np.ndarray]]:
    """ROIs of a field with their nucleus boxes and ignored boxes.

    Args:
        field: The rendered field.
        n: Random ROIs.
        size_px: ROI side, px.
        rng: Random generator.
        focus: Indices of cells to add one more ROI around each (the cell at a random
            place in it): hard examples, e.g. binucleate koilocytes.
    """
    windows = random_windows(field, n, size_px, rng)
    hi = field.image.shape[0] - size_px
    for i in focus:
        cx, cy = nucleus_centres([field.cells[i]])[0]
        x0 = int(np.clip(cx - rng.uniform(0.15, 0.85) * size_px, 0, hi))
        y0 = int(np.clip(cy - rng.uniform(0.15, 0.85) * size_px, 0, hi))
        windows.append((x0, y0))
    rois, ignores = [], []
    for x0, y0 in windows:
        kept, ignored = window_truth(field.cells, x0, y0, size_px)
        image = np.ascontiguousarray(field.image[y0 : y0 + size_px, x0 : x0 + size_px])
        rois.append(BoxedImage(f"synth{field.spec.seed}@{x0},{y0}", image, kept))
        ignores.append(ignored)
    return rois, ignores


def binucleate_cells(field: SynthField) -> list[int]:
    """Indices of the field's binucleate cells (one nucleus box spans both nuclei).

    The detector's truth for such a cell is the joint box, so each lone nucleus it finds
    there is a false positive; ROIs around them are its hardest examples.
    """
    out = []
    for i, cell in enumerate(field.cells):
        if cell.kind != "koilocyte":
            continue
        geometry = cell_geometry(field.spec.seed, cell.id, cell.kind, field.spec.mpp)
        if len(geometry.nuclei) > 1:
            out.append(i)
    return out


def cell_crops(
    field: SynthField, size_px: int, jitter_px: float, copies: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-field crops of every cell in a field, centred on its nucleus plus jitter.

    Args:
        field: The rendered field (neighbouring cells and debris are in the crops).
        size_px: Crop side, px (96 = 48 µm at 0.5 mpp).
        jitter_px: Std of the Gaussian centre offset, px (mimics detector box error);
            clipped at 3 std.
        copies: Crops per cell (each with its own jitter).
        rng: Random generator.

    Returns:
        ([N * copies, size_px, size_px, 3] uint8, [N * copies] class indices).
    """
    centres = np.repeat(nucleus_centres(field.cells), copies, axis=0)
    if jitter_px > 0:
        centres = centres + np.clip(
            rng.normal(0, jitter_px, centres.shape), -3 * jitter_px, 3 * jitter_px
        )
    labels = np.repeat([CELL_CLASSES.index(c.label) for c in field.cells], copies).astype(np.int64)
    return cut_crops(field.image, centres, size_px, size_px), labels
