"""The slide call on scanned synthetic slides: what is not seen is never called negative."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.repository import ModelRepository, default_repository_path
from train.synth import write_synthetic_slide
from worker.db.models import SlideResult
from worker.db.session import Database
from worker.lifecycle import scan_file
from worker.pipeline.slide_call import UNSATISFACTORY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repository() -> ModelRepository:
    return ModelRepository(default_repository_path())


def _scan(tmp_path: Path, repository: ModelRepository, focus_map: Path | None = None, **slide):
    path = tmp_path / "slide.tiff"
    write_synthetic_slide(path, width=2048, height=2048, mpp=0.5, seed=3, **slide)
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    report = scan_file(path, db, repository, preparation="liquid-based", focus_map=focus_map)
    with db.session() as s:
        row = s.get(SlideResult, report.scan_id)
        s.expunge(row)
    return report, row


def test_a_blank_slide_is_unsatisfactory_not_nilm(tmp_path: Path, repository) -> None:
    report, row = _scan(tmp_path, repository, cells=0)
    assert report.summary.category == UNSATISFACTORY == row.category
    assert row.adequacy == "unsatisfactory" and row.squamous_estimate == 0
    assert row.notes and ("no cellular area" in row.notes[0] or "no cells" in row.notes[0])


def test_a_scant_slide_of_normal_cells_is_unsatisfactory(tmp_path: Path, repository) -> None:
    png = tmp_path / "focus.png"
    report, row = _scan(tmp_path, repository, png, cells=40, class_mix={"NILM": 1.0})
    assert report.summary.category == UNSATISFACTORY, report.summary.call
    assert report.focus_map == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert 20 <= row.squamous_estimate < 5000 and row.adequacy_minimum == 5000
    assert "scant cellularity" in row.notes[0]
    assert row.operating_point == report.summary.call.operating_point != "unfitted"
    assert row.evidence["cell_count"] == row.squamous_estimate


def test_a_scant_slide_with_abnormal_cells_reports_them(tmp_path: Path, repository) -> None:
    report, row = _scan(tmp_path, repository, cells=40, class_mix={"HSIL": 1.0})
    assert row.category in ("HSIL", "ASC-H") and row.abnormal
    assert row.adequacy == "unsatisfactory" and "scant cellularity" in row.notes[0]


def test_qc_flags_travel_with_the_result_of_a_colour_swapped_slide(
    tmp_path: Path, repository
) -> None:
    import numpy as np
    import tifffile

    from worker.wsi.slide import open_slide

    source = tmp_path / "source.tiff"
    write_synthetic_slide(source, width=2048, height=2048, mpp=0.5, seed=4, cells=300)
    with open_slide(source) as slide:
        rgb = np.asarray(slide.osr.read_region((0, 0), 0, (2048, 2048)).convert("RGB"))
    swapped = tmp_path / "swapped.tiff"
    res = 1e4 / 0.5  # pixels per cm at 0.5 µm/px
    with tifffile.TiffWriter(swapped) as tw:
        tw.write(
            np.ascontiguousarray(rgb[..., ::-1]),
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    report = scan_file(swapped, db, repository, preparation="liquid-based")
    qc = report.summary.qc
    assert qc["colour_flag"] and any("colour" in f.lower() for f in qc["flags"])
    with db.session() as s:
        row = s.get(SlideResult, report.scan_id)
        assert row.qc["flags"] == qc["flags"] and row.category == report.summary.category
