"""Noise fields defined on absolute level-0 pixel coordinates.

Every function here returns, for a pixel at level-0 position ``(x, y)``, a value that
depends only on ``(x, y)`` and the key, never on the region asked for. That is what
makes :func:`train.synth.render.render_region` give identical pixels whatever the tiling.

- :func:`value_noise` is smooth lattice noise (a hash of integer lattice points,
  smoothstep-interpolated), evaluated separably on a rectangular grid.
- :func:`block_normal` is per-pixel Gaussian noise drawn per fixed-size block of level-0
  pixels from a generator seeded by ``(key, block index)``.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

BLOCK_PX = 256
"""Side of the level-0 blocks that per-pixel noise is drawn in."""

_MASK32 = np.uint64(0xFFFFFFFF)


def _as_u32(values: np.ndarray) -> np.ndarray:
    """Wrap int64 values into uint32 (two's complement), keeping the shape."""
    return (values.astype(np.int64).astype(np.uint64) & _MASK32).astype(np.uint32)


def hash_unit(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Hash integer lattice coordinates to floats in [-1, 1).

    Args:
        ix: integer x lattice indices (any shape, broadcastable with ``iy``).
        iy: integer y lattice indices.
        key: 32-bit key choosing an independent field.

    Returns:
        float32 array of the broadcast shape.
    """
    hx = _as_u32(ix) * np.uint32(0x8DA6B343)
    hy = _as_u32(iy) * np.uint32(0xD8163841)
    h = hx ^ hy ^ np.uint32(key & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 / 16777216.0) - np.float32(1.0)


def _lattice_weights(coords_px: np.ndarray, scale_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index below each coordinate and the smoothstep weight towards the next."""
    t = coords_px.astype(np.float64) / float(scale_px)
    i0 = np.floor(t)
    f = (t - i0).astype(np.float32)
    f = f * f * (np.float32(3.0) - np.float32(2.0) * f)
    return i0.astype(np.int64), f


def value_noise(x0: int, y0: int, w: int, h: int, scale_px: float, key: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the level-0 pixel grid ``[x0, x0+w) x [y0, y0+h)``.

    Args:
        x0: left edge, level-0 px.
        y0: top edge, level-0 px.
        w: width, px.
        h: height, px.
        scale_px: lattice spacing (feature size), level-0 px; must be > 0.
        key: field key.

    Returns:
        float32 array (h, w).
    """
    if scale_px <= 0:
        raise ValueError(f"noise scale must be positive, got {scale_px}")
    ix, fx = _lattice_weights(np.arange(x0, x0 + w), scale_px)
    iy, fy = _lattice_weights(np.arange(y0, y0 + h), scale_px)
    lx0 = int(ix[0]) if w else 0
    ly0 = int(iy[0]) if h else 0
    lat_x = np.arange(lx0, (int(ix[-1]) if w else lx0) + 2)
    lat_y = np.arange(ly0, (int(iy[-1]) if h else ly0) + 2)
    lattice = hash_unit(lat_x[None, :], lat_y[:, None], key)  # (ly, lx)
    cx = ix - lx0
    rows = lattice[:, cx] * (np.float32(1.0) - fx) + lattice[:, cx + 1] * fx  # (ly, w)
    cy = iy - ly0
    out = rows[cy, :] * (np.float32(1.0) - fy)[:, None] + rows[cy + 1, :] * fy[:, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def fbm(
    x0: int, y0: int, w: int, h: int, scale_px: float, key: int, octaves: int = 2
) -> np.ndarray:
    """Fractal sum of :func:`value_noise` octaves (halving scale, halving amplitude).

    Returns:
        float32 array (h, w), roughly in [-1, 1].
    """
    total = np.zeros((h, w), dtype=np.float32)
    amp = 1.0
    norm = 0.0
    for octave in range(octaves):
        scale = max(scale_px / (2**octave), 0.5)
        total += np.float32(amp) * value_noise(x0, y0, w, h, scale, key + 7919 * octave)
        norm += amp
        amp *= 0.5
    total *= np.float32(1.0 / norm)
    return total


def block_normal(x0: int, y0: int, w: int, h: int, channels: int, key: int) -> np.ndarray:
    """Standard normal per-pixel noise, identical for a pixel whatever region is asked.

    Drawn per :data:`BLOCK_PX` block of level-0 pixels from ``default_rng((key, bx, by))``.

    Returns:
        float32 array (h, w, channels).
    """
    out = np.empty((h, w, channels), dtype=np.float32)
    if w <= 0 or h <= 0:
        return out
    bx0, bx1 = x0 // BLOCK_PX, (x0 + w - 1) // BLOCK_PX
    by0, by1 = y0 // BLOCK_PX, (y0 + h - 1) // BLOCK_PX
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            rng = np.random.default_rng((key & 0xFFFFFFFF, bx & 0xFFFFFFFF, by & 0xFFFFFFFF))
            block = rng.standard_normal((BLOCK_PX, BLOCK_PX, channels), dtype=np.float32)
            gx0, gy0 = bx * BLOCK_PX, by * BLOCK_PX
            sx0, sx1 = max(x0, gx0), min(x0 + w, gx0 + BLOCK_PX)
            sy0, sy1 = max(y0, gy0), min(y0 + h, gy0 + BLOCK_PX)
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = block[
                sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0
            ]
    return out
