"""Slide QC and adequacy speed: what they add to the scan of the demo slide.

    python bench/qc_speed.py [--size 8192] [--cells 600] [--repeats 3]
    python bench/qc_speed.py --evidence [--data ../shared/data]

Writes the demo's synthetic slide (8192², 600 cells, seed 0, as `papscan demo` does) and
scans it whole with `worker.lifecycle.scan_file`, `--repeats` times with QC on and as many
with it off (`ScanOptions(qc=False)`), alternating, each into a fresh SQLite file; the
adequacy estimate and the call run in both (they are counts and a few floats a cell, not
separable from the aggregation). Prints the median scan times and their ratio (the
issue's budget for adequacy and QC together is 10 %). Then it times `SlideQc` alone over
the plan's ROIs, read before the clock starts, with `result()` and the focus map.

`--evidence` instead reruns the numbers `worker/pipeline/qc_thresholds.yaml` quotes: the
colour verdict of every real field in the shared data folder (each a one-ROI slide at
0.5 µm/px) against the same field with red and blue swapped, read as Y'CrCb / Y'CbCr, and
turned grey; and per-ROI sharpness of the fields cut into 448 px ROIs, sharp and blurred.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from engines.preprocess import resample
from engines.repository import ModelRepository, default_repository_path
from train.data.paths import default_data_root
from train.data.real_fields import REAL_SETS
from train.data.scanner_crops import HERLEV_MPP
from train.synth import write_synthetic_slide
from worker.db.session import Database
from worker.lifecycle import scan_file
from worker.pipeline.plan import cellular_mask, plan_rois
from worker.pipeline.qc import (
    QcThresholds,
    SlideQc,
    cellular_area_mm2,
    focus_map_png,
    roi_sharpness,
)
from worker.pipeline.scan import ScanOptions
from worker.wsi.read import make_reader, read_ahead
from worker.wsi.slide import open_slide

console = Console(width=150)


def scan_seconds(
    slide_path: Path, repo: ModelRepository, workdir: Path, qc: bool
) -> tuple[float, int]:
    """Wall time of one whole scan (open, plan, read, detect, classify, QC, write)."""
    db = Database(f"sqlite:///{workdir / f'papscan-{time.perf_counter_ns()}.db'}")
    db.create_schema()
    start = time.perf_counter()
    report = scan_file(slide_path, db, repo, options=ScanOptions(qc=qc))
    return time.perf_counter() - start, report.rois_planned


def qc_seconds(slide_path: Path, repo: ModelRepository, workdir: Path, repeats: int) -> dict:
    """QC over the plan's ROIs, `repeats` times; the ROIs are read first."""
    prep = repo.config("cell_detector").preprocessing  # the ROIs the scan reads
    roi_px = prep.input_size[0]
    with open_slide(slide_path) as slide:
        mask = cellular_mask(slide)
        plan = plan_rois(slide.info, mask, prep.mpp, roi_px, ScanOptions().overlap_px)
        reader = make_reader(slide, prep.mpp, roi_px)
        try:
            rois = list(read_ahead(reader, plan.rois, depth=4))
        finally:
            reader.close()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        qc = SlideQc(plan.mpp)
        for roi, image in rois:
            qc.add_roi(roi.index, image, roi)
        result = qc.result(cellular_area_mm2(mask))
        focus_map_png(result, plan, workdir / "focus_map.png")
        times.append(time.perf_counter() - start)
    return {"seconds": times, "rois": len(rois), "result": result}


SCANNER_MPP = 0.5
CORRUPTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "real": lambda rgb: rgb,
    "swap": lambda rgb: np.ascontiguousarray(rgb[..., ::-1]),
    "ycrcb": lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb),
    "ycbcr": lambda rgb: np.ascontiguousarray(
        cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]
    ),
    "grey": lambda rgb: np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2),
}
BLURS_UM = (0.0, 1.0, 1.5, 2.0)


def real_fields(root: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(set, RGB image at 0.5 µm/px) for every real field, Herlev crop and the Aperio file."""
    for name, load in REAL_SETS.items():
        for field in load(root):
            yield name, resample(field.load(), field.mpp / SCANNER_MPP)
    for path in sorted((root / "herlev").glob("*/*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        yield "herlev", resample(rgb, HERLEV_MPP / SCANNER_MPP)
    svs = root / "wsi" / "CMU-1-Small-Region.svs"
    if svs.exists():
        with open_slide(svs) as slide:
            yield "aperio_he", slide.read_region((0, 0), 0, (slide.info.width, slide.info.height))


def evidence(root: Path) -> None:
    """Colour verdicts and ROI sharpness per set, real against corrupted and blurred."""
    thresholds = QcThresholds.load()
    verdicts: dict[tuple[str, str], Counter] = {}
    measures: dict[tuple[str, str], list[tuple]] = {}
    sharpness: dict[tuple[str, float], list[float | None]] = {}
    for name, rgb in real_fields(root):
        for kind, corrupt in CORRUPTIONS.items():
            qc = SlideQc(SCANNER_MPP, thresholds)
            qc.add_roi(0, corrupt(rgb))
            r = qc.result()
            verdicts.setdefault((name, kind), Counter())[r.colour_code] += 1
            measures.setdefault((name, kind), []).append(
                (r.nuclear_chroma, r.absorption_breadth, r.swap_balance)
            )
        for blur in BLURS_UM:
            blurred = rgb if blur == 0 else cv2.GaussianBlur(rgb, (0, 0), blur / SCANNER_MPP)
            grey = cv2.cvtColor(blurred, cv2.COLOR_RGB2GRAY)
            for y in range(0, max(1, grey.shape[0] - 224), 448):
                for x in range(0, max(1, grey.shape[1] - 224), 448):
                    roi = grey[y : y + 448, x : x + 448]
                    sharpness.setdefault((name, blur), []).append(
                        roi_sharpness(roi, SCANNER_MPP, thresholds.focus)
                    )
    table = Table(title="colour verdicts per set (each field a one-ROI slide)")
    for col in ("set", "image", "verdicts", "chroma min", "breadth min..max", "balance min..max"):
        table.add_column(col)
    for (name, kind), counts in sorted(verdicts.items()):
        m = np.array(measures[(name, kind)], dtype=float)  # None -> nan
        table.add_row(
            name,
            kind,
            ", ".join(f"{code} {n}" for code, n in counts.most_common()),
            _range(m[:, 0], lo_only=True),
            _range(m[:, 1]),
            _range(m[:, 2]),
        )
    console.print(table)
    table = Table(
        title=f"ROI sharpness (448 px ROIs), blurred below {thresholds.focus.blurred_below}"
    )
    for col in ("set", "blur µm", "ROIs", "unmeasured", "min..median", "blurred"):
        table.add_column(col)
    for (name, blur), values in sorted(sharpness.items()):
        v = np.array([x for x in values if x is not None])
        table.add_row(
            name,
            f"{blur:.1f}",
            str(len(values)),
            str(len(values) - len(v)),
            f"{v.min():.3f}..{np.median(v):.3f}" if len(v) else "-",
            f"{int((v < thresholds.focus.blurred_below).sum())}/{len(v)}",
        )
    console.print(table)


def _range(values: np.ndarray, lo_only: bool = False) -> str:
    v = values[~np.isnan(values)]
    if not len(v):
        return "-"
    return f"{v.min():.3f}" if lo_only else f"{v.min():.3f}..{v.max():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--evidence", action="store_true", help="rerun the thresholds' evidence instead"
    )
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder")
    parser.add_argument("--size", type=int, default=8192, help="slide side in px (0.5 mpp)")
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3, help="QC passes to time")
    parser.add_argument("--slide", type=Path, default=None, help="reuse a slide file")
    args = parser.parse_args()
    if args.evidence:
        evidence(args.data or default_data_root())
        return
    repo = ModelRepository(default_repository_path())
    with tempfile.TemporaryDirectory(prefix="papscan-qc-bench-") as tmp:
        workdir = Path(tmp)
        slide = args.slide or workdir / "demo.tiff"
        if not slide.exists():
            console.print(f"writing a {args.size}² synthetic slide with {args.cells} cells …")
            write_synthetic_slide(
                slide, width=args.size, height=args.size, mpp=0.5, seed=0, cells=args.cells
            )
        console.print(f"scanning it {args.repeats}× with QC on and off, alternating …")
        on, off = [], []
        for _ in range(args.repeats):
            on.append(scan_seconds(slide, repo, workdir, qc=True)[0])
            seconds, rois = scan_seconds(slide, repo, workdir, qc=False)
            off.append(seconds)
        scan_s, off_s = statistics.median(on), statistics.median(off)
        console.print(
            f"scan with QC and adequacy {scan_s:.2f} s, without QC {off_s:.2f} s (medians):"
            f" [bold]on / off = {scan_s / off_s:.3f}[/] (budget ≤ 1.10)"
        )
        console.print(f"QC alone over its {rois} ROIs, {args.repeats}× …")
        qc = qc_seconds(slide, repo, workdir, args.repeats)
    qc_s = statistics.median(qc["seconds"])
    result = qc["result"]
    console.print(
        f"scan {scan_s:.2f} s; QC {qc_s:.3f} s (median of {args.repeats}: "
        + ", ".join(f"{s:.3f}" for s in qc["seconds"])
        + f"), {1000 * qc_s / max(qc['rois'], 1):.2f} ms per ROI"
    )
    console.print(
        f"QC: median sharpness {result.median_sharpness}, blurred fraction "
        f"{result.focus_blurred_fraction}, colour {result.colour_code}, cellular area "
        f"{result.cellular_area_mm2} mm², flags {result.flags}"
    )
    console.print(
        f"[bold]QC time / scan time: {qc_s / scan_s:.3f}[/]  (budget ≤ 0.10 with adequacy)"
    )


if __name__ == "__main__":
    main()
