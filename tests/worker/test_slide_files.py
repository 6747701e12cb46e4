"""The API's open scanned slides and its tile cache: a slide is served only while the file
at its recorded path is the scanned slide; both caches stay within their bounds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worker.api.slide_files import OpenSlides, SlideGone
from worker.api.tiles import TileCache
from worker.db.models import Slide as SlideRow


def _row(path: Path, row_id: int = 1) -> SlideRow:
    from worker.wsi.slide import open_slide

    with open_slide(path) as slide:
        info = slide.info
    return SlideRow(
        id=row_id, path=str(path), fingerprint=info.fingerprint, width=info.width,
        height=info.height, mpp_x=info.mpp, mpp_y=info.mpp,
    )  # fmt: skip


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[Path, Path]:
    from train.synth import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slide-files")
    first, second = folder / "first.tiff", folder / "second.tiff"
    write_synthetic_slide(first, width=1024, height=1024, mpp=0.5, seed=1, cells=10)
    write_synthetic_slide(second, width=1024, height=1024, mpp=0.5, seed=2, cells=10)
    return first, second


def test_a_slide_is_kept_open_until_its_file_changes(slides, tmp_path: Path) -> None:
    path = tmp_path / "slide.tiff"
    shutil.copyfile(slides[0], path)
    row = _row(path)
    cache = OpenSlides()
    opened = cache.get(row)
    assert cache.get(row) is opened  # the same handle while the file is untouched
    assert opened.deepzoom.level_count == 11

    shutil.copyfile(slides[1], path)  # another slide where the scanned one was
    with pytest.raises(SlideGone, match="another slide now"):
        cache.get(row)
    path.unlink()
    with pytest.raises(SlideGone, match="no longer where it was scanned"):
        cache.get(row)
    path.write_bytes(b"not a slide")
    with pytest.raises(SlideGone, match="cannot be read"):
        cache.get(row)


def test_at_most_size_slides_stay_open(slides) -> None:
    cache = OpenSlides(size=2)
    rows = [_row(slides[0], 1), _row(slides[1], 2), _row(slides[0], 3)]
    first = cache.get(rows[0])
    cache.get(rows[1])
    cache.get(rows[2])  # the least recently used, row 1, is closed
    assert cache.get(rows[0]) is not first
    assert cache.get(rows[2]) is cache.get(rows[2])


def test_the_tile_cache_stays_within_its_bytes() -> None:
    cache = TileCache(max_bytes=1000)
    for i in range(10):
        cache.put((1, 0, i, 0, "f"), bytes(300))
    kept = [i for i in range(10) if cache.get((1, 0, i, 0, "f")) is not None]
    assert kept == [7, 8, 9]
    cache.put((1, 0, 7, 0, "f"), bytes(100))  # replacing a tile counts its new size
    assert cache.get((1, 0, 8, 0, "f")) is not None and cache._bytes == 700
