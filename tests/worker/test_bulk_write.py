"""The PostgreSQL bulk writer (COPY) stores exactly the rows an INSERT would."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import Text, insert, select

from worker.db import queries
from worker.db.models import Cell, Roi
from worker.db.session import Database
from worker.pipeline.records import CellResult, RoiResult

COLUMNS = (
    "x", "y", "w", "h", "detection_score", "label", "score", "suspicion", "probs",
    "attention", "review_rank",
)  # fmt: skip


def _scan(db: Database) -> int:
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s,
            fingerprint=uuid.uuid4().hex,
            path="/slides/copy.svs",
            vendor="aperio",
            width=4096,
            height=4096,
            mpp_x=0.25,
            mpp_y=0.25,
        )
        return queries.create_scan(s, slide.id, {}).id


def _chunk() -> tuple[list[RoiResult], list[CellResult]]:
    probs = {"NILM": 0.123456789, "LSIL": 1e-9, "HSIL": 0.876543211}
    rois = [RoiResult(i, 512 * i, 7, 512, 512, "LSIL", probs, 3) for i in range(4)]
    cells = [
        CellResult(
            i % 4, 3 * i, 5 * i, 20 + i % 3, 21, 0.1 + i / 997, "HSIL", 1 / 3, probs,
            2 / 3, 1e-7 * i, i if i < 3 else None,
        )
        for i in range(40)
    ]  # fmt: skip
    return rois, cells


def _stored(db: Database, scan_id: int) -> list[tuple]:
    with db.session() as s:
        rows = s.execute(
            select(Roi.index, *(getattr(Cell, c) for c in COLUMNS))
            .join(Roi, Cell.roi_id == Roi.id)
            .where(Cell.scan_id == scan_id)
            .order_by(Cell.id)
        ).all()
        probs_text = (
            s.execute(
                select(Cell.probs.cast(Text)).where(Cell.scan_id == scan_id).order_by(Cell.id)
            )
            .scalars()
            .all()
        )
    return [(*row, text) for row, text in zip(rows, probs_text, strict=True)]


def test_copy_stores_the_same_rows_as_insert(pg_db: Database) -> None:
    rois, cells = _chunk()
    copied = _scan(pg_db)
    with pg_db.session() as s, s.begin():
        queries.write_chunk(s, copied, rois, cells)  # COPY on PostgreSQL
    inserted = _scan(pg_db)
    with pg_db.session() as s, s.begin():
        queries.write_chunk(s, inserted, rois, [])
        roi_ids = dict(s.execute(select(Roi.index, Roi.id).where(Roi.scan_id == inserted)).all())
        s.execute(
            insert(Cell),
            [
                {"scan_id": inserted, "roi_id": roi_ids[c.roi_index]}
                | {name: getattr(c, name) for name in COLUMNS}
                for c in cells
            ],
        )
    assert _stored(pg_db, copied) == _stored(pg_db, inserted)
    assert len(_stored(pg_db, copied)) == len(cells)


def test_copy_rolls_back_with_its_transaction(pg_db: Database) -> None:
    rois, cells = _chunk()
    scan_id = _scan(pg_db)
    try:
        with pg_db.session() as s, s.begin():
            queries.write_chunk(s, scan_id, rois, cells)
            raise RuntimeError("the chunk's transaction fails after the COPY")
    except RuntimeError:
        pass
    with pg_db.session() as s:
        assert s.scalars(select(Cell.id).where(Cell.scan_id == scan_id)).all() == []


def test_json_text_of_probabilities_is_what_json_dumps_writes() -> None:
    from worker.db.queries import _json_object

    keys: dict[str, str] = {}
    for probs in (
        {"NILM": 0.1, "LSIL": 1e-9, "HSIL": 0.8999999999999999},
        {'a"b\\': 1, "é\t": 2.5, "n": -0.0},
        {"x": float("nan"), "y": float("inf")},
        {"flag": True, "none": None},
        {},
    ):
        assert _json_object(probs, keys) == json.dumps(probs)
