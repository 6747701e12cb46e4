"""Detector runs: the YOLO detector trained through ultralytics on any detection data set,
into a run folder like the classifiers' (`papscan train detector`)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

from train.data.isbi import isbi_rois, list_isbi_images, tile_boxed_image
from train.data.paths import default_data_root
from train.data.splits import ratio_split
from train.data.synth_fields import detector_rois, field_specs, render_field
from train.data.yolo_dataset import write_dataset_yaml, write_yolo_split
from train.data.yolo_folder import read_yolo_folder
from train.loops import detector as det
from train.loops.metrics import detection_report, match_detections
from train.runs import (
    METRICS_JSON,
    MODEL_PT,
    SPLITS_JSON,
    finish_run,
    log_to_file,
    start_run,
    write_json,
)

DETECTOR_FRACTIONS = (0.7, 0.15, 0.15)
DETECTOR_ROI_PX = 512


def detector_items(spec: str, root: Path | None, seed: int) -> tuple[list, str]:
    """Boxed ROIs (`BoxedImage`, at most 512 px) of a detection data set, and its class name.

    Args:
        spec: `isbi` (nucleus boxes), `sipakmed` (full-field cell boxes), `cric` (100 px
            boxes on nuclei), `synth` (rendered fields, nucleus boxes) or a YOLO folder.
        root: The shared data folder; default `train.data.paths.default_data_root()`.
        seed: Seed of the synthetic fields.

    Raises:
        ValueError: An unknown spec.
        FileNotFoundError: The data are missing.
    """

    root = default_data_root() if root is None else root

    def tiled(items: list) -> list:
        """Images larger than an ROI cut into ROIs; smaller ones kept whole."""
        return [
            roi
            for item in items
            for roi in (
                tile_boxed_image(item, DETECTOR_ROI_PX)
                if max(item.image.shape[:2]) > DETECTOR_ROI_PX
                else [item]
            )
        ]

    if spec == "isbi":
        return isbi_rois(root, list_isbi_images(root), DETECTOR_ROI_PX), "nucleus"
    if spec == "sipakmed":
        folder = read_yolo_folder(
            root / "sipakmed" / "Metaplastic" / "full_field",
            labels_dir=root / "sipakmed" / "Metaplastic" / "full_field" / "yolo_labels_cell",
        )
        return tiled(folder.items), "cell"
    if spec == "cric":
        return tiled(read_yolo_folder(root / "cric" / "full_images").items), "cell"
    if spec == "synth":
        rng = np.random.default_rng((seed, 0xDE7))
        items = []
        for fspec in field_specs(6, seed, held_out=False, size_px=1024):
            items += detector_rois(render_field(fspec), 4, DETECTOR_ROI_PX, rng)[0]
        return items, "nucleus"
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"unknown detection data {spec!r}; use isbi, sipakmed, cric, synth "
            "or the path of a YOLO folder"
        )
    splits = [s for s in ("train", "val", "test") if (path / "images" / s).is_dir()]
    folders = [read_yolo_folder(path, s) for s in splits] if splits else [read_yolo_folder(path)]
    names = folders[0].class_names
    return tiled([it for f in folders for it in f.items]), names[0] if len(names) == 1 else "object"


def _items_sha256(items: list) -> str:

    h = hashlib.sha256()
    for item in items:
        h.update(item.name.encode())
        h.update(np.ascontiguousarray(item.boxes_xyxy, np.float32).tobytes())
        h.update(np.ascontiguousarray(item.image).tobytes())
    return h.hexdigest()


def _recall_at_iou50(weights: Path, items: list, imgsz: int, conf: float = 0.25) -> dict:
    """Greedy matching at IoU 0.5 of the trained detector's boxes (conf >= `conf`)."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    n_true = n_pred = n_matched = 0
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        # ultralytics reads numpy images as BGR
        results = model.predict(
            [it.image[..., ::-1] for it in chunk],
            imgsz=imgsz,
            conf=conf,
            iou=0.6,
            device="cpu",
            verbose=False,
        )
        for item, result in zip(chunk, results, strict=True):
            boxes = result.boxes.xyxy.cpu().numpy()
            scores = result.boxes.conf.cpu().numpy()
            n_true += len(item.boxes_xyxy)
            n_pred += len(boxes)
            n_matched += match_detections(boxes, scores, item.boxes_xyxy, 0.5)
    return {**detection_report(n_true, n_pred, n_matched), "conf_threshold": conf, "iou": 0.5}


def train_detector_run(
    spec: str,
    run_dir: Path,
    *,
    epochs: int | None = None,
    imgsz: int | None = None,
    batch: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    root: Path | None = None,
    command: str = "",
) -> dict:
    """Train the YOLO detector on a data set through ultralytics into a run folder.

    ROIs are split 70/15/15 into train / val / test by source image (by ROI where a set
    has fewer than three images); ultralytics trains on train (plots off, no downloads) and
    keeps its best-on-val weights; the test split gets ultralytics' mAP50 and papscan's
    recall / precision at IoU 0.5 (conf 0.25). Writes run.json, metrics.json, splits.json
    (ROI names), log.txt and model.pt, which here is ultralytics' own checkpoint
    (`YOLO("model.pt")` loads it; run.json says `weights_format: ultralytics`).

    Returns:
        The metrics.json content.

    Raises:
        ValueError: Too few ROIs for three parts, or a non-empty run folder.
    """

    t0 = time.perf_counter()
    items, class_name = detector_items(spec, root, seed)
    sources = np.asarray([it.name.split("@")[0] for it in items])
    group_by = "image" if len(set(sources)) >= 3 else "roi"
    _, groups = np.unique(
        sources if group_by == "image" else np.arange(len(items)), return_inverse=True
    )
    parts = ratio_split(np.zeros(len(items), np.int64), groups, DETECTOR_FRACTIONS, seed)
    if limit is not None:
        rng = np.random.default_rng((seed, 0x11A1))
        parts = tuple(np.sort(rng.choice(p, min(limit, len(p)), replace=False)) for p in parts)
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"{spec!r} has too few ROIs ({len(items)}) for a train/val/test split")
    changes = {k: v for k, v in {"epochs": epochs, "imgsz": imgsz, "batch": batch}.items() if v}
    settings = dataclasses.replace(det.DetectorSettings(), **changes)
    protocol = {
        **det.settings_dict(settings),
        "split": "ratio",
        "fractions": list(DETECTOR_FRACTIONS),
        "split_groups": group_by,
        "limit": limit,
        "overrides": {**changes, **({"limit": limit} if limit else {})},
    }
    run = start_run(
        run_dir,
        {
            "task": "detector",
            "arch": Path(settings.model_yaml).stem,
            "arch_kwargs": {"scale": settings.scale},
            "dataset": spec,
            "classes": [class_name],
            "input_px": settings.imgsz,
            "mean": [0.0, 0.0, 0.0],
            "std": [255.0, 255.0, 255.0],
            "protocol": protocol,
            "seed": seed,
            "data_sha256": _items_sha256(items),
            "command": command,
            "weights_format": "ultralytics",
        },
    )
    with log_to_file(run_dir):
        ds = run_dir / "dataset"
        split_names = ("train", "val", "test")
        for name, part in zip(split_names, parts, strict=True):
            write_yolo_split(ds, name, [items[i] for i in part])
        data_yaml = write_dataset_yaml(ds, [class_name], {s: f"images/{s}" for s in split_names})
        t_train = time.perf_counter()
        weights = det.train_detector(run_dir, data_yaml, settings, seed)
        train_s = time.perf_counter() - t_train
        best = weights.with_name("best.pt")
        chosen = best if best.exists() else weights
        test_items = [items[i] for i in parts[2]]
        fold = {
            "fold": 0,
            "epochs": settings.epochs,
            "train_s": round(train_s, 1),
            "test_rois": len(test_items),
            "ultralytics": det.ultralytics_map50(chosen, data_yaml, "test", settings.imgsz),
            "iou50": _recall_at_iou50(chosen, test_items, settings.imgsz),
        }
        metrics = {
            "folds": [fold],
            "summary": {
                "map50": {"mean": fold["ultralytics"]["map50"], "std": 0.0},
                "recall_iou50": {"mean": fold["iou50"]["recall"], "std": 0.0},
                "precision_iou50": {"mean": fold["iou50"]["precision"], "std": 0.0},
                "folds": 1,
            },
            "exported_fold": 0,
        }
        shutil.copyfile(chosen, run_dir / MODEL_PT)
        write_json(run_dir / METRICS_JSON, metrics)
        write_json(
            run_dir / SPLITS_JSON,
            {
                "folds": [
                    {s: [items[i].name for i in p] for s, p in zip(split_names, parts, strict=True)}
                ],
                "exported_fold": 0,
            },
        )
    finish_run(run_dir, run, time.perf_counter() - t0)
    return metrics
