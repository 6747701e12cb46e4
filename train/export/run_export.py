"""A trained run folder -> one model version in a model repository ("engines out").

`export_run` rebuilds the run's network from `model.pt`, exports it to ONNX with a dynamic
batch and checks ONNX Runtime against PyTorch, writes the FP16 twin `model.fp16.onnx`
(FP16 weights and arithmetic, FP32 inputs and outputs) and compares the two on the run's
held-out test images, then writes `config.yaml`, both ONNX files and `card.json` through
`write_model_version`, and, where asked and where TensorRT is installed, builds a TensorRT
plan (FP16, or INT8 calibrated on the run's training images; `tensorrt_build`).

The FP16 comparison is the check of paper 004's compression claim (CVM-Cervix: 32-bit
weights to 16-bit, 120 MB -> 60 MB, accuracy "almost unchanged (around -1 %)") on our
models: sizes in bytes, test accuracy of each file and how often they agree. It re-opens
the run's data set (`train.data.catalog.open_image_set(run.json's dataset, input_px)`),
checks it is the data the run trained on (`data_sha256`), and takes the exported fold's
test indices from `splits.json`; where that cannot be done, the card records the sizes
and says why. A ``rois`` run's test ROIs are its bags of detected cells, re-opened through
`train.loops.rois.open_cell_bags` (from the bag cache; without it the detector runs again).

Run folder layout: see `train.runs`. Task ``cells`` exports a cell classifier
(`crops` -> `probs`, `features`, as the shipped `cell_classifier`); task ``rois`` exports
the global-local ROI network through `train.models.global_local.GlobalLocalExport`
(`cells`, `mask` -> `roi_probs`, `cell_probs`, `attention`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from engines.backends.onnxruntime import FP16_ARTIFACT_NAME
from engines.config import CONFIG_FILENAME
from engines.preprocess import normalise
from train.data.types import ImageSet
from train.export.configs import classifier_config, global_local_config
from train.export.onnx_export import (
    check_dynamic_batch,
    export_onnx,
    max_abs_diff_vs_torch,
    onnx_session,
    write_fp16_onnx,
)
from train.export.repository import write_model_version
from train.export.tensorrt_build import (
    DEFAULT_CALIBRATION_IMAGES,
    PlanBuild,
    build_plan,
    require_tensorrt,
)
from train.models import create_model

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
WEIGHTS_FILE = "model.pt"
SPLITS_JSON = "splits.json"
#: Largest max |ONNX Runtime - PyTorch| an export may show.
ONNX_TOLERANCE = 1e-4
#: The model name a task's export gets unless one is given.
DEFAULT_NAMES = {"cells": "cell_classifier", "rois": "roi_classifier"}
#: Crop resolution written where a run does not record one: the pipeline cuts cell crops
#: at the shipped classifier's 0.5 µm/px, and ROI runs' bags are cut at the detector's
#: 0.5 µm/px (the card says it was not recorded).
DEFAULT_CELL_MPP = 0.5
TENSORRT_PRECISIONS = {"fp16": "FP16", "int8": "INT8"}
_CHECK_ITEMS = 64
_CHECK_BAGS = 8
_EVAL_BATCH = 64


class ClassifierExport(nn.Module):
    """Export wrapper of a cell classifier: `crops` -> (`probs` softmax [B, C], `features`
    [B, F]).

    The backbone runs once: `forward_features`, then `forward_head` for the logits and
    `forward_head(..., pre_logits=True)` for the features (timm's contract, which the seed
    `SeCellNet` follows too); `export_run` checks the logits equal `forward`'s.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.model.forward_features(crops)
        features = self.model.forward_head(trunk, pre_logits=True)
        logits = self.model.forward_head(trunk)
        return torch.softmax(logits, dim=1), features


@dataclass(frozen=True)
class Fp16Comparison:
    """`model.onnx` (FP32) against `model.fp16.onnx`: sizes, and accuracy where data allows.

    Attributes:
        fp32_bytes: Size of `model.onnx`.
        fp16_bytes: Size of `model.fp16.onnx`.
        items: Test items both ran on (0 where the data check did not run).
        split: Which items, e.g. ``test split of fold 0 (140 items)``.
        fp32_accuracy: Accuracy of the FP32 file on them, or None.
        fp16_accuracy: Accuracy of the FP16 file on them, or None.
        agreement: Fraction of items both files give the same class.
        max_abs_diff: Output name -> max |FP16 - FP32| over the items (or over the
            export's check inputs where the data check did not run).
        note: Why there is no accuracy, or None.
    """

    fp32_bytes: int
    fp16_bytes: int
    items: int
    split: str | None
    fp32_accuracy: float | None
    fp16_accuracy: float | None
    agreement: float | None
    max_abs_diff: dict[str, float]
    note: str | None = None

    @property
    def size_ratio(self) -> float:
        """FP16 bytes / FP32 bytes (paper 004: 60 MB / 120 MB = 0.5)."""
        return self.fp16_bytes / self.fp32_bytes

    @property
    def accuracy_delta(self) -> float | None:
        """FP16 accuracy - FP32 accuracy (paper 004: about -0.01)."""
        if self.fp32_accuracy is None or self.fp16_accuracy is None:
            return None
        return self.fp16_accuracy - self.fp32_accuracy

    def as_card(self) -> dict[str, Any]:
        """The card's `fp16` entry."""
        return {
            "file": FP16_ARTIFACT_NAME,
            "conversion": "onnxruntime.transformers.float16 (keep_io_types: FP32 inputs/outputs)",
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "size_ratio": round(self.size_ratio, 4),
            "items": self.items,
            "split": self.split,
            "fp32_accuracy": self.fp32_accuracy,
            "fp16_accuracy": self.fp16_accuracy,
            "accuracy_delta": self.accuracy_delta,
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs_diff,
            "note": self.note,
            "paper_004_claim": "120 MB -> 60 MB (ratio 0.5) at about -1 % accuracy",
        }


@dataclass(frozen=True)
class ExportReport:
    """What `export_run` wrote and measured.

    Attributes:
        name: The model's name in the repository.
        version: The version written.
        version_dir: ``<repository>/<name>/<version>``.
        task: ``cells`` or ``rois``.
        arch: The registered model name.
        parameters: Its parameter count.
        precision: The config's precision (``FP32``, ``FP16`` or ``INT8``).
        onnx_bytes: Size of `model.onnx`.
        onnx_vs_torch_max_abs_diff: max |ONNX Runtime - PyTorch| over every output.
        check_items: Items that check ran on.
        check_source: What they were (test images, or seeded random inputs).
        fp16: The FP32 / FP16 comparison, or None when no FP16 file was written.
        tensorrt: The TensorRT plan built, or None.
    """

    name: str
    version: int
    version_dir: Path
    task: str
    arch: str
    parameters: int
    precision: str
    onnx_bytes: int
    onnx_vs_torch_max_abs_diff: float
    check_items: int
    check_source: str
    fp16: Fp16Comparison | None
    tensorrt: PlanBuild | None

    def summary_lines(self) -> list[str]:
        """A few lines for a terminal: what was written, sizes, diffs, accuracies."""
        lines = [
            f"{self.name}@{self.version} -> {self.version_dir} "
            f"({self.arch}, {self.parameters:,} parameters, precision {self.precision})",
            f"model.onnx: {self.onnx_bytes:,} bytes; max |ONNX Runtime - PyTorch| "
            f"{self.onnx_vs_torch_max_abs_diff:.1e} on {self.check_items} {self.check_source}",
        ]
        fp16 = self.fp16
        if fp16 is not None:
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in fp16.max_abs_diff.items())
            lines.append(
                f"{FP16_ARTIFACT_NAME}: {fp16.fp16_bytes:,} bytes "
                f"({100 * fp16.size_ratio:.1f} % of FP32); max |FP16 - FP32| {diffs}"
            )
            if fp16.accuracy_delta is not None:
                lines.append(
                    f"accuracy FP32 {fp16.fp32_accuracy:.4f}, FP16 {fp16.fp16_accuracy:.4f} "
                    f"({100 * fp16.accuracy_delta:+.2f} points), same class on "
                    f"{100 * (fp16.agreement or 0):.2f} % of the {fp16.split}"
                )
            else:
                lines.append(f"no FP16 accuracy check: {fp16.note}")
        if self.tensorrt is not None:
            build = self.tensorrt
            line = f"TensorRT {build.precision} plan {build.plan.name} ({build.seconds:.0f} s)"
            if build.calibration_cache is not None:
                line += (
                    f", calibrated on {build.calibration_items} training images "
                    f"({build.calibration_batches} batches) into {build.calibration_cache.name}"
                )
            if build.max_abs_diff_vs_onnxruntime:
                diffs = ", ".join(
                    f"{k} {v:.1e}" for k, v in build.max_abs_diff_vs_onnxruntime.items()
                )
                line += f"; max |TensorRT - ONNX Runtime FP32| {diffs}"
            lines.append(line)
        return lines


@dataclass(frozen=True)
class _Exported:
    """One exported ONNX file with the pieces the config and checks need."""

    onnx_path: Path
    wrapper: nn.Module
    config: dict[str, Any]
    output_names: list[str]
    check_inputs: dict[str, np.ndarray]
    check_source: str
    architecture: dict[str, Any]


def export_run(
    run_dir: Path,
    repository: Path,
    name: str | None = None,
    version: int | None = None,
    fp16: bool = True,
    tensorrt: str | None = None,
    *,
    device: str = "cuda",
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    cache_dir: Path = Path("runs/cache"),
) -> ExportReport:
    """Writes a trained run as a new version of a model in `repository`.

    Args:
        run_dir: The run folder (`run.json`, `model.pt`, `metrics.json`, `splits.json`).
        repository: The model repository (created if missing).
        name: The model's name; default ``cell_classifier`` (task cells) or
            ``roi_classifier`` (task rois).
        version: The version number; default the next free one. An existing version
            folder of that number is replaced.
        fp16: Write `model.fp16.onnx` and compare it with `model.onnx`; the config's
            precision is then FP16 (else FP32), unless `tensorrt` asks for INT8.
        tensorrt: ``fp16`` or ``int8`` to build a TensorRT plan for this machine's GPU
            (INT8 calibrated on `calibration_images` of the run's training images), or None.
        device: The GPU TensorRT builds on.
        calibration_images: Training images the INT8 calibration reads at most.
        cache_dir: The cache of detected cell bags (task rois).

    Returns:
        What was written and measured.

    Raises:
        ValueError: A bad argument, a run folder that is incomplete or unfinished, an
            export that differs from PyTorch by more than `ONNX_TOLERANCE`, or a model
            name whose existing versions have another interface.
        BackendUnavailableError: `tensorrt` is asked for and TensorRT is not installed
            (checked before anything is written).
    """
    run_dir, repository = Path(run_dir), Path(repository)
    if tensorrt is not None and tensorrt not in TENSORRT_PRECISIONS:
        raise ValueError(f"tensorrt must be one of {', '.join(TENSORRT_PRECISIONS)} or None")
    if version is not None and (isinstance(version, bool) or version < 1):
        raise ValueError(f"version must be a positive integer, got {version!r}")
    if calibration_images < 1:
        raise ValueError(f"calibration_images must be positive, got {calibration_images}")
    run = _read_run(run_dir)
    task = run["task"]
    if tensorrt == "int8" and task != "cells":
        raise ValueError("INT8 calibration reads cell images: use tensorrt='fp16' for task rois")
    if tensorrt is not None:
        require_tensorrt(device)
    precision = "INT8" if tensorrt == "int8" else "FP16" if fp16 or tensorrt else "FP32"
    name = name or DEFAULT_NAMES[task]
    if task == "rois":
        # Registers the global-local builders where `train.models` does not import them.
        import train.models.global_local  # noqa: F401
    model, checkpoint = _load_model(run_dir, run)
    splits = _read_json(run_dir / SPLITS_JSON) if (run_dir / SPLITS_JSON).is_file() else None
    fold = int((splits or {}).get("exported_fold", checkpoint.get("fold", 0)))
    images = None
    if task == "cells":
        images, data_note = _open_images(run)
        held_out = _image_held_out(images, splits, fold, run) if images is not None else None
    else:
        held_out, data_note = _bag_held_out(run, splits, fold, cache_dir)
    if held_out is None and data_note is None:
        data_note = f"{SPLITS_JSON} has no test split for fold {fold}"

    with tempfile.TemporaryDirectory(prefix="papscan-export-") as tmp:
        work = Path(tmp)
        if task == "cells":
            exported = _export_classifier(model, run, name, precision, work, held_out)
        else:
            exported = _export_global_local(model, run, name, precision, work, held_out)
        diff = max_abs_diff_vs_torch(exported.wrapper, exported.onnx_path, exported.check_inputs)
        if diff > ONNX_TOLERANCE:
            raise ValueError(
                f"{name}: ONNX Runtime differs from PyTorch by {diff:.2e} > {ONNX_TOLERANCE}"
            )
        comparison = None
        extra: dict[str, Path] = {}
        if fp16:
            fp16_path = write_fp16_onnx(exported.onnx_path, work / FP16_ARTIFACT_NAME)
            extra[FP16_ARTIFACT_NAME] = fp16_path
            comparison = _compare_fp16(exported, fp16_path, held_out, data_note)
        version = version or _next_version(repository / name)
        _check_same_interface(repository / name, exported.config, version)
        card = _card(run, run_dir, checkpoint, fold, exported, diff, comparison)
        version_dir = write_model_version(
            repository, exported.config, exported.onnx_path, card, version, extra_artifacts=extra
        )
    plan = None
    if tensorrt is not None:
        calibration = None
        if precision == "INT8":
            calibration = _calibration_inputs(images, splits, fold, run, calibration_images)
        check = {
            k: v[: exported.config["max_batch_size"]] for k, v in exported.check_inputs.items()
        }
        plan = build_plan(
            version_dir, device=device, calibration_inputs=calibration, check_inputs=check
        )
        _add_to_card(version_dir, {"tensorrt": plan.as_card()})
    report = ExportReport(
        name=name,
        version=version,
        version_dir=version_dir,
        task=task,
        arch=run["arch"],
        parameters=exported.architecture["parameters"],
        precision=precision,
        onnx_bytes=(version_dir / "model.onnx").stat().st_size,
        onnx_vs_torch_max_abs_diff=diff,
        check_items=len(next(iter(exported.check_inputs.values()))),
        check_source=exported.check_source,
        fp16=comparison,
        tensorrt=plan,
    )
    for line in report.summary_lines():
        logger.info("%s", line)
    return report


# --- the run folder ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeldOut:
    """The exported fold's test items as the ONNX file's inputs, with their labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    split: str

    def head(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.inputs.items()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path.parent} is not a complete run folder: it has no {path.name}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc})") from exc


def _read_run(run_dir: Path) -> dict[str, Any]:
    run = _read_json(run_dir / RUN_JSON)
    missing = [k for k in ("task", "arch", "classes", "input_px", "mean", "std") if k not in run]
    if missing:
        raise ValueError(f"{run_dir / RUN_JSON} lacks {', '.join(missing)}")
    if run["task"] not in DEFAULT_NAMES:
        raise ValueError(f"{run_dir / RUN_JSON}: task must be cells or rois, got {run['task']!r}")
    if run.get("status", "done") != "done":
        raise ValueError(f"{run_dir} has not finished training (status {run.get('status')!r})")
    return run


def _load_model(run_dir: Path, run: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The run's network with its trained weights, in eval mode, and the checkpoint."""
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a complete run folder: it has no {WEIGHTS_FILE}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    arch = checkpoint.get("arch", run["arch"])
    if arch != run["arch"]:
        raise ValueError(f"{path} holds {arch} but {RUN_JSON} says {run['arch']}")
    kwargs = dict(checkpoint.get("arch_kwargs", run.get("arch_kwargs", {})))
    num_classes = int(checkpoint.get("num_classes", len(run["classes"])))
    model = create_model(arch, num_classes=num_classes, **kwargs)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def _open_images(run: dict[str, Any]) -> tuple[ImageSet | None, str | None]:
    """The run's data set re-opened, or (None, why not)."""
    spec = run.get("dataset")
    if not spec:
        return None, f"{RUN_JSON} names no dataset"
    try:
        from train.data.catalog import open_image_set
    except ImportError as exc:
        return None, f"train.data.catalog cannot be imported ({exc})"
    try:
        images = open_image_set(spec, int(run["input_px"]))
    except (OSError, ValueError, KeyError) as exc:
        return None, f"the data set {spec!r} cannot be opened here ({exc})"
    expected = run.get("data_sha256")
    if expected and images.sha256() != expected:
        return None, f"the data set {spec!r} here differs from the one the run trained on"
    size = int(run["input_px"])
    if images.images.shape[1:3] != (size, size):
        return None, f"the data set {spec!r} opens at {images.images.shape[1:3]}, not {size} px"
    return images, None


def _split_index(splits: dict[str, Any] | None, fold: int, part: str) -> np.ndarray | None:
    folds = (splits or {}).get("folds", [])
    if fold >= len(folds) or not folds[fold].get(part):
        return None
    return np.asarray(folds[fold][part], np.int64)


def _image_held_out(
    images: ImageSet, splits: dict[str, Any] | None, fold: int, run: dict[str, Any]
) -> _HeldOut | None:
    test = _split_items(images, splits, fold, "test")
    if test is None:
        return None
    split = f"test split of fold {fold} ({len(test)} items)"
    return _HeldOut({"crops": _normalised(test, run)}, test.labels, split)


def _bag_held_out(
    run: dict[str, Any], splits: dict[str, Any] | None, fold: int, cache_dir: Path
) -> tuple[_HeldOut | None, str | None]:
    """The test ROIs of a rois run as (cells, mask) inputs, or (None, why not)."""
    missing = [k for k in ("dataset", "cells_per_roi", "crop_px") if k not in run]
    if missing:
        return None, f"{RUN_JSON} names no {', '.join(missing)}"
    index = _split_index(splits, fold, "test")
    if index is None:
        return None, f"{SPLITS_JSON} has no test split for fold {fold}"
    from train.loops.rois import BagLearner, open_cell_bags

    spec = run["dataset"]
    try:
        bags, _ = open_cell_bags(
            spec, int(run["cells_per_roi"]), int(run["crop_px"]), cache_dir=cache_dir
        )
    except (OSError, ValueError) as exc:
        return None, f"the ROI bags of {spec!r} cannot be opened here ({exc})"
    if run.get("data_sha256") and bags.sha256() != run["data_sha256"]:
        return None, f"the ROI bags of {spec!r} here differ from the ones the run trained on"
    cells, mask = BagLearner(bags, None, int(run["input_px"]), torch.device("cpu")).inputs(index)
    inputs = {"cells": cells.numpy(), "mask": mask.numpy().astype(np.float32)}
    split = f"test split of fold {fold} ({len(index)} ROIs)"
    return _HeldOut(inputs, bags.labels[index], split), None


def _split_items(
    images: ImageSet, splits: dict[str, Any] | None, fold: int, part: str
) -> ImageSet | None:
    index = _split_index(splits, fold, part)
    return None if index is None else images.subset(index)


def _normalised(images: ImageSet, run: dict[str, Any]) -> np.ndarray:
    return normalise(images.images, tuple(run["mean"]), tuple(run["std"]))


# --- export -------------------------------------------------------------------------------------


def _export_classifier(
    model: nn.Module,
    run: dict[str, Any],
    name: str,
    precision: str,
    work: Path,
    held_out: _HeldOut | None,
) -> _Exported:
    size = int(run["input_px"])
    if held_out is not None:
        sample = held_out.head(_CHECK_ITEMS)["crops"]
        source = "test images"
    else:
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((8, 3, size, size)).astype(np.float32)
        source = "seeded random inputs"
    wrapper = ClassifierExport(model).eval()
    with torch.no_grad():
        probs, features = wrapper(torch.from_numpy(sample))
        logits = model(torch.from_numpy(sample))
    logits = logits[0] if isinstance(logits, tuple) else logits
    if not torch.allclose(torch.softmax(logits, dim=1), probs, atol=1e-6):
        raise ValueError(
            f"{run['arch']}: forward_head(forward_features(x)) differs from forward(x); "
            "the export wrapper cannot share the backbone"
        )
    onnx_path = export_onnx(
        wrapper,
        (torch.from_numpy(sample[:2]),),
        work / "model.onnx",
        ["crops"],
        ["probs", "features"],
        {"crops": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    mpp = float(run.get("mpp") or DEFAULT_CELL_MPP)
    config = classifier_config(
        size,
        mpp,
        list(run["classes"]),
        int(features.shape[1]),
        mean=tuple(float(m) for m in run["mean"]),
        std=tuple(float(s) for s in run["std"]),
        name=name,
        precision=precision,
    )
    checks = check_dynamic_batch(
        onnx_path, lambda b: {"crops": np.resize(sample, (b, *sample.shape[1:]))}
    )
    architecture = {
        "name": run["arch"],
        "kwargs": run.get("arch_kwargs", {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": int(features.shape[1]),
        "mpp": mpp,
        "mpp_recorded_by_run": "mpp" in run,
        "dynamic_batch_output_shapes": checks,
    }
    return _Exported(
        onnx_path, wrapper, config, ["probs", "features"], {"crops": sample}, source, architecture
    )


def _export_global_local(
    model: nn.Module,
    run: dict[str, Any],
    name: str,
    precision: str,
    work: Path,
    held_out: _HeldOut | None,
) -> _Exported:
    from train.models.global_local import GlobalLocalExport

    size = int(run["input_px"])
    if held_out is not None:
        check = held_out.head(_CHECK_BAGS)
        cells, mask, source = check["cells"], check["mask"], "test ROIs"
    else:
        rng = np.random.default_rng(0)
        cells = rng.standard_normal((2, 5, 3, size, size)).astype(np.float32)
        mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
        source = "seeded random bags"
    wrapper = GlobalLocalExport(model).eval()
    outputs = ["roi_probs", "cell_probs", "attention"]
    dynamic = {"cells": {0: "batch", 1: "cells"}, "mask": {0: "batch", 1: "cells"}}
    dynamic |= {"roi_probs": {0: "batch"}, "cell_probs": {0: "batch", 1: "cells"}}
    dynamic |= {"attention": {0: "batch", 1: "cells"}}
    example = (torch.from_numpy(cells), torch.from_numpy(mask))
    onnx_path = export_onnx(
        wrapper, example, work / "model.onnx", ["cells", "mask"], outputs, dynamic
    )
    with torch.no_grad():
        _, cell_probs, _ = wrapper(*example)
    # The bags' crops are `crop_px` squares cut at the detector's scale (`mpp`, else its
    # 0.5 µm/px), resized to `input_px`: each network pixel spans crop_px / input_px of them.
    cut_mpp = float(run.get("mpp") or DEFAULT_CELL_MPP)
    crop_px = int(run.get("crop_px") or size)
    mpp = cut_mpp * crop_px / size
    config = global_local_config(
        size,
        list(run["classes"]),
        int(cell_probs.shape[-1]),
        mpp=mpp,
        mean=tuple(float(m) for m in run["mean"]),
        std=tuple(float(s) for s in run["std"]),
        name=name,
        precision=precision,
    )
    architecture = {
        "name": run["arch"],
        "kwargs": run.get("arch_kwargs", {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "cell_crops": {
            "input_px": size,
            "mpp": mpp,
            "crop_px": crop_px,
            "cut_mpp": cut_mpp,
            "field_um": round(crop_px * cut_mpp, 3),
            "recorded_by_run": [k for k in ("crop_px", "mpp") if k in run],
            "mean": run["mean"],
            "std": run["std"],
        },
    }
    return _Exported(
        onnx_path,
        wrapper,
        config,
        outputs,
        {"cells": cells, "mask": mask},
        source,
        architecture,
    )


def _run(path: Path, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Runs an ONNX file over `inputs` in batches of `_EVAL_BATCH` (CPU provider)."""
    session = onnx_session(path)
    count = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, count, _EVAL_BATCH):
        feed = {k: v[start : start + _EVAL_BATCH] for k, v in inputs.items()}
        for n, out in zip(names, session.run(names, feed), strict=True):
            parts[n].append(out)
    return {n: np.concatenate(v) for n, v in parts.items()}


def _compare_fp16(
    exported: _Exported, fp16_path: Path, held_out: _HeldOut | None, data_note: str | None
) -> Fp16Comparison:
    names = exported.output_names
    sizes = exported.onnx_path.stat().st_size, fp16_path.stat().st_size
    inputs = exported.check_inputs if held_out is None else held_out.inputs
    fp32, half = _run(exported.onnx_path, inputs, names), _run(fp16_path, inputs, names)
    diffs = {n: _max_diff(fp32[n], half[n]) for n in names}
    if held_out is None:
        return Fp16Comparison(*sizes, 0, None, None, None, None, diffs, data_note)
    probs = names[0]  # `probs` of a cell classifier, `roi_probs` of the ROI network
    pred32, pred16 = fp32[probs].argmax(1), half[probs].argmax(1)
    return Fp16Comparison(
        *sizes,
        items=len(held_out.labels),
        split=held_out.split,
        fp32_accuracy=float((pred32 == held_out.labels).mean()),
        fp16_accuracy=float((pred16 == held_out.labels).mean()),
        agreement=float((pred32 == pred16).mean()),
        max_abs_diff=diffs,
    )


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0


def _calibration_inputs(
    images: ImageSet | None,
    splits: dict[str, Any] | None,
    fold: int,
    run: dict[str, Any],
    limit: int,
) -> dict[str, np.ndarray]:
    """Up to `limit` normalised training images of the exported fold (seeded choice)."""
    train = _split_items(images, splits, fold, "train") if images is not None else None
    if train is None:
        raise ValueError(
            "INT8 calibration needs the run's training images, which are not available here"
        )
    if len(train) > limit:
        pick = np.random.default_rng(int(run.get("seed", 0))).choice(len(train), limit, False)
        train = train.subset(np.sort(pick))
    return {"crops": _normalised(train, run)}


# --- repository ---------------------------------------------------------------------------------


def _next_version(model_dir: Path) -> int:
    if not model_dir.is_dir():
        return 1
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=0) + 1


_INTERFACE_KEYS = ("input", "output", "labels", "preprocessing", "max_batch_size")


def _check_same_interface(model_dir: Path, config: dict[str, Any], version: int) -> None:
    """Refuses to replace `config.yaml` under versions written for another interface: the
    config is shared by every version folder of a model."""
    path = model_dir / CONFIG_FILENAME
    others = [
        p.name
        for p in model_dir.glob("*")
        if p.is_dir() and p.name.isdigit() and int(p.name) != version
    ]
    if not path.is_file() or not others:
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    changed = [k for k in _INTERFACE_KEYS if old.get(k) != config.get(k)]
    if changed:
        raise ValueError(
            f"{model_dir} holds version(s) {', '.join(sorted(others))} whose config differs "
            f"in {', '.join(changed)}; export under another name or remove them"
        )


def _card(
    run: dict[str, Any],
    run_dir: Path,
    checkpoint: dict[str, Any],
    fold: int,
    exported: _Exported,
    diff: float,
    comparison: Fp16Comparison | None,
) -> dict[str, Any]:
    metrics_path = run_dir / METRICS_JSON
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    folds = (metrics or {}).get("folds", [])
    fold_report = next((f for f in folds if f.get("fold") == fold), None)
    provenance = {
        k: run.get(k)
        for k in (
            "dataset",
            "classes",
            "input_px",
            "mean",
            "std",
            "protocol",
            "seed",
            "data_sha256",
            "git_commit",
            "command",
            "duration_s",
            "started_utc",
            "finished_utc",
            "software",
        )
        if k in run
    }
    return {
        "task": run["task"],
        "architecture": exported.architecture,
        "training": {"run_dir": str(run_dir.resolve()), "exported_fold": fold, **provenance},
        "metrics": {
            "summary": (metrics or {}).get("summary"),
            "exported_fold": fold_report,
            "note": None if metrics is not None else f"the run has no {METRICS_JSON}",
        },
        "checks": {
            "onnx_vs_torch_max_abs_diff": diff,
            "onnx_vs_torch_items": len(next(iter(exported.check_inputs.values()))),
            "onnx_vs_torch_inputs": exported.check_source,
            "tolerance": ONNX_TOLERANCE,
        },
        "fp16": comparison.as_card() if comparison is not None else None,
        "weights_fold": checkpoint.get("fold"),
    }


def _add_to_card(version_dir: Path, fields: dict[str, Any]) -> None:
    path = version_dir / "card.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**card, **fields}, indent=2) + "\n", encoding="utf-8")
