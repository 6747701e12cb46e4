"""`papscan export RUN --repository DIR` of a `train rois` run, then `papscan scan` with it.

Paper 002's global-local network (GLAN) takes the cells' crops, not the cell classifier's
features: the scan cuts each ROI's cells again at the network's own field and size (its
config's `preprocessing`) and feeds `cells` / `mask`. A tiny untrained GLAN stands in for a
trained one; the run folder is shaped as `train.loops.rois.train_rois` writes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from engines.contract import roi_kind
from engines.repository import ModelRepository, default_repository_path
from train.export.configs import CLASSIFIER_MEAN, CLASSIFIER_STD
from train.models import create_model
from train.synth import write_synthetic_slide
from worker.db.models import Cell, Roi, SlideResult
from worker.db.session import Database
from worker.pipeline.scan import ScanModels, ScanPipeline, _Pending

pytestmark = pytest.mark.slow

LABELS = ["NILM", "LSIL", "HSIL"]
KWARGS = {"backbone": "resnet18", "embed_dim": 32, "attn_dim": 32, "depth": 1, "num_heads": 4}
INPUT_PX = 32
CROP_PX = 64  # cut at the detector's 0.5 µm/px: a 32 µm field, not the classifier's 48 µm


def write_rois_run(run: Path) -> Path:
    """A finished `train rois` run folder: run.json and model.pt (no splits: no test ROIs)."""
    torch.manual_seed(0)
    model = create_model("global_local_roi", num_classes=len(LABELS), **KWARGS).eval()
    run.mkdir()
    info = {
        "task": "rois",
        "arch": "global_local_roi",
        "arch_kwargs": KWARGS,
        "dataset": "lbc",
        "classes": LABELS,
        "input_px": INPUT_PX,
        "mean": list(CLASSIFIER_MEAN),
        "std": list(CLASSIFIER_STD),
        "cells_per_roi": 8,
        "crop_px": CROP_PX,
        "status": "done",
    }
    (run / "run.json").write_text(json.dumps(info))
    checkpoint = {"arch": "global_local_roi", "arch_kwargs": KWARGS, "num_classes": len(LABELS)}
    torch.save({**checkpoint, "state_dict": model.state_dict(), "fold": 0}, run / "model.pt")
    return run


def papscan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def glan_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped repository with its roi_classifier replaced by the exported GLAN."""
    tmp = tmp_path_factory.mktemp("glan")
    repo = Path(shutil.copytree(default_repository_path(), tmp / "models"))
    shutil.rmtree(repo / "roi_classifier")
    run = write_rois_run(tmp / "run")
    exported = papscan("export", str(run), "--repository", str(repo), "--no-fp16")
    assert exported.returncode == 0, exported.stderr
    assert "roi_classifier@1" in exported.stdout
    return repo


def test_export_declares_how_the_scan_cuts_the_crops(glan_repository: Path) -> None:
    config = ModelRepository(glan_repository).config("roi_classifier")
    assert roi_kind(config) == "crops"
    assert config.preprocessing is not None
    assert config.preprocessing.input_size == (INPUT_PX, INPUT_PX)
    assert config.preprocessing.mpp == pytest.approx(0.5 * CROP_PX / INPUT_PX)
    assert config.severity == tuple(LABELS)
    models = ScanModels.load(ModelRepository(glan_repository))
    try:
        pipeline = ScanPipeline(models)
        assert (pipeline.crop_field_px, pipeline.roi_field_px) == (96, CROP_PX)
    finally:
        models.close()


def test_papscan_scan_runs_the_global_local_network(glan_repository: Path, tmp_path: Path) -> None:
    slide = tmp_path / "small.tiff"
    write_synthetic_slide(slide, width=1024, height=1024, mpp=0.5, seed=4, cells=25)
    db_url = f"sqlite:///{tmp_path / 'results.db'}"
    result = papscan("scan", str(slide), "--models", str(glan_repository), "--db", db_url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["category"] in LABELS
    with Database(db_url).session() as s:
        rois = s.scalars(select(Roi)).all()
        cells = s.scalars(select(Cell)).all()
        (category,) = s.scalars(select(SlideResult.category)).all()
    assert category in LABELS
    assert rois and cells and sum(r.cell_count for r in rois) == len(cells)
    for roi in rois:
        assert list(roi.probs) == LABELS
        assert sum(roi.probs.values()) == pytest.approx(1.0, abs=1e-4)
    attention = np.array([c.attention for c in cells])
    assert np.isfinite(attention).all() and (attention >= 0).all() and attention.any()
    # The cross-attention weights of each ROI's cells are a softmax over them.
    for roi in rois:
        if roi.cell_count:
            weights = [c.attention for c in cells if c.roi_id == roi.id]
            assert sum(weights) == pytest.approx(1.0, abs=1e-3)


def test_rois_without_cells_are_nilm_beside_rois_with_cells(glan_repository: Path) -> None:
    """As for a features ROI classifier: an ROI with no cells is not sent to the model."""
    models = ScanModels.load(ModelRepository(glan_repository))
    try:
        pipeline = ScanPipeline(models)
        rng = np.random.default_rng(0)
        crops = rng.integers(0, 256, (3, INPUT_PX, INPUT_PX, 3), dtype=np.uint8)

        def pending(n: int) -> _Pending:
            no_boxes = np.zeros((n, 4), np.int64)
            return _Pending(0, (0, 0, 1, 1), no_boxes, np.ones(n), Future(), crops[:n])

        roi_probs, attention = pipeline._classify_rois([pending(0), pending(3), pending(1)], [])
        np.testing.assert_array_equal(roi_probs[0], [1.0, 0.0, 0.0])
        np.testing.assert_allclose(roi_probs.sum(axis=1), 1.0, atol=1e-5)
        assert [len(a) for a in attention] == [0, 3, 1]
        assert attention[1].sum() == pytest.approx(1.0, abs=1e-4)
        assert attention[2] == pytest.approx([1.0])
    finally:
        models.close()
