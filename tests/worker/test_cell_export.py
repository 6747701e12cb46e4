"""`papscan export`: GeoJSON for QuPath, CSV, and the printable HTML report.

One synthetic slide (2048², about 60 cells) scanned once with the shipped models into a
SQLite file; tests that change rows work on a copy of that file. The streaming test
hand-inserts its cells (no scan).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import sqlite3
import tracemalloc
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import insert, select, update

from engines.repository import ModelRepository, default_repository_path
from train.synth import write_synthetic_slide
from worker.db import queries
from worker.db.export import (
    CLASS_COLOURS,
    class_colour,
    qupath_origin,
    write_cells,
    write_geojson,
)
from worker.db.models import Cell, Roi, Slide
from worker.db.report import write_report
from worker.db.session import Database
from worker.errors import ScanNotFoundError
from worker.lifecycle import scan_file
from worker.pipeline.records import RoiResult

MPP = 0.5


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory):
    """(database file, scan id, slide path) of one scanned synthetic slide."""
    folder = tmp_path_factory.mktemp("export")
    slide = folder / "synthetic-2k.tiff"
    write_synthetic_slide(slide, width=2048, height=2048, mpp=MPP, seed=3, cells=60)
    db_file = folder / "results.db"
    report = scan_file(
        slide, Database(f"sqlite:///{db_file}"), ModelRepository(default_repository_path())
    )
    return db_file, report.scan_id, slide


@pytest.fixture
def db(scanned) -> Database:
    return Database(f"sqlite:///{scanned[0]}")


@pytest.fixture
def db_copy(scanned, tmp_path: Path) -> Database:
    """A copy of the scanned database, for tests that change rows."""
    src, dst = sqlite3.connect(scanned[0]), sqlite3.connect(tmp_path / "copy.db")
    try:
        src.backup(dst)  # the WAL's pages too, which a file copy would miss
    finally:
        src.close()
        dst.close()
    return Database(f"sqlite:///{tmp_path / 'copy.db'}")


def rows_of(db: Database, scan_id: int) -> list:
    with db.session() as s:
        return list(queries.iter_cells(s, scan_id))


def geojson_of(db: Database, ref: str) -> dict:
    out = io.StringIO()
    with db.session() as s:
        n = write_cells(s, ref, "geojson", out)
    doc = json.loads(out.getvalue())
    assert n == len(doc["features"])
    return doc


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- GeoJSON ------------------------------------------------------------------------------


@pytest.mark.slow
def test_geojson_is_a_feature_collection_qupath_imports(scanned, db) -> None:
    _, scan_id, slide = scanned
    doc = geojson_of(db, str(slide))  # by slide path: its latest finished scan
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert 40 <= len(features) == len(rows_of(db, scan_id))
    ids = set()
    for f in features:
        assert f["type"] == "Feature"
        ids.add(str(uuid.UUID(f["id"])))  # QuPath keeps only UUID ids
        geometry = f["geometry"]
        assert geometry["type"] == "Polygon"
        (ring,) = geometry["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1], "a closed ring"
        assert all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in ring)
        assert len({tuple(p) for p in ring}) == 4
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert set(props["classification"]) == {"name", "color"}
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        measurements = props["measurements"]
        assert {"score", "suspicion", "detection_score", "attention"} <= set(measurements)
        assert all(is_number(v) and math.isfinite(v) for v in measurements.values())
    assert len(ids) == len(features)
    assert sum("review_rank" in f["properties"]["measurements"] for f in features) == 20


@pytest.mark.slow
def test_geojson_boxes_and_measurements_are_the_database_rows(scanned, db) -> None:
    _, scan_id, _ = scanned
    features = geojson_of(db, str(scan_id))["features"]
    rows = rows_of(db, scan_id)
    for f, row in zip(features, rows, strict=True):
        (ring,) = f["geometry"]["coordinates"]
        x0, y0 = ring[0]
        x1, y1 = ring[2]
        assert (x0, y0, x1 - x0, y1 - y0) == (row.x, row.y, row.w, row.h)
        assert ring == [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        assert f["properties"]["classification"]["name"] == row.label
        m = f["properties"]["measurements"]
        assert m["score"] == row.score and m["suspicion"] == row.suspicion
        assert m["detection_score"] == row.detection_score and m["attention"] == row.attention
        assert m.get("review_rank") == row.review_rank


@pytest.mark.slow
def test_class_colours_are_fixed_per_class(scanned, db) -> None:
    _, scan_id, _ = scanned
    doc = geojson_of(db, str(scan_id))
    colours: dict[str, set] = {}
    for f in doc["features"]:
        c = f["properties"]["classification"]
        colours.setdefault(c["name"], set()).add(tuple(c["color"]))
    assert len(colours) >= 2
    for label, seen in colours.items():
        assert seen == {CLASS_COLOURS[label]}
    assert len(set(CLASS_COLOURS.values())) == len(CLASS_COLOURS)
    assert CLASS_COLOURS["NILM"] == (40, 160, 70) and CLASS_COLOURS["HSIL"] == (200, 0, 0)
    assert doc == geojson_of(db, str(scan_id)), "ids and colours the same on every export"


def test_an_unknown_class_gets_a_colour_from_its_name() -> None:
    assert class_colour("Koilocyte") == class_colour("Koilocyte") == (178, 134, 52)
    assert class_colour("Koilocyte") not in CLASS_COLOURS.values()


def test_geojson_moves_boxes_to_qupaths_origin_and_leaves_out_non_finite_values() -> None:
    rows = [(7, 110, 60, 20, 30, "HSIL", 0.9, math.nan, 0.8, 0.5, None)]
    out = io.StringIO()
    write_geojson(iter(rows), out, origin=(100, 50), id_prefix="00000000-0000-5000-8000-")
    (f,) = json.loads(out.getvalue())["features"]
    assert f["id"] == "00000000-0000-5000-8000-000000000007"
    assert f["geometry"]["coordinates"] == [[[10, 10], [30, 10], [30, 40], [10, 40], [10, 10]]]
    assert f["properties"]["measurements"] == {
        "score": 0.9,
        "detection_score": 0.8,
        "attention": 0.5,
    }


def test_qupath_origin_is_the_openslide_bounds(monkeypatch, tmp_path: Path, caplog) -> None:
    """QuPath's OpenSlide reader crops to openslide.bounds-*: its (0, 0) is (bounds-x, -y)."""
    import openslide

    class FakeSlide:
        def __init__(self, path: str) -> None:
            self.properties = {
                "openslide.bounds-x": "1536",
                "openslide.bounds-y": "2048",
                "openslide.bounds-width": "40000",
                "openslide.bounds-height": "30000",
            }

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(openslide, "OpenSlide", FakeSlide)
    (tmp_path / "cropped.mrxs").touch()
    assert qupath_origin(tmp_path / "cropped.mrxs") == (1536, 2048)
    monkeypatch.undo()
    assert qupath_origin(tmp_path / "gone.mrxs") == (0, 0)
    assert "gone.mrxs cannot be read (no longer there)" in caplog.text


@pytest.mark.slow
def test_a_tiff_without_bounds_keeps_its_frame(scanned) -> None:
    assert qupath_origin(scanned[2]) == (0, 0)


# --- CSV ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_csv_round_trips(scanned, db) -> None:
    _, scan_id, _ = scanned
    out = io.StringIO(newline="")
    with db.session() as s:
        n = write_cells(s, str(scan_id), "csv", out)
    read = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    rows = rows_of(db, scan_id)
    assert n == len(read) == len(rows)
    ints = ("x", "y", "w", "h", "roi_id", "roi_index")
    floats = ("score", "detection_score", "suspicion", "attention")
    for line, row in zip(read, rows, strict=True):
        back = {k: int(line[k]) for k in ints} | {k: float(line[k]) for k in floats}
        back |= {"label": line["label"], "review_rank": int(line["review_rank"] or 0) or None}
        assert back == row._asdict()


# --- the HTML report ----------------------------------------------------------------------


class _Links(HTMLParser):
    """Every src/href of a page, and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def report_of(db: Database, ref: str):
    out = io.StringIO()
    with db.session() as s:
        info = write_report(s, ref, out)
    page = out.getvalue()
    links = _Links()
    links.feed(page)
    return info, page, links


@pytest.mark.slow
def test_report_holds_the_result_and_the_gallery(scanned, db) -> None:
    _, scan_id, slide = scanned
    info, page, links = report_of(db, str(scan_id))
    with db.session() as s:
        summary = queries.scan_summary(s, scan_id)
    assert info.note is None and info.gallery_cells == 20
    assert 'class="category">' in page and f"{summary['category']}</span>" in page
    assert f"{summary['score']:.3f}" in page
    assert "squamous cells" in page and "minimum 5,000" in page
    assert "QC flags" in page and "Operating point" in page and "cell_detector 1" in page
    for label, count in summary["class_counts"].items():
        assert f"{label}</th><td class='n'>{count:,}</td>" in page
    images = [u for u in links.urls if u.startswith("data:image/png;base64,")]
    assert len(images) == 20 == len(links.urls)
    png = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
    assert png.size == (round(48 / MPP), round(48 / MPP))  # a 48 µm field at level 0
    assert "http://" not in page and "https://" not in page
    assert not links.tags & {"script", "link", "iframe", "object"}
    ranks = [int(r) for r in re.findall(r"<figcaption>#(\d+) ", page)]
    assert ranks == list(range(1, 21)), "review-rank order"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"path": "/slides/moved-away.tiff"}, "is no longer there"),
        ({"fingerprint": "another-slide"}, "fingerprint differs"),
    ],
)
def test_report_without_its_slide_has_a_note(db_copy, change, says) -> None:
    with db_copy.session() as s, s.begin():
        s.execute(update(Slide).values(**change))
    info, page, links = report_of(db_copy, "1")
    assert info.gallery_cells == 0 and says in info.note
    assert says in page and "gallery of cells is left out" in page
    assert links.urls == [] and "Category" in page


@pytest.mark.slow
def test_report_needs_a_finished_scan(db_copy) -> None:
    with db_copy.session() as s, s.begin():
        queued = queries.create_scan(s, 1, {}).id
    with pytest.raises(ScanNotFoundError, match="is queued"):
        report_of(db_copy, str(queued))


@pytest.mark.slow
def test_cli_writes_the_report_and_the_geojson(scanned, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli.main import app

    db_file, scan_id, _ = scanned
    url = f"sqlite:///{db_file}"
    html_file = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["export", str(scan_id), "--format", "report", "--db", url, "-o", str(html_file)]
    )
    assert result.exit_code == 0, result.output
    assert html_file.read_text(encoding="utf-8").count('src="data:image/png;base64,') == 20
    result = CliRunner().invoke(app, ["export", str(scan_id), "--format", "geojson", "--db", url])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "FeatureCollection"


# --- streaming ----------------------------------------------------------------------------


def insert_cells(db: Database, n: int) -> int:
    """A scan of `n` hand-made cells (one executemany); returns its id."""
    with db.session() as s, s.begin():
        slide = queries.upsert_slide(
            s, fingerprint=uuid.uuid4().hex, path="/nonexistent/slide.svs", vendor="aperio",
            width=200_000, height=200_000, mpp_x=0.25, mpp_y=0.25,
        )  # fmt: skip
        scan_id = queries.create_scan(s, slide.id, {}).id
        queries.write_chunk(s, scan_id, [RoiResult(0, 0, 0, 448, 448, "NILM", {}, n)], [])
        roi_id = s.scalars(select(Roi.id).where(Roi.scan_id == scan_id)).one()
        s.execute(
            insert(Cell),
            [
                dict(
                    scan_id=scan_id, roi_id=roi_id, x=(i * 37) % 190_000, y=(i * 53) % 190_000,
                    w=24, h=22, detection_score=0.9, label=("NILM", "LSIL", "HSIL")[i % 3],
                    score=0.5 + (i % 50) / 100, suspicion=(i % 97) / 97, probs={},
                    attention=(i % 13) / 13, review_rank=i + 1 if i < 20 else None,
                )
                for i in range(n)
            ],
        )  # fmt: skip
    return scan_id


@pytest.mark.slow
def test_geojson_streams_in_flat_memory(tmp_path: Path) -> None:
    """The tracemalloc peak of exporting 100k cells is that of 20k: rows and features are
    written as they stream from the database, never all held."""
    db = Database(f"sqlite:///{tmp_path / 'many.db'}")
    db.create_schema()
    peaks = {}
    for n in (20_000, 100_000):
        scan_id = insert_cells(db, n)
        out = tmp_path / f"{n}.geojson"
        with db.session() as s, out.open("w") as f:
            tracemalloc.start()
            try:
                written = write_cells(s, str(scan_id), "geojson", f, origin=(0, 0))
                peaks[n] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert written == n
        with out.open() as f:
            assert len(json.load(f)["features"]) == n
    print({n: f"{p / 2**20:.2f} MiB" for n, p in peaks.items()})
    assert peaks[100_000] < 1.25 * peaks[20_000] + 256 * 1024
    assert peaks[100_000] < 8 * 2**20
