"""Scan speed: papscan's streaming pipeline against a naive one, on the same slide and models.

    python bench/scan_speed.py [--size 20480] [--cells 5000] [--naive-rois 0]

The naive baseline is how one would first write it: OpenSlide `read_region` per ROI,
batch size 1 everywhere, one ORM insert per cell. Both scan the same synthetic slide with
the same models into fresh SQLite files. Then each of papscan's stages runs alone over the
whole slide (read; detect on the read ROIs; classify the crops) to show how close the
end-to-end time is to the slowest stage. `--naive-rois N` times the naive pipeline on the
first N ROIs only and extrapolates (0 = the whole slide).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from engines.postprocess import decode_yolo
from engines.preprocess import cut_crops, to_input
from engines.repository import ModelRepository, default_repository_path
from train.synth import write_synthetic_slide
from worker.db import queries
from worker.db.models import Cell, Roi
from worker.db.session import Database
from worker.lifecycle import scan_file
from worker.pipeline.detect import l0_boxes_in_core
from worker.pipeline.plan import cellular_mask, plan_rois
from worker.pipeline.scan import ScanModels, ScanOptions, ScanPipeline
from worker.wsi.read import make_reader, read_ahead
from worker.wsi.slide import open_slide

console = Console()


def papscan_scan(slide_path: Path, repo: ModelRepository, workdir: Path) -> dict:
    db = Database(f"sqlite:///{workdir / 'papscan.db'}")
    db.create_schema()
    start = time.perf_counter()
    report = scan_file(slide_path, db, repo)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cells": report.summary.cell_count,
        "rois": report.rois_planned,
        "stages_ms": report.timings_ms,
        "reader": report.reader,
    }


def stages_alone(slide_path: Path, repo: ModelRepository) -> dict[str, float]:
    """Each stage over the whole slide on its own, in seconds."""
    models = ScanModels.load(repo)
    pipeline = ScanPipeline(models, ScanOptions())
    with open_slide(slide_path) as slide:
        plan = plan_rois(
            slide.info,
            cellular_mask(slide),
            pipeline.target_mpp,
            pipeline.roi_px,
            pipeline.options.overlap_px,
        )
        reader = make_reader(slide, pipeline.target_mpp, pipeline.roi_px)
        start = time.perf_counter()
        images = [(roi, image) for roi, image in read_ahead(reader, plan.rois, depth=4)]
        read_s = time.perf_counter() - start
        reader.close()
    det = models.detector
    start = time.perf_counter()
    crops = []
    batch = det.config.max_batch_size
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        x = to_input(np.stack([im for _, im in chunk]), det.config.preprocessing)
        heads = det.infer({det.config.inputs[0].name: x})[det.config.outputs[0].name]
        for (roi, image), d in zip(
            chunk, decode_yolo(heads, pipeline.conf_threshold, pipeline.iou_threshold), strict=True
        ):
            _, _, kept = l0_boxes_in_core(
                d, (roi.l0_x, roi.l0_y), roi.l0_w / image.shape[1], roi.l0_core
            )
            centres = (d.boxes[kept, :2] + d.boxes[kept, 2:]) / 2
            crops.append(cut_crops(image, centres, pipeline.crop_field_px, pipeline.crop_px))
    detect_s = time.perf_counter() - start
    del images
    cls = models.cell_classifier
    all_crops = np.concatenate(crops)
    start = time.perf_counter()
    cls.infer({cls.config.inputs[0].name: to_input(all_crops, cls.config.preprocessing)})
    classify_s = time.perf_counter() - start
    models.close()
    return {"read": read_s, "detect+crop": detect_s, "classify_cells": classify_s}


def naive_scan(slide_path: Path, repo: ModelRepository, workdir: Path, max_rois: int) -> dict:
    """OpenSlide read_region per ROI, batch size 1, one ORM insert per cell."""
    models = ScanModels.load(repo)
    pipeline = ScanPipeline(models, ScanOptions())
    det, cls, roi_model = models.detector, models.cell_classifier, models.roi_classifier
    labels = pipeline.labels
    db = Database(f"sqlite:///{workdir / 'naive.db'}")
    db.create_schema()
    with open_slide(slide_path) as slide, db.session() as s:
        info = slide.info
        row = queries.record_slide(s, info)
        scan = queries.create_scan(s, row.id, models.versions())
        s.commit()
        start = time.perf_counter()
        plan = plan_rois(
            info,
            cellular_mask(slide),
            pipeline.target_mpp,
            pipeline.roi_px,
            pipeline.options.overlap_px,
        )
        rois = plan.rois[:max_rois] if max_rois else plan.rois
        reader = make_reader(slide, pipeline.target_mpp, pipeline.roi_px, prefer="openslide")
        n_cells = 0
        for roi in rois:
            image = reader.read(roi)
            x = to_input(image[None], det.config.preprocessing)
            heads = det.infer({det.config.inputs[0].name: x})[det.config.outputs[0].name]
            (d,) = decode_yolo(heads, pipeline.conf_threshold, pipeline.iou_threshold)
            boxes, scores, kept = l0_boxes_in_core(
                d, (roi.l0_x, roi.l0_y), roi.l0_w / image.shape[1], roi.l0_core
            )
            centres = (d.boxes[kept, :2] + d.boxes[kept, 2:]) / 2
            crops = cut_crops(image, centres, pipeline.crop_field_px, pipeline.crop_px)
            probs, feats = [], []
            for crop in crops:
                out = cls.infer(
                    {cls.config.inputs[0].name: to_input(crop[None], cls.config.preprocessing)}
                )
                probs.append(out["probs"][0])
                feats.append(out["features"][0])
            roi_probs = np.zeros(len(labels), np.float32)
            roi_probs[0] = 1.0
            if feats:
                f = np.stack(feats)[None]
                roi_probs = roi_model.infer(
                    {"cell_features": f, "cell_mask": np.ones(f.shape[:2], np.float32)}
                )["roi_probs"][0]
            roi_row = Roi(
                scan_id=scan.id,
                index=roi.index,
                x=roi.l0_x,
                y=roi.l0_y,
                w=roi.l0_w,
                h=roi.l0_h,
                label=labels[int(np.argmax(roi_probs))],
                probs={k: float(v) for k, v in zip(labels, roi_probs, strict=True)},
                cell_count=len(boxes),
            )
            s.add(roi_row)
            s.flush()
            for (bx, by, bw, bh), score, p in zip(boxes, scores, probs, strict=True):
                k = int(np.argmax(p))
                s.add(
                    Cell(
                        scan_id=scan.id,
                        roi_id=roi_row.id,
                        x=int(bx),
                        y=int(by),
                        w=int(bw),
                        h=int(bh),
                        detection_score=float(score),
                        label=labels[k],
                        score=float(p[k]),
                        suspicion=1.0 - float(p[0]),
                        probs={k2: float(v) for k2, v in zip(labels, p, strict=True)},
                        attention=0.0,
                    )
                )
                s.flush()
                n_cells += 1
            s.commit()
        reader.close()
        seconds = time.perf_counter() - start
    models.close()
    scale = len(plan.rois) / len(rois)
    return {
        "seconds": seconds * scale,
        "measured_seconds": seconds,
        "cells": round(n_cells * scale),
        "rois": len(plan.rois),
        "rois_measured": len(rois),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20480, help="slide side in px (0.5 mpp)")
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--naive-rois", type=int, default=0)
    parser.add_argument("--slide", type=Path, default=None, help="reuse a slide file")
    args = parser.parse_args()
    repo = ModelRepository(default_repository_path())
    with tempfile.TemporaryDirectory(prefix="papscan-bench-") as tmp:
        workdir = Path(tmp)
        slide = args.slide or workdir / "bench.tiff"
        if not slide.exists():
            console.print(f"writing a {args.size}² synthetic slide with {args.cells} cells …")
            write_synthetic_slide(
                slide, width=args.size, height=args.size, mpp=0.5, seed=2026, cells=args.cells
            )
        with open_slide(slide) as s:
            mpx = s.info.width * s.info.height / 1e6
        console.print("papscan pipeline …")
        ours = papscan_scan(slide, repo, workdir)
        console.print("each stage alone …")
        alone = stages_alone(slide, repo)
        console.print("naive pipeline …")
        naive = naive_scan(slide, repo, workdir, args.naive_rois)
    table = Table(title=f"{args.size}×{args.size} px slide ({mpx:.0f} Mpx), {ours['rois']} ROIs")
    for col in ("pipeline", "seconds", "cells", "cells/s", "Mpx/s"):
        table.add_column(col, justify="right")
    for name, r in (("papscan", ours), ("naive", naive)):
        table.add_row(
            name,
            f"{r['seconds']:.1f}",
            str(r["cells"]),
            f"{r['cells'] / r['seconds']:.0f}",
            f"{mpx / r['seconds']:.1f}",
        )
    console.print(table)
    if naive.get("rois_measured") != naive["rois"]:
        console.print(
            f"(naive timed on {naive['rois_measured']} ROIs, "
            f"{naive['measured_seconds']:.1f} s, scaled to the slide)"
        )
    console.print(
        "papscan stage times inside the pipeline (ms, summed over threads): "
        + ", ".join(f"{k} {v:.0f}" for k, v in ours["stages_ms"].items())
    )
    console.print("stages alone (s): " + ", ".join(f"{k} {v:.1f}" for k, v in alone.items()))
    slowest = max(alone, key=alone.get)
    console.print(
        f"[bold]speed-up over naive: {naive['seconds'] / ours['seconds']:.2f}×[/]  (target ≥ 3×)"
    )
    console.print(
        f"[bold]end-to-end / slowest stage alone ({slowest}): "
        f"{ours['seconds'] / alone[slowest]:.2f}[/]  (target ≤ 1.5)"
    )


if __name__ == "__main__":
    main()
