"""`open_slide`: what it accepts, the one sentence for each file it refuses, level choice.

Real OpenSlide on small generated TIFFs, and the real Aperio file in ../shared/data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import openslide
import pytest
import tifffile

from worker.errors import SlideOpenError, SlideReadError
from worker.wsi.slide import SlideInfo, level_for_mpp, open_slide


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


@pytest.fixture(scope="module")
def good_tiff(tmp_path_factory, make_tiff, make_cells_image) -> Path:
    path = tmp_path_factory.mktemp("slides") / "good.tiff"
    return make_tiff(path, make_cells_image(1200, 900, seed=1), mpp=0.5, levels=3)


def refusal(path, **kwargs) -> str:
    with pytest.raises(SlideOpenError) as info:
        open_slide(path, **kwargs)
    message = str(info.value)
    assert one_sentence(message), message
    return message


def test_good_tiff_opens_with_its_geometry(good_tiff: Path) -> None:
    with open_slide(good_tiff) as slide:
        info = slide.info
        assert info.vendor == "generic-tiff"
        assert (info.width, info.height) == (1200, 900)
        assert info.mpp_x == pytest.approx(0.5) and info.mpp_y == pytest.approx(0.5)
        assert info.level_count == 3
        assert info.level_dimensions == ((1200, 900), (600, 450), (300, 225))
        assert info.level_downsamples == (1.0, 2.0, 4.0)
        assert re.fullmatch(r"[0-9a-f]{64}", info.fingerprint)
        assert info.path == good_tiff.absolute()
        region = slide.read_region((0, 0), 1, (50, 40))
        assert region.shape == (40, 50, 3) and region.dtype.name == "uint8"
        # Outside the slide reads as white.
        assert (slide.read_region((1190, 890), 0, (30, 30))[15:, 15:] == 255).all()


def test_fingerprint_does_not_depend_on_the_path(good_tiff: Path, tmp_path: Path) -> None:
    copy = tmp_path / "renamed.tif"
    copy.write_bytes(good_tiff.read_bytes())
    with open_slide(good_tiff) as a, open_slide(copy) as b:
        assert a.info.fingerprint == b.info.fingerprint


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in refusal(tmp_path / "nope.svs")


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in refusal(tmp_path)


def test_unsupported_format_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "slide.kfb"
    path.write_bytes(os.urandom(20000))
    message = refusal(path)
    assert ".kfb files are not supported" in message
    assert "Aperio .svs" in message and "DICOM" in message and "MIRAX" in message


def test_text_file_named_svs_is_not_a_slide(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("patient notes, not a slide\n" * 50)
    assert "is not a slide" in refusal(path)


def test_stripped_tiff_is_not_a_whole_slide_image(tmp_path: Path, make_cells_image) -> None:
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, make_cells_image(300, 200), photometric="rgb")
    assert "not a tiled whole-slide image" in refusal(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.995])
def test_truncated_tiff(tmp_path: Path, good_tiff: Path, keep: float) -> None:
    data = good_tiff.read_bytes()
    path = tmp_path / "cut.tiff"
    path.write_bytes(data[: int(len(data) * keep)])
    assert "is truncated or corrupt" in refusal(path)


def test_damaged_last_tile_is_found_at_open(tmp_path: Path, good_tiff: Path) -> None:
    """OpenSlide opens this file (its quick hash reads only the smallest level), so the
    probe read of level 0's last tile must catch it, not a scan hours later."""
    data = bytearray(good_tiff.read_bytes())
    with tifffile.TiffFile(good_tiff) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
    data[offset : offset + count] = bytes(count)
    path = tmp_path / "damaged.tiff"
    path.write_bytes(bytes(data))
    assert refusal(path) == (
        f"{path} is truncated or corrupt: level 0's tile at column 4, row 3 (level pixels "
        "x 1024–1199, y 768–899) cannot be decoded (Not a JPEG file: starts with 0x00 0x00); "
        "copy the file again, or rescan the slide."
    )


def damage_tile(source: Path, path: Path, page: int, tile: int) -> Path:
    """A copy of `source` with one tile's bytes replaced by garbage (no JPEG marker)."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        offset, count = tif.pages[page].dataoffsets[tile], tif.pages[page].databytecounts[tile]
    data[offset : offset + count] = b"\x5f\x82" * (count // 2) + b"\x00" * (count % 2)
    path.write_bytes(bytes(data))
    return path


LEVEL1_TILE1 = (
    "is truncated or corrupt: level 1's tile at column 1, row 0 (level pixels x 256–511, "
    "y 0–255) cannot be decoded (Not a JPEG file: starts with 0x5f 0x82); copy the file "
    "again, or rescan the slide."
)


def test_damaged_tile_found_while_reading_is_named(tmp_path: Path, good_tiff: Path) -> None:
    """The probe misses a tile in the middle of a level; the read that meets it names it."""
    path = damage_tile(good_tiff, tmp_path / "damaged.tiff", page=1, tile=1)
    with open_slide(path) as slide:
        assert slide.read_region((0, 0), 1, (256, 256)).shape == (256, 256, 3)  # tile 0
        with pytest.raises(SlideReadError) as info:
            slide.read_region((0, 0), 1, (600, 450))  # the whole level
    assert str(info.value) == f"{path} {LEVEL1_TILE1}"


def test_a_read_failed_by_another_threads_damaged_tile_names_that_tile(
    tmp_path: Path, good_tiff: Path
) -> None:
    """OpenSlide's errors stick to the handle: a clean region read after (or while) another
    thread meets a damaged tile fails too, and must name the tile, not its own region."""
    path = damage_tile(good_tiff, tmp_path / "damaged.tiff", page=1, tile=1)
    with open_slide(path) as slide:
        damaged = (1, (0, 0), (600, 450))
        slide._reading.append(damaged)  # another thread's read, still in flight
        with pytest.raises(openslide.OpenSlideError):
            slide.osr.read_region((0, 0), 1, (600, 450))
        with pytest.raises(SlideReadError) as info:
            slide.read_region((0, 0), 0, (64, 64))
    assert str(info.value) == f"{path} {LEVEL1_TILE1}"


def test_no_mpp_needs_an_override(tmp_path: Path, make_tiff, make_cells_image) -> None:
    path = make_tiff(tmp_path / "nompp.tiff", make_cells_image(600, 400), mpp=None)
    message = refusal(path)
    assert message.endswith("has no microns-per-pixel; pass --mpp.")
    with open_slide(path, mpp=0.25) as slide:
        assert (slide.info.mpp_x, slide.info.mpp_y) == (0.25, 0.25)


def test_mpp_override_wins_and_must_be_plausible(good_tiff: Path) -> None:
    with open_slide(good_tiff, mpp=0.3) as slide:
        assert slide.info.mpp == pytest.approx(0.3)
    for wrong in (0, -1, 100, float("nan")):
        assert refusal(good_tiff, mpp=wrong) == (
            f"the mpp given for {good_tiff} is {wrong:g} µm/px, outside the plausible range "
            "0.05–20 µm/px; give the slide's real microns per pixel."
        )


def test_implausible_mpp_in_the_file(tmp_path: Path, make_tiff, make_cells_image) -> None:
    """Resolution tags claiming 10 m per pixel once asked for a 1 EiB tissue mask."""
    path = make_tiff(tmp_path / "ten-metres.tiff", make_cells_image(600, 400), mpp=1e7)
    assert refusal(path) == (
        f"{path} records 1e+07 µm/px, outside the plausible range 0.05–20 µm/px, so its "
        "resolution tags are wrong; pass the real value with --mpp."
    )
    with open_slide(path, mpp=0.25) as slide:
        assert slide.info.mpp == 0.25


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    assert refusal(tmp_path / "a.svs") == (
        f"{tmp_path / 'a.svs'} is a symbolic link that leads back to itself, not to a slide "
        "file; point it at the slide."
    )


def test_real_aperio_svs(shared_data: Path) -> None:
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with open_slide(path) as slide:
        info = slide.info
    assert info.vendor == "aperio"
    assert info.mpp_x == pytest.approx(0.499, abs=1e-3)
    assert (info.width, info.height) == (2220, 2967)
    assert info.fingerprint == "6335ea0e6cc54c2cba64bb265d3c713a50cd84484924e3a9c109558c13521d5c"


def fake_info(mpp: float = 0.5, downsamples: tuple[float, ...] = (1.0, 2.0, 4.0)) -> SlideInfo:
    dims = tuple((int(8000 / d), int(6000 / d)) for d in downsamples)
    return SlideInfo(
        path=Path("/fake.tiff"),
        fingerprint="x",
        vendor="generic-tiff",
        width=8000,
        height=6000,
        mpp_x=mpp,
        mpp_y=mpp,
        level_count=len(downsamples),
        level_dimensions=dims,
        level_downsamples=downsamples,
    )


@pytest.mark.parametrize(
    ("slide_mpp", "target", "level", "scale"),
    [
        # levels at downsample 1, 2, 4
        (0.5, 0.5, 0, 1.0),
        (0.5, 1.0, 1, 1.0),
        (0.5, 2.0, 2, 1.0),
        (0.5, 8.0, 2, 4.0),  # coarser than every level: shrink the coarsest
        (0.5, 0.51, 0, 1.0),  # within 2 %: read as is
        (0.5, 1.015, 1, 1.0),
        (0.5, 0.52, 0, 1.04),  # 4 % off: resampled to exactly the target
        (0.5, 1.05, 1, 1.05),
        (0.46, 0.5, 0, 0.5 / 0.46),  # 8 % finer than the target: shrunk
        (0.8, 0.5, 0, 0.625),  # coarser than the target: enlarged
        (0.5, 0.7, 0, 1.4),  # between levels: the finer one, shrunk
        (0.5, 1.5, 1, 1.5),
        (0.5, 0.25, 0, 0.5),  # finer than level 0: enlarge
        (0.499, 0.5, 0, 1.0),
        (0.25, 0.5, 1, 1.0),
        (0.25, 1.0, 2, 1.0),
    ],
)
def test_level_for_mpp(slide_mpp: float, target: float, level: int, scale: float) -> None:
    choice = level_for_mpp(fake_info(slide_mpp), target)
    assert choice.level == level
    assert choice.scale == pytest.approx(scale)
    assert choice.l0_per_px == pytest.approx(scale * choice.downsample)
    # Delivered: the target exactly, unless the level is read as is (within 2 %).
    delivered = choice.level_mpp if scale == 1.0 else target
    assert choice.mpp == pytest.approx(delivered)
    assert abs(choice.mpp / target - 1) <= 0.02 + 1e-9


def test_level_for_mpp_between_sparse_levels() -> None:
    # A 40x scan with levels at downsample 1, 4, 16: 0.5 mpp is level 0 shrunk by 2.
    choice = level_for_mpp(fake_info(0.25, (1.0, 4.0, 16.0)), 0.5)
    assert (choice.level, choice.scale, choice.l0_per_px) == (0, 2.0, 2.0)
    # Slightly uneven downsamples (Aperio) still count as the level within tolerance.
    choice = level_for_mpp(fake_info(0.25, (1.0, 4.000133, 16.0019)), 1.0)
    assert (choice.level, choice.scale) == (1, 1.0)


def test_level_for_mpp_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        level_for_mpp(fake_info(), 0)
    with pytest.raises(ValueError):
        level_for_mpp(fake_info(), 0.5, tolerance=-1)
