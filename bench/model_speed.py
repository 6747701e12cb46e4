"""What the models cost: the demo slide scanned with two model repositories, and the cell
encoders' cells/s.

    python bench/model_speed.py --baseline DIR [--candidate engines/repository] [--repeats 2]

Both repositories scan the same synthetic slide (the demo's: 8192² px at 0.5 µm/px, 600
cells) end to end into fresh SQLite files, alternating, best of `--repeats`; the ratio is
candidate / baseline seconds. Then each EfficientNet-Lite cell encoder (random weights:
speed only) is exported to ONNX at the shipped classifier's input size and timed at the
classifier's largest preferred batch through ONNX Runtime, beside the candidate's own
classifier, so a heavier encoder's cost is read off the same run.

A baseline is any repository folder, e.g. the one a commit shipped:
`git archive <commit> engines/repository | tar -x -C /tmp/old`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from engines.repository import ModelRepository, default_repository_path
from train.export.onnx_export import export_onnx
from train.models import create_model
from train.models.cell_cnn import CellClassifierExport
from train.synth import write_synthetic_slide
from worker.db.session import Database
from worker.lifecycle import scan_file

console = Console()


def scan_seconds(slide: Path, repository: Path, workdir: Path) -> tuple[float, int]:
    """Seconds to scan `slide` end to end with `repository`, and the cells found."""
    db = Database(f"sqlite:///{workdir / f'{time.monotonic_ns()}.db'}")
    db.create_schema()
    start = time.perf_counter()
    report = scan_file(slide, db, ModelRepository(repository))
    return time.perf_counter() - start, report.summary.cell_count


def session_cells_per_s(path: Path, crops: np.ndarray, name: str, repeats: int = 5) -> float:
    """Crops per second through an ONNX Runtime CPU session, best of `repeats`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {name: crops})
    best = min(_timed(lambda: session.run(None, {name: crops})) for _ in range(repeats))
    return len(crops) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encoder_speeds(candidate: Path, baseline: Path, workdir: Path) -> list[tuple[str, float, int]]:
    """(encoder, cells/s, parameters) of both repositories' classifiers and of each
    EfficientNet-Lite, at the candidate's input size and batch."""
    repo = ModelRepository(candidate)
    config = repo.config("cell_classifier")
    px = config.preprocessing.input_size[0]
    batching = config.dynamic_batching
    preferred = batching.preferred_batch_size if batching else ()
    batch = max(preferred) if preferred else config.max_batch_size
    crops = np.random.default_rng(0).normal(size=(batch, 3, px, px)).astype(np.float32)
    rows = []
    for name, folder in (("baseline", baseline), ("candidate", candidate)):
        version = ModelRepository(folder).versions("cell_classifier")[-1]
        onnx = folder / "cell_classifier" / str(version) / "model.onnx"
        rows.append((f"{name} cell_classifier", session_cells_per_s(onnx, crops, "crops"), 0))
    for variant in ("lite0", "lite1", "lite2"):
        model = create_model(f"efficientnet_{variant}_cell", pretrained=False).eval()
        path = export_onnx(
            CellClassifierExport(model),
            (torch.zeros(2, 3, px, px),),
            workdir / f"{variant}.onnx",
            ["crops"],
            ["probs", "features"],
            {"crops": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
        )
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (f"efficientnet_{variant}_cell", session_cells_per_s(path, crops, "crops"), params)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="repository to compare to")
    parser.add_argument("--candidate", type=Path, default=default_repository_path())
    parser.add_argument("--size", type=int, default=8192, help="slide side, px at 0.5 µm/px")
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slide = work / "demo.tiff"
        write_synthetic_slide(
            slide, width=args.size, height=args.size, mpp=0.5, seed=0, cells=args.cells
        )
        times: dict[str, list[float]] = {"baseline": [], "candidate": []}
        cells: dict[str, int] = {}
        for _ in range(args.repeats):
            for name in ("baseline", "candidate"):
                seconds, found = scan_seconds(slide, getattr(args, name), work)
                times[name].append(seconds)
                cells[name] = found
        table = Table(
            title=f"demo slide {args.size}² px, {args.cells} cells (best of {args.repeats})"
        )
        for col in ("repository", "seconds", "cells found", "cells/s"):
            table.add_column(col)
        for name in ("baseline", "candidate"):
            best = min(times[name])
            table.add_row(
                f"{name} ({getattr(args, name)})",
                f"{best:.1f}",
                str(cells[name]),
                f"{cells[name] / best:.0f}",
            )
        console.print(table)
        ratio = min(times["candidate"]) / min(times["baseline"])
        console.print(f"candidate / baseline scan time: {ratio:.2f}x (target <= 2.00x)")
        enc = Table(title="cell encoders through ONNX Runtime (CPU)")
        for col in ("encoder", "cells/s", "parameters"):
            enc.add_column(col)
        for name, speed, params in encoder_speeds(args.candidate, args.baseline, work):
            enc.add_row(name, f"{speed:.0f}", f"{params / 1e6:.1f} M" if params else "")
        console.print(enc)


if __name__ == "__main__":
    main()
