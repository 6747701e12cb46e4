"""Reading ROIs: raw JPEG tiles through DALI where the file allows, else OpenSlide.

Every reader returns an ROI as a (roi_px, roi_px, 3) uint8 RGB array at the plan's mpp,
white outside the slide: a level within 2 % of the target mpp as it is, any other level
resampled to exactly the target mpp. Both readers cut the same box from the same level (see
`_LevelGeometry`) and resample it the same way, so they differ only in how JPEG is
decoded: for libjpeg-turbo on both sides (DALI CPU and OpenSlide), not at all. One
exception: on a level whose downsample is not a whole number (odd level-0 sizes, Aperio's
4.0003), OpenSlide maps level-0 coordinates to fractional level positions and interpolates
by the fraction, while `TileReader` cuts whole level pixels: a shift of under one level
pixel. nvJPEG (`device="mixed"`) rounds differently from libjpeg-turbo: close, not equal.

`TileReader` reads the compressed tiles an ROI needs straight from the file (offsets from
tifffile, one file descriptor, `os.pread`), decodes them in one DALI batch and stitches
them. It reads only levels where OpenSlide's level is one TIFF page tiled on a plain grid
(Aperio SVS and generic tiled TIFF); other formats go through `OpenSlideReader`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engines.errors import BackendUnavailableError
from engines.preprocess import resample
from worker.errors import SlideReadError
from worker.pipeline.plan import Roi
from worker.wsi.decode import (
    JpegDecodeError,
    JpegDecoder,
    dali_available,
    default_device,
    jpeg_stream,
)
from worker.wsi.slide import (
    MPP_TOLERANCE,
    LevelChoice,
    Slide,
    SlideInfo,
    damaged_tile_sentence,
    level_for_mpp,
)

logger = logging.getLogger(__name__)

# Formats whose OpenSlide levels are TIFF pages read tile for tile with no further
# processing. Others (Ventana's overlapping tiles, Philips' sparse tiles, NDPI's strips…)
# are left to OpenSlide.
_TILE_VENDORS = frozenset({"aperio", "generic-tiff"})
_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
PREFER = ("auto", "dali", "openslide")


class RoiReader(Protocol):
    """Reads ROIs of one slide at one resolution."""

    name: str

    def read(self, roi: Roi) -> np.ndarray:
        """The ROI as (roi_px, roi_px, 3) uint8 RGB at the target mpp, white outside the slide."""
        ...

    def close(self) -> None:
        """Release files and pipelines."""
        ...


class _LevelGeometry:
    """Where an ROI lies on the level it is read from, and the final resample.

    An ROI at level-0 (x, y) becomes the level box at (round(x / ds), round(y / ds)).
    When the level is within tolerance of the target, the box is roi_px level pixels, read
    as is. Otherwise it is ceil(roi_px * scale) level pixels, resampled by exactly
    1 / scale (INTER_AREA to shrink, INTER_LINEAR to enlarge) and cut to roi_px, so each
    output pixel spans exactly `scale` level pixels: the ROI is at the target mpp, not at
    the mpp that rounding the box to whole pixels would give.
    """

    def __init__(self, info: SlideInfo, target_mpp: float, roi_px: int, tolerance: float) -> None:
        if roi_px <= 0:
            raise ValueError(f"roi_px must be > 0, got {roi_px}")
        self.info = info
        self.roi_px = roi_px
        self.choice: LevelChoice = level_for_mpp(info, target_mpp, tolerance)
        scale = self.choice.scale
        # The 1e-9 keeps a box of exactly roi_px * scale pixels from growing by rounding.
        self.lvl_roi_px = roi_px if scale == 1.0 else math.ceil(roi_px * scale - 1e-9)

    @property
    def mpp(self) -> float:
        """Microns per pixel of the ROIs read (see `LevelChoice.mpp`)."""
        return self.choice.mpp

    def lvl_origin(self, roi: Roi) -> tuple[int, int]:
        """Top-left of the ROI in pixels of the chosen level."""
        ds = self.choice.downsample
        return round(roi.l0_x / ds), round(roi.l0_y / ds)

    def to_target(self, lvl_image: np.ndarray) -> np.ndarray:
        """Resample a (lvl_roi_px, lvl_roi_px, 3) level image to (roi_px, roi_px, 3)."""
        scale = self.choice.scale
        if scale == 1.0:
            return lvl_image
        out = resample(lvl_image, 1.0 / scale)  # the resampling training uses too
        return np.ascontiguousarray(out[: self.roi_px, : self.roi_px])

    def where(self, roi: Roi) -> str:
        return f"ROI {roi.index} at level-0 ({roi.l0_x}, {roi.l0_y}) of {self.info.path}"


class OpenSlideReader(_LevelGeometry):
    """Reads ROIs with OpenSlide `read_region` at the chosen level, then resamples.

    Args:
        slide: the open slide (stays owned by the caller).
        target_mpp: microns per output pixel.
        roi_px: output side in pixels.
        tolerance: relative mpp tolerance (as the plan used).
    """

    name = "openslide"

    def __init__(
        self, slide: Slide, target_mpp: float, roi_px: int, tolerance: float = MPP_TOLERANCE
    ) -> None:
        super().__init__(slide.info, target_mpp, roi_px, tolerance)
        self._slide = slide

    def read(self, roi: Roi) -> np.ndarray:
        """Read one ROI; raises SlideReadError (naming the damaged tile where it can be
        found) when OpenSlide fails."""
        lvl_x, lvl_y = self.lvl_origin(roi)
        ds = self.choice.downsample
        size = (self.lvl_roi_px, self.lvl_roi_px)
        image = self._slide.read_region(
            (round(lvl_x * ds), round(lvl_y * ds)), self.choice.level, size
        )
        return self.to_target(image)

    def close(self) -> None:
        """Nothing to release: the slide belongs to the caller."""


@dataclass(frozen=True, slots=True)
class JpegTileLayout:
    """Where one level's JPEG tiles are in the file.

    Attributes:
        page: TIFF page index (main IFD chain).
        width, height: level size in pixels.
        tile_w, tile_h: tile size in pixels.
        offsets, bytecounts: per tile, row-major, int64; a bytecount of 0 is a missing
            tile (read as white).
        tables: the JPEGTables tag, or None.
        rgb: photometric RGB (else YCbCr).
    """

    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    tables: bytes | None
    rgb: bool

    @property
    def tiles_across(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def tiles_down(self) -> int:
        return math.ceil(self.height / self.tile_h)


def jpeg_tile_layout(info: SlideInfo, level: int) -> JpegTileLayout | None:
    """The JPEG tile layout of an OpenSlide level, or None if TileReader cannot read it.

    The level is matched to a TIFF page by its dimensions: exactly one tiled page of the
    main IFD chain must have them. The page must be baseline 8-bit, 3-sample, chunky,
    JPEG (compression 7) with photometric RGB or YCbCr.
    """
    if info.vendor not in _TILE_VENDORS:
        return None
    import tifffile

    lvl_w, lvl_h = info.level_dimensions[level]
    try:
        with tifffile.TiffFile(info.path) as tif:
            pages = [
                p
                for p in tif.pages
                if p.is_tiled and (p.imagewidth, p.imagelength) == (lvl_w, lvl_h)
            ]
            if len(pages) != 1:
                logger.debug("level %d: %d TIFF pages of %dx%d", level, len(pages), lvl_w, lvl_h)
                return None
            page = pages[0]
            if not (
                page.compression == _JPEG
                and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
                and page.samplesperpixel == 3
                and page.bitspersample == 8
                and page.planarconfig == 1
                and page.imagedepth == 1
                and page.tiledepth == 1
                and _orientation(page) == 1
            ):
                return None
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            layout = JpegTileLayout(
                page=page.index,
                width=lvl_w,
                height=lvl_h,
                tile_w=page.tilewidth,
                tile_h=page.tilelength,
                offsets=offsets,
                bytecounts=counts,
                tables=bytes(page.jpegtables) if page.jpegtables else None,
                rgb=page.photometric == _PHOTOMETRIC_RGB,
            )
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not for us"
        logger.debug("level %d: not readable as JPEG tiles: %s", level, exc)
        return None
    if offsets.size != layout.tiles_across * layout.tiles_down:
        return None
    return layout


def _orientation(page) -> int:  # tifffile.TiffPage
    tag = page.tags.get(274)  # Orientation; absent means 1 (top-left)
    return int(tag.value) if tag is not None else 1


class TileReader(_LevelGeometry):
    """Reads ROIs from raw JPEG tiles: `os.pread` the tiles, one DALI batch, stitch, resample.

    Args:
        slide: the open slide (its info only; the reader opens its own file descriptor).
        target_mpp: microns per output pixel.
        roi_px: output side in pixels.
        device: DALI decoding device, `"cpu"` or `"mixed"` (GPU).
        tolerance: relative mpp tolerance (as the plan used).
        num_threads: DALI CPU threads.
        layout: the level's tile layout, if already found.

    Raises:
        ValueError: the chosen level is not JPEG-tiled (see `jpeg_tile_layout`).
        BackendUnavailableError: DALI or (for "mixed") a GPU is missing.
    """

    def __init__(
        self,
        slide: Slide,
        target_mpp: float,
        roi_px: int,
        device: str = "cpu",
        tolerance: float = MPP_TOLERANCE,
        num_threads: int = 2,
        layout: JpegTileLayout | None = None,
    ) -> None:
        super().__init__(slide.info, target_mpp, roi_px, tolerance)
        layout = layout or jpeg_tile_layout(slide.info, self.choice.level)
        if layout is None:
            raise ValueError(
                f"level {self.choice.level} of {slide.info.path} is not a JPEG-tiled TIFF page"
            )
        self.layout = layout
        most_tiles = (math.ceil(self.lvl_roi_px / layout.tile_w) + 1) * (
            math.ceil(self.lvl_roi_px / layout.tile_h) + 1
        )
        self._decoder = JpegDecoder(device=device, max_batch=most_tiles, num_threads=num_threads)
        self.name = self._decoder.name
        # ROIs overlap and follow the grid row by row, so a band of tile rows as wide as the
        # level serves every tile from cache after its first decode (about 4x fewer decodes
        # at 25 % overlap). Capped in bytes so memory stays flat for any slide and tile size.
        band_rows = math.ceil(self.lvl_roi_px / layout.tile_h) + 1
        band_bytes = layout.tiles_across * band_rows * layout.tile_w * layout.tile_h * 3
        self._cache = _TileCache(min(band_bytes, MAX_CACHED_BYTES))
        self._fd: int | None = os.open(slide.info.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read(self, roi: Roi) -> np.ndarray:
        """Read one ROI; raises SlideReadError (naming the tile) when a tile cannot be read
        or decoded."""
        lay = self.layout
        lvl_x, lvl_y = self.lvl_origin(roi)
        side = self.lvl_roi_px
        canvas = np.full((side, side, 3), 255, np.uint8)
        # Tiles meeting [lvl_x, lvl_x + side) x [lvl_y, lvl_y + side) inside the level.
        tx0, ty0 = max(0, lvl_x // lay.tile_w), max(0, lvl_y // lay.tile_h)
        tx1 = min(lay.tiles_across, -(-(lvl_x + side) // lay.tile_w))
        ty1 = min(lay.tiles_down, -(-(lvl_y + side) // lay.tile_h))
        tiles = [
            (tx, ty)
            for ty in range(ty0, ty1)
            for tx in range(tx0, tx1)
            if lay.bytecounts[ty * lay.tiles_across + tx] > 0
        ]
        cached = {t: self._cache.get(t) for t in tiles}
        missing = [t for t, image in cached.items() if image is None]
        if missing:
            for t, image in zip(missing, self._decode_tiles(roi, missing), strict=True):
                cached[t] = image
                self._cache.put(t, image)
        for (tx, ty), tile in cached.items():
            self._paste(canvas, tile, tx * lay.tile_w - lvl_x, ty * lay.tile_h - lvl_y, tx, ty)
        return self.to_target(canvas)

    def _decode_tiles(self, roi: Roi, tiles: list[tuple[int, int]]) -> list[np.ndarray]:
        lay = self.layout
        if self._fd is None:
            raise SlideReadError(f"Cannot read {self.where(roi)}: the reader is closed.")
        streams = []
        for tx, ty in tiles:
            i = ty * lay.tiles_across + tx
            n, offset = int(lay.bytecounts[i]), int(lay.offsets[i])
            try:
                raw = os.pread(self._fd, n, offset)
            except OSError as exc:
                raise SlideReadError(f"Cannot read {self.where(roi)}: {exc}.") from exc
            if len(raw) != n:
                raise SlideReadError(
                    self._damaged((tx, ty), f"only {len(raw)} of its {n} bytes are in the file")
                )
            try:
                streams.append(jpeg_stream(raw, lay.tables, lay.rgb))
            except ValueError as exc:
                raise SlideReadError(self._damaged((tx, ty), "no JPEG start marker")) from exc
        try:
            return self._decoder.decode(streams)
        except JpegDecodeError as exc:
            if exc.sample is None:
                raise SlideReadError(
                    f"Cannot decode {self.where(roi)}: its tiles are not valid JPEG."
                ) from exc
            raise SlideReadError(self._damaged(tiles[exc.sample], "not valid JPEG")) from exc

    def _damaged(self, tile: tuple[int, int], detail: str) -> str:
        lay = self.layout
        return damaged_tile_sentence(
            self.info.path,
            self.choice.level,
            tile,
            (lay.tile_w, lay.tile_h),
            (lay.width, lay.height),
            detail,
        )

    def _paste(
        self, canvas: np.ndarray, tile: np.ndarray, dx: int, dy: int, tx: int, ty: int
    ) -> None:
        """Copy the part of a tile that is inside the level into the canvas at (dx, dy)."""
        lay = self.layout
        # Edge tiles are padded to full size in the file: keep only pixels inside the level.
        valid_w = min(tile.shape[1], lay.width - tx * lay.tile_w)
        valid_h = min(tile.shape[0], lay.height - ty * lay.tile_h)
        sx0, sy0 = max(0, -dx), max(0, -dy)
        sx1 = min(valid_w, canvas.shape[1] - dx)
        sy1 = min(valid_h, canvas.shape[0] - dy)
        if sx1 > sx0 and sy1 > sy0:
            canvas[dy + sy0 : dy + sy1, dx + sx0 : dx + sx1] = tile[sy0:sy1, sx0:sx1]

    def close(self) -> None:
        """Close the file descriptor and the DALI pipeline."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._decoder.close()


#: Most bytes of decoded tiles a TileReader keeps: 1365 tiles of 256 px, 341 of 512 px.
MAX_CACHED_BYTES = 256 << 20


class _TileCache:
    """A thread-safe LRU of decoded tiles keyed by `(tx, ty)` (read-ahead threads share it),
    holding at most `max_bytes` of them; a tile larger than that is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._tiles[key] = tile
            self.nbytes += tile.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self.nbytes -= dropped.nbytes


def make_reader(
    slide: Slide,
    target_mpp: float,
    roi_px: int,
    prefer: str = "auto",
    device: str | None = None,
    tolerance: float = MPP_TOLERANCE,
    num_threads: int = 2,
) -> TileReader | OpenSlideReader:
    """The reader for a slide: raw tiles through DALI where the level allows, else OpenSlide.

    Args:
        slide: the open slide.
        target_mpp: microns per ROI pixel.
        roi_px: ROI side in pixels.
        prefer: `"auto"` (DALI where possible), `"dali"` (DALI or an error) or
            `"openslide"`.
        device: DALI device, `"cpu"` or `"mixed"`; None picks `"mixed"` where a GPU is
            visible.
        tolerance: relative mpp tolerance (as the plan used).
        num_threads: DALI CPU threads.

    Returns:
        A reader; its `.name` is `"dali-cpu"`, `"dali-gpu"` or `"openslide"`.

    Raises:
        ValueError: unknown `prefer`.
        SlideReadError: `prefer="dali"` and the level is not JPEG-tiled.
        BackendUnavailableError: `prefer="dali"` and DALI (or the GPU) is missing.
    """
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    if prefer == "openslide":
        return OpenSlideReader(slide, target_mpp, roi_px, tolerance)
    level = level_for_mpp(slide.info, target_mpp, tolerance).level
    layout = jpeg_tile_layout(slide.info, level)
    if layout is None:
        if prefer == "dali":
            raise SlideReadError(
                f"Level {level} of {slide.info.path} ({slide.info.vendor}) is not a JPEG-tiled "
                "TIFF page, so DALI cannot read it; use the OpenSlide reader."
            )
        return OpenSlideReader(slide, target_mpp, roi_px, tolerance)
    if not dali_available():
        if prefer == "dali":
            raise BackendUnavailableError("NVIDIA DALI is not installed; use the OpenSlide reader.")
        logger.info("DALI is not installed: reading %s through OpenSlide", slide.info.path)
        return OpenSlideReader(slide, target_mpp, roi_px, tolerance)
    return TileReader(
        slide,
        target_mpp,
        roi_px,
        device=device or default_device(),
        tolerance=tolerance,
        num_threads=num_threads,
        layout=layout,
    )


def read_ahead(
    reader: RoiReader, rois: Iterable[Roi], depth: int = 4, workers: int = 2
) -> Iterator[tuple[Roi, np.ndarray]]:
    """Yield (roi, image) in the order of `rois`, with reads running ahead on threads.

    At most `depth` reads are queued or running at any time, so memory holds at most
    `depth` + 1 ROI images. An error reading an ROI is raised when that ROI's turn comes.
    Closing the generator early cancels the reads not yet started.

    Args:
        reader: any `RoiReader` (must be safe to call from several threads).
        rois: the ROIs to read.
        depth: reads in flight, >= 1.
        workers: reading threads, >= 1.
    """
    if depth < 1 or workers < 1:
        raise ValueError(f"depth and workers must be >= 1, got {depth} and {workers}")
    pending: deque[tuple[Roi, Future[np.ndarray]]] = deque()
    it = iter(rois)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi-read")
    try:
        for roi in it:
            pending.append((roi, pool.submit(reader.read, roi)))
            if len(pending) >= depth:
                break
        while pending:
            roi, future = pending.popleft()
            image = future.result()
            for nxt in it:
                pending.append((nxt, pool.submit(reader.read, nxt)))
                break
            yield roi, image
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
