"""`papscan train defaults`: train, evaluate and export the three default models.

One reproducible CPU run (seeded; torch on 2 threads) that writes a Triton-style model
repository (`<out>/<model>/config.yaml`, `<out>/<model>/1/{model.onnx,model.pt2,card.json}`;
`model.pt2` is the same network as a `torch.export` program, checked against eager
PyTorch and against ONNX Runtime):

1. `cell_detector`: YOLO11 at a pico scale, from YAML, on synthetic 512 px ROIs at
   0.5 mpp (with debris and empty glass) plus ISBI 2014 real nuclei; nucleus boxes.
2. `cell_classifier`: SE CNN on 96 px fixed-field crops of synthetic cells (jittered
   centres) plus Herlev (80 % train, reduced weight); evaluated on held-out synthetic
   fields and held-out Herlev separately.
3. `roi_classifier`: gated attention MIL on the trained classifier's cell features of
   synthetic ROIs; ROI label = worst cell class present.

Working files (rendered datasets, ultralytics runs, intermediate ONNX) go to `work_dir`,
never into the repository.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data.herlev import load_herlev, stratified_split
from train.data.isbi import isbi_rois, list_isbi_images
from train.data.paths import default_data_root
from train.data.synth_fields import (
    SynthField,
    binucleate_cells,
    cell_crops,
    cells_in_window,
    detector_rois,
    field_specs,
    random_windows,
    render_field,
)
from train.data.yolo_dataset import write_dataset_yaml, write_yolo_split
from train.export.configs import classifier_config, detector_config, roi_config
from train.export.onnx_export import check_dynamic_batch, export_onnx, max_abs_diff_vs_torch
from train.export.pt2_export import Pt2Export, export_pt2, max_abs_diff_onnx_vs_pt2
from train.export.repository import write_model_version
from train.loops import classifier as cls_loop
from train.loops import detector as det_loop
from train.loops import roi as roi_loop
from train.models import create_model
from train.models.cell_cnn import CellClassifierExport
from train.models.mil import RoiClassifierExport
from train.synth import CELL_CLASSES

logger = logging.getLogger(__name__)

MPP = 0.5
DETECTOR_PX = 512
CROP_PX = 96
CONF_THRESHOLD = 0.25  # the contract's default; the shipped one is calibrated (see below)
CONF_GRID = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
NMS_IOU_THRESHOLD = 0.5
ISBI_TEST_STEMS = ("EDF010", "EDF011")
HERLEV_TEST_FRACTION = 0.2
ONNX_TOLERANCE = 1e-4
#: Largest max |ONNX Runtime - exported PyTorch program| shipped (the detector's raw head
#: holds box coordinates in pixels, up to 512, hence looser than ONNX_TOLERANCE).
ONNX_VS_PT2_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DefaultsPlan:
    """Sizes of one default run (the full run, or `quick()` for a smoke run).

    Attributes:
        train_fields: Synthetic training fields (detector ROIs and classifier cells).
        test_fields: Held-out synthetic fields (every metric "on held-out synthetic").
        calibration_fields: Further held-out fields: the detector's validation split and
            the ROIs its confidence threshold is chosen on (over `CONF_GRID`, the one
            whose worse of recall and precision is best).
        mil_fields: Further synthetic fields whose ROIs train the ROI classifier.
        field_px: Side of a field, px at 0.5 mpp.
        train_cells: Range of cells per training field (per 2048 px; denser than the
            held-out fields, so each ROI teaches more nuclei).
        train_debris_per_cell: Range of debris per cell of training fields (more
            negatives than the slide writer's 1.0).
        rois_per_field: Random detector ROIs cut from each training / held-out field.
        binucleate_rois_per_field: Extra training ROIs per field around binucleate
            koilocytes (whose lone nuclei are the detector's commonest false positives).
        classifier_fields: Training fields whose cells train the cell classifier (the
            synthetic classes are easy; Herlev gets the rest of the time).
        isbi_repeats: Times each ISBI training ROI is listed in the detector's train split.
        bags_per_field: ROI-classifier bags (random 512 px windows) per field.
        val_rois: Held-out ROIs ultralytics validates on each epoch.
        detector: Detector training settings.
        classifier: Cell classifier settings.
        roi: ROI classifier settings.
    """

    train_fields: int = 50
    test_fields: int = 12
    calibration_fields: int = 8
    mil_fields: int = 30
    field_px: int = 2048
    train_cells: tuple[int, int] = (50, 170)
    train_debris_per_cell: tuple[float, float] = (1.5, 2.5)
    rois_per_field: int = 6
    binucleate_rois_per_field: int = 2
    classifier_fields: int = 30
    isbi_repeats: int = 1
    bags_per_field: int = 40
    val_rois: int = 32
    detector: det_loop.DetectorSettings = field(
        default_factory=lambda: det_loop.DetectorSettings(epochs=20, batch=8, close_mosaic=5)
    )
    classifier: cls_loop.ClassifierSettings = field(
        default_factory=lambda: cls_loop.ClassifierSettings(
            epochs=8, herlev_weight=1.0, herlev_repeats=3
        )
    )
    roi: roi_loop.RoiSettings = field(default_factory=roi_loop.RoiSettings)

    @classmethod
    def quick(cls) -> DefaultsPlan:
        """A minutes-scale smoke run: same steps, tiny data and epochs (metrics meaningless)."""
        return cls(
            train_fields=4,
            test_fields=2,
            calibration_fields=1,
            mil_fields=2,
            field_px=1024,
            rois_per_field=3,
            binucleate_rois_per_field=1,
            bags_per_field=10,
            val_rois=4,
            detector=det_loop.DetectorSettings(epochs=1, batch=8, close_mosaic=0),
            classifier=cls_loop.ClassifierSettings(model_name="se_cellnet_tiny", epochs=1),
            roi=roi_loop.RoiSettings(epochs=3),
        )


def set_determinism(seed: int, num_threads: int) -> None:
    """Seed python, numpy and torch; fix torch's CPU thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)


def train_defaults(
    out: Path,
    seed: int = 0,
    quick: bool = False,
    work_dir: Path | None = None,
    data_root: Path | None = None,
    command: str = "",
    num_threads: int = 2,
) -> dict[str, Any]:
    """Train, evaluate and export the three default models into the repository `out`.

    Args:
        out: Model repository folder (created; the three model folders are replaced).
        seed: Seed of every random choice (data, initialisation, order).
        quick: Smoke run (tiny data and epochs).
        work_dir: Folder for working files (default `runs/train_defaults[_quick]_seed<seed>`).
        data_root: Shared real-data folder (default `../shared/data`); ISBI and Herlev are
            skipped, with a warning and a note on the cards, where they are absent.
        command: The command line, recorded on each card.
        num_threads: Torch CPU threads.

    Returns:
        A summary: per model, its metrics and the version folder; timings in seconds.
    """
    t_start = time.perf_counter()
    plan = DefaultsPlan.quick() if quick else DefaultsPlan()
    work_dir = work_dir or Path("runs") / f"train_defaults{'_quick' if quick else ''}_seed{seed}"
    # absolute: ultralytics puts a relative `project` under its own runs folder
    work_dir = work_dir.resolve()
    out = out.resolve()
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    data_root = data_root or default_data_root()
    set_determinism(seed, num_threads)
    common = {"seed": seed, "command": command, "quick": quick, "plan": _plan_card(plan)}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    train_fields = _render_fields(
        field_specs(
            plan.train_fields,
            seed,
            False,
            plan.field_px,
            density_range=plan.train_cells,
            debris_range=plan.train_debris_per_cell,
        )
    )
    test_fields = _render_fields(field_specs(plan.test_fields, seed, True, plan.field_px))
    calib_fields = _render_fields(
        field_specs(plan.calibration_fields, seed + 2, True, plan.field_px)
    )
    timings["render_fields_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    detector = _detector(
        out, work_dir, plan, seed, train_fields, test_fields, calib_fields, data_root, common
    )
    del calib_fields
    timings["cell_detector_s"] = round(time.perf_counter() - t0, 1)
    set_determinism(seed, num_threads)

    t0 = time.perf_counter()
    classifier, cls_model = _classifier(
        out,
        work_dir,
        plan,
        seed,
        train_fields[: plan.classifier_fields],
        test_fields,
        data_root,
        common,
    )
    timings["cell_classifier_s"] = round(time.perf_counter() - t0, 1)
    del train_fields

    t0 = time.perf_counter()
    mil_fields = _render_fields(field_specs(plan.mil_fields, seed + 1, False, plan.field_px))
    roi = _roi(out, work_dir, plan, seed, cls_model, mil_fields, test_fields, common)
    timings["roi_classifier_s"] = round(time.perf_counter() - t0, 1)

    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    summary = {
        "repository": str(out),
        "seed": seed,
        "quick": quick,
        "timings": timings,
        "cell_detector": detector,
        "cell_classifier": classifier,
        "roi_classifier": roi,
    }
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("default models written to %s in %.0f s", out, timings["total_s"])
    return summary


# --- data --------------------------------------------------------------------------------


def _render_fields(specs: list) -> list[SynthField]:
    fields = [render_field(s) for s in specs]
    logger.info(
        "rendered %d synthetic fields (%d cells)", len(fields), sum(len(f.cells) for f in fields)
    )
    return fields


def _field_summary(fields: list[SynthField]) -> dict[str, Any]:
    counts = Counter(c.label for f in fields for c in f.cells)
    kinds = Counter(c.kind for f in fields for c in f.cells)
    seeds = [f.spec.seed for f in fields]
    return {
        "fields": len(fields),
        "field_px": fields[0].spec.size_px if fields else 0,
        "mpp": MPP,
        "seeds": [min(seeds), max(seeds)] if seeds else [],
        "cells": sum(counts.values()),
        "cells_per_class": {c: counts.get(c, 0) for c in CELL_CLASSES},
        "cells_per_kind": dict(sorted(kinds.items())),
        "debris": sum(len(f.debris) for f in fields),
        "jpeg_quality": sorted({f.spec.jpeg_quality for f in fields}),
    }


def _plan_card(plan: DefaultsPlan) -> dict[str, Any]:
    d = asdict(plan)
    d["detector"] = det_loop.settings_dict(plan.detector)
    return d


# --- exported PyTorch programs ----------------------------------------------------------


def _pt2_checks(
    name: str,
    pt2: Pt2Export,
    onnx_path: Path,
    feeds: list[dict[str, np.ndarray]],
    output_names: list[str],
) -> dict[str, Any]:
    """The card's record of `model.pt2`: its differences from eager PyTorch and ONNX Runtime.

    Raises:
        ValueError: ONNX Runtime and the program differ by more than ONNX_VS_PT2_TOLERANCE.
    """
    diff = max(max_abs_diff_onnx_vs_pt2(onnx_path, pt2.path, feed, output_names) for feed in feeds)
    if diff > ONNX_VS_PT2_TOLERANCE:
        raise ValueError(
            f"{name}: ONNX Runtime and the exported PyTorch program differ by {diff:.2e} "
            f"> {ONNX_VS_PT2_TOLERANCE}"
        )
    logger.info("%s: max |ONNX Runtime - exported PyTorch program| %.1e", name, diff)
    return {
        "onnx_vs_pytorch_max_abs_diff": diff,
        "onnx_vs_pytorch_inputs": [{k: list(v.shape) for k, v in feed.items()} for feed in feeds],
        "pytorch_vs_eager_max_abs_diff": pt2.max_abs_diff_vs_eager,
        "pytorch_vs_eager_batch_sizes": list(pt2.check_batch_sizes),
        "torch": torch.__version__,
    }


# --- cell detector -----------------------------------------------------------------------


def _detector_images(items: list) -> np.ndarray:
    """HxWx3 uint8 RGB ROIs -> [B, 3, H, W] float32 in [0, 1], as the detector takes them."""
    x = np.stack([it.image for it in items]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray(x)


def _detector(
    out: Path,
    work_dir: Path,
    plan: DefaultsPlan,
    seed: int,
    train_fields: list[SynthField],
    test_fields: list[SynthField],
    calib_fields: list[SynthField],
    data_root: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    rng = np.random.default_rng((seed, 0xDE7))
    train_rois = []
    for f in train_fields:
        focus = binucleate_cells(f)[: plan.binucleate_rois_per_field]
        train_rois += detector_rois(f, plan.rois_per_field, DETECTOR_PX, rng, focus)[0]
    test_rois, test_ignores = [], []
    for f in test_fields:
        n_test = plan.rois_per_field + plan.binucleate_rois_per_field  # all random
        rois, ignores = detector_rois(f, n_test, DETECTOR_PX, rng)
        test_rois += rois
        test_ignores += ignores
    calib_rois, calib_ignores = [], []
    for f in calib_fields:
        n_calib = plan.rois_per_field + plan.binucleate_rois_per_field
        rois, ignores = detector_rois(f, n_calib, DETECTOR_PX, rng)
        calib_rois += rois
        calib_ignores += ignores
    isbi_train, isbi_test, isbi_note = [], [], None
    try:
        stems = list_isbi_images(data_root)
        isbi_train = isbi_rois(data_root, [s for s in stems if s not in ISBI_TEST_STEMS])
        isbi_test = isbi_rois(data_root, [s for s in stems if s in ISBI_TEST_STEMS])
    except FileNotFoundError as exc:
        isbi_note = str(exc)
        logger.warning("ISBI 2014 skipped: %s", exc)

    ds = work_dir / "detector_dataset"
    write_yolo_split(ds, "train", train_rois + isbi_train * plan.isbi_repeats)
    write_yolo_split(ds, "val", calib_rois[: plan.val_rois])
    write_yolo_split(ds, "test", test_rois)
    data_yaml = write_dataset_yaml(
        ds, ["nucleus"], {"train": "images/train", "val": "images/val", "test": "images/test"}
    )
    weights = det_loop.train_detector(work_dir, data_yaml, plan.detector, seed)
    onnx_path, export_module = det_loop.export_detector(weights, plan.detector)

    # Lone nuclei of binucleate koilocytes (whose truth is one box over both) score
    # 0.3-0.6, so the shipped threshold is calibrated on separate held-out ROIs.
    sweep = det_loop.sweep_conf_thresholds(
        onnx_path, calib_rois, calib_ignores, CONF_GRID, NMS_IOU_THRESHOLD
    )
    conf = det_loop.choose_conf_threshold(sweep)
    logger.info("cell_detector confidence threshold %.2f (calibration ROIs)", conf)
    metrics: dict[str, Any] = {
        "conf_threshold_shipped": conf,
        "calibration_sweep": sweep,
        "synthetic_held_out": det_loop.evaluate_detector_onnx(
            onnx_path, test_rois, test_ignores, conf, NMS_IOU_THRESHOLD
        ),
        "synthetic_held_out_at_conf_0.25": det_loop.evaluate_detector_onnx(
            onnx_path, test_rois, test_ignores, CONF_THRESHOLD, NMS_IOU_THRESHOLD
        ),
        "synthetic_held_out_ultralytics": det_loop.ultralytics_map50(
            weights, data_yaml, "test", plan.detector.imgsz
        ),
    }
    if isbi_test:
        metrics["isbi2014_held_out"] = det_loop.evaluate_detector_onnx(
            onnx_path, isbi_test, None, conf, NMS_IOU_THRESHOLD
        )
    logger.info("cell_detector held-out synthetic: %s", metrics["synthetic_held_out"])

    checks = {
        "dynamic_batch_output_shapes": check_dynamic_batch(
            onnx_path,
            lambda b: {
                "images": np.random.default_rng(b).random(
                    (b, 3, DETECTOR_PX, DETECTOR_PX), dtype=np.float32
                )
            },
        ),
        "onnx_vs_torch_max_abs_diff": det_loop.onnx_vs_torch_diff(
            weights, onnx_path, test_rois[:4]
        ),
    }
    n_train_boxes = int(sum(len(r.boxes_xyxy) for r in train_rois))
    card = {
        **common,
        "task": "nucleus detection, one class 'nucleus' (nucleus boxes); ultralytics raw head",
        "architecture": {
            "family": "ultralytics YOLO11",
            "yaml": "train/models/papscan_yolo11_pico.yaml",
            "scale": plan.detector.scale,
            "pretrained": False,
        },
        "training_data": {
            "synthetic": {
                **_field_summary(train_fields),
                "rois": len(train_rois),
                "roi_px": DETECTOR_PX,
                "nucleus_boxes": n_train_boxes,
                "empty_rois": int(sum(len(r.boxes_xyxy) == 0 for r in train_rois)),
                "source": "train.synth (plan_cells + render_region), JPEG round-trip",
            },
            "isbi2014_edf": {
                "images": sorted({r.name.split("@")[0] for r in isbi_train}),
                "rois": len(isbi_train),
                "repeats": plan.isbi_repeats,
                "nucleus_boxes": int(sum(len(r.boxes_xyxy) for r in isbi_train)),
                "scale_to_0.5mpp": 0.6,
                "note": isbi_note,
                "source": "ISBI 2014 Overlapping Cervical Cytology challenge, grey->RGB",
            },
        },
        "held_out_data": {
            "synthetic": {**_field_summary(test_fields), "rois": len(test_rois)},
            "isbi2014_edf": {"images": list(ISBI_TEST_STEMS), "rois": len(isbi_test)},
            "synthetic_calibration": {
                **_field_summary(calib_fields),
                "rois": len(calib_rois),
                "use": "ultralytics val split and the confidence-threshold choice",
            },
        },
        "settings": det_loop.settings_dict(plan.detector),
        "metrics": metrics,
        "checks": checks,
    }
    config = detector_config(DETECTOR_PX, MPP, ["nucleus"], conf, NMS_IOU_THRESHOLD)
    images = _detector_images(test_rois[:4])
    pt2 = det_loop.export_detector_pt2(
        export_module, images, work_dir / "cell_detector.pt2", config["max_batch_size"]
    )
    pt2_checks = _pt2_checks("cell_detector", pt2, onnx_path, [{"images": images}], ["output0"])
    version_dir = write_model_version(
        out, config, onnx_path, card, pt2_path=pt2.path, pt2_checks=pt2_checks
    )
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}


# --- cell classifier ---------------------------------------------------------------------


def _crops_of(
    fields: list[SynthField], jitter_px: float, copies: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    parts = [cell_crops(f, CROP_PX, jitter_px, copies, rng) for f in fields]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _classifier(
    out: Path,
    work_dir: Path,
    plan: DefaultsPlan,
    seed: int,
    train_fields: list[SynthField],
    test_fields: list[SynthField],
    data_root: Path,
    common: dict[str, Any],
) -> tuple[dict[str, Any], torch.nn.Module]:
    settings = plan.classifier
    labels = tuple(CELL_CLASSES)
    test_rng = np.random.default_rng((seed, 0x7E57))
    test_x, test_y = _crops_of(test_fields, settings.jitter_px, 1, test_rng)
    herlev_note = None
    try:
        herlev = load_herlev(data_root, labels, CROP_PX)
        h_train, h_test = stratified_split(herlev.labels, HERLEV_TEST_FRACTION, seed)
    except FileNotFoundError as exc:
        herlev, h_train, h_test, herlev_note = None, np.zeros(0, int), np.zeros(0, int), str(exc)
        logger.warning("Herlev skipped: %s", exc)
    hx = herlev.images[h_train] if herlev else np.zeros((0, CROP_PX, CROP_PX, 3), np.uint8)
    hy = herlev.labels[h_train] if herlev else np.zeros(0, np.int64)

    model = create_model(settings.model_name, num_classes=len(labels))
    log = cls_loop.train_classifier(
        model,
        lambda rng: _crops_of(train_fields, settings.jitter_px, settings.copies, rng),
        hx,
        hy,
        test_x,
        test_y,
        settings,
        seed,
        labels,
    )

    metrics: dict[str, Any] = {
        "synthetic_held_out": cls_loop.evaluate(model, test_x, test_y, labels)
    }
    exact_x, exact_y = _crops_of(test_fields, 0.0, 1, test_rng)
    metrics["synthetic_held_out_exact_centres"] = cls_loop.evaluate(model, exact_x, exact_y, labels)
    if herlev is not None:
        metrics["herlev_held_out"] = cls_loop.evaluate(
            model, herlev.images[h_test], herlev.labels[h_test], labels
        )
    logger.info(
        "cell_classifier accuracy: synthetic %.4f, herlev %s",
        metrics["synthetic_held_out"]["accuracy"],
        metrics.get("herlev_held_out", {}).get("accuracy"),
    )

    wrapper = CellClassifierExport(model).eval()
    onnx_path = export_onnx(
        wrapper,
        (torch.zeros(2, 3, CROP_PX, CROP_PX),),
        work_dir / "cell_classifier.onnx",
        ["crops"],
        ["probs", "features"],
        {"crops": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    from train.data.crops import normalise
    from train.export.configs import CLASSIFIER_MEAN, CLASSIFIER_STD

    sample = normalise(test_x[:64], CLASSIFIER_MEAN, CLASSIFIER_STD)
    diff = max_abs_diff_vs_torch(wrapper, onnx_path, {"crops": sample})
    if diff > ONNX_TOLERANCE:
        raise ValueError(
            f"cell_classifier ONNX differs from PyTorch by {diff:.2e} > {ONNX_TOLERANCE}"
        )
    checks = {
        "onnx_vs_torch_max_abs_diff": diff,
        "onnx_vs_torch_samples": len(sample),
        "dynamic_batch_output_shapes": check_dynamic_batch(
            onnx_path,
            lambda b: {
                "crops": sample[:b]
                if b <= len(sample)
                else np.resize(sample, (b, *sample.shape[1:]))
            },
        ),
    }
    n_params = sum(p.numel() for p in model.parameters())
    herlev_counts = None
    if herlev is not None:
        herlev_counts = {
            "train": {c: int((herlev.labels[h_train] == i).sum()) for i, c in enumerate(labels)},
            "test": {c: int((herlev.labels[h_test] == i).sum()) for i, c in enumerate(labels)},
        }
    card = {
        **common,
        "task": "cell class NILM / LSIL / HSIL from a 96x96 crop at 0.5 mpp centred on the nucleus",
        "architecture": {
            "name": settings.model_name,
            "family": "SeCellNet (train/models/cell_cnn.py)",
            "parameters": n_params,
            "embed_dim": model.embed_dim,
            "paper": "Su et al., multiple attention fusion (shared/papers/000): SE attention",
        },
        "training_data": {
            "synthetic": {
                **_field_summary(train_fields),
                "crops_per_epoch": int(sum(len(f.cells) for f in train_fields)) * settings.copies,
                "centre_jitter_std_px": settings.jitter_px,
                "source": "train.synth fields; crops with neighbours, white beyond the field",
            },
            "herlev": {
                "counts": herlev_counts,
                "test_fraction": HERLEV_TEST_FRACTION,
                "split_seed": seed,
                "loss_weight": settings.herlev_weight,
                "repeats_per_epoch": settings.herlev_repeats,
                "mapping": "normal_* -> NILM, light -> LSIL, moderate/severe/in situ -> HSIL",
                "resize": "whole image to 96x96 (unknown magnification)",
                "note": herlev_note,
            },
        },
        "held_out_data": {
            "synthetic": {
                **_field_summary(test_fields),
                "crops": len(test_x),
                "centre_jitter_std_px": settings.jitter_px,
            }
        },
        "settings": asdict(settings),
        "epochs_log": log,
        "metrics": metrics,
        "checks": checks,
    }
    config = classifier_config(CROP_PX, MPP, list(labels), model.embed_dim)
    pt2 = export_pt2(
        wrapper,
        {"crops": torch.from_numpy(sample[:8])},
        work_dir / "cell_classifier.pt2",
        ["probs", "features"],
        max_batch_size=config["max_batch_size"],
    )
    pt2_checks = _pt2_checks(
        "cell_classifier", pt2, onnx_path, [{"crops": sample}], ["probs", "features"]
    )
    version_dir = write_model_version(
        out, config, onnx_path, card, pt2_path=pt2.path, pt2_checks=pt2_checks
    )
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}, model


# --- ROI classifier ----------------------------------------------------------------------


def _bags(
    fields: list[SynthField],
    model: torch.nn.Module,
    per_field: int,
    jitter_px: float,
    rng: np.random.Generator,
) -> list[roi_loop.Bag]:
    bags = []
    for f in fields:
        crops, labels = cell_crops(f, CROP_PX, jitter_px, 1, rng)
        _, feats = cls_loop.predict(model, crops)
        for x0, y0 in random_windows(f, per_field, DETECTOR_PX, rng):
            idx = cells_in_window(f.cells, x0, y0, DETECTOR_PX)
            bags.append(roi_loop.Bag(feats[idx].astype(np.float32), labels[idx]))
    return bags


def _roi(
    out: Path,
    work_dir: Path,
    plan: DefaultsPlan,
    seed: int,
    cls_model: torch.nn.Module,
    mil_fields: list[SynthField],
    test_fields: list[SynthField],
    common: dict[str, Any],
) -> dict[str, Any]:
    labels = tuple(CELL_CLASSES)
    rng = np.random.default_rng((seed, 0x301))
    jitter = plan.classifier.jitter_px
    train_bags = _bags(mil_fields, cls_model, plan.bags_per_field, jitter, rng)
    test_bags = _bags(test_fields, cls_model, plan.bags_per_field // 2, jitter, rng)
    feature_dim = int(cls_model.embed_dim)
    model = create_model("gated_attention_mil", in_dim=feature_dim, num_classes=len(labels))
    log = roi_loop.train_roi_classifier(model, train_bags, test_bags, plan.roi, seed, labels)
    metrics = {"synthetic_held_out": roi_loop.evaluate_bags(model, test_bags, feature_dim, labels)}
    empty_probs, _ = roi_loop.predict_bags(
        model,
        [roi_loop.Bag(np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64))],
        feature_dim,
    )
    metrics["empty_roi_probs"] = [round(float(p), 4) for p in empty_probs[0]]
    logger.info("roi_classifier held-out accuracy %.4f", metrics["synthetic_held_out"]["accuracy"])

    wrapper = RoiClassifierExport(model).eval()
    onnx_path = export_onnx(
        wrapper,
        (torch.zeros(2, 5, feature_dim), torch.ones(2, 5)),
        work_dir / "roi_classifier.onnx",
        ["cell_features", "cell_mask"],
        ["roi_probs", "attention"],
        {
            "cell_features": {0: "batch", 1: "cells"},
            "cell_mask": {0: "batch", 1: "cells"},
            "roi_probs": {0: "batch"},
            "attention": {0: "batch", 1: "cells"},
        },
    )
    x, m, _ = roi_loop.pad_bags(test_bags[:16], feature_dim)
    diffs = [
        max_abs_diff_vs_torch(
            wrapper, onnx_path, {"cell_features": x.numpy(), "cell_mask": m.numpy()}
        ),
        max_abs_diff_vs_torch(
            wrapper,
            onnx_path,
            {
                "cell_features": np.zeros((3, 0, feature_dim), np.float32),
                "cell_mask": np.zeros((3, 0), np.float32),
            },
        ),
    ]
    diff = max(diffs)
    if diff > ONNX_TOLERANCE:
        raise ValueError(
            f"roi_classifier ONNX differs from PyTorch by {diff:.2e} > {ONNX_TOLERANCE}"
        )

    def make(b: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(b)
        mask = (r.random((b, 11)) < 0.7).astype(np.float32)
        return {
            "cell_features": r.normal(size=(b, 11, feature_dim)).astype(np.float32),
            "cell_mask": mask,
        }

    checks = {
        "onnx_vs_torch_max_abs_diff": diff,
        "dynamic_batch_output_shapes": check_dynamic_batch(onnx_path, make),
    }
    bag_counts = Counter(labels[b.label] for b in train_bags)
    test_counts = Counter(labels[b.label] for b in test_bags)
    card = {
        **common,
        "task": "ROI class NILM / LSIL / HSIL from the cell classifier's features of its cells",
        "architecture": {
            "name": "gated_attention_mil",
            "family": "AttentionMil (train/models/mil.py)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "paper": "stand-in for Shi et al., global-local attention ROI net (shared/papers/002)",
        },
        "training_data": {
            "synthetic": {
                **_field_summary(mil_fields),
                "bags": len(train_bags),
                "bags_per_class": {c: bag_counts.get(c, 0) for c in labels},
                "roi_px": DETECTOR_PX,
                "centre_jitter_std_px": jitter,
                "label": "worst cell class present (NILM < LSIL < HSIL); no cell -> NILM",
                "features": "cell_classifier@1 features of truth nucleus-centred crops",
            }
        },
        "held_out_data": {
            "synthetic": {
                "fields": len(test_fields),
                "bags": len(test_bags),
                "bags_per_class": {c: test_counts.get(c, 0) for c in labels},
            }
        },
        "settings": asdict(plan.roi),
        "epochs_log": log,
        "metrics": metrics,
        "checks": checks,
    }
    config = roi_config(list(labels), feature_dim)
    pt2 = export_pt2(
        wrapper,
        {"cell_features": x, "cell_mask": m},
        work_dir / "roi_classifier.pt2",
        ["roi_probs", "attention"],
        max_batch_size=config["max_batch_size"],
        dynamic_axes={"cell_features": {1: "cells"}, "cell_mask": {1: "cells"}},
    )
    pt2_checks = _pt2_checks(
        "roi_classifier",
        pt2,
        onnx_path,
        [
            {"cell_features": x.numpy(), "cell_mask": m.numpy()},
            {
                "cell_features": np.zeros((3, 0, feature_dim), np.float32),
                "cell_mask": np.zeros((3, 0), np.float32),
            },
        ],
        ["roi_probs", "attention"],
    )
    version_dir = write_model_version(
        out, config, onnx_path, card, pt2_path=pt2.path, pt2_checks=pt2_checks
    )
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}
