"""DeepZoom tiles of a scanned slide, for the review page's viewer (or any DZI viewer).

`GET /api/scans/{id}/deepzoom` describes the pyramid; `GET /api/scans/{id}/deepzoom/
{level}/{col}_{row}.jpeg` is one tile. Level-0 coordinates are the database's, so cell
boxes from `/cells` overlay the tiles without a shift. Encoded tiles are kept in a small
byte-bounded cache: a viewer asks for the same tiles again at every pan.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import Response

from worker.api.routes import NOT_FOUND, ScanId, _db, _scan
from worker.api.schemas import DeepZoomInfo, Error
from worker.api.slide_files import DEEPZOOM_OVERLAP, DEEPZOOM_TILE, OpenSlides, SlideGone
from worker.db.models import Slide

__all__ = ["TileCache", "router"]

router = APIRouter(prefix="/api")

JPEG_QUALITY = 85
_ADDRESS = re.compile(r"(\d{1,7})_(\d{1,7})\.jpeg")
GONE: dict[int | str, dict[str, Any]] = {
    410: {"model": Error, "description": "The slide file is gone or changed."}
}


class TileCache:
    """Encoded tiles, least recently used dropped first once `max_bytes` is passed."""

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._tiles: OrderedDict[tuple[int, int, int, int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int, int, str]) -> bytes | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int, int, int, str], tile: bytes) -> None:
        with self._lock:
            old = self._tiles.pop(key, None)
            self._bytes += len(tile) - (len(old) if old else 0)
            self._tiles[key] = tile
            while self._bytes > self._max and self._tiles:
                self._bytes -= len(self._tiles.popitem(last=False)[1])


def _slides(request: Request) -> OpenSlides:
    return request.app.state.open_slides


def _opened(request: Request, scan_id: int):
    """The scan's slide row and its open file (410 where the file cannot serve)."""
    with _db(request).session() as s:
        row = s.get(Slide, _scan(s, scan_id).slide_id)
        s.expunge(row)
    try:
        return row, _slides(request).get(row)
    except SlideGone as exc:
        raise HTTPException(410, str(exc)[:1].upper() + str(exc)[1:]) from None


@router.get(
    "/scans/{scan_id}/deepzoom", response_model=DeepZoomInfo, responses={**NOT_FOUND, **GONE}
)
def deepzoom_info(request: Request, scan_id: ScanId) -> dict[str, Any]:
    """The slide's DeepZoom pyramid: size, tile size, overlap and levels (0 is 1 px)."""
    row, opened = _opened(request, scan_id)
    dz = opened.deepzoom
    return {
        "width": row.width,
        "height": row.height,
        "tile_size": DEEPZOOM_TILE,
        "overlap": DEEPZOOM_OVERLAP,
        "format": "jpeg",
        "levels": dz.level_count,
        "mpp": (row.mpp_x + row.mpp_y) / 2,
        "tiles": f"/api/scans/{scan_id}/deepzoom/{{level}}/{{col}}_{{row}}.jpeg",
    }


@router.get(
    "/scans/{scan_id}/deepzoom/{level}/{address}",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "One tile."},
        **NOT_FOUND,
        **GONE,
    },
)
def deepzoom_tile(
    request: Request,
    scan_id: ScanId,
    level: Annotated[int, Path(ge=0, le=64)],
    address: Annotated[str, Path(max_length=32, description="COL_ROW.jpeg")],
) -> Response:
    """One DeepZoom tile as JPEG; a level or address the pyramid lacks is 404."""
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise HTTPException(404, "A tile address is COL_ROW.jpeg, e.g. 0_0.jpeg.")
    col, row_ = int(match[1]), int(match[2])
    slide_row, opened = _opened(request, scan_id)
    key = (slide_row.id, level, col, row_, slide_row.fingerprint)
    cache: TileCache = request.app.state.tile_cache
    tile = cache.get(key)
    if tile is None:
        tile = _encode(opened, scan_id, level, col, row_)
        cache.put(key, tile)
    headers = {"Cache-Control": "private, max-age=600"}
    return Response(tile, media_type="image/jpeg", headers=headers)


def _encode(opened, scan_id: int, level: int, col: int, row: int) -> bytes:
    import openslide

    dz = opened.deepzoom
    if level >= dz.level_count:
        raise HTTPException(
            404, f"Scan {scan_id}'s slide has DeepZoom levels 0 to {dz.level_count - 1}."
        )
    cols, rows = dz.level_tiles[level]
    if col >= cols or row >= rows:
        raise HTTPException(
            404, f"Level {level} of scan {scan_id}'s slide has tiles 0_0 to {cols - 1}_{rows - 1}."
        )
    try:
        image = dz.get_tile(level, (col, row))
    except openslide.OpenSlideError:
        raise HTTPException(410, "The slide file of this scan cannot be read.") from None
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
