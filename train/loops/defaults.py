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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.model import Model
from engines.preprocess import normalise
from engines.repository import ModelRepository
from train.data.detector_rois import EXHAUSTIVE_SETS, POINT_BOX_UM, real_detector_rois
from train.data.field_bags import classify_crops, field_bag
from train.data.heldout import split_record
from train.data.paths import default_data_root
from train.data.real_fields import REAL_SCALES, REAL_SETS, field_parts, load_real_set
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
from train.export.onnx_export import (
    check_dynamic_batch,
    export_onnx,
    max_abs_diff_vs_torch,
    onnx_session,
)
from train.export.pt2_export import Pt2Export, export_pt2, max_abs_diff_onnx_vs_pt2
from train.export.repository import write_model_version
from train.loops import detector as det_loop
from train.loops import roi as roi_loop
from train.loops.metrics import abnormal_report
from train.loops.real_cells import (
    RealCellSettings,
    cell_metrics,
    real_cell_sets,
    train_real_classifier,
)
from train.loops.ultralytics_env import import_ultralytics
from train.models import create_model
from train.models.cell_cnn import CellClassifierExport
from train.models.mil import RoiClassifierExport
from train.pretrained import describe_start, nucleus_yolo_checkpoint
from train.synth import CELL_CLASSES

logger = logging.getLogger(__name__)

MPP = 0.5
DETECTOR_PX = 512
CROP_PX = 96
CONF_THRESHOLD = 0.25  # the contract's default; the shipped one is calibrated (see below)
CONF_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
MIN_DETECTOR_PRECISION = 0.8
NMS_IOU_THRESHOLD = 0.5
HERLEV_TEST_FRACTION = 0.2
ONNX_TOLERANCE = 1e-4
#: Largest max |ONNX Runtime - exported PyTorch program| shipped, relative to the largest
#: output value (the detector's raw head holds box coordinates in pixels, up to 512, where
#: 4.7e-3 px is float rounding in a YOLO11n; the classifiers' outputs are at most ~1-10).
ONNX_VS_PT2_TOLERANCE = 1e-5


@dataclass(frozen=True)
class DefaultsPlan:
    """Sizes of one default run (the full run, or `quick()` for a smoke run).

    Attributes:
        train_fields: Synthetic training fields (detector ROIs and classifier cells).
        test_fields: Held-out synthetic fields (every metric "on held-out synthetic").
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
        detector_synth_fields: Synthetic training fields whose ROIs join the real ones.
        detector_pretrained: Fine-tune the YOLO11n nucleus checkpoint (napari-nuclephaser)
            instead of training the pico YAML from scratch.
        bags_per_field: ROI-classifier bags (random 512 px windows) per field.
        detector: Detector training settings.
        classifier: Cell classifier settings.
        roi: ROI classifier settings.
    """

    train_fields: int = 50
    test_fields: int = 12
    mil_fields: int = 30
    field_px: int = 2048
    train_cells: tuple[int, int] = (50, 170)
    train_debris_per_cell: tuple[float, float] = (1.5, 2.5)
    rois_per_field: int = 6
    binucleate_rois_per_field: int = 2
    classifier_fields: int = 30
    detector_synth_fields: int = 12
    detector_pretrained: bool = True
    bags_per_field: int = 40
    lbc_repeats: int = 3
    detector: det_loop.DetectorSettings = field(
        default_factory=lambda: det_loop.DetectorSettings(
            epochs=12, batch=16, close_mosaic=3, lr0=0.002, warmup_epochs=0.5
        )
    )
    synthetic_jitter_px: float = 2.5
    classifier: RealCellSettings = field(default_factory=RealCellSettings)
    roi: roi_loop.RoiSettings = field(
        default_factory=lambda: roi_loop.RoiSettings(epochs=30, balanced=True)
    )

    @classmethod
    def quick(cls) -> DefaultsPlan:
        """A minutes-scale smoke run: same steps, tiny data and epochs (metrics meaningless)."""
        return cls(
            train_fields=4,
            test_fields=2,
            mil_fields=2,
            field_px=1024,
            rois_per_field=3,
            binucleate_rois_per_field=1,
            bags_per_field=10,
            detector_synth_fields=2,
            detector=det_loop.DetectorSettings(epochs=1, batch=8, close_mosaic=0),
            classifier=RealCellSettings(epochs=1, samples_per_epoch=256),
            roi=roi_loop.RoiSettings(epochs=3),
        )


def set_determinism(seed: int, num_threads: int) -> None:
    """Seed python, numpy and torch; fix torch's CPU thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)


STAGES = ("detector", "classifier", "roi")


def train_defaults(
    out: Path,
    seed: int = 0,
    quick: bool = False,
    work_dir: Path | None = None,
    data_root: Path | None = None,
    command: str = "",
    num_threads: int = 2,
    stages: tuple[str, ...] = STAGES,
    from_scratch: bool = False,
    detector_weights: Path | None = None,
) -> dict[str, Any]:
    """Train, evaluate and export the default models into the repository `out`.

    Args:
        out: Model repository folder (created; the folders of the stages run are replaced).
        seed: Seed of every random choice (data, initialisation, order).
        quick: Smoke run (tiny data and epochs).
        work_dir: Folder for working files (default `runs/train_defaults[_quick]_seed<seed>`);
            each stage works in its own subfolder.
        data_root: Shared real-data folder (default `../shared/data`).
        command: The command line, recorded on each card.
        num_threads: Torch CPU threads.
        stages: Which models to (re)train, from `STAGES`. The ROI stage reads the cell
            detector and classifier already in `out`, as a scan would, so stages can run
            one at a time in order.
        from_scratch: Random initial weights for the detector and the cell encoder (the
            comparison against the pretrained starts, or a lab that wants no AGPL weights).
        detector_weights: Trained ultralytics weights to export and evaluate instead of
            training the detector (a run interrupted after training, or trained on a GPU).

    Returns:
        A summary: per model, its metrics and the version folder; timings in seconds.
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    t_start = time.perf_counter()
    plan = DefaultsPlan.quick() if quick else DefaultsPlan()
    if from_scratch:
        plan = replace(
            plan,
            detector_pretrained=False,
            # the architecture of the nucleus checkpoint, so only the start differs
            detector=replace(
                plan.detector, model_yaml="yolo11n.yaml", scale="n", lr0=0.004, warmup_epochs=1.0
            ),
            classifier=replace(plan.classifier, pretrained=False),
        )
    work_dir = work_dir or Path("runs") / f"train_defaults{'_quick' if quick else ''}_seed{seed}"
    # absolute: ultralytics puts a relative `project` under its own runs folder
    work_dir = work_dir.resolve()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = data_root or default_data_root()
    common = {"seed": seed, "command": command, "quick": quick, "plan": _plan_card(plan)}
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"repository": str(out), "seed": seed, "quick": quick}

    def stage_dir(name: str) -> Path:
        path = work_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        set_determinism(seed, num_threads)
        return path

    test_fields: list[SynthField] = []
    if "detector" in stages or "classifier" in stages:
        t0 = time.perf_counter()
        set_determinism(seed, num_threads)
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
        timings["render_fields_s"] = round(time.perf_counter() - t0, 1)
    if "detector" in stages:
        t0 = time.perf_counter()
        summary["cell_detector"] = _detector(
            out,
            stage_dir("detector"),
            plan,
            seed,
            train_fields,
            test_fields,
            data_root,
            common,
            detector_weights,
        )
        timings["cell_detector_s"] = round(time.perf_counter() - t0, 1)
    if "classifier" in stages:
        t0 = time.perf_counter()
        summary["cell_classifier"] = _classifier(
            out,
            stage_dir("classifier"),
            plan,
            seed,
            train_fields[: plan.classifier_fields],
            test_fields,
            data_root,
            common,
        )
        timings["cell_classifier_s"] = round(time.perf_counter() - t0, 1)
    if "roi" in stages:
        t0 = time.perf_counter()
        summary["roi_classifier"] = _roi(out, stage_dir("roi"), plan, seed, data_root, common)
        timings["roi_classifier_s"] = round(time.perf_counter() - t0, 1)

    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    summary["timings"] = timings
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / f"summary_{'_'.join(stages)}.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("default models %s written to %s in %.0f s", stages, out, timings["total_s"])
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
        ValueError: ONNX Runtime and the program differ by more than ONNX_VS_PT2_TOLERANCE
            of the largest output value (at least 1).
    """
    diff = max(max_abs_diff_onnx_vs_pt2(onnx_path, pt2.path, feed, output_names) for feed in feeds)
    scale = max(
        1.0,
        *(
            float(np.abs(out).max(initial=0.0))
            for feed in feeds
            for out in onnx_session(onnx_path).run(output_names, feed)
        ),
    )
    if diff > ONNX_VS_PT2_TOLERANCE * scale:
        raise ValueError(
            f"{name}: ONNX Runtime and the exported PyTorch program differ by {diff:.2e} "
            f"> {ONNX_VS_PT2_TOLERANCE} x {scale:.3g}"
        )
    logger.info("%s: max |ONNX Runtime - exported PyTorch program| %.1e", name, diff)
    return {
        "onnx_vs_pytorch_max_abs_diff": diff,
        "onnx_vs_pytorch_largest_output": scale,
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
    data_root: Path,
    common: dict[str, Any],
    weights: Path | None = None,
) -> dict[str, Any]:
    rng = np.random.default_rng((seed, 0xDE7))
    synth_train = []
    for f in train_fields[: plan.detector_synth_fields]:
        focus = binucleate_cells(f)[: plan.binucleate_rois_per_field]
        synth_train += detector_rois(f, plan.rois_per_field, DETECTOR_PX, rng, focus)[0]
    synth_test, synth_test_ignores = [], []
    for f in test_fields:
        rois, ignores = detector_rois(f, plan.rois_per_field, DETECTOR_PX, rng)
        synth_test += rois
        synth_test_ignores += ignores
    real_train, train_counts = real_detector_rois(data_root, "train", MPP, DETECTOR_PX, seed)
    real_val, val_counts = real_detector_rois(
        data_root, "val", MPP, DETECTOR_PX, seed, stain_copies=False
    )
    real_test = {
        name: real_detector_rois(
            data_root, "test", MPP, DETECTOR_PX, seed, stain_copies=False, sets=(name,)
        )
        for name in EXHAUSTIVE_SETS
    }
    if not real_val:
        raise FileNotFoundError(f"no real nucleus data under {data_root}: the detector needs it")

    ds = work_dir / "detector_dataset"
    write_yolo_split(ds, "train", synth_train + real_train)
    write_yolo_split(ds, "val", real_val)
    data_yaml = write_dataset_yaml(ds, ["nucleus"], {"train": "images/train", "val": "images/val"})
    settings = plan.detector
    start = None
    if plan.detector_pretrained:
        checkpoint = nucleus_yolo_checkpoint("n")
        start = describe_start("nuclephaser_yolo11n")
        settings = replace(settings, start_weights=str(checkpoint))
    if weights is None:
        weights = det_loop.train_detector(work_dir, data_yaml, settings, seed)
    else:
        import_ultralytics(work_dir / "ultralytics_config")
        logger.info("cell_detector: exporting the given weights %s (not trained here)", weights)
    onnx_path, export_module = det_loop.export_detector(weights, settings)

    # Screening wants recall: the shipped threshold is the one with the best recall at
    # precision >= MIN_DETECTOR_PRECISION on the real validation ROIs.
    sweep = det_loop.sweep_conf_thresholds(onnx_path, real_val, None, CONF_GRID, NMS_IOU_THRESHOLD)
    conf = det_loop.choose_conf_for_recall(sweep, MIN_DETECTOR_PRECISION)
    logger.info("cell_detector confidence threshold %.2f (real validation ROIs)", conf)
    metrics: dict[str, Any] = {"conf_threshold_shipped": conf, "validation_sweep": sweep}
    for name, (rois, _) in real_test.items():
        if rois:
            metrics[f"{name}_held_out"] = det_loop.evaluate_detector_onnx(
                onnx_path, rois, None, conf, NMS_IOU_THRESHOLD
            )
    metrics["synthetic_held_out"] = det_loop.evaluate_detector_onnx(
        onnx_path, synth_test, synth_test_ignores, conf, NMS_IOU_THRESHOLD
    )
    logger.info(
        "cell_detector held-out: %s",
        {k: v.get("recall") for k, v in metrics.items() if isinstance(v, dict)},
    )

    checks = {
        "dynamic_batch_output_shapes": check_dynamic_batch(
            onnx_path,
            lambda b: {
                "images": np.random.default_rng(b).random(
                    (b, 3, DETECTOR_PX, DETECTOR_PX), dtype=np.float32
                )
            },
        ),
        "onnx_vs_torch_max_abs_diff": det_loop.onnx_vs_torch_diff(weights, onnx_path, real_val[:4]),
    }
    card = {
        **common,
        "task": "nucleus detection, one class 'nucleus' (nucleus boxes); ultralytics raw head",
        "architecture": {
            "family": "ultralytics YOLO11",
            "scale": "n (from the nucleus checkpoint)" if start else settings.scale,
            "yaml": None if start else Path(settings.model_yaml).name,
            "pretrained": start,
        },
        "scale_assumptions": REAL_SCALES,
        "training_data": {
            "real": {
                **train_counts,
                "stain_copies": "each colour ROI also grey, each grey ROI also Pap-tinted",
                "point_box_um": POINT_BOX_UM,
                "not_used": "CRIC (only squamous cells labelled) and SIPaKMeD (cell boxes): "
                "they would teach that unlabelled nuclei are background",
            },
            "synthetic": {
                **_field_summary(train_fields[: plan.detector_synth_fields]),
                "rois": len(synth_train),
            },
        },
        "held_out_data": {
            "splits": _real_splits(data_root, EXHAUSTIVE_SETS),
            "validation": val_counts,
            "test": {name: counts for name, (_, counts) in real_test.items()},
            "synthetic": {**_field_summary(test_fields), "rois": len(synth_test)},
        },
        "settings": det_loop.settings_dict(settings),
        "metrics": metrics,
        "checks": checks,
    }
    config = detector_config(DETECTOR_PX, MPP, ["nucleus"], conf, NMS_IOU_THRESHOLD)
    images = _detector_images(real_val[:4])
    pt2 = det_loop.export_detector_pt2(
        export_module, images, work_dir / "cell_detector.pt2", config["max_batch_size"]
    )
    pt2_checks = _pt2_checks("cell_detector", pt2, onnx_path, [{"images": images}], ["output0"])
    version_dir = write_model_version(
        out, config, onnx_path, card, pt2_path=pt2.path, pt2_checks=pt2_checks
    )
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}


def _real_splits(data_root: Path, sets: tuple[str, ...]) -> dict[str, Any]:
    """The card's record of each real set's fixed split (train/data/heldout.py)."""
    out = {}
    for name in sets:
        try:
            fields = REAL_SETS[name](data_root)
        except FileNotFoundError:
            continue
        out[name] = split_record(name, field_parts(fields))
    return out


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
) -> dict[str, Any]:
    settings = plan.classifier
    labels = tuple(CELL_CLASSES)
    parts, data_record = real_cell_sets(data_root, labels, MPP, CROP_PX)
    train_x, train_y = parts["train"].arrays(CROP_PX)
    val_x, val_y = parts["val"].arrays(CROP_PX)
    if not len(train_x) or not len(val_x):
        raise FileNotFoundError(
            f"no real labelled cells under {data_root}: the classifier needs them"
        )
    rng = np.random.default_rng((seed, 0xC1A55))
    synth_x, synth_y = _crops_of(train_fields, plan.synthetic_jitter_px, 1, rng)
    model = create_model(
        settings.model_name, num_classes=len(labels), pretrained=settings.pretrained
    )
    mean, std = model.input_mean, model.input_std
    log, best_epoch = train_real_classifier(
        model, train_x, train_y, synth_x, synth_y, val_x, val_y, labels, settings, seed, mean, std
    )
    metrics: dict[str, Any] = {}
    for tag in ("cric", "herlev", "sipakmed"):
        x, y = parts["test"].by_source(tag, CROP_PX)
        if len(x):
            metrics[f"{tag}_held_out"] = cell_metrics(model, x, y, labels, mean, std)
    metrics["validation"] = cell_metrics(model, val_x, val_y, labels, mean, std)
    test_x, test_y = _crops_of(test_fields, 0.0, 1, rng)
    metrics["synthetic_held_out"] = cell_metrics(model, test_x, test_y, labels, mean, std)
    logger.info(
        "cell_classifier held-out: %s",
        {k: (v["accuracy"], v["abnormal"]["roc_auc"]) for k, v in metrics.items()},
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
    sample = normalise(val_x[:64], mean, std)
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
    start = (
        describe_start(settings.model_name.removesuffix("_cell")) if settings.pretrained else None
    )
    card = {
        **common,
        "task": "cell grade NILM / LSIL / HSIL from a 96x96 crop at 0.5 mpp centred on the "
        "nucleus (a 48 µm field, cut as the scanner cuts it)",
        "architecture": {
            "name": settings.model_name,
            "family": "EfficientNet-Lite (timm tf_efficientnet_lite*) + 128-d projection "
            "(train/models/efficientnet_cell.py)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "embed_dim": model.embed_dim,
            "pretrained": start,
            "input_normalisation": "mean = std = 127.5 (the ImageNet start's own)",
        },
        "training_data": {
            "real": data_record,
            "label_map": "CRIC Bethesda -> grade: ASC-US, LSIL -> LSIL; ASC-H, HSIL, SCC -> "
            "HSIL; Herlev normal -> NILM, light -> LSIL, moderate/severe/in situ -> HSIL; "
            "SIPaKMeD metaplastic -> NILM",
            "herlev_scale": "resampled from 0.201 µm/px (the set's stated scale; its copy "
            "was resized to 200-224 px, so sizes are approximate) onto a white 48 µm field",
            "scale_assumptions": REAL_SCALES,
            "synthetic": {
                **_field_summary(train_fields),
                "share_of_each_epoch": settings.synthetic_fraction,
            },
        },
        "held_out_data": {
            "rule": "fixed group splits (train/data/heldout.py); best epoch chosen on val",
            "synthetic": {**_field_summary(test_fields), "crops": len(test_x)},
        },
        "settings": asdict(settings),
        "best_epoch": best_epoch,
        "epochs_log": log,
        "metrics": metrics,
        "checks": checks,
    }
    config = classifier_config(
        CROP_PX, MPP, list(labels), model.embed_dim, mean=tuple(mean), std=tuple(std)
    )
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
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}


# --- ROI classifier ----------------------------------------------------------------------


def _lbc_bags(
    data_root: Path, labels: tuple[str, ...], detector: Model, classifier: Model
) -> tuple[dict[str, list[roi_loop.Bag]], dict[str, Any]]:
    """The Mendeley LBC fields as bags of the repository's cell features, by part.

    Each field is one ROI with one diagnosis (NL -> NILM, LSIL, HSIL and SCC -> HSIL on
    papscan's grades); every cell of a bag carries the field's grade, so a bag keeps it
    when cells are dropped in training, and only an emptied bag becomes NILM.
    """
    fields = load_real_set(data_root, "lbc")
    assignment = field_parts(fields)
    parts: dict[str, list[roi_loop.Bag]] = {"train": [], "val": [], "test": []}
    cells = []
    for f in fields:
        bag = field_bag(f, detector, classifier)
        grade = labels.index(f.grade)
        parts[assignment[f.group]].append(
            roi_loop.Bag(bag.features, np.full(len(bag.features), grade, np.int64))
        )
        cells.append(len(bag.features))
    record = {
        "split": split_record("lbc", assignment),
        "bags": {p: Counter(labels[b.label] for b in bags) for p, bags in parts.items()},
        "cells_per_field": {
            "mean": round(float(np.mean(cells)), 1),
            "min": int(min(cells)),
            "max": int(max(cells)),
            "none": int(sum(c == 0 for c in cells)),
        },
        "scale": REAL_SCALES["lbc"],
    }
    return parts, record


def _synthetic_bags(
    fields: list[SynthField], classifier: Model, per_field: int, rng: np.random.Generator
) -> list[roi_loop.Bag]:
    """Random 512 px windows of synthetic fields as bags (truth nuclei, served features)."""
    bags = []
    for f in fields:
        crops, cell_labels = cell_crops(f, CROP_PX, 0.0, 1, rng)
        feats, _ = classify_crops(classifier, crops)
        for x0, y0 in random_windows(f, per_field, DETECTOR_PX, rng):
            idx = cells_in_window(f.cells, x0, y0, DETECTOR_PX)
            bags.append(roi_loop.Bag(feats[idx].astype(np.float32), cell_labels[idx]))
    return bags


def _roi(
    out: Path,
    work_dir: Path,
    plan: DefaultsPlan,
    seed: int,
    data_root: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    labels = tuple(CELL_CLASSES)
    rng = np.random.default_rng((seed, 0x301))
    repository = ModelRepository(out)
    detector = repository.load("cell_detector")
    classifier = repository.load("cell_classifier")
    try:
        lbc, lbc_record = _lbc_bags(data_root, labels, detector, classifier)
        mil_fields = _render_fields(field_specs(plan.mil_fields, seed + 1, False, plan.field_px))
        synth = _synthetic_bags(mil_fields, classifier, plan.bags_per_field, rng)
    finally:
        detector.close()
    classifier.close()
    feature_dim = int(lbc["train"][0].features.shape[1]) if lbc["train"] else 0
    train_bags = lbc["train"] * plan.lbc_repeats + synth
    model = create_model("gated_attention_mil", in_dim=feature_dim, num_classes=len(labels))
    log = roi_loop.train_roi_classifier(model, train_bags, lbc["val"], plan.roi, seed, labels)
    metrics: dict[str, Any] = {}
    for part in ("test", "val"):
        name = "lbc_held_out" if part == "test" else "lbc_validation"
        bags = lbc[part]
        report = roi_loop.evaluate_bags(model, bags, feature_dim, labels)
        probs, _ = roi_loop.predict_bags(model, bags, feature_dim)
        report["abnormal"] = abnormal_report(
            np.array([b.label > 0 for b in bags]), 1.0 - probs[:, 0]
        )
        metrics[name] = report
    empty_probs, _ = roi_loop.predict_bags(
        model,
        [roi_loop.Bag(np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64))],
        feature_dim,
    )
    metrics["empty_roi_probs"] = [round(float(p), 4) for p in empty_probs[0]]
    logger.info("roi_classifier LBC held-out: %s", metrics["lbc_held_out"]["accuracy"])

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
    # torch.export specialises a cells axis of 0 or 1: the example bags hold two or more
    # (a smoke run's untrained detector may find none in the test fields)
    examples = [b for b in lbc["test"] + synth if len(b.features) >= 2][:16]
    x, m, _ = roi_loop.pad_bags(examples or synth[:16], feature_dim)
    if x.shape[1] < 2:
        x = torch.nn.functional.pad(x, (0, 0, 0, 2 - x.shape[1]))
        m = torch.nn.functional.pad(m, (0, 2 - m.shape[1]))
    empty_feed = {
        "cell_features": np.zeros((3, 0, feature_dim), np.float32),
        "cell_mask": np.zeros((3, 0), np.float32),
    }
    diff = max(
        max_abs_diff_vs_torch(
            wrapper, onnx_path, {"cell_features": x.numpy(), "cell_mask": m.numpy()}
        ),
        max_abs_diff_vs_torch(wrapper, onnx_path, empty_feed),
    )
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
    card = {
        **common,
        "task": "ROI grade NILM / LSIL / HSIL from the cell classifier's features of its cells",
        "architecture": {
            "name": "gated_attention_mil",
            "family": "AttentionMil (train/models/mil.py)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "paper": "attention MIL over the pretrained encoder's features; paper 002's "
            "global-local network is selectable through `papscan train rois`",
            "cell_classifier": _version_record(out, "cell_classifier"),
            "cell_detector": _version_record(out, "cell_detector"),
        },
        "training_data": {
            "lbc": {**lbc_record, "repeats": plan.lbc_repeats},
            "synthetic": {
                **_field_summary(mil_fields),
                "bags": len(synth),
                "label": "worst cell class present; no cell -> NILM",
            },
        },
        "held_out_data": {"lbc": lbc_record["split"]},
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
        [{"cell_features": x.numpy(), "cell_mask": m.numpy()}, empty_feed],
        ["roi_probs", "attention"],
    )
    version_dir = write_model_version(
        out, config, onnx_path, card, pt2_path=pt2.path, pt2_checks=pt2_checks
    )
    return {"metrics": metrics, "checks": checks, "version_dir": str(version_dir)}


def _version_record(repository: Path, name: str) -> dict[str, Any]:
    """Which version of a model a card was built on, with its ONNX file's sha256."""
    import hashlib

    version = ModelRepository(repository).versions(name)[-1]
    onnx = repository / name / str(version) / "model.onnx"
    return {"version": version, "onnx_sha256": hashlib.sha256(onnx.read_bytes()).hexdigest()}
