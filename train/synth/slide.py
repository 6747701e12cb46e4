"""Write a synthetic slide as a JPEG-tiled pyramidal TIFF that OpenSlide opens.

Layout: level 0 then levels downsampled by 2 each (until the smallest side is under
~1000 px), each level its own top-level page (not SubIFDs), RGB stored as JPEG YCbCr in
square tiles, ``ResolutionUnit = CENTIMETER`` with ``XResolution = YResolution = 1e4/mpp``
so OpenSlide (generic-tiff) reports ``openslide.mpp-x`` / ``openslide.mpp-y``.

Memory stays bounded: level 0 is rendered one strip of rows at a time (the next strip
renders on a worker thread while the current one is compressed), lower levels are built
from the same strips by 2x2 averaging into temporary memory-mapped files beside the output.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from train.synth.cells import Debris, SynthCell
from train.synth.layout import cellular_area, normalise_class_mix, plan_cells
from train.synth.render import render_region
from train.synth.truth import write_truth

logger = logging.getLogger(__name__)

MIN_LEVEL_SIDE_PX = 1000
"""Levels are added until the smallest side of the last one is below this."""
_RENDER_BLOCK_PX = 2048


@dataclass(frozen=True)
class SynthSlide:
    """A written synthetic slide and its ground truth.

    Attributes:
        path: the TIFF.
        cells_csv: ``<stem>.cells.csv``.
        truth_json: ``<stem>.truth.json``.
        width, height: level-0 size, px.
        mpp: microns per level-0 pixel.
        seed: slide seed.
        level_dimensions: (width, height) per level, level 0 first.
        cells: the cells (boxes in level-0 px).
        debris: the debris pieces.
        timings_s: seconds spent planning, rendering+writing level 0, writing lower levels.
    """

    path: Path
    cells_csv: Path
    truth_json: Path
    width: int
    height: int
    mpp: float
    seed: int
    level_dimensions: tuple[tuple[int, int], ...]
    cells: tuple[SynthCell, ...]
    debris: tuple[Debris, ...]
    timings_s: dict[str, float] = field(default_factory=dict)


def level_dimensions_for(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) per pyramid level: halve (floor) until the smallest side < 1000 px."""
    dims = [(width, height)]
    while min(dims[-1]) >= MIN_LEVEL_SIDE_PX and min(dims[-1]) >= 2:
        w, h = dims[-1]
        dims.append((w // 2, h // 2))
    return dims


def _halve(strip: np.ndarray) -> np.ndarray:
    """2x2 mean of an (h, w, 3) uint8 array, dropping an odd last row / column."""
    h, w = strip.shape[0] // 2 * 2, strip.shape[1] // 2 * 2
    s = strip[:h, :w].astype(np.uint16)
    out = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2
    return (out >> 2).astype(np.uint8)


def _tiles_of(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Full-size tiles of a strip (height a multiple of ``tile_px`` except at the end),
    row-major, the incomplete edge tiles padded by edge replication."""
    h, w = strip.shape[:2]
    for ty in range(0, h, tile_px):
        for tx in range(0, w, tile_px):
            tile = strip[ty : ty + tile_px, tx : tx + tile_px]
            if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
                pad = ((0, tile_px - tile.shape[0]), (0, tile_px - tile.shape[1]), (0, 0))
                tile = np.pad(tile, pad, mode="edge")
            yield np.ascontiguousarray(tile)


def _render_strip(
    cells: Sequence[SynthCell], debris: Sequence[Debris], y0: int, rows: int, width: int,
    mpp: float, seed: int,
) -> np.ndarray:  # fmt: skip
    strip = np.empty((rows, width, 3), dtype=np.uint8)
    for x0 in range(0, width, _RENDER_BLOCK_PX):
        bw = min(_RENDER_BLOCK_PX, width - x0)
        strip[:, x0 : x0 + bw] = render_region(cells, debris, x0, y0, bw, rows, mpp, seed)
    return strip


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int = 8192,
    height: int = 8192,
    mpp: float = 0.5,
    seed: int = 0,
    cells: int = 600,
    class_mix: Mapping[str, float] | None = None,
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> SynthSlide:
    """Plan, render and write a synthetic LBC slide with its ground truth.

    Args:
        path: output TIFF path (``.tiff``); truth files go beside it.
        width: level-0 width, px.
        height: level-0 height, px.
        mpp: microns per level-0 pixel.
        seed: slide seed (>= 0); the same arguments give the same slide.
        cells: number of cells.
        class_mix: weights per class (NILM, LSIL, HSIL); default 0.6 / 0.2 / 0.2.
        tile_px: TIFF tile side, px (multiple of 16).
        jpeg_quality: JPEG quality, 1..100.

    Returns:
        The written slide, its cells and debris, and timings.

    Raises:
        ValueError: bad arguments, or too many cells for the slide.
    """
    if tile_px <= 0 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    path = Path(path)
    t_start = time.perf_counter()
    mix = normalise_class_mix(class_mix)
    cell_list, debris = plan_cells(width, height, mpp, cells, seed, mix)
    t_planned = time.perf_counter()

    dims = level_dimensions_for(width, height)
    n_levels = len(dims)
    strip_rows = max(2 * tile_px, 2 ** (n_levels - 1))
    strip_rows = math.ceil(strip_rows / tile_px) * tile_px
    px_per_cm = 1e4 / mpp
    page_args = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(jpeg_quality)},
        tile=(tile_px, tile_px),
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
        software="papscan train.synth",
        maxworkers=2,
        buffersize=32 * 2**20,  # tifffile buffers this much raw tile data per batch
    )
    description = (
        f"papscan synthetic liquid-based cytology slide; seed={seed}; mpp={mpp}; "
        f"cells={len(cell_list)}"
    )
    bigtiff = width * height * 3 > 2**31
    part = path.with_name(path.name + ".part")
    timings: dict[str, float] = {"plan": t_planned - t_start}

    try:
        t_level0 = _write_pyramid(
            part, cell_list, debris, dims, mpp, seed, tile_px, strip_rows, bigtiff,
            description, page_args,
        )  # fmt: skip
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)
    t_written = time.perf_counter()
    timings["level0"] = t_level0 - t_planned
    timings["lower_levels"] = t_written - t_level0

    area = cellular_area(width, height, seed)
    params = {
        "width": width,
        "height": height,
        "mpp": mpp,
        "seed": seed,
        "n_cells": len(cell_list),
        "class_mix": mix,
        "n_debris": len(debris),
        "cellular_area": asdict(area),
        "level_dimensions": [list(d) for d in dims],
        "tile_px": tile_px,
        "jpeg_quality": jpeg_quality,
        "generator": "train.synth",
    }
    csv_path, json_path = write_truth(path, cell_list, params)
    timings["total"] = time.perf_counter() - t_start
    logger.info(
        "wrote synthetic slide %s (%dx%d px, %d levels, %d cells) in %.1f s",
        path, width, height, n_levels, len(cell_list), timings["total"],
    )  # fmt: skip
    return SynthSlide(
        path=path,
        cells_csv=csv_path,
        truth_json=json_path,
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        level_dimensions=tuple(dims),
        cells=tuple(cell_list),
        debris=tuple(debris),
        timings_s=timings,
    )


def _write_pyramid(
    part: Path,
    cell_list: Sequence[SynthCell],
    debris: Sequence[Debris],
    dims: list[tuple[int, int]],
    mpp: float,
    seed: int,
    tile_px: int,
    strip_rows: int,
    bigtiff: bool,
    description: str,
    page_args: dict,
) -> float:
    """Write all levels to ``part``; returns the perf_counter time level 0 was done."""
    width, height = dims[0]
    with tempfile.TemporaryDirectory(dir=part.parent, prefix=".synth-") as tmp:
        lower = [
            np.lib.format.open_memmap(
                os.path.join(tmp, f"level{k}.npy"), mode="w+", dtype=np.uint8, shape=(h, w, 3)
            )
            for k, (w, h) in enumerate(dims[1:], start=1)
        ]
        filled = [0] * len(lower)

        def level0_tiles() -> Iterator[np.ndarray]:
            starts = list(range(0, height, strip_rows))
            with ThreadPoolExecutor(max_workers=1) as pool:

                def submit(y0: int) -> Future[np.ndarray]:
                    rows = min(strip_rows, height - y0)
                    return pool.submit(_render_strip, cell_list, debris, y0, rows, width, mpp, seed)

                pending = submit(starts[0])
                for i, _ in enumerate(starts):
                    strip = pending.result()
                    if i + 1 < len(starts):
                        pending = submit(starts[i + 1])
                    level_strip = strip
                    for k, arr in enumerate(lower):
                        level_strip = _halve(level_strip)
                        rows = min(level_strip.shape[0], arr.shape[0] - filled[k])
                        arr[filled[k] : filled[k] + rows] = level_strip[:rows, : arr.shape[1]]
                        filled[k] += rows
                    yield from _tiles_of(strip, tile_px)

        with tifffile.TiffWriter(part, bigtiff=bigtiff) as tif:
            tif.write(
                level0_tiles(),
                shape=(height, width, 3),
                dtype=np.uint8,
                subfiletype=0,
                description=description,
                **page_args,
            )
            t_level0 = time.perf_counter()
            for k, arr in enumerate(lower):
                if filled[k] != arr.shape[0]:
                    raise RuntimeError(f"level {k + 1}: built {filled[k]} of {arr.shape[0]} rows")
                tif.write(
                    _tiles_of(arr, tile_px),
                    shape=arr.shape,
                    dtype=np.uint8,
                    subfiletype=1,
                    **page_args,
                )
    return t_level0
