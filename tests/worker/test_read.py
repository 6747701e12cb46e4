"""ROI readers: raw JPEG tiles through DALI (CPU here) against OpenSlide, pixel for pixel.

Both sides decode with libjpeg-turbo and cut the same level box, so the expected
difference is zero everywhere: YCbCr 4:2:0 tiles (tifffile), RGB tiles with JPEGTables and
no colour marker (Aperio style), the real Aperio SVS, and every resampling path.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engines.errors import BackendUnavailableError
from worker.errors import SlideReadError
from worker.pipeline.plan import Roi, TissueMask, cellular_mask, plan_rois
from worker.wsi import read as read_module
from worker.wsi.decode import JpegDecoder, cuda_device_count, jpeg_stream
from worker.wsi.read import (
    OpenSlideReader,
    TileReader,
    _TileCache,
    jpeg_tile_layout,
    make_reader,
    read_ahead,
)
from worker.wsi.slide import open_slide


def all_rois(slide, target_mpp: float, roi_px: int = 512, overlap_px: int = 128):
    info = slide.info
    d = 16.0 / info.mpp
    mask = np.ones((int(info.height // d) + 1, int(info.width // d) + 1), bool)
    return plan_rois(info, TissueMask(mask, 16.0, d, 0.0), target_mpp, roi_px, overlap_px).rois


def max_diff(slide, target_mpp: float, roi_px: int = 512) -> int:
    """Largest |TileReader - OpenSlideReader| over every ROI of a full grid."""
    tile_reader = make_reader(slide, target_mpp, roi_px, prefer="dali", device="cpu")
    assert tile_reader.name == "dali-cpu"
    os_reader = OpenSlideReader(slide, target_mpp, roi_px)
    worst = 0
    try:
        for roi in all_rois(slide, target_mpp, roi_px):
            a, b = tile_reader.read(roi), os_reader.read(roi)
            assert a.shape == b.shape == (roi_px, roi_px, 3) and a.dtype == np.uint8
            worst = max(worst, int(np.abs(a.astype(np.int16) - b).max()))
    finally:
        tile_reader.close()
    return worst


@pytest.fixture(scope="module")
def ycbcr_tiff(tmp_path_factory, make_tiff, make_cells_image) -> Path:
    image = make_cells_image(1900, 1300, seed=7, n_cells=150)  # not a multiple of 256
    return make_tiff(tmp_path_factory.mktemp("slides") / "ycbcr.tiff", image, levels=3)


@pytest.fixture(scope="module")
def aperio_style_tiff(tmp_path_factory, make_tiff, make_cells_image) -> Path:
    image = make_cells_image(1100, 800, seed=8, n_cells=80)
    return make_tiff(
        tmp_path_factory.mktemp("slides") / "rgb.tiff", image, levels=2, tile_px=240, style="aperio"
    )


@pytest.mark.parametrize("target_mpp", [0.5, 1.0, 2.0, 0.7, 0.25])
def test_ycbcr_tiles_equal_openslide(ycbcr_tiff: Path, target_mpp: float) -> None:
    # 0.5 / 1.0 / 2.0: levels 0 / 1 / 2 read as is; 0.7: level 0 shrunk; 0.25: enlarged.
    with open_slide(ycbcr_tiff) as slide:
        assert max_diff(slide, target_mpp) == 0


@pytest.mark.parametrize("target_mpp", [0.5, 1.0, 0.8])
def test_rgb_tiles_with_tables_equal_openslide(
    aperio_style_tiff: Path, target_mpp: float, make_cells_image
) -> None:
    with open_slide(aperio_style_tiff) as slide:
        layout = jpeg_tile_layout(slide.info, 0)
        assert layout is not None and layout.rgb and layout.tables is not None
        assert max_diff(slide, target_mpp) == 0
        # And the colours are right (a YCbCr reading of RGB data is off by ~60 levels).
        reader = make_reader(slide, 0.5, 512)
        roi = all_rois(slide, 0.5)[0]
        source = make_cells_image(1100, 800, seed=8, n_cells=80)[:512, :512]
        assert np.abs(reader.read(roi).astype(int) - source).mean() < 2.0
        reader.close()


def test_real_aperio_svs_equals_openslide(shared_data: Path) -> None:
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with open_slide(path) as slide:
        assert jpeg_tile_layout(slide.info, 0).rgb
        assert max_diff(slide, 0.5) == 0  # 0.499 mpp: read as is
        assert max_diff(slide, 1.0) == 0  # shrunk by ~2


def test_synthetic_slide_equals_openslide(tmp_path: Path) -> None:
    synth = pytest.importorskip("train.synth")
    path = tmp_path / "synth.tiff"
    synth.write_synthetic_slide(path, width=2048, height=1536, mpp=0.5, seed=3, cells=60)
    with open_slide(path) as slide:
        assert max_diff(slide, 0.5) == 0
        if slide.info.level_count > 1:
            assert max_diff(slide, 1.0) == 0


def test_rois_past_the_edge_are_white(ycbcr_tiff: Path) -> None:
    with open_slide(ycbcr_tiff) as slide:
        rois = all_rois(slide, 0.5)
        last = rois[-1]
        assert last.l0_x + last.l0_w > slide.info.width
        reader = make_reader(slide, 0.5, 512)
        image = reader.read(last)
        reader.close()
    inside_w = slide.info.width - last.l0_x
    inside_h = slide.info.height - last.l0_y
    assert (image[:, inside_w:] == 255).all() and (image[inside_h:, :] == 255).all()
    assert (image[:inside_h, :inside_w] < 250).any()


def test_make_reader_choices(tmp_path: Path, ycbcr_tiff: Path, make_tiff, make_cells_image) -> None:
    with open_slide(ycbcr_tiff) as slide:
        auto = make_reader(slide, 0.5, 512)
        assert isinstance(auto, TileReader) and auto.name == "dali-cpu"
        auto.close()
        assert make_reader(slide, 0.5, 512, prefer="openslide").name == "openslide"
        with pytest.raises(ValueError):
            make_reader(slide, 0.5, 512, prefer="fastest")
    deflate = make_tiff(tmp_path / "zlib.tiff", make_cells_image(700, 500), style="deflate")
    with open_slide(deflate) as slide:
        assert make_reader(slide, 0.5, 512).name == "openslide"
        with pytest.raises(SlideReadError, match="not a JPEG-tiled"):
            make_reader(slide, 0.5, 512, prefer="dali")


@pytest.mark.skipif(cuda_device_count() > 0, reason="a GPU is present")
def test_gpu_decoding_without_a_gpu_is_a_clear_error(ycbcr_tiff: Path) -> None:
    with open_slide(ycbcr_tiff) as slide, pytest.raises(BackendUnavailableError):
        make_reader(slide, 0.5, 512, prefer="dali", device="mixed")


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("style", ["ycbcr", "aperio"])
def test_gpu_decoding_is_close_to_openslide(
    tmp_path: Path, make_tiff, make_cells_image, style: str
) -> None:
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's: close, not equal.
    RGB tiles decoded as YCbCr (APP14 ignored) would be off by ~60 levels on average."""
    path = make_tiff(tmp_path / f"{style}.tiff", make_cells_image(1500, 1000), style=style)
    with open_slide(path) as slide:
        gpu = make_reader(slide, 0.5, 512, prefer="dali", device="mixed")
        assert gpu.name == "dali-gpu"
        ref = OpenSlideReader(slide, 0.5, 512)
        for roi in all_rois(slide, 0.5):
            diff = np.abs(gpu.read(roi).astype(int) - ref.read(roi))
            assert diff.mean() < 1.5 and diff.max() <= 48
        gpu.close()


def test_corrupt_tiles_are_read_errors_naming_the_tile(tmp_path: Path, ycbcr_tiff: Path) -> None:
    with open_slide(ycbcr_tiff) as slide:
        layout = jpeg_tile_layout(slide.info, 0)
    data = bytearray(ycbcr_tiff.read_bytes())
    for tile, keep in ((0, 0), (1, 300)):  # tile 0: no SOI at all; tile 1: cut short
        offset, count = int(layout.offsets[tile]), int(layout.bytecounts[tile])
        data[offset + keep : offset + count] = bytes(count - keep)
    path = tmp_path / "bad-tiles.tiff"
    path.write_bytes(bytes(data))

    def tile_sentence(column: int, detail: str) -> str:
        return (
            f"{path} is truncated or corrupt: level 0's tile at column {column}, row 0 "
            f"(level pixels x {256 * column}–{256 * column + 255}, y 0–255) cannot be decoded "
            f"({detail}); copy the file again, or rescan the slide."
        )

    with open_slide(path) as slide:  # the open-time probe reads only each level's last tile
        reader = make_reader(slide, 0.5, 512, prefer="dali", device="cpu")
        rois = all_rois(slide, 0.5)
        assert (rois[0].l0_x, rois[1].l0_x) == (0, 384)  # tiles 0 and 1, then 1, 2 and 3
        with pytest.raises(SlideReadError) as info:
            reader.read(rois[0])
        assert str(info.value) == tile_sentence(0, "no JPEG start marker")
        with pytest.raises(SlideReadError) as info:
            reader.read(rois[1])
        assert str(info.value) == tile_sentence(1, "not valid JPEG")
        # The decoder recovers: later ROIs still read.
        assert reader.read(rois[-1]).shape == (512, 512, 3)
        reader.close()
    # OpenSlide's handle fails for good after an error: a fresh slide for each ROI.
    for roi, column in ((rois[0], 0), (rois[1], 1)):
        with open_slide(path) as slide, pytest.raises(SlideReadError) as info:
            OpenSlideReader(slide, 0.5, 512).read(roi)
        before, detail, after = tile_sentence(column, "DETAIL").partition("DETAIL")
        message = str(info.value)
        assert message.startswith(before) and message.endswith(after), message
        assert "\n" not in message and message[len(before) : -len(after)]


def test_jpeg_stream() -> None:
    tile = b"\xff\xd8\xff\xc0body\xff\xd9"
    assert jpeg_stream(tile) is tile
    tables = b"\xff\xd8\xff\xdbQQ\xff\xd9"
    merged = jpeg_stream(tile, tables, rgb=True)
    assert merged == (
        b"\xff\xd8\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00\xff\xdbQQ\xff\xc0body\xff\xd9"
    )
    assert jpeg_stream(tile, tables) == b"\xff\xd8\xff\xdbQQ\xff\xc0body\xff\xd9"
    with pytest.raises(ValueError):
        jpeg_stream(b"\x00\x00junk")


def test_decoder_splits_long_batches(ycbcr_tiff: Path) -> None:
    with open_slide(ycbcr_tiff) as slide:
        layout = jpeg_tile_layout(slide.info, 0)
    raw = ycbcr_tiff.read_bytes()
    streams = [raw[o : o + n] for o, n in zip(layout.offsets, layout.bytecounts, strict=True)]
    decoder = JpegDecoder("cpu", max_batch=4)
    images = decoder.decode(streams)
    assert len(images) == len(streams) and all(i.shape == (256, 256, 3) for i in images)
    decoder.close()


class SlowReader:
    """Returns the ROI's index as an image after a random delay; counts reads in flight."""

    name = "slow"

    def __init__(self, fail_at: int | None = None) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.started: list[int] = []
        self.rng = np.random.default_rng(0)
        self.fail_at = fail_at

    def read(self, roi: Roi) -> np.ndarray:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.started.append(roi.index)
            delay = float(self.rng.uniform(0, 0.01))
        time.sleep(delay)
        with self.lock:
            self.in_flight -= 1
        if roi.index == self.fail_at:
            raise SlideReadError(f"Cannot read ROI {roi.index}.")
        return np.full((2, 2, 3), roi.index % 256, np.uint8)

    def close(self) -> None:
        pass


def fake_rois(n: int) -> list[Roi]:
    return [Roi(i, 0, i, i * 10, 0, 10, 10, i * 10, 0, 10, 10) for i in range(n)]


def test_read_ahead_keeps_order_and_bounds_work_in_flight() -> None:
    reader = SlowReader()
    rois = fake_rois(60)
    seen = []
    for roi, image in read_ahead(reader, iter(rois), depth=3, workers=3):
        # Never more than `depth` reads started beyond what has been consumed.
        assert len(reader.started) <= len(seen) + 1 + 3
        seen.append(roi.index)
        assert image[0, 0, 0] == roi.index
    assert seen == list(range(60))
    assert reader.most_in_flight <= 3


def test_read_ahead_raises_at_the_failing_roi_and_stops_early() -> None:
    reader = SlowReader(fail_at=5)
    seen = []
    with pytest.raises(SlideReadError, match="ROI 5"):
        for roi, _ in read_ahead(reader, fake_rois(100), depth=4, workers=2):
            seen.append(roi.index)
    assert seen == [0, 1, 2, 3, 4]
    assert len(reader.started) < 15


def test_read_ahead_on_a_real_slide(ycbcr_tiff: Path) -> None:
    with open_slide(ycbcr_tiff) as slide:
        plan = plan_rois(slide.info, cellular_mask(slide), 0.5)
        reader = make_reader(slide, 0.5, 512)
        reference = OpenSlideReader(slide, 0.5, 512)
        got = list(read_ahead(reader, plan.rois, depth=4, workers=2))
        assert [r.index for r, _ in got] == [r.index for r in plan.rois]
        for roi, image in got[:5]:
            assert np.array_equal(image, reference.read(roi))
        reader.close()
    with pytest.raises(ValueError):
        next(read_ahead(reader, plan.rois, depth=0))


def test_uneven_downsample_levels_are_close_to_openslide(
    tmp_path: Path, make_tiff, make_cells_image
) -> None:
    """Odd sizes give levels at downsample 1.9992 and 3.995. OpenSlide then maps level-0
    coordinates to fractional level positions and interpolates (cairo) by that fraction;
    TileReader cuts whole level pixels at round(l0 / downsample). Same picture, shifted by
    under a level pixel."""
    image = make_cells_image(3001, 2101, seed=4, n_cells=300)
    path = make_tiff(tmp_path / "odd.tiff", image, levels=3)
    with open_slide(path) as slide:
        assert slide.info.level_downsamples[1] != 2.0
        for target_mpp in (1.0, 2.0):
            tile_reader = make_reader(slide, target_mpp, 512, prefer="dali")
            os_reader = OpenSlideReader(slide, target_mpp, 512)
            for roi in all_rois(slide, target_mpp):
                diff = np.abs(tile_reader.read(roi).astype(int) - os_reader.read(roi))
                assert diff.mean() < 1.5
            tile_reader.close()


def test_overlapping_rois_decode_each_tile_once(ycbcr_tiff: Path) -> None:
    """The decoded-tile cache: a full grid of overlapping ROIs decodes every tile once."""
    with open_slide(ycbcr_tiff) as slide:
        reader = make_reader(slide, 0.5, 512, prefer="dali", device="cpu")
        decoded = 0
        decode = reader._decoder.decode

        def counting(streams):
            nonlocal decoded
            decoded += len(streams)
            return decode(streams)

        reader._decoder.decode = counting
        try:
            rois = all_rois(slide, 0.5, 512)
            for roi in rois:
                reader.read(roi)
        finally:
            reader.close()
    tiles = reader.layout.tiles_across * reader.layout.tiles_down
    assert len(rois) > 4 and decoded <= tiles


def test_tile_cache_is_bounded_in_bytes() -> None:
    tile = np.zeros((512, 512, 3), np.uint8)  # 768 KiB, as a 512 px tile decodes
    cache = _TileCache(3 * tile.nbytes)

    def held() -> int:
        return sum(t.nbytes for t in cache._tiles.values())

    for x in range(5):
        cache.put((x, 0), tile.copy())
        assert held() <= 3 * tile.nbytes
    assert [cache.get((x, 0)) is not None for x in range(5)] == [False, False, True, True, True]
    cache.get((2, 0))  # used last: (3, 0) is now the oldest
    cache.put((5, 0), tile.copy())
    assert cache.get((3, 0)) is None and cache.get((2, 0)) is not None
    assert held() == cache.nbytes == 3 * tile.nbytes
    # A tile bigger than the whole budget is not kept, and evicts nothing.
    cache.put((9, 9), np.zeros((1024, 1024, 3), np.uint8))
    assert cache.get((9, 9)) is None and held() == 3 * tile.nbytes


def test_tile_reader_cache_stays_within_its_byte_budget(
    tmp_path: Path, make_tiff, make_cells_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_cells_image(3000, 1400, seed=9, n_cells=120)
    path = make_tiff(tmp_path / "big-tiles.tiff", image, levels=1, tile_px=512)
    budget = 4 * 512 * 512 * 3  # a band of rows would be 6 x 2 tiles
    monkeypatch.setattr(read_module, "MAX_CACHED_BYTES", budget)
    with open_slide(path) as slide:
        reader = make_reader(slide, 0.5, 512, prefer="dali", device="cpu")
        reference = OpenSlideReader(slide, 0.5, 512)
        try:
            assert reader._cache.max_bytes == budget
            for roi in all_rois(slide, 0.5):
                assert np.array_equal(reader.read(roi), reference.read(roi))
                assert reader._cache.nbytes <= budget
        finally:
            reader.close()


# --- resampling to the target mpp ------------------------------------------------------

DISC_UM = 40.0  # diameter of the dark disc, microns
DISC_AT_UM = (150.0, 130.0)  # its centre, microns from the slide's top-left


def disc_image(width: int, height: int, mpp: float) -> np.ndarray:
    """Light glass with one dark disc of `DISC_UM` microns, anti-aliased, at `mpp`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    cx, cy = (c / mpp for c in DISC_AT_UM)
    inside = np.clip(DISC_UM / mpp / 2 - np.hypot(xx - cx, yy - cy) + 0.5, 0.0, 1.0)
    grey = 230.0 - 170.0 * inside
    return np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=2)


def disc_in(image: np.ndarray) -> tuple[float, float, float]:
    """(diameter, centre x, centre y) in pixels of the dark disc: from its area and centroid
    at half contrast (anti-aliased edges count by their coverage)."""
    grey = image.astype(np.float64).mean(axis=2)
    coverage = np.clip((230.0 - grey) / 170.0, 0.0, 1.0)
    area = coverage.sum()
    yy, xx = np.mgrid[0 : grey.shape[0], 0 : grey.shape[1]] + 0.5
    cx, cy = (coverage * xx).sum() / area, (coverage * yy).sum() / area
    return 2.0 * math.sqrt(area / math.pi), cx, cy


@pytest.mark.parametrize(
    ("slide_mpp", "delivered_mpp"),
    [
        (0.46, 0.5),  # 8 % finer than the model: shrunk to exactly 0.5
        (0.42, 0.5),  # 16 % finer
        (0.51, 0.51),  # within 2 %: read as is
        (0.6, 0.5),  # 20 % coarser: enlarged to exactly 0.5
    ],
)
def test_rois_are_delivered_at_the_target_mpp(
    tmp_path: Path, make_tiff, slide_mpp: float, delivered_mpp: float
) -> None:
    """A disc of known size comes out at its size at the delivered mpp (±1 px), through
    both readers, and wherever the plan says it is."""
    path = make_tiff(
        tmp_path / "disc.tiff", disc_image(900, 700, slide_mpp), mpp=slide_mpp, quality=95
    )
    with open_slide(path) as slide:
        plan = plan_rois(slide.info, TissueMask(np.ones((1, 1), bool), 1e3, 1e3, 0.0), 0.5)
        assert plan.mpp == pytest.approx(delivered_mpp)
        roi = plan.rois[0]
        readers = [
            make_reader(slide, 0.5, 512, prefer="dali", device="cpu"),
            OpenSlideReader(slide, 0.5, 512),
        ]
        try:
            for reader in readers:
                assert reader.mpp == pytest.approx(plan.mpp)
                image = reader.read(roi)
                assert image.shape == (512, 512, 3)
                diameter, cx, cy = disc_in(image)
                assert diameter == pytest.approx(DISC_UM / delivered_mpp, abs=1.0), reader.name
                # Where the plan maps it: level-0 position over l0_per_px.
                assert cx == pytest.approx(DISC_AT_UM[0] / slide_mpp / plan.l0_per_px, abs=1.0)
                assert cy == pytest.approx(DISC_AT_UM[1] / slide_mpp / plan.l0_per_px, abs=1.0)
        finally:
            readers[0].close()
