"""A scan streams: its peak memory must not grow with the slide's size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.synth import write_synthetic_slide

pytestmark = pytest.mark.slow

SCAN_AND_MEASURE = """
import json, resource, sys
from engines.repository import ModelRepository, default_repository_path
from worker.db.session import Database
from worker.lifecycle import scan_file
report = scan_file(sys.argv[1], Database(sys.argv[2]), ModelRepository(default_repository_path()))
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak_mib, "cells": report.summary.cell_count,
                  "rois": report.rois_planned}))
"""


def peak_memory_of_scan(slide: Path, db_url: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCAN_AND_MEASURE, str(slide), db_url],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_slide_size(tmp_path: Path) -> None:
    small, large = tmp_path / "small.tiff", tmp_path / "large.tiff"
    write_synthetic_slide(small, width=3072, height=3072, mpp=0.5, seed=1, cells=80)
    write_synthetic_slide(large, width=9216, height=9216, mpp=0.5, seed=2, cells=720)
    a = peak_memory_of_scan(small, f"sqlite:///{tmp_path / 'a.db'}")
    b = peak_memory_of_scan(large, f"sqlite:///{tmp_path / 'b.db'}")
    print(f"small: {a}  large: {b}")
    assert b["rois"] >= 6 * a["rois"]
    # 9x the pixels and cells; a pipeline holding the slide would need > 700 MiB more.
    assert b["peak_mib"] <= a["peak_mib"] * 1.10 + 64
