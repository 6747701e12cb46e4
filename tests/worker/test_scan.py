"""`papscan scan` end to end on a synthetic slide, with the shipped models (nothing trained).

Real OpenSlide, real DALI (CPU), real ONNX Runtime, a real SQLite file and the real
PostgreSQL on this machine.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engines.errors import ModelContractError
from engines.repository import ModelRepository, default_repository_path
from train.evaluation import match_cells
from train.synth import read_truth, write_synthetic_slide
from worker.db import queries
from worker.db.export import write_cells
from worker.db.models import Cell, Roi, Scan
from worker.db.session import Database
from worker.lifecycle import scan_file
from worker.pipeline.scan import ScanModels, ScanOptions, ScanPipeline
from worker.wsi.slide import open_slide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slide_8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic-8k.tiff"
    write_synthetic_slide(path, width=8192, height=8192, mpp=0.5, seed=11, cells=600)
    return path


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    return ModelRepository(default_repository_path())


@pytest.fixture(scope="module")
def dali_scan(slide_8k: Path, repository: ModelRepository, tmp_path_factory):
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('db') / 'results.db'}")
    report = scan_file(slide_8k, db, repository, options=ScanOptions(reader="dali"))
    return db, report


def cells_of(db: Database, scan_id: int) -> list:
    with db.session() as s:
        return list(queries.iter_cells(s, scan_id))


def test_scan_finds_and_classifies_the_ground_truth_cells(slide_8k: Path, dali_scan) -> None:
    db, report = dali_scan
    truth = read_truth(slide_8k)
    assert len(truth) >= 500
    found = cells_of(db, report.scan_id)
    m = match_cells(truth, found)
    print(
        f"recall {m.recall:.3f} precision {m.precision:.3f} accuracy {m.accuracy:.3f} "
        f"confusion {m.confusion}"
    )
    assert m.recall >= 0.90
    assert m.precision >= 0.90
    assert m.accuracy >= 0.85
    assert report.reader.startswith("dali")
    assert report.warnings == [] and report.to_dict()["warnings"] == []


def test_one_row_per_detected_cell(dali_scan) -> None:
    db, report = dali_scan
    found = cells_of(db, report.scan_id)
    assert len(found) == report.summary.cell_count == sum(report.summary.class_counts.values())
    boxes = {(c.x, c.y, c.w, c.h) for c in found}
    assert len(boxes) == len(found), "a cell seen in two overlapping ROIs was written twice"
    with db.session() as s:
        scan = s.get(Scan, report.scan_id)
        assert scan.status == "done"
        assert scan.rois_done == scan.rois_planned == report.rois_planned
        assert set(scan.model_versions) == {"cell_detector", "cell_classifier", "roi_classifier"}
        rois = s.scalar(select(func.count()).select_from(Roi).where(Roi.scan_id == scan.id))
        assert rois == report.rois_planned
        ranked = s.scalars(
            select(Cell.review_rank).where(Cell.scan_id == scan.id, Cell.review_rank.is_not(None))
        ).all()
        assert sorted(ranked) == list(range(1, len(report.summary.top_cells) + 1))


def test_dali_and_openslide_paths_give_the_same_cells(
    slide_8k: Path, dali_scan, repository: ModelRepository
) -> None:
    db, report = dali_scan
    other = scan_file(slide_8k, db, repository, options=ScanOptions(reader="openslide"))
    assert other.reader == "openslide"
    key = lambda c: (c.x, c.y, c.w, c.h, c.label)  # noqa: E731
    assert sorted(map(key, cells_of(db, other.scan_id))) == sorted(
        map(key, cells_of(db, report.scan_id))
    )


def test_rescan_makes_a_new_scan_and_keeps_the_old_rows(
    slide_8k: Path, dali_scan, repository: ModelRepository
) -> None:
    db, report = dali_scan
    before = len(cells_of(db, report.scan_id))
    again = scan_file(slide_8k, db, repository)
    assert again.scan_id != report.scan_id and again.slide_id == report.slide_id
    assert len(cells_of(db, report.scan_id)) == before
    assert len(cells_of(db, again.scan_id)) == again.summary.cell_count


def test_export_csv_has_one_row_per_cell(slide_8k: Path, dali_scan) -> None:
    db, report = dali_scan
    stream = io.StringIO()
    with db.session() as s:
        n = write_cells(s, str(report.scan_id), "csv", stream)
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert n == len(rows) == report.summary.cell_count
    assert {"x", "y", "w", "h", "label", "score", "detection_score", "roi_id"} <= set(rows[0])
    geo = io.StringIO()
    with db.session() as s:
        write_cells(s, str(slide_8k), "geojson", geo)
    assert len(json.loads(geo.getvalue())["features"]) > 0


def test_scan_into_postgresql(slide_8k: Path, repository: ModelRepository, pg_url: str) -> None:
    db = Database(pg_url)
    report = scan_file(slide_8k, db, repository)
    assert len(cells_of(db, report.scan_id)) == report.summary.cell_count > 500


# --- resolution and the model contract ----------------------------------------------------


@pytest.mark.parametrize("mpp", [0.46, 0.8])
def test_slides_off_the_model_mpp_are_resampled(
    tmp_path: Path, repository: ModelRepository, mpp: float
) -> None:
    """0.46 mpp (8 % off 0.5) is shrunk to exactly 0.5 and scanned as well as a 0.5 slide;
    0.8 mpp (60 % coarser) is enlarged, scanned, and the report says so."""
    path = tmp_path / f"at-{mpp}.tiff"
    side = round(1024 * 0.5 / mpp)  # about 1024 px at 0.5 mpp
    write_synthetic_slide(path, width=side, height=side, mpp=mpp, seed=4, cells=25)
    db = Database(f"sqlite:///{tmp_path / 'results.db'}")
    report = scan_file(path, db, repository)
    if mpp == 0.46:
        m = match_cells(read_truth(path), cells_of(db, report.scan_id))
        assert m.recall >= 0.9 and m.precision >= 0.9, m
        assert report.warnings == []
    else:
        (warning,) = report.warnings
        assert "0.8 µm/px, 60% coarser than the 0.5 µm/px the models expect" in warning
        assert report.to_dict()["warnings"] == [warning]


def test_crop_field_follows_the_delivered_mpp(repository: ModelRepository) -> None:
    models = ScanModels.load(repository)
    try:
        pipeline = ScanPipeline(models)
        assert pipeline.crop_field_for(0.5) == pipeline.crop_field_px == 96
        assert pipeline.crop_field_for(0.51) == 94  # a level read as is, 2 % coarser
        assert pipeline.crop_field_for(0.49) == 98
    finally:
        models.close()


def test_the_slide_rules_follow_the_declared_severity(
    tmp_path: Path, repository: ModelRepository
) -> None:
    """Labels in one order, severity in another: the aggregator ranks by severity."""
    repo = Path(shutil.copytree(repository.path, tmp_path / "models"))
    for name in ("cell_classifier", "roi_classifier"):
        config = repo / name / "config.yaml"
        config.write_text(
            config.read_text().replace("labels: [NILM, LSIL, HSIL]", "labels: [NILM, HSIL, LSIL]")
        )
    models = ScanModels.load(ModelRepository(repo))
    try:
        pipeline = ScanPipeline(models)
        assert pipeline.labels == ("NILM", "HSIL", "LSIL")
        assert pipeline.severity == ("NILM", "LSIL", "HSIL")
        path = tmp_path / "small.tiff"
        write_synthetic_slide(path, width=1024, height=1024, mpp=0.5, seed=4, cells=25)
        with open_slide(path) as slide:
            outcome = pipeline.run(slide, lambda rois, cells: None)
        assert list(outcome.summary.class_counts) == ["NILM", "LSIL", "HSIL"]
    finally:
        models.close()


def test_mismatched_models_are_refused_before_any_loads(
    tmp_path: Path, repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Path(shutil.copytree(repository.path, tmp_path / "models"))
    config = repo / "roi_classifier" / "config.yaml"
    config.write_text(config.read_text().replace("dims: [-1, 128]", "dims: [-1, 32]"))
    mismatched = ModelRepository(repo)
    monkeypatch.setattr(
        mismatched, "load", lambda *a, **k: pytest.fail("a model was loaded before the check")
    )
    with pytest.raises(ModelContractError) as info:
        ScanModels.load(mismatched)
    assert str(info.value) == (
        f"model repository {repo}: cell_classifier and roi_classifier disagree on the cell "
        "feature size: cell_classifier's output 'features' has 128 values per cell but "
        "roi_classifier's input 'cell_features' takes 32 values"
    )
