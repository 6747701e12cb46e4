"""Lay synthetic cells and debris out on a slide, as in a liquid-based cytology preparation.

Cells are spread inside an elliptical cellular area (the LBC "spot"); outside it the
glass is empty. Cells may overlap by their cytoplasm, but nucleus boxes never touch:
the detector is nucleus-centred and scored on every nucleus. Debris (no cytoplasm) lies
anywhere in the cellular area except on a nucleus.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from train.synth.cells import (
    CELL_CLASSES,
    KIND_LABEL,
    NILM_SUPERFICIAL_FRACTION,
    CellGeometry,
    Debris,
    SynthCell,
    cell_geometry,
    debris_geometry,
)

logger = logging.getLogger(__name__)

DEFAULT_CLASS_MIX: dict[str, float] = {"NILM": 0.6, "LSIL": 0.2, "HSIL": 0.2}
DEBRIS_KIND_MIX: dict[str, float] = {"dot": 0.45, "neutrophil": 0.35, "fragment": 0.2}
NUCLEUS_GAP_UM = 2.0
"""Minimum clearance between any two nucleus boxes (and debris and nuclei), µm."""
MIN_CENTRE_DISTANCE = 0.55
"""Cell centres are at least this fraction of the sum of their radii apart."""
NEIGHBOUR_FRACTION = 0.15
"""Share of cells placed touching an earlier cell (overlapping cytoplasm)."""
_ATTEMPTS = 300


@dataclass(frozen=True)
class CellularArea:
    """The ellipse holding the cells, level-0 px."""

    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: float, y: float, inset_px: float = 0.0) -> bool:
        """Whether (x, y) lies inside the ellipse shrunk by ``inset_px``."""
        rx, ry = self.rx - inset_px, self.ry - inset_px
        if rx <= 0 or ry <= 0:
            return False
        return ((x - self.cx) / rx) ** 2 + ((y - self.cy) / ry) ** 2 <= 1.0


def cellular_area(width_px: int, height_px: int, seed: int) -> CellularArea:
    """The slide's cellular-area ellipse, drawn from the seed (level-0 px)."""
    rng = np.random.default_rng((seed & 0xFFFFFFFF, seed >> 32, 0xCE11))
    return CellularArea(
        cx=width_px * (0.5 + rng.uniform(-0.03, 0.03)),
        cy=height_px * (0.5 + rng.uniform(-0.03, 0.03)),
        rx=width_px * rng.uniform(0.41, 0.46),
        ry=height_px * rng.uniform(0.41, 0.46),
    )


def normalise_class_mix(class_mix: Mapping[str, float] | None) -> dict[str, float]:
    """Class weights as probabilities over :data:`CELL_CLASSES` (missing classes get 0)."""
    mix = DEFAULT_CLASS_MIX if class_mix is None else dict(class_mix)
    unknown = set(mix) - set(CELL_CLASSES)
    if unknown:
        raise ValueError(f"unknown classes in class_mix: {sorted(unknown)}; use {CELL_CLASSES}")
    weights = [float(mix.get(c, 0.0)) for c in CELL_CLASSES]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"class_mix weights must be finite, >= 0 and not all 0: {mix}")
    total = sum(weights)
    return {c: w / total for c, w in zip(CELL_CLASSES, weights, strict=True)}


def _largest_remainder(n: int, probs: list[float]) -> list[int]:
    raw = [n * p for p in probs]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _kinds_for(n_cells: int, mix: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Exact class counts (largest remainder), NILM split superficial / intermediate."""
    counts = dict(zip(CELL_CLASSES, _largest_remainder(n_cells, list(mix.values())), strict=True))
    n_sup = round(counts["NILM"] * NILM_SUPERFICIAL_FRACTION)
    kinds = (
        ["superficial"] * n_sup
        + ["intermediate"] * (counts["NILM"] - n_sup)
        + ["koilocyte"] * counts["LSIL"]
        + ["hsil"] * counts["HSIL"]
    )
    rng.shuffle(kinds)
    return kinds


class _Grid:
    """Buckets of placed boxes for neighbour queries."""

    def __init__(self, cell_px: float) -> None:
        self.cell_px = cell_px
        self.buckets: dict[tuple[int, int], list[int]] = {}

    def key(self, x: float, y: float) -> tuple[int, int]:
        return int(x // self.cell_px), int(y // self.cell_px)

    def add(self, x: float, y: float, index: int) -> None:
        self.buckets.setdefault(self.key(x, y), []).append(index)

    def near(self, x: float, y: float, reach: int = 1) -> list[int]:
        gx, gy = self.key(x, y)
        out: list[int] = []
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                out.extend(self.buckets.get((gx + dx, gy + dy), ()))
        return out


def _boxes_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: float) -> bool:
    """Whether boxes (x0, y0, x1, y1) are at least ``gap`` px apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def plan_cells(
    width_px: int,
    height_px: int,
    mpp: float,
    n_cells: int,
    seed: int,
    class_mix: Mapping[str, float] | None = None,
    *,
    debris_per_cell: float = 1.0,
) -> tuple[list[SynthCell], list[Debris]]:
    """Place cells and debris on a slide, deterministically from the seed.

    Args:
        width_px: slide width, level-0 px.
        height_px: slide height, level-0 px.
        mpp: microns per level-0 pixel.
        n_cells: number of cells; class counts follow ``class_mix`` exactly (rounded).
        seed: slide seed (>= 0); also keys every cell's look in :func:`render_region`.
        class_mix: weights per class in :data:`CELL_CLASSES` (default 0.6 / 0.2 / 0.2).
        debris_per_cell: debris pieces per cell (dots, neutrophils, fragments).

    Returns:
        (cells ordered by id, debris ordered by id), boxes in level-0 px.

    Raises:
        ValueError: bad arguments, or the cells do not fit without touching nuclei.
    """
    if width_px <= 0 or height_px <= 0:
        raise ValueError(f"slide size must be positive, got {width_px}x{height_px} px")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if n_cells < 0 or seed < 0 or debris_per_cell < 0:
        raise ValueError("n_cells, seed and debris_per_cell must be >= 0")
    mix = normalise_class_mix(class_mix)
    rng = np.random.default_rng((seed & 0xFFFFFFFF, seed >> 32, 0x1A7))
    area = cellular_area(width_px, height_px, seed)
    kinds = _kinds_for(n_cells, mix, rng)
    geoms = [cell_geometry(seed, i, k, mpp) for i, k in enumerate(kinds)]

    need_px2 = sum(g.area_cell_px2 for g in geoms)
    have_px2 = math.pi * area.rx * area.ry
    if need_px2 > 0.6 * have_px2:
        raise ValueError(
            f"{n_cells} cells need about {need_px2 * mpp * mpp / 1e6:.2f} mm² but the cellular "
            f"area of a {width_px}x{height_px} px slide at {mpp} mpp holds "
            f"{have_px2 * mpp * mpp / 1e6:.2f} mm²; use fewer cells or a larger slide"
        )

    gap_px = NUCLEUS_GAP_UM / mpp
    max_r = max((max(abs(v) for v in g.box_rel) for g in geoms), default=1)
    grid = _Grid(2.0 * max_r + gap_px + 1.0)
    centres: list[tuple[int, int]] = []
    nboxes: list[tuple[int, int, int, int]] = []
    cells: list[SynthCell] = []
    hsil_ids: list[int] = []

    for cid, (kind, g) in enumerate(zip(kinds, geoms, strict=True)):
        placed = None
        for _ in range(_ATTEMPTS):
            cx, cy = _candidate(rng, area, g, cells, centres, geoms, hsil_ids, kind)
            if _fits(cx, cy, g, width_px, height_px, area, grid, centres, nboxes, geoms, gap_px):
                placed = (cx, cy)
                break
        if placed is None:
            raise ValueError(
                f"could not place cell {cid} of {n_cells} on a {width_px}x{height_px} px slide "
                f"at {mpp} mpp without touching nuclei; use fewer cells or a larger slide"
            )
        cx, cy = placed
        bx0, by0, bx1, by1 = g.box_rel
        nx0, ny0, nx1, ny1 = g.nbox_rel
        cells.append(
            SynthCell(
                id=cid, label=KIND_LABEL[kind], kind=kind,
                x=cx + bx0, y=cy + by0, w=bx1 - bx0, h=by1 - by0,
                nx=cx + nx0, ny=cy + ny0, nw=nx1 - nx0, nh=ny1 - ny0,
            )
        )  # fmt: skip
        centres.append((cx, cy))
        nboxes.append((cx + nx0, cy + ny0, cx + nx1, cy + ny1))
        grid.add(cx, cy, cid)
        if kind == "hsil":
            hsil_ids.append(cid)

    debris = _plan_debris(
        rng, round(n_cells * debris_per_cell), seed, mpp, width_px, height_px, area,
        grid, centres, nboxes, gap_px,
    )  # fmt: skip
    logger.debug("planned %d cells and %d debris on %dx%d px", len(cells), len(debris),
                 width_px, height_px)  # fmt: skip
    return cells, debris


def _candidate(
    rng: np.random.Generator,
    area: CellularArea,
    g: CellGeometry,
    cells: list[SynthCell],
    centres: list[tuple[int, int]],
    geoms: list[CellGeometry],
    hsil_ids: list[int],
    kind: str,
) -> tuple[int, int]:
    """A candidate centre: next to an earlier cell sometimes, else uniform in the area."""
    u = rng.uniform()
    neighbour = None
    if kind == "hsil" and hsil_ids and u < 0.3:
        neighbour = hsil_ids[int(rng.integers(len(hsil_ids)))]
    elif centres and u < NEIGHBOUR_FRACTION:
        neighbour = int(rng.integers(len(centres)))
    if neighbour is not None:
        nx, ny = centres[neighbour]
        reach = rng.uniform(0.6, 0.9) * (g.radius_px + geoms[neighbour].radius_px)
        ang = rng.uniform(0, 2 * math.pi)
        return round(nx + reach * math.cos(ang)), round(ny + reach * math.sin(ang))
    r = math.sqrt(rng.uniform())
    ang = rng.uniform(0, 2 * math.pi)
    return round(area.cx + r * area.rx * math.cos(ang)), round(
        area.cy + r * area.ry * math.sin(ang)
    )


def _fits(
    cx: int,
    cy: int,
    g: CellGeometry,
    width_px: int,
    height_px: int,
    area: CellularArea,
    grid: _Grid,
    centres: list[tuple[int, int]],
    nboxes: list[tuple[int, int, int, int]],
    geoms: list[CellGeometry],
    gap_px: float,
) -> bool:
    bx0, by0, bx1, by1 = g.box_rel
    if cx + bx0 < 0 or cy + by0 < 0 or cx + bx1 > width_px or cy + by1 > height_px:
        return False
    if not area.contains(cx, cy, inset_px=0.8 * g.radius_px):
        return False
    nx0, ny0, nx1, ny1 = g.nbox_rel
    nbox = (cx + nx0, cy + ny0, cx + nx1, cy + ny1)
    for j in grid.near(cx, cy):
        ox, oy = centres[j]
        if math.hypot(cx - ox, cy - oy) < MIN_CENTRE_DISTANCE * (g.radius_px + geoms[j].radius_px):
            return False
        if not _boxes_clear(nbox, nboxes[j], gap_px):
            return False
    return True


def _plan_debris(
    rng: np.random.Generator,
    n_debris: int,
    seed: int,
    mpp: float,
    width_px: int,
    height_px: int,
    area: CellularArea,
    grid: _Grid,
    centres: list[tuple[int, int]],
    nboxes: list[tuple[int, int, int, int]],
    gap_px: float,
) -> list[Debris]:
    kinds = list(DEBRIS_KIND_MIX)
    probs = list(DEBRIS_KIND_MIX.values())
    out: list[Debris] = []
    last_neutrophil: tuple[int, int] | None = None
    for did in range(n_debris):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        g = debris_geometry(seed, did, kind, mpp)
        bx0, by0, bx1, by1 = g.box_rel
        for _ in range(50):
            if kind == "neutrophil" and last_neutrophil is not None and rng.uniform() < 0.5:
                reach = rng.uniform(6.0, 20.0) / mpp
                ang = rng.uniform(0, 2 * math.pi)
                cx = round(last_neutrophil[0] + reach * math.cos(ang))
                cy = round(last_neutrophil[1] + reach * math.sin(ang))
            else:
                r = math.sqrt(rng.uniform())
                ang = rng.uniform(0, 2 * math.pi)
                cx = round(area.cx + r * area.rx * math.cos(ang))
                cy = round(area.cy + r * area.ry * math.sin(ang))
            box = (cx + bx0, cy + by0, cx + bx1, cy + by1)
            if box[0] < 0 or box[1] < 0 or box[2] > width_px or box[3] > height_px:
                continue
            if not area.contains(cx, cy):
                continue
            if all(_boxes_clear(box, nboxes[j], gap_px) for j in grid.near(cx, cy)):
                out.append(Debris(id=did, kind=kind, x=box[0], y=box[1],
                                  w=bx1 - bx0, h=by1 - by0))  # fmt: skip
                if kind == "neutrophil":
                    last_neutrophil = (cx, cy)
                break
    return out
