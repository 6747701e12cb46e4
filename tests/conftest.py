"""Fixtures shared across the test packages: the real-data folder, small test TIFFs, and a
PostgreSQL database of the session's own (created on the server at PAPSCAN_TEST_PG_URL,
default the machine's `test` server, dropped at the end; skipped where unreachable, failed
under CI: see `service_missing`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from worker.db.session import Database

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository; tests needing it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def cells_image(
    width: int,
    height: int,
    seed: int = 0,
    cells_right_of: float = 0.0,
    cells_left_of: float = 1.0,
    n_cells: int = 80,
) -> np.ndarray:
    """An (H, W, 3) uint8 test picture: off-white glass with coloured round blobs ("cells").

    Blobs are placed only in the band `cells_right_of * W <= x < cells_left_of * W`.
    """
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 236, np.uint8)
    image += rng.integers(0, 4, image.shape, dtype=np.uint8)  # glass is never flat
    x_lo, x_hi = int(cells_right_of * width), int(cells_left_of * width)
    for _ in range(n_cells if x_hi > x_lo else 0):
        cx, cy = int(rng.integers(x_lo, x_hi)), int(rng.integers(0, height))
        r = int(rng.integers(12, 40))
        y0, y1, x0, x1 = max(0, cy - r), min(height, cy + r), max(0, cx - r), min(width, cx + r)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        patch = image[y0:y1, x0:x1]
        patch[d2 < r * r] = rng.integers(60, 200, 3)
        patch[d2 < (r // 4) ** 2] = (60, 40, 110)
    return image


def write_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float | None = 0.5,
    levels: int = 2,
    tile_px: int = 256,
    style: str = "ycbcr",
    quality: int = 90,
) -> Path:
    """Write a pyramidal JPEG-tiled TIFF that OpenSlide opens as generic-tiff.

    Levels are separate pages, each half the previous; resolution in CENTIMETER so
    OpenSlide reports mpp (none when `mpp` is None).

    Styles:
        "ycbcr": tifffile's own JPEG (YCbCr 4:2:0, one whole JPEG stream per tile).
        "aperio": photometric RGB, quantisation tables in JPEGTables, abbreviated tiles
            whose component ids are 1, 2, 3 and with no Adobe marker, so only the TIFF's
            photometric says they are RGB (as in Aperio SVS files).
        "deflate": zlib tiles (tiled, but not JPEG).
    """
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        level = image
        for k in range(levels):
            if k:
                level = np.ascontiguousarray(level[::2, ::2])
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            if k:
                extra["subfiletype"] = 1
            if style == "ycbcr":
                tw.write(
                    level,
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    photometric="rgb",
                    **extra,
                )
            elif style == "deflate":
                tw.write(
                    level, tile=(tile_px, tile_px), compression="zlib", photometric="rgb", **extra
                )
            elif style == "aperio":
                tiles, tables = _aperio_tiles(level, tile_px, quality)
                tw.write(
                    iter(tiles),
                    shape=level.shape,
                    dtype=np.uint8,
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    photometric="rgb",
                    subsampling=(1, 1),
                    compressionargs={"outcolorspace": "rgb"},
                    jpegtables=tables,
                    **extra,
                )
            else:
                raise ValueError(f"unknown style {style!r}")
    return path


def _jpeg_segments(stream: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of each segment after SOI; the last is SOS with the entropy data + EOI."""
    out, i = [], 2
    while i < len(stream):
        marker = stream[i + 1]
        if marker == 0xDA:
            out.append((marker, stream[i:]))
            break
        n = int.from_bytes(stream[i + 2 : i + 4], "big")
        out.append((marker, stream[i : i + 2 + n]))
        i += 2 + n
    return out


def _aperio_tiles(level: np.ndarray, tile_px: int, quality: int) -> tuple[list[bytes], bytes]:
    import imagecodecs

    tiles: list[bytes] = []
    tables = b""
    h, w = level.shape[:2]
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            tile = np.zeros((tile_px, tile_px, 3), np.uint8)
            part = level[y : y + tile_px, x : x + tile_px]
            tile[: part.shape[0], : part.shape[1]] = part
            stream = imagecodecs.jpeg8_encode(
                tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling="444"
            )
            segments = _jpeg_segments(stream)
            if not tables:
                tables = b"\xff\xd8" + b"".join(s for m, s in segments if m == 0xDB) + b"\xff\xd9"
            kept = [_ids_123(m, s) for m, s in segments if m != 0xDB and not 0xE0 <= m <= 0xEF]
            tiles.append(b"\xff\xd8" + b"".join(kept))
    return tiles, tables


def _ids_123(marker: int, segment: bytes) -> bytes:
    """Renumber component ids to 1, 2, 3 (libjpeg's 'R', 'G', 'B' ids would reveal RGB)."""
    b = bytearray(segment)
    if marker == 0xC0:
        for k in range(b[9]):
            b[10 + 3 * k] = k + 1
    elif marker == 0xDA:
        for k in range(b[4]):
            b[5 + 2 * k] = k + 1
    return bytes(b)


@pytest.fixture(scope="session")
def make_tiff() -> Callable[..., Path]:
    """`make_tiff(path, image, mpp=0.5, levels=2, tile_px=256, style="ycbcr")`: `write_tiff`."""
    return write_tiff


@pytest.fixture(scope="session")
def make_cells_image() -> Callable[..., np.ndarray]:
    """`make_cells_image(width, height, seed=0, ...)` (see `cells_image`)."""
    return cells_image


# --- PostgreSQL -----------------------------------------------------------------------

PG_URL = os.environ.get("PAPSCAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    """Whether the environment variable CI is set (and not "0" or "false")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def service_missing(service: str, url: str, env_var: str, how: str, exc: Exception) -> NoReturn:
    """Skip a test whose PostgreSQL or Redis is unreachable; under CI, fail it instead.

    CI must prove the database and queue stories, not skip them (`.ci/run` starts both).
    """
    reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    sentence = (
        f"{service} at {url} is unreachable ({reason}); start it ({how}) or point {env_var} "
        "at one that runs."
    )
    if in_ci():
        pytest.fail(f"CI is set, so this fails instead of skipping: {sentence}", pytrace=False)
    pytest.skip(sentence)


def postgres_missing(exc: Exception) -> NoReturn:
    """`service_missing` for the PostgreSQL at PG_URL."""
    url = make_url(PG_URL).render_as_string()
    how = "`service postgresql start`; trust auth, database `test`"
    service_missing("PostgreSQL", url, "PAPSCAN_TEST_PG_URL", how, exc)


@contextmanager
def new_pg_database(prefix: str = "papscan_test") -> Iterator[str]:
    """A new, empty PostgreSQL database on the server at PG_URL, dropped on leaving (even
    with clients still connected, or refused); yields its SQLAlchemy URL. Skips (or, in CI,
    fails) where the server is unreachable."""
    import psycopg

    admin = make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        postgres_missing(exc)
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with new_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_db(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    db.create_schema()
    yield db
    db.dispose()
