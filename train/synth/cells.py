"""Cell and debris records, and the Bethesda morphology of each synthetic cell kind.

A :class:`SynthCell` holds only its class, kind and two boxes (level-0 px). Everything
else about its look (outline, nucleus shape, chromatin, halo, stain, focus) is drawn from
``default_rng((seed, id, kind))`` by :func:`cell_geometry`, so a slide is reproduced from
its ground-truth table and its seed alone.

Sizes follow the Bethesda System atlas (physical sizes, µm; converted to px with mpp):

- ``superficial`` (NILM): polygonal cell 40–60 µm, eosinophilic (pink) cytoplasm, small
  dense pyknotic nucleus 4.5–6 µm.
- ``intermediate`` (NILM): polygonal cell 35–55 µm, cyanophilic (blue-green / lilac)
  cytoplasm, vesicular nucleus 7–9 µm with fine chromatin.
- ``koilocyte`` (LSIL): intermediate-sized cell, nucleus enlarged to 11.5–14 µm
  (~2.5–3x the intermediate nuclear area), slightly hyperchromatic and irregular, inside a
  sharply outlined clear perinuclear cavity with a dense cytoplasmic rim; sometimes two
  nuclei.
- ``hsil`` (HSIL): small rounder cell (~13–20 µm), nucleus 9.5–14 µm covering 55–75 % of
  the cell area, hyperchromatic with coarse chromatin and an irregular (lobulated,
  wrinkled) outline, dense cyanophilic cytoplasm.

Debris (no cytoplasm): tiny dark dots (2–4.5 µm), neutrophil-like clusters of 2–4 small
lobes, and irregular dark fragments.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

CELL_CLASSES: tuple[str, ...] = ("NILM", "LSIL", "HSIL")
CELL_KINDS: tuple[str, ...] = ("superficial", "intermediate", "koilocyte", "hsil")
KIND_LABEL: dict[str, str] = {
    "superficial": "NILM",
    "intermediate": "NILM",
    "koilocyte": "LSIL",
    "hsil": "HSIL",
}
DEBRIS_KINDS: tuple[str, ...] = ("dot", "neutrophil", "fragment")

NILM_SUPERFICIAL_FRACTION = 0.4
"""Share of NILM cells that are superficial (the rest are intermediate)."""

_TWO_PI = 2.0 * math.pi
_CONTOUR_SAMPLES = 720


@dataclass(frozen=True)
class SynthCell:
    """One synthetic cell: class, kind, and boxes in level-0 pixels.

    Attributes:
        id: index of the cell in its slide (also keys its look).
        label: Bethesda class, one of :data:`CELL_CLASSES`.
        kind: morphology, one of :data:`CELL_KINDS`.
        x, y, w, h: cytoplasm (whole-cell) box, level-0 px.
        nx, ny, nw, nh: nucleus box (both nuclei for a binucleate cell), level-0 px.
    """

    id: int
    label: str
    kind: str
    x: int
    y: int
    w: int
    h: int
    nx: int
    ny: int
    nw: int
    nh: int


@dataclass(frozen=True)
class Debris:
    """One piece of debris (no cytoplasm): box in level-0 pixels.

    Attributes:
        id: index of the piece in its slide (also keys its look).
        kind: one of :data:`DEBRIS_KINDS`.
        x, y, w, h: box, level-0 px.
    """

    id: int
    kind: str
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Blob:
    """A star-shaped ellipse: nucleus, halo or debris lobe, px relative to the cell centre.

    The outline is ``(a*rho(t)*cos t, b*rho(t)*sin t)`` rotated by ``angle`` and moved to
    ``(cx, cy)``, with ``rho(t) = 1 + sum(amps * cos(harmonics * t + phases))``.
    """

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    harmonics: tuple[int, ...] = ()
    amps: tuple[float, ...] = ()
    phases: tuple[float, ...] = ()

    def contour(self, n: int = _CONTOUR_SAMPLES) -> np.ndarray:
        """Outline points (n, 2) as (x, y), px relative to the cell centre."""
        t = np.linspace(0.0, _TWO_PI, n, endpoint=False)
        rho = self.rho(t)
        u = self.a * rho * np.cos(t)
        v = self.b * rho * np.sin(t)
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * ca - v * sa, self.cy + u * sa + v * ca], axis=1)

    def rho(self, t: np.ndarray) -> np.ndarray:
        """Radial modulation at parametric angle ``t`` (float array)."""
        out = np.ones_like(t)
        for k, amp, ph in zip(self.harmonics, self.amps, self.phases, strict=True):
            out = out + amp * np.cos(k * t + ph)
        return out

    def area_px2(self) -> float:
        """Area inside the outline, px²."""
        t = np.linspace(0.0, _TWO_PI, _CONTOUR_SAMPLES, endpoint=False)
        return float(0.5 * self.a * self.b * np.mean(self.rho(t) ** 2) * _TWO_PI)

    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the outline, px relative to the cell centre."""
        pts = self.contour()
        return (
            float(pts[:, 0].min()),
            float(pts[:, 1].min()),
            float(pts[:, 0].max()),
            float(pts[:, 1].max()),
        )


@dataclass(frozen=True)
class Fold:
    """A straight cytoplasmic fold: points with ``|n . p - offset| < half_width_px``."""

    normal: tuple[float, float]
    offset_px: float
    half_width_px: float
    strength: float


@dataclass(frozen=True)
class CellGeometry:
    """Everything needed to draw one cell, px relative to its integer centre.

    Attributes:
        kind: cell kind.
        normals: (k, 2) outward unit normals of the convex cytoplasm polygon edges.
        offsets: (k,) edge offsets, so ``max(normals @ p - offsets)`` is the signed
            distance (px, negative inside) for a point p near the polygon.
        vertices: (k, 2) polygon vertices.
        nuclei: one blob, or two for a binucleate koilocyte.
        halo: perinuclear cavity (koilocytes only).
        fold: optional fold line.
        box_rel: (x0, y0, x1, y1) integer cell box relative to the centre, px.
        nbox_rel: (x0, y0, x1, y1) integer nucleus box relative to the centre, px.
        od_cyto, od_nuc: optical density (natural log) per RGB channel.
        edge_px: softness of outlines (focus), px.
        texture: 0..1 texture amplitude multiplier (lower when out of focus).
        chromatin_scale_px, chromatin_amp: nuclear texture feature size and contrast.
        rim_od_factor, halo_clear: koilocyte rim density and cavity transmission factor.
        key: 32-bit noise key of this cell.
        area_cell_px2, area_nuc_px2: areas, px².
    """

    kind: str
    normals: np.ndarray
    offsets: np.ndarray
    vertices: np.ndarray
    nuclei: tuple[Blob, ...]
    halo: Blob | None
    fold: Fold | None
    box_rel: tuple[int, int, int, int]
    nbox_rel: tuple[int, int, int, int]
    od_cyto: np.ndarray
    od_nuc: np.ndarray
    edge_px: float
    texture: float
    chromatin_scale_px: float
    chromatin_amp: float
    rim_od_factor: float
    halo_clear: float
    key: int
    area_cell_px2: float
    area_nuc_px2: float

    @property
    def radius_px(self) -> float:
        """Radius of the circle with the cell's area, px."""
        return math.sqrt(self.area_cell_px2 / math.pi)


@dataclass(frozen=True)
class DebrisGeometry:
    """Blobs of one debris piece, px relative to its integer centre."""

    kind: str
    blobs: tuple[Blob, ...]
    od: np.ndarray
    edge_px: float
    box_rel: tuple[int, int, int, int]
    key: int


# --- colours -----------------------------------------------------------------------------


def od_from_rgb(rgb: tuple[float, float, float]) -> np.ndarray:
    """Optical density (natural log) of a stain seen as ``rgb`` on white glass."""
    arr = np.clip(np.asarray(rgb, dtype=np.float64), 1.0, 255.0) / 255.0
    return (-np.log(arr)).astype(np.float32)


_CYTO_PINK = (234.0, 172.0, 198.0)
_CYTO_BLUEGREEN = (176.0, 204.0, 214.0)
_CYTO_LILAC = (176.0, 178.0, 218.0)
_CYTO_HSIL = (128.0, 166.0, 200.0)
_NUC = {
    "superficial": (58.0, 42.0, 92.0),
    "intermediate": (112.0, 100.0, 156.0),
    "koilocyte": (84.0, 68.0, 134.0),
    "hsil": (66.0, 54.0, 118.0),
}
_DEBRIS_RGB = {
    "dot": (70.0, 56.0, 112.0),
    "neutrophil": (82.0, 66.0, 128.0),
    "fragment": (92.0, 78.0, 110.0),
}


def _jitter_od(rng: np.random.Generator, od: np.ndarray, hue_sd: float, gain: tuple) -> np.ndarray:
    """Per-object stain variation: per-channel hue jitter and an intensity gain."""
    hue = np.exp(rng.normal(0.0, hue_sd, 3))
    return (od * hue * rng.uniform(*gain)).astype(np.float32)


# --- geometry helpers --------------------------------------------------------------------


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (n, 2) points, counter-clockwise."""
    pts = sorted(map(tuple, points.tolist()))

    def cross(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def _edge_planes(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward unit normals and offsets of a convex polygon containing the origin."""
    edges = np.roll(vertices, -1, axis=0) - vertices
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = np.einsum("ij,ij->i", normals, vertices)
    flip = offsets < 0
    normals[flip] *= -1.0
    offsets[flip] *= -1.0
    return normals, offsets


def _polygon_sdf(points: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of (n, 2) points to a convex polygon."""
    return (points @ normals.T - offsets[None, :]).max(axis=1)


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _random_polygon(
    rng: np.random.Generator, radius_px: float, n_vertices: int, jitter: float, elongation: float
) -> np.ndarray:
    """Convex polygon around the origin: jittered vertices on an elongated circle."""
    base = np.arange(n_vertices) * _TWO_PI / n_vertices + rng.uniform(0, _TWO_PI)
    angles = base + rng.uniform(-0.3, 0.3, n_vertices) * _TWO_PI / n_vertices
    radii = radius_px * np.clip(1.0 + jitter * rng.standard_normal(n_vertices), 0.7, 1.3)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    stretch = math.sqrt(elongation)
    rot = rng.uniform(0, math.pi)
    c, s = math.cos(rot), math.sin(rot)
    r = np.array([[c, -s], [s, c]])
    pts = pts @ r.T  # into the rotated frame
    pts[:, 0] *= stretch
    pts[:, 1] /= stretch
    pts = pts @ r  # back
    return _convex_hull(pts)


def _irregular(
    rng: np.random.Generator, ks: tuple[int, ...], amp: float
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """Harmonic outline irregularity with total amplitude about ``amp``."""
    if amp <= 0 or not ks:
        return (), (), ()
    raw = rng.uniform(0.3, 1.0, len(ks)) / np.sqrt(np.arange(1, len(ks) + 1))
    amps = raw / raw.sum() * amp
    phases = rng.uniform(0, _TWO_PI, len(ks))
    return tuple(int(k) for k in ks), tuple(float(a) for a in amps), tuple(float(p) for p in phases)


def _blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    diameter_px: float,
    aspect: tuple[float, float],
    ks: tuple[int, ...],
    irregularity: float,
) -> Blob:
    """Blob of given equivalent diameter, aspect ratio range and outline irregularity."""
    asp = rng.uniform(*aspect)
    r = diameter_px / 2.0
    harmonics, amps, phases = _irregular(rng, ks, irregularity)
    return Blob(
        cx=cx,
        cy=cy,
        a=r * math.sqrt(asp),
        b=r / math.sqrt(asp),
        angle=float(rng.uniform(0, math.pi)),
        harmonics=harmonics,
        amps=amps,
        phases=phases,
    )


def _box_of(points: np.ndarray) -> tuple[int, int, int, int]:
    """Integer box (x0, y0, x1, y1) covering (n, 2) points."""
    return (
        math.floor(points[:, 0].min()),
        math.floor(points[:, 1].min()),
        math.ceil(points[:, 0].max()) + 1,
        math.ceil(points[:, 1].max()) + 1,
    )


def _contains(normals: np.ndarray, offsets: np.ndarray, blob: Blob, margin_px: float) -> bool:
    return bool(_polygon_sdf(blob.contour(180), normals, offsets).max() <= -margin_px)


def _focus(rng: np.random.Generator, mpp: float) -> tuple[float, float]:
    """(edge softness px, texture multiplier): most cells sharp, some out of focus."""
    u = rng.uniform()
    if u < 0.72:
        blur_um = rng.uniform(0.25, 0.5)
    elif u < 0.92:
        blur_um = rng.uniform(0.8, 1.6)
    else:
        blur_um = rng.uniform(2.0, 3.5)
    edge_px = max(blur_um / mpp, 0.75)
    return edge_px, float(1.0 / (1.0 + 0.8 * blur_um))


# --- cells -------------------------------------------------------------------------------

_KIND_INDEX = {k: i for i, k in enumerate(CELL_KINDS)}
_DEBRIS_INDEX = {k: i for i, k in enumerate(DEBRIS_KINDS)}


def _rng_for(seed: int, tag: int, obj_id: int, kind_index: int) -> np.random.Generator:
    return np.random.default_rng((seed & 0xFFFFFFFF, seed >> 32, tag, obj_id, kind_index))


def cell_geometry(seed: int, cell_id: int, kind: str, mpp: float) -> CellGeometry:
    """The look of one cell, drawn from ``(seed, cell_id, kind)``; px at ``mpp``.

    Args:
        seed: slide seed (>= 0).
        cell_id: cell index in the slide.
        kind: one of :data:`CELL_KINDS`.
        mpp: microns per level-0 pixel.

    Returns:
        The cell's geometry, px relative to its integer centre (cached).
    """
    if kind not in _KIND_INDEX:
        raise ValueError(f"unknown cell kind {kind!r}; expected one of {CELL_KINDS}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return _cell_geometry(int(seed), int(cell_id), kind, float(mpp))


@functools.lru_cache(maxsize=16384)
def _cell_geometry(seed: int, cell_id: int, kind: str, mpp: float) -> CellGeometry:
    rng = _rng_for(seed, 1, cell_id, _KIND_INDEX[kind])
    um = 1.0 / mpp  # px per µm
    halo: Blob | None = None
    halo_clear = 1.0
    rim = 1.0

    if kind == "hsil":
        nuc_d = rng.uniform(9.5, 14.0) * um
        nucleus = _blob(
            rng, 0.0, 0.0, nuc_d, (1.0, 1.45), (2, 3, 4, 5, 6, 7), rng.uniform(0.12, 0.2)
        )
        # wrinkles: a little high-frequency outline modulation
        wk = int(rng.integers(9, 14))
        nucleus = Blob(
            nucleus.cx, nucleus.cy, nucleus.a, nucleus.b, nucleus.angle,
            nucleus.harmonics + (wk,), nucleus.amps + (float(rng.uniform(0.02, 0.04)),),
            nucleus.phases + (float(rng.uniform(0, _TWO_PI)),),
        )  # fmt: skip
        nc_ratio = rng.uniform(0.52, 0.72)
        cell_r = math.sqrt(nucleus.area_px2() / nc_ratio / math.pi)
        vertices = _random_polygon(
            rng, cell_r, int(rng.integers(7, 11)), 0.07, rng.uniform(1.0, 1.25)
        )
        shift = rng.uniform(-0.08, 0.08, 2) * cell_r
        nucleus = Blob(shift[0], shift[1], nucleus.a, nucleus.b, nucleus.angle,
                       nucleus.harmonics, nucleus.amps, nucleus.phases)  # fmt: skip
        nuclei = (nucleus,)
        rim_margin = 0.6 * um
        od_cyto = _jitter_od(rng, od_from_rgb(_CYTO_HSIL), 0.10, (0.85, 1.2))
        chromatin_scale, chromatin_amp = 1.0 * um, rng.uniform(0.4, 0.55)
    else:
        cell_d = rng.uniform(40.0, 60.0) if kind == "superficial" else rng.uniform(35.0, 55.0)
        cell_r = cell_d * um / 2.0
        vertices = _random_polygon(
            rng, cell_r, int(rng.integers(5, 9)), 0.12, rng.uniform(1.0, 1.45)
        )
        off = (
            rng.uniform(-0.18, 0.18, 2) * cell_r
            if kind != "koilocyte"
            else rng.uniform(-0.1, 0.1, 2) * cell_r
        )
        if kind == "superficial":
            nuclei = (
                _blob(rng, off[0], off[1], rng.uniform(4.5, 6.0) * um, (1.0, 1.2), (2, 3), 0.03),
            )
            chromatin_scale, chromatin_amp = 0.8 * um, 0.08
        elif kind == "intermediate":
            nuclei = (
                _blob(rng, off[0], off[1], rng.uniform(7.0, 9.0) * um, (1.0, 1.3), (2, 3), 0.03),
            )
            chromatin_scale, chromatin_amp = 0.7 * um, 0.22
        else:  # koilocyte
            if rng.uniform() < 0.15:
                d1, d2 = rng.uniform(9.5, 12.0, 2) * um
                direction = rng.uniform(0, _TWO_PI)
                sep = (d1 + d2) / 2.0 + rng.uniform(0.3, 1.0) * um
                ux, uy = math.cos(direction), math.sin(direction)
                hx, hy = ux * sep / 2, uy * sep / 2
                nuclei = (
                    _blob(rng, off[0] - hx, off[1] - hy, d1, (1.0, 1.25), (2, 3, 4), 0.06),
                    _blob(rng, off[0] + hx, off[1] + hy, d2, (1.0, 1.25), (2, 3, 4), 0.06),
                )
            else:
                nuc_d = rng.uniform(11.5, 14.0) * um
                irregularity = rng.uniform(0.05, 0.09)
                nuclei = (
                    _blob(rng, off[0], off[1], nuc_d, (1.0, 1.35), (2, 3, 4, 5), irregularity),
                )
            chromatin_scale, chromatin_amp = 1.4 * um, rng.uniform(0.15, 0.25)
        rim_margin = 1.5 * um
        if kind == "superficial":
            od_cyto = _jitter_od(rng, od_from_rgb(_CYTO_PINK), 0.10, (0.7, 1.25))
        else:
            t = rng.uniform()
            base = (1 - t) * np.asarray(_CYTO_BLUEGREEN) + t * np.asarray(_CYTO_LILAC)
            if kind == "koilocyte" and rng.uniform() < 0.2:
                base = np.asarray(_CYTO_PINK)
            od_cyto = _jitter_od(rng, od_from_rgb(tuple(base)), 0.10, (0.75, 1.25))

    normals, offsets = _edge_planes(vertices)
    # keep nuclei inside the cytoplasm with a rim; grow the cell if needed
    for _ in range(40):
        if all(_contains(normals, offsets, n, rim_margin) for n in nuclei):
            break
        vertices = vertices * 1.05
        normals, offsets = _edge_planes(vertices)

    if kind == "koilocyte":
        pts = np.concatenate([n.contour(180) for n in nuclei])
        hcx, hcy = pts.mean(axis=0)
        span = np.abs(pts - [hcx, hcy]).max(axis=0)
        hr = float(np.hypot(*span)) / math.sqrt(2.0)
        factor = rng.uniform(1.55, 2.1)
        ks, amps, phases = _irregular(rng, (2, 3, 4, 5, 6), rng.uniform(0.08, 0.15))
        hcx += rng.uniform(-0.12, 0.12) * hr
        hcy += rng.uniform(-0.12, 0.12) * hr
        for _ in range(30):
            halo = Blob(
                float(hcx), float(hcy), span[0] + hr * (factor - 1), span[1] + hr * (factor - 1),
                0.0, ks, amps, phases,
            )  # fmt: skip
            if _contains(normals, offsets, halo, 3.0 * um) or factor <= 1.4:
                break
            factor -= 0.05
        for _ in range(40):
            if _contains(normals, offsets, halo, 3.0 * um):
                break
            vertices = vertices * 1.04
            normals, offsets = _edge_planes(vertices)
        halo_clear = float(rng.uniform(0.08, 0.25))
        rim = float(rng.uniform(1.7, 2.4))
        od_cyto = od_cyto * np.float32(1.15)

    fold = None
    if kind != "hsil" and rng.uniform() < 0.2:
        ang = rng.uniform(0, _TWO_PI)
        fold = Fold(
            normal=(math.cos(ang), math.sin(ang)),
            offset_px=float(rng.uniform(0.45, 0.8) * cell_r),
            half_width_px=float(rng.uniform(0.6, 1.3) * um),
            strength=float(rng.uniform(0.4, 0.9)),
        )

    od_nuc = _jitter_od(rng, od_from_rgb(_NUC[kind]), 0.08, (0.85, 1.15))
    edge_px, texture = _focus(rng, mpp)
    npts = np.concatenate([n.contour() for n in nuclei])
    key = int(rng.integers(0, 2**31))
    for arr in (normals, offsets, vertices):
        arr.setflags(write=False)
    od_cyto = od_cyto.astype(np.float32)
    od_cyto.setflags(write=False)
    od_nuc.setflags(write=False)
    return CellGeometry(
        kind=kind,
        normals=normals,
        offsets=offsets,
        vertices=vertices,
        nuclei=nuclei,
        halo=halo,
        fold=fold,
        box_rel=_box_of(vertices),
        nbox_rel=_box_of(npts),
        od_cyto=od_cyto,
        od_nuc=od_nuc,
        edge_px=edge_px,
        texture=texture,
        chromatin_scale_px=float(chromatin_scale),
        chromatin_amp=float(chromatin_amp),
        rim_od_factor=rim,
        halo_clear=halo_clear,
        key=key,
        area_cell_px2=_polygon_area(vertices),
        area_nuc_px2=float(sum(n.area_px2() for n in nuclei)),
    )


# --- debris ------------------------------------------------------------------------------


def debris_geometry(seed: int, debris_id: int, kind: str, mpp: float) -> DebrisGeometry:
    """The look of one debris piece, drawn from ``(seed, debris_id, kind)``; px at ``mpp``."""
    if kind not in _DEBRIS_INDEX:
        raise ValueError(f"unknown debris kind {kind!r}; expected one of {DEBRIS_KINDS}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return _debris_geometry(int(seed), int(debris_id), kind, float(mpp))


@functools.lru_cache(maxsize=16384)
def _debris_geometry(seed: int, debris_id: int, kind: str, mpp: float) -> DebrisGeometry:
    rng = _rng_for(seed, 2, debris_id, _DEBRIS_INDEX[kind])
    um = 1.0 / mpp
    if kind == "dot":
        blobs = (_blob(rng, 0.0, 0.0, rng.uniform(2.0, 4.5) * um, (1.0, 1.3), (2, 3), 0.05),)
    elif kind == "neutrophil":
        n = int(rng.integers(2, 5))
        spread = rng.uniform(1.8, 3.0) * um
        start = rng.uniform(0, _TWO_PI)
        blobs = tuple(
            _blob(
                rng,
                spread * math.cos(start + i * _TWO_PI / n + rng.uniform(-0.4, 0.4)),
                spread * math.sin(start + i * _TWO_PI / n + rng.uniform(-0.4, 0.4)),
                rng.uniform(2.4, 3.6) * um,
                (1.0, 1.5),
                (2, 3),
                0.06,
            )
            for i in range(n)
        )
    else:  # fragment
        n = int(rng.integers(1, 4))
        blobs = tuple(
            Blob(
                float(rng.uniform(-3, 3) * um),
                float(rng.uniform(-3, 3) * um),
                float(rng.uniform(3.0, 9.0) * um),
                float(rng.uniform(0.8, 2.2) * um),
                float(rng.uniform(0, math.pi)),
                *_irregular(rng, (2, 3, 5, 7), rng.uniform(0.1, 0.25)),
            )
            for _ in range(n)
        )
    od = _jitter_od(rng, od_from_rgb(_DEBRIS_RGB[kind]), 0.12, (0.7, 1.2))
    edge_px, _ = _focus(rng, mpp)
    pts = np.concatenate([b.contour(180) for b in blobs])
    od.setflags(write=False)
    return DebrisGeometry(
        kind=kind,
        blobs=blobs,
        od=od,
        edge_px=edge_px,
        box_rel=_box_of(pts),
        key=int(rng.integers(0, 2**31)),
    )
