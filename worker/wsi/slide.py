"""Slide access through OpenSlide: open, describe, check, read regions.

`open_slide` is the one door to a slide file. It refuses, with one sentence, anything
papscan cannot scan to the end: a missing path, a symbolic link loop, a directory, a format
OpenSlide does not know, a file that is not what its extension says, a truncated or corrupt
file, a slide without a plausible microns per pixel (mpp). Damage is looked for at open time
(the TIFF structure and a probe read of each level's last tile), not found halfway through
an overnight scan; damage found later, while reading, names the tile as well.

Frames: `l0_` level-0 pixels, `lvl_` pixels of a pyramid level. Sizes are (width, height).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import openslide

from worker.errors import SlideOpenError, SlideReadError

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi/.vms/.vmu, Leica .scn, MIRAX .mrxs, "
    "Philips TIFF, Sakura .svslide, Ventana .bif, Zeiss .czi and DICOM"
)

# Extensions that promise a slide: a file with one of these that OpenSlide cannot place
# is "not a slide" rather than "a format we do not support".
SLIDE_SUFFIXES = frozenset(
    {
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".svslide",
        ".bif",
        ".czi",
        ".dcm",
    }
)

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HASH_HEAD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SlideInfo:
    """What papscan knows about an opened slide.

    Attributes:
        path: the slide file, absolute.
        fingerprint: `openslide.quickhash-1`, or `sha256:` + a hash of the properties and
            the first MiB of the file for formats without one; identifies the slide
            whatever its path.
        vendor: OpenSlide's format name (`aperio`, `generic-tiff`, ...).
        width, height: level-0 size in pixels.
        mpp_x, mpp_y: microns per level-0 pixel (from the file, or the caller's override).
        level_count: number of pyramid levels.
        level_dimensions: (width, height) of each level, in that level's pixels.
        level_downsamples: level-0 pixels per level pixel, per level.
    """

    path: Path
    fingerprint: str
    vendor: str
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    @property
    def mpp(self) -> float:
        """Mean microns per level-0 pixel (slides have square pixels to < 1 %)."""
        return (self.mpp_x + self.mpp_y) / 2.0

    def level_mpp(self, level: int) -> float:
        """Mean microns per pixel at `level`."""
        return self.mpp * self.level_downsamples[level]


#: Microns per pixel papscan believes (inclusive): 0.05 is finer than any optical scan, 20
#: coarser than a 1x overview. Outside it the file's resolution tags (or an override) are
#: wrong, and planning at 0.5 µm/px would ask for impossible amounts of memory.
MPP_RANGE = (0.05, 20.0)

_RANGE_TEXT = f"{MPP_RANGE[0]:g}–{MPP_RANGE[1]:g} µm/px"


def check_mpp(mpp: float, what: str) -> float:
    """`mpp` if it lies in `MPP_RANGE`, else a one-sentence SlideOpenError.

    Args:
        mpp: microns per pixel.
        what: where the value came from, to start the sentence ("--mpp", "the mpp on
            line 3 of the manifest tonight.csv").
    """
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:  # NaN fails too
        raise SlideOpenError(
            f"{what} is {mpp:g} µm/px, outside the plausible range {_RANGE_TEXT}; "
            "give the slide's real microns per pixel."
        )
    return mpp


#: Relative mpp difference within which a level is read as it is (0.499 for 0.5); any
#: larger difference is resampled to exactly the target mpp.
MPP_TOLERANCE = 0.02
#: A slide whose level 0 is coarser than the target mpp by more than this is enlarged to
#: it: the scan runs, with a warning, since enlarging cannot restore detail the scan lacks.
COARSE_LIMIT = 0.25


@dataclass(frozen=True, slots=True)
class LevelChoice:
    """The pyramid level to read for a wanted resolution, and what is left to resample.

    Attributes:
        level: the OpenSlide level.
        downsample: level-0 pixels per level pixel.
        level_mpp: microns per pixel of that level.
        scale: level pixels per target pixel; 1.0 exactly when the level is within
            tolerance of the target (read as is), > 1 to shrink, < 1 to enlarge.
    """

    level: int
    downsample: float
    level_mpp: float
    scale: float

    @property
    def l0_per_px(self) -> float:
        """Level-0 pixels per target pixel."""
        return self.scale * self.downsample

    @property
    def mpp(self) -> float:
        """Microns per pixel as delivered: the level's own when it is read as is (within
        tolerance of the target), else the target exactly."""
        return self.level_mpp * self.scale


def level_for_mpp(
    info: SlideInfo, target_mpp: float, tolerance: float = MPP_TOLERANCE
) -> LevelChoice:
    """Pick the coarsest level that is not coarser than `target_mpp`.

    A level whose mpp is within `tolerance` (relative) of the target counts as equal and
    is read without resampling (0.499 for 0.5); any other is resampled to exactly the
    target, from the coarsest level finer than it (0.46 for 0.5 is shrunk by 0.46/0.5).
    If even level 0 is coarser than the target, level 0 is returned with `scale` < 1
    (enlarge; see `coarse_slide_warning`).

    Args:
        info: the slide.
        target_mpp: wanted microns per pixel, > 0.
        tolerance: relative tolerance, e.g. 0.02 = 2 %.

    Returns:
        The level and the remaining scale factor.

    Raises:
        ValueError: `target_mpp` or `tolerance` is not positive / negative.
    """
    if not target_mpp > 0:
        raise ValueError(f"target_mpp must be > 0, got {target_mpp}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    # The 1e-9 keeps a level exactly at the tolerance (0.51 for 0.5) from being lost to
    # floating-point rounding.
    best = 0
    for level in range(info.level_count):
        if info.level_mpp(level) / target_mpp - 1.0 <= tolerance + 1e-9:
            if info.level_mpp(level) > info.level_mpp(best):
                best = level
    level_mpp = info.level_mpp(best)
    scale = target_mpp / level_mpp
    if abs(level_mpp / target_mpp - 1.0) <= tolerance + 1e-9:
        scale = 1.0
    return LevelChoice(
        level=best, downsample=info.level_downsamples[best], level_mpp=level_mpp, scale=scale
    )


def coarse_slide_warning(
    info: SlideInfo, target_mpp: float, limit: float = COARSE_LIMIT
) -> str | None:
    """One sentence when the slide's level 0 is coarser than `target_mpp` by more than
    `limit` (relative): its ROIs are enlarged, and small cells may be missed.

    Returns:
        The warning, or None when level 0 is fine enough.
    """
    if info.mpp <= target_mpp * (1.0 + limit):
        return None
    return (
        f"{info.path.name} was scanned at {info.mpp:.3g} µm/px, {info.mpp / target_mpp - 1:.0%} "
        f"coarser than the {target_mpp:g} µm/px the models expect: its ROIs are enlarged to "
        "it, so small or faint cells may be missed or misclassified"
    )


Region = tuple[int, tuple[int, int], tuple[int, int]]  # level, l0_xy, lvl_size


class Slide:
    """An open slide: `info`, region reads, and the underlying `openslide.OpenSlide`.

    Use as a context manager, or call `close()`. `read_region` is safe to call from
    several threads (OpenSlide is thread-safe).
    """

    def __init__(self, osr: openslide.OpenSlide, info: SlideInfo) -> None:
        self._osr = osr
        self.info = info
        # An OpenSlide error sticks to the handle, so a damaged tile fails every read after
        # it, on any thread: keep the regions being read to find it, and what was found.
        self._reading: list[Region] = []
        self._reading_lock = threading.Lock()
        self._damage: str | None = None
        self._damage_lock = threading.Lock()

    @property
    def osr(self) -> openslide.OpenSlide:
        """The OpenSlide handle (for code that needs more than this class offers)."""
        return self._osr

    def read_region(
        self, l0_xy: tuple[int, int], level: int, lvl_size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as RGB on white.

        Args:
            l0_xy: top-left (x, y) in level-0 pixels.
            level: pyramid level to read from.
            lvl_size: (width, height) in pixels of `level`.

        Returns:
            Array of shape (height, width, 3), uint8 RGB; pixels outside the slide (or
            transparent in it) are white.

        Raises:
            SlideReadError: OpenSlide failed; the sentence names the damaged tile where it
                can be found. This handle is unusable afterwards (OpenSlide errors stick).
        """
        region = (level, tuple(l0_xy), tuple(lvl_size))
        with self._reading_lock:
            self._reading.append(region)
        try:
            rgba = np.asarray(self._osr.read_region(l0_xy, level, lvl_size))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self._why_failed(region, exc)) from exc
        finally:
            with self._reading_lock:
                self._reading.remove(region)
        return rgb_on_white(rgba)

    def _why_failed(self, region: Region, exc: openslide.OpenSlideError) -> str:
        """The sentence for a failed read: the damaged tile, looked for in this region, then
        in those other threads are reading (one of which may have hit it first)."""
        with self._damage_lock:
            if self._damage is None:
                with self._reading_lock:
                    others = [r for r in self._reading if r != region]
                for candidate in (region, *others):
                    self._damage = find_damaged_tile(self.info, *candidate)
                    if self._damage is not None:
                        break
            if self._damage is not None:
                return self._damage
        level, l0_xy, _ = region
        return f"Cannot read level {level} of {self.info.path} at level-0 {l0_xy}: {_clause(exc)}."

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.info.path)!r}, vendor={self.info.vendor!r})"


def rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 4) uint8 RGBA array (straight alpha) onto white → (H, W, 3)."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    out = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a whole-slide image for scanning, after checking it can be scanned.

    Args:
        path: the slide file.
        mpp: microns per level-0 pixel to use instead of (or in the absence of) the
            file's own; > 0.

    Returns:
        The open slide; close it (or use `with`).

    Raises:
        SlideOpenError: missing path, symbolic link loop, directory, unsupported format,
            not a slide, truncated or corrupt file, no mpp and no override, or an mpp
            (the file's or `mpp`) outside `MPP_RANGE`; one sentence each.
    """
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: Python < 3.13's symlink loop
        raise SlideOpenError(
            f"{path} is a symbolic link that leads back to itself, not to a slide file; "
            "point it at the slide."
        ) from exc
    if mpp is not None:
        check_mpp(mpp, f"the mpp given for {path}")
    if not path.exists():
        raise SlideOpenError(f"Slide file {path} does not exist.")
    if path.is_dir():
        raise SlideOpenError(f"{path} is a directory, not a slide file.")
    if not os.access(path, os.R_OK):
        raise SlideOpenError(f"{path} cannot be read: permission denied.")
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except (OSError, openslide.OpenSlideError) as exc:
        raise SlideOpenError(f"{path} cannot be read: {exc}.") from exc
    if vendor is None:
        raise SlideOpenError(_why_not_detected(path))
    try:
        osr = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideOpenError(
            f"{path} is not a slide OpenSlide can read, though it looks like {vendor}."
        ) from exc
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(
            f"{path} is truncated or corrupt (OpenSlide: {_clause(exc)})."
        ) from exc
    try:
        _probe(osr, path, vendor)
        info = _describe(osr, path, vendor, mpp)
    except BaseException:
        osr.close()
        raise
    logger.debug(
        "opened %s: %s %dx%d mpp %.4f, %d levels",
        path,
        info.vendor,
        info.width,
        info.height,
        info.mpp,
        info.level_count,
    )
    return Slide(osr, info)


def _why_not_detected(path: Path) -> str:
    """The one sentence for a file OpenSlide does not recognise."""
    if is_tiff(path):
        damage = tiff_damage(path)
        if damage:
            return f"{path} is truncated or corrupt ({damage})."
        return (
            f"{path} is a TIFF but not a tiled whole-slide image; "
            "OpenSlide reads only tiled (pyramidal) TIFFs."
        )
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return f"{path} is not a slide: its contents are not the {suffix} format its name says."
    kind = f"{suffix} files" if suffix else "files of this kind"
    return f"{path}: {kind} are not supported; papscan reads {SUPPORTED_FORMATS}."


def is_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF or BigTIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGICS


def tiff_damage(path: Path) -> str | None:
    """Look for truncation in a TIFF's structure without decoding anything.

    Walks the IFD chain (classic and BigTIFF) and checks that every page's strips or
    tiles lie inside the file. Cost: the IFDs and offset tables, a few MB at most.

    Returns:
        What is wrong, as a clause ("page 3's tiles end at byte … past the end of the
        file, … bytes"), or None if the structure is whole.
    """
    import tifffile  # only TIFF-based slides need it

    size = path.stat().st_size
    problem = _walk_ifds(path, size)
    if problem:
        return problem
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size == 0:
                    continue
                end = int((offsets + counts).max())
                if end > size:
                    return (
                        f"page {page.index}'s image data ends at byte {end}, "
                        f"past the end of the {size}-byte file"
                    )
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad files
        return f"its TIFF structure cannot be parsed: {exc}"
    return None


def _walk_ifds(path: Path, size: int) -> str | None:
    """Follow the IFD chain; report a pointer or entry table past the end of the file."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(order + "H", head[2:4])[0] == 43
        if big:
            offset = struct.unpack(order + "Q", head[8:16])[0]
            count_fmt, entry_size, ptr_fmt = "Q", 20, "Q"
        else:
            offset = struct.unpack(order + "I", head[4:8])[0]
            count_fmt, entry_size, ptr_fmt = "H", 12, "I"
        count_size = struct.calcsize(count_fmt)
        ptr_size = struct.calcsize(ptr_fmt)
        seen: set[int] = set()
        page = 0
        while offset:
            if offset in seen:
                return f"its IFD chain loops back at page {page}"
            seen.add(offset)
            if offset + count_size > size:
                return (
                    f"page {page}'s directory starts at byte {offset}, "
                    f"past the end of the {size}-byte file"
                )
            fh.seek(offset)
            n = struct.unpack(order + count_fmt, fh.read(count_size))[0]
            next_ptr_at = offset + count_size + n * entry_size
            if next_ptr_at + ptr_size > size:
                return f"page {page}'s directory runs past the end of the {size}-byte file"
            fh.seek(next_ptr_at)
            offset = struct.unpack(order + ptr_fmt, fh.read(ptr_size))[0]
            page += 1
    return None


def _probe(osr: openslide.OpenSlide, path: Path, vendor: str) -> None:
    """Fail now, not mid-scan, on a damaged file: TIFF structure, then each level's last tile."""
    # NDPI keeps the high bits of its >4 GiB offsets outside the IFDs: a plain walk misreads it.
    if vendor != "hamamatsu" and is_tiff(path):
        damage = tiff_damage(path)
        if damage:
            raise SlideOpenError(f"{path} is truncated or corrupt ({damage}).")
    # Tile sizes first: after a failed read, the handle answers nothing, properties included.
    tiles = [_tile_size(osr, level) for level in range(osr.level_count)]
    for level, (lvl_w, lvl_h) in enumerate(osr.level_dimensions):
        ds = osr.level_downsamples[level]
        l0_xy = (int((lvl_w - 1) * ds), int((lvl_h - 1) * ds))
        try:
            osr.read_region(l0_xy, level, (1, 1))
        except openslide.OpenSlideError as exc:
            tile = tiles[level]
            if tile is None:
                raise SlideOpenError(
                    f"{path} is truncated or corrupt (OpenSlide: {_clause(exc)})."
                ) from exc
            where = ((lvl_w - 1) // tile[0], (lvl_h - 1) // tile[1])
            raise SlideOpenError(
                damaged_tile_sentence(path, level, where, tile, (lvl_w, lvl_h), _clause(exc))
            ) from exc


def _describe(osr: openslide.OpenSlide, path: Path, vendor: str, mpp: float | None) -> SlideInfo:
    props = osr.properties
    if mpp is not None:
        mpp_x = mpp_y = float(mpp)
    else:
        mpp_x_s = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp_y_s = props.get(openslide.PROPERTY_NAME_MPP_Y)
        try:
            mpp_x = float(mpp_x_s) if mpp_x_s else math.nan
            mpp_y = float(mpp_y_s) if mpp_y_s else mpp_x
        except ValueError:
            mpp_x = mpp_y = math.nan
        if not (mpp_x > 0 and mpp_y > 0):
            raise SlideOpenError(f"{path} has no microns-per-pixel; pass --mpp.")
        for value in (mpp_x, mpp_y):
            if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
                raise SlideOpenError(
                    f"{path} records {value:g} µm/px, outside the plausible range "
                    f"{_RANGE_TEXT}, so its resolution tags are wrong; pass the real value "
                    "with --mpp."
                )
    width, height = osr.dimensions
    return SlideInfo(
        path=path,
        fingerprint=_fingerprint(osr, path),
        vendor=vendor,
        width=width,
        height=height,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        level_count=osr.level_count,
        level_dimensions=tuple(tuple(d) for d in osr.level_dimensions),
        level_downsamples=tuple(float(d) for d in osr.level_downsamples),
    )


def damaged_tile_sentence(
    path: Path,
    level: int,
    tile: tuple[int, int],
    tile_size: tuple[int, int],
    level_size: tuple[int, int],
    detail: str,
) -> str:
    """The one sentence for a tile that cannot be read: where it is, and what to do.

    Args:
        path: the slide file.
        level: the pyramid level.
        tile: (column, row) of the tile in the level's grid.
        tile_size: (width, height) of the level's tiles.
        level_size: (width, height) of the level, to clip the last column and row.
        detail: what the decoder said, as a clause.
    """
    (col, row), (tw, th), (w, h) = tile, tile_size, level_size
    x0, y0 = col * tw, row * th
    return (
        f"{path} is truncated or corrupt: level {level}'s tile at column {col}, row {row} "
        f"(level pixels x {x0}–{min(x0 + tw, w) - 1}, y {y0}–{min(y0 + th, h) - 1}) "
        f"cannot be decoded ({detail}); copy the file again, or rescan the slide."
    )


def find_damaged_tile(
    info: SlideInfo, level: int, l0_xy: tuple[int, int], lvl_size: tuple[int, int]
) -> str | None:
    """After a failed read, find the first tile of the region that OpenSlide cannot read.

    Uses a fresh OpenSlide handle (a failed one stays failed) and reads one pixel in the
    middle of each tile of the region, in rows.

    Returns:
        The `damaged_tile_sentence`, or None where the format has no tile grid, the file
        cannot be opened again, or every tile reads.
    """
    try:
        osr = openslide.OpenSlide(info.path)
    except openslide.OpenSlideError:
        return None
    try:
        tile = _tile_size(osr, level)
        if tile is None:
            return None
        (tw, th), (w, h) = tile, info.level_dimensions[level]
        ds = info.level_downsamples[level]
        x0, y0 = max(0, int(l0_xy[0] / ds)), max(0, int(l0_xy[1] / ds))
        x1, y1 = min(w, x0 + lvl_size[0]), min(h, y0 + lvl_size[1])
        for row in range(y0 // th, -(-y1 // th)):
            for col in range(x0 // tw, -(-x1 // tw)):
                cx, cy = min(col * tw + tw // 2, w - 1), min(row * th + th // 2, h - 1)
                try:
                    osr.read_region((int(cx * ds), int(cy * ds)), level, (1, 1))
                except openslide.OpenSlideError as exc:
                    return damaged_tile_sentence(
                        info.path, level, (col, row), tile, (w, h), _clause(exc)
                    )
        return None
    finally:
        osr.close()


def _tile_size(osr: openslide.OpenSlide, level: int) -> tuple[int, int] | None:
    """(width, height) of a level's tiles, where OpenSlide reports a tile grid."""
    props = osr.properties
    try:
        return (
            int(props[f"openslide.level[{level}].tile-width"]),
            int(props[f"openslide.level[{level}].tile-height"]),
        )
    except (KeyError, ValueError, openslide.OpenSlideError):
        return None


def _clause(exc: BaseException) -> str:
    """An error's message as a clause inside a sentence: one line, no final full stop."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def _fingerprint(osr: openslide.OpenSlide, path: Path) -> str:
    quickhash = osr.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
    if quickhash:
        return quickhash
    digest = hashlib.sha256()
    for key in sorted(osr.properties):
        digest.update(f"{key}={osr.properties[key]}\n".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_HASH_HEAD_BYTES))
    return "sha256:" + digest.hexdigest()
