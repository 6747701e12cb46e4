"""Render any region of a synthetic slide, pixel-identical whatever the tiling.

Staining is modelled as absorbance (Beer-Lambert): every cell, nucleus and piece of debris
adds optical density (OD) per RGB channel, and a pixel is ``glass * exp(-OD) + noise``. So
overlapping cytoplasm looks darker, nuclei show through overlying cells, and drawing order
does not matter. Each object is evaluated on its own bounding box only (vectorised numpy),
and every value at a pixel depends on its level-0 position, the seed and the object list,
never on the region asked for (see :mod:`train.synth.noise`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from train.synth.cells import (
    Blob,
    CellGeometry,
    Debris,
    DebrisGeometry,
    SynthCell,
    cell_geometry,
    debris_geometry,
)
from train.synth.noise import block_normal, fbm, value_noise

logger = logging.getLogger(__name__)

_WOBBLE_UM = 0.8
_MAX_BLUR_PX_PER_UM = 3.5  # matches the widest focus blur drawn in cells._focus


@dataclass(frozen=True)
class SlideStyle:
    """Per-slide stain and glass variation, drawn from the seed.

    Attributes:
        glass_rgb: empty-glass colour (float, 0..255).
        cyto_gain: per-channel multiplier of cytoplasmic OD (counterstain batch).
        nuc_gain: per-channel multiplier of nuclear OD (haematoxylin batch).
        noise_sd: camera noise standard deviation, grey levels.
    """

    glass_rgb: np.ndarray
    cyto_gain: np.ndarray
    nuc_gain: np.ndarray
    noise_sd: float


@functools.lru_cache(maxsize=64)
def slide_style(seed: int) -> SlideStyle:
    """The slide's stain and glass variation, drawn from the seed."""
    rng = np.random.default_rng((seed & 0xFFFFFFFF, seed >> 32, 0x57A1))
    glass = np.array([229.0, 233.0, 240.0]) + rng.normal(0.0, 3.0, 3) + rng.uniform(-4, 4)
    cyto = np.exp(rng.normal(0.0, 0.07, 3)) * rng.uniform(0.85, 1.15)
    nuc = np.exp(rng.normal(0.0, 0.06, 3)) * rng.uniform(0.85, 1.2)
    out = SlideStyle(
        glass_rgb=np.clip(glass, 200, 250).astype(np.float32),
        cyto_gain=cyto.astype(np.float32),
        nuc_gain=nuc.astype(np.float32),
        noise_sd=float(rng.uniform(1.2, 2.4)),
    )
    for arr in (out.glass_rgb, out.cyto_gain, out.nuc_gain):
        arr.setflags(write=False)
    return out


@dataclass(frozen=True)
class _Window:
    """Intersection of an object's box with the output region (absolute level-0 px)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0


def _window(
    bx0: int, by0: int, bx1: int, by1: int, x0: int, y0: int, w: int, h: int
) -> _Window | None:
    win = _Window(max(bx0, x0), max(by0, y0), min(bx1, x0 + w), min(by1, y0 + h))
    return win if win.w > 0 and win.h > 0 else None


def _blob_sdf(blob: Blob, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Approximate signed distance (px, negative inside) to a blob outline.

    Args:
        blob: the outline, px relative to the object centre.
        px: (1, W) x offsets from the object centre, float32.
        py: (H, 1) y offsets from the object centre, float32.
    """
    ca, sa = np.float32(math.cos(blob.angle)), np.float32(math.sin(blob.angle))
    dx = px - np.float32(blob.cx)
    dy = py - np.float32(blob.cy)
    u = (dx * ca + dy * sa) * np.float32(1.0 / blob.a)
    v = (dy * ca - dx * sa) * np.float32(1.0 / blob.b)
    rho_p = np.sqrt(u * u + v * v)
    rho = np.ones_like(rho_p)
    if blob.harmonics:
        t = np.arctan2(v, u)
        for k, amp, ph in zip(blob.harmonics, blob.amps, blob.phases, strict=True):
            rho += np.float32(amp) * np.cos(np.float32(k) * t + np.float32(ph))
    return (rho_p - rho) * np.float32(math.sqrt(blob.a * blob.b))


def _ramp(sdf: np.ndarray, edge_px: float) -> np.ndarray:
    """Soft inside mask from a signed distance: 1 inside, 0 outside, ``edge_px`` wide."""
    return np.clip(np.float32(0.5) - sdf * np.float32(1.0 / edge_px), 0.0, 1.0)


def _grid(win: _Window, cx: int, cy: int) -> tuple[np.ndarray, np.ndarray]:
    px = (np.arange(win.x0, win.x1, dtype=np.float32) - np.float32(cx))[None, :]
    py = (np.arange(win.y0, win.y1, dtype=np.float32) - np.float32(cy))[:, None]
    return px, py


def _add_cell(
    od: np.ndarray,
    cell: SynthCell,
    g: CellGeometry,
    x0: int,
    y0: int,
    w: int,
    h: int,
    mpp: float,
    style: SlideStyle,
) -> None:
    """Add one cell's optical density into ``od`` (region ``x0, y0, w, h``)."""
    cx = cell.x - g.box_rel[0]
    cy = cell.y - g.box_rel[1]
    um = 1.0 / mpp
    wobble_px = _WOBBLE_UM * um
    pad = math.ceil(3.0 * g.edge_px + wobble_px + 1.0)
    bx0, by0, bx1, by1 = g.box_rel
    win = _window(cx + bx0 - pad, cy + by0 - pad, cx + bx1 + pad, cy + by1 + pad, x0, y0, w, h)
    if win is None:
        return
    px, py = _grid(win, cx, cy)
    key = g.key

    # cytoplasm outline (convex polygon, wobbled), density and texture
    sdf = px * np.float32(g.normals[0, 0]) + py * np.float32(g.normals[0, 1])
    sdf = sdf - np.float32(g.offsets[0])
    for (nx, ny), off in zip(g.normals[1:], g.offsets[1:], strict=True):
        np.maximum(sdf, px * np.float32(nx) + py * np.float32(ny) - np.float32(off), out=sdf)
    sdf += np.float32(wobble_px) * value_noise(win.x0, win.y0, win.w, win.h, 5.0 * um, key)
    mask = _ramp(sdf, g.edge_px)
    membrane = np.exp(-(((sdf + np.float32(0.9 * um)) * np.float32(1.0 / (0.9 * um))) ** 2))
    dens = np.float32(1.0) + np.float32(0.35) * membrane
    dens *= np.float32(1.0) + np.float32(g.texture) * (
        np.float32(0.24) * fbm(win.x0, win.y0, win.w, win.h, 4.0 * um, key + 1, octaves=3)
        + np.float32(0.10) * value_noise(win.x0, win.y0, win.w, win.h, 0.7 * um, key + 2)
    )
    if g.fold is not None:
        f = g.fold
        dist = np.abs(px * np.float32(f.normal[0]) + py * np.float32(f.normal[1]) - f.offset_px)
        band = np.clip(np.float32(1.0) - dist * np.float32(1.0 / f.half_width_px), 0.0, 1.0)
        dens += np.float32(f.strength) * band
    if g.halo is not None:
        hsdf = _blob_sdf(g.halo, px, py)
        hsdf += np.float32(0.4 * um) * value_noise(win.x0, win.y0, win.w, win.h, 3.0 * um, key + 3)
        inside = _ramp(hsdf, max(0.6 * g.edge_px, 0.6))
        rim = np.exp(-np.maximum(hsdf, 0.0) * np.float32(1.0 / (2.2 * um)))
        dens *= np.float32(1.0) + np.float32(g.rim_od_factor - 1.0) * rim * (1.0 - inside)
        dens *= np.float32(1.0) - inside * np.float32(1.0 - g.halo_clear)
    weight = mask * dens
    od_c = g.od_cyto * style.cyto_gain
    sub = od[win.y0 - y0 : win.y1 - y0, win.x0 - x0 : win.x1 - x0]
    sub += weight[:, :, None] * od_c[None, None, :]

    # nuclei
    od_n = g.od_nuc * style.nuc_gain
    for n_index, blob in enumerate(g.nuclei):
        npad = math.ceil(3.0 * g.edge_px + 2)
        nb = blob.bounds()
        nwin = _window(
            cx + math.floor(nb[0]) - npad, cy + math.floor(nb[1]) - npad,
            cx + math.ceil(nb[2]) + npad, cy + math.ceil(nb[3]) + npad,
            x0, y0, w, h,
        )  # fmt: skip
        if nwin is None:
            continue
        npx, npy = _grid(nwin, cx, cy)
        nsdf = _blob_sdf(blob, npx, npy)
        nmask = _ramp(nsdf, g.edge_px)
        nkey = key + 10 + n_index
        chrom = np.float32(1.0) + np.float32(g.chromatin_amp * g.texture) * fbm(
            nwin.x0, nwin.y0, nwin.w, nwin.h, g.chromatin_scale_px, nkey, octaves=2
        )
        if g.kind == "hsil":
            clumps = value_noise(nwin.x0, nwin.y0, nwin.w, nwin.h, 0.5 * um, nkey + 5)
            chrom += np.float32(0.35 * g.texture) * np.maximum(clumps, 0.0)
        if g.kind in ("intermediate", "koilocyte", "hsil"):
            envelope = np.exp(
                -(((nsdf + np.float32(0.6 * um)) * np.float32(1.0 / (0.6 * um))) ** 2)
            )
            chrom += np.float32(0.3) * envelope
        nsub = od[nwin.y0 - y0 : nwin.y1 - y0, nwin.x0 - x0 : nwin.x1 - x0]
        nsub += (nmask * chrom)[:, :, None] * od_n[None, None, :]


def _add_debris(
    od: np.ndarray,
    piece: Debris,
    g: DebrisGeometry,
    x0: int,
    y0: int,
    w: int,
    h: int,
    mpp: float,
    style: SlideStyle,
) -> None:
    cx = piece.x - g.box_rel[0]
    cy = piece.y - g.box_rel[1]
    pad = math.ceil(3.0 * g.edge_px + 1.0)
    bx0, by0, bx1, by1 = g.box_rel
    win = _window(cx + bx0 - pad, cy + by0 - pad, cx + bx1 + pad, cy + by1 + pad, x0, y0, w, h)
    if win is None:
        return
    px, py = _grid(win, cx, cy)
    sdf = _blob_sdf(g.blobs[0], px, py)
    for blob in g.blobs[1:]:
        np.minimum(sdf, _blob_sdf(blob, px, py), out=sdf)
    dens = _ramp(sdf, g.edge_px) * (
        np.float32(1.0)
        + np.float32(0.2) * value_noise(win.x0, win.y0, win.w, win.h, 1.0 / mpp, g.key)
    )
    sub = od[win.y0 - y0 : win.y1 - y0, win.x0 - x0 : win.x1 - x0]
    sub += dens[:, :, None] * (g.od * style.nuc_gain)[None, None, :]


def _overlapping(boxes: np.ndarray, x0: int, y0: int, w: int, h: int, pad: int) -> np.ndarray:
    """Indices of boxes (n, 4: x, y, w, h) that come within ``pad`` px of the region."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    hit = (
        (boxes[:, 0] - pad < x0 + w)
        & (boxes[:, 0] + boxes[:, 2] + pad > x0)
        & (boxes[:, 1] - pad < y0 + h)
        & (boxes[:, 1] + boxes[:, 3] + pad > y0)
    )
    return np.flatnonzero(hit)


def render_region(
    cells: Sequence[SynthCell],
    debris: Sequence[Debris],
    x0: int,
    y0: int,
    w: int,
    h: int,
    mpp: float,
    seed: int,
) -> np.ndarray:
    """Render a region of a synthetic slide.

    Args:
        cells: the slide's cells (from :func:`train.synth.plan_cells` or a truth file).
        debris: the slide's debris.
        x0: left edge of the region, level-0 px (may be outside the slide).
        y0: top edge, level-0 px.
        w: width, px (> 0).
        h: height, px (> 0).
        mpp: microns per level-0 pixel the cells were planned at.
        seed: the slide seed the cells were planned with.

    Returns:
        (h, w, 3) uint8 RGB; the same pixels for a given level-0 position whatever region
        or tiling is asked for.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"region size must be positive, got {w}x{h} px")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    x0, y0, w, h = int(x0), int(y0), int(w), int(h)
    style = slide_style(int(seed))
    od = np.zeros((h, w, 3), dtype=np.float32)

    max_pad = math.ceil((3.0 * _MAX_BLUR_PX_PER_UM + _WOBBLE_UM) / mpp + 3.0)
    cell_boxes = np.array([(c.x, c.y, c.w, c.h) for c in cells], dtype=np.int64).reshape(-1, 4)
    for i in _overlapping(cell_boxes, x0, y0, w, h, max_pad):
        cell = cells[int(i)]
        _add_cell(od, cell, cell_geometry(seed, cell.id, cell.kind, mpp), x0, y0, w, h, mpp, style)
    debris_boxes = np.array([(d.x, d.y, d.w, d.h) for d in debris], dtype=np.int64).reshape(-1, 4)
    for i in _overlapping(debris_boxes, x0, y0, w, h, max_pad):
        piece = debris[int(i)]
        geom = debris_geometry(seed, piece.id, piece.kind, mpp)
        _add_debris(od, piece, geom, x0, y0, w, h, mpp, style)

    # faint glass texture and uneven illumination, then camera noise
    um = 1.0 / mpp
    od += (np.float32(0.008) * (fbm(x0, y0, w, h, 25.0 * um, 0x6A55, octaves=2) + 1.0))[:, :, None]
    light = np.float32(1.0) + np.float32(0.02) * value_noise(x0, y0, w, h, 600.0 * um, 0x11A7)
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= light[:, :, None]
    od *= style.glass_rgb[None, None, :]
    noise = block_normal(x0, y0, w, h, 3, (int(seed) * 2654435761 + 0x0015E) & 0xFFFFFFFF)
    od += noise * np.float32(style.noise_sd)
    np.clip(od, 0.0, 255.0, out=od)
    return np.rint(od).astype(np.uint8)
