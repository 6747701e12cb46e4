"""Synthetic liquid-based cervical cytology slides with exact ground truth.

``plan_cells`` lays out cells (NILM superficial / intermediate, LSIL koilocytes, HSIL)
and debris; ``render_region`` draws any region pixel-identically whatever the tiling;
``write_synthetic_slide`` writes a JPEG-tiled pyramidal TIFF that OpenSlide opens, with
``<stem>.cells.csv`` and ``<stem>.truth.json`` beside it (``read_truth`` reads them).
"""

from __future__ import annotations

from train.synth.cells import CELL_CLASSES, CELL_KINDS, DEBRIS_KINDS, KIND_LABEL, Debris, SynthCell
from train.synth.layout import DEFAULT_CLASS_MIX, plan_cells
from train.synth.render import render_region
from train.synth.slide import SynthSlide, write_synthetic_slide
from train.synth.truth import read_truth, read_truth_params

__all__ = [
    "CELL_CLASSES",
    "CELL_KINDS",
    "DEBRIS_KINDS",
    "DEFAULT_CLASS_MIX",
    "KIND_LABEL",
    "Debris",
    "SynthCell",
    "SynthSlide",
    "plan_cells",
    "read_truth",
    "read_truth_params",
    "render_region",
    "write_synthetic_slide",
]
