"""The scanned slides the API reads images from, kept open between requests.

A slide is opened only at the path its database row records, and served only while the
file there is still the slide that was scanned (its fingerprint), so nothing a request
sends can make the API read another file. Opening a slide and checking its fingerprint
costs tens of milliseconds; viewers ask for dozens of tiles a second, so the last few
slides stay open, each with its DeepZoom generator, and are re-checked only when the
file's inode or modification time changes.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from openslide.deepzoom import DeepZoomGenerator

from worker.db.models import Slide as SlideRow
from worker.wsi.slide import Slide

__all__ = ["DEEPZOOM_OVERLAP", "DEEPZOOM_TILE", "OpenSlides", "ScannedSlide", "SlideGone"]

#: DeepZoom tiles are 254 px with 1 px overlap: 256 px images, the DZI convention.
DEEPZOOM_TILE = 254
DEEPZOOM_OVERLAP = 1


class SlideGone(Exception):
    """The scanned slide file cannot serve images (gone, changed or unreadable)."""


@dataclass
class ScannedSlide:
    """An open scanned slide, with its DeepZoom generator made on first use."""

    slide: Slide
    stamp: tuple[int, int]
    _deepzoom: DeepZoomGenerator | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def deepzoom(self) -> DeepZoomGenerator:
        """Level-0 coordinates as the database stores them (`limit_bounds=False`)."""
        with self._lock:
            if self._deepzoom is None:
                self._deepzoom = DeepZoomGenerator(
                    self.slide.osr,
                    tile_size=DEEPZOOM_TILE,
                    overlap=DEEPZOOM_OVERLAP,
                    limit_bounds=False,
                )
            return self._deepzoom


class OpenSlides:
    """At most `size` scanned slides open at once, the least recently used closed first."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._open: OrderedDict[tuple[int, str, str], ScannedSlide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: SlideRow) -> ScannedSlide:
        """The open slide of `row`, opened (and its fingerprint checked) if need be.

        Raises:
            SlideGone: the file is gone, is another slide now, or cannot be read.
        """
        stamp = _stamp(Path(row.path))
        key = (row.id, row.path, row.fingerprint)
        with self._lock:
            cached = self._open.get(key)
            if cached is not None and cached.stamp == stamp:
                self._open.move_to_end(key)
                return cached
        opened = ScannedSlide(_open_scanned(row), stamp)
        with self._lock:
            stale = self._open.pop(key, None)
            self._open[key] = opened
            evicted = [stale] if stale is not None else []
            while len(self._open) > self._size:
                evicted.append(self._open.popitem(last=False)[1])
        # Readers on other threads may still hold an evicted slide; OpenSlide handles are
        # closed by the garbage collector once the last of them lets go.
        del evicted
        return opened

    def close(self) -> None:
        """Forget every open slide."""
        with self._lock:
            self._open.clear()


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        raise SlideGone("the slide file of this scan is no longer where it was scanned.") from None
    return st.st_ino, st.st_mtime_ns


def _open_scanned(row: SlideRow) -> Slide:
    from worker.errors import SlideOpenError
    from worker.wsi.slide import open_slide

    path = Path(row.path)
    if not path.is_file():
        raise SlideGone("the slide file of this scan is no longer where it was scanned.")
    try:
        opened = open_slide(path, mpp=(row.mpp_x + row.mpp_y) / 2)
    except (SlideOpenError, OSError):
        raise SlideGone("the slide file of this scan cannot be read.") from None
    if opened.info.fingerprint != row.fingerprint:
        opened.close()
        raise SlideGone("the file where this scan's slide was is another slide now.")
    return opened
