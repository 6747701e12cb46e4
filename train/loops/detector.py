"""Train the `cell_detector` (ultralytics YOLO nucleus detector) on CPU, export, evaluate.

The model is built from `train/models/papscan_yolo11_pico.yaml` (no downloaded weights)
and trained offline (`train.loops.ultralytics_env`): plots off, AMP off (AMP's check would
download weights), fixed seed, deterministic. Boxes are NUCLEUS boxes, class `nucleus`.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.postprocess import decode_yolo
from train.data.isbi import BoxedImage
from train.export.onnx_export import onnx_session
from train.export.pt2_export import Pt2Export, export_pt2
from train.loops.detection import score_detections
from train.loops.ultralytics_env import import_ultralytics

logger = logging.getLogger(__name__)

DETECTOR_YAML = Path(__file__).resolve().parents[1] / "models" / "papscan_yolo11_pico.yaml"


@dataclass(frozen=True)
class DetectorSettings:
    """ultralytics training settings for the nucleus detector (CPU-sized).

    Attributes:
        model_yaml: Architecture YAML (built from scratch when `start_weights` is None): a
            file, or the name of one ultralytics ships (`yolo11n.yaml`).
        scale: Scale key inside the YAML.
        start_weights: An ultralytics checkpoint to fine-tune instead (e.g. the YOLO11n
            nucleus checkpoint `train.pretrained.nucleus_yolo_checkpoint`), or None.
        epochs: Training epochs.
        batch: Images per batch.
        imgsz: Training and export input size, px (square).
        close_mosaic: Final epochs trained without mosaic.
        scale_aug: Random rescale amplitude (small: the slide's mpp is known).
        opset: ONNX opset of the export.
    """

    model_yaml: str = str(DETECTOR_YAML)
    scale: str = "p"
    start_weights: str | None = None
    epochs: int = 30
    batch: int = 16
    imgsz: int = 512
    close_mosaic: int = 5
    scale_aug: float = 0.2
    lr0: float = 0.004
    warmup_epochs: float = 1.0
    opset: int = 17


def train_detector(run_dir: Path, data_yaml: Path, settings: DetectorSettings, seed: int) -> Path:
    """Train the YOLO nucleus detector; return the path of the final weights (`.pt`).

    Args:
        run_dir: Run folder; ultralytics writes under `run_dir/detector/`.
        data_yaml: Dataset YAML (`train`, `val` splits, one class).
        settings: Training settings.
        seed: Random seed.
    """
    import_ultralytics(run_dir / "ultralytics_config")
    from ultralytics import YOLO

    if settings.start_weights:
        model = YOLO(settings.start_weights, task="detect")
    elif not Path(settings.model_yaml).is_file():  # one of ultralytics' own (yolo11n.yaml)
        model = YOLO(settings.model_yaml, task="detect")
    else:
        yaml_copy = run_dir / f"papscan_yolo11{settings.scale}.yaml"
        # ultralytics reads the scale from the file name (yolo11<scale>.yaml -> scale key).
        shutil.copyfile(settings.model_yaml, yaml_copy)
        model = YOLO(str(yaml_copy), task="detect")
    t0 = time.perf_counter()
    model.train(
        data=str(data_yaml),
        epochs=settings.epochs,
        imgsz=settings.imgsz,
        batch=settings.batch,
        device="cpu",
        workers=0,
        seed=seed,
        deterministic=True,
        plots=False,
        amp=False,
        project=str(run_dir.resolve()),
        name="detector",
        exist_ok=True,
        pretrained=bool(settings.start_weights),
        optimizer="AdamW",
        lr0=settings.lr0,
        cos_lr=True,
        warmup_epochs=settings.warmup_epochs,
        close_mosaic=settings.close_mosaic,
        scale=settings.scale_aug,
        degrees=0.0,
        fliplr=0.5,
        flipud=0.5,
        mosaic=1.0,
        patience=0,
        verbose=True,
        val=True,
        cache=False,
    )
    logger.info("detector trained in %.0f s", time.perf_counter() - t0)
    weights = run_dir / "detector" / "weights" / "last.pt"
    if not weights.exists():
        raise FileNotFoundError(f"ultralytics did not write {weights}")
    return weights


class DetectorExport(nn.Module):
    """Export wrapper: `images` [B, 3, H, W] RGB in [0, 1] -> raw head `output0` [B, 4 + nc, N].

    Args:
        model: The ultralytics `DetectionModel` in its export-ready form (fused, eval,
            Detect head in export mode), whose forward returns the raw head alone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, list | tuple) else out


def export_detector(weights: Path, settings: DetectorSettings) -> tuple[Path, DetectorExport]:
    """Export trained weights to ONNX (`images` -> raw head `output0` [B, 4 + nc, N]).

    Dynamic batch (and spatial) axes, no NMS in the graph, not simplified.

    Returns:
        The ONNX file, and the very module ultralytics traced for it (its export-ready
        form, caught at the exporter's `on_export_end`), wrapped to take `images` by name,
        so other formats export the same graph.
    """
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    traced: list[nn.Module] = []
    model.add_callback("on_export_end", lambda exporter: traced.append(exporter.model))
    path = Path(
        model.export(
            format="onnx",
            dynamic=True,
            simplify=False,
            opset=settings.opset,
            imgsz=settings.imgsz,
            nms=False,
            half=False,
            device="cpu",
        )
    )
    if not traced:
        raise RuntimeError("ultralytics' exporter did not report the model it exported")
    logger.info("detector exported to %s", path)
    return path, DetectorExport(traced[-1]).eval()


def export_detector_pt2(
    module: DetectorExport, images: np.ndarray, path: Path, max_batch_size: int
) -> Pt2Export:
    """Export the export-ready detector with `torch.export` (`images` -> `output0`).

    Args:
        module: From `export_detector`.
        images: [B, 3, H, W] float32 in [0, 1], B >= 2: the examples, and the check's data.
        path: Output `.pt2` file.
        max_batch_size: The config's `max_batch_size`.
    """
    with warnings.catch_warnings():
        # The Detect head, exported with dynamic=True as for ONNX, recomputes its anchors
        # in every forward and stores them on itself; torch.export warns that the stored
        # tensors are not buffers. The program computes them in its graph, so nothing is lost.
        warnings.filterwarnings("ignore", message=r".*were assigned during export.*")
        return export_pt2(
            module,
            {"images": torch.from_numpy(np.ascontiguousarray(images))},
            path,
            ["output0"],
            max_batch_size=max_batch_size,
        )


def ultralytics_map50(weights: Path, data_yaml: Path, split: str, imgsz: int) -> dict[str, float]:
    """ultralytics' own validation on a split: precision, recall, mAP50, mAP50-95."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    metrics = model.val(
        data=str(data_yaml),
        split=split,
        imgsz=imgsz,
        batch=8,
        device="cpu",
        plots=False,
        verbose=False,
        project=str(weights.parents[2]),
        name=f"val_{split}",
        exist_ok=True,
        conf=0.001,
        iou=0.6,
    )
    box = metrics.box
    return {
        "map50": round(float(box.map50), 4),
        "map50_95": round(float(box.map), 4),
        "precision": round(float(box.mp), 4),
        "recall": round(float(box.mr), 4),
    }


def detect_onnx(
    onnx_path: Path,
    images: list[np.ndarray],
    conf_threshold: float,
    iou_threshold: float,
    batch: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the exported detector on HxWx3 uint8 RGB images (all the model's input size)."""
    session = onnx_session(onnx_path)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(0, len(images), batch):
        x = np.stack(images[i : i + batch]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        raw = session.run(["output0"], {"images": np.ascontiguousarray(x)})[0]
        out.extend((d.boxes, d.scores) for d in decode_yolo(raw, conf_threshold, iou_threshold))
    return out


def evaluate_detector_onnx(
    onnx_path: Path,
    items: list[BoxedImage],
    ignores: list[np.ndarray] | None,
    conf_threshold: float,
    iou_threshold: float,
) -> dict[str, Any]:
    """Recall/precision at IoU 0.5 of the exported detector on held-out images."""
    t0 = time.perf_counter()
    preds = detect_onnx(onnx_path, [it.image for it in items], conf_threshold, iou_threshold)
    report = score_detections(preds, [it.boxes_xyxy for it in items], ignores)
    report.update(
        {
            "images": len(items),
            "conf_threshold": conf_threshold,
            "nms_iou_threshold": iou_threshold,
            "match_iou": 0.5,
            "ms_per_image_cpu": round((time.perf_counter() - t0) * 1000 / max(len(items), 1), 1),
        }
    )
    return report


def settings_dict(settings: DetectorSettings) -> dict[str, Any]:
    """Settings for the model card (the YAML path made relative to the project)."""
    d = asdict(settings)
    if Path(settings.model_yaml).is_file():
        d["model_yaml"] = "train/models/" + Path(settings.model_yaml).name
    if settings.start_weights:
        d["start_weights"] = Path(settings.start_weights).name  # no machine paths on a card
    return d


def onnx_vs_torch_diff(weights: Path, onnx_path: Path, items: list[BoxedImage]) -> float:
    """max |ONNX - PyTorch| of the raw head on a few ROIs (the fused PyTorch model in eval mode)."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect").model.float().fuse().eval()
    x = np.stack([it.image for it in items]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    x = np.ascontiguousarray(x)
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    ref = out[0] if isinstance(out, list | tuple) else out
    raw = onnx_session(onnx_path).run(["output0"], {"images": x})[0]
    return float(np.abs(raw - ref.numpy()).max())


def sweep_conf_thresholds(
    onnx_path: Path,
    items: list[BoxedImage],
    ignores: list[np.ndarray] | None,
    thresholds: tuple[float, ...],
    iou_threshold: float,
) -> list[dict[str, Any]]:
    """Recall/precision/F1 of the exported detector at each confidence threshold."""
    preds = detect_onnx(onnx_path, [it.image for it in items], min(thresholds), iou_threshold)
    rows = []
    for conf in thresholds:
        kept = [(b[s >= conf], s[s >= conf]) for b, s in preds]
        report = score_detections(kept, [it.boxes_xyxy for it in items], ignores)
        rows.append({"conf_threshold": conf, **report})
    return rows


def choose_conf_threshold(sweep: list[dict[str, Any]]) -> float:
    """The threshold whose worse of recall and precision is best (the lowest among ties).

    Both must clear the same bar in the scanning tests, so the balanced point is chosen
    rather than best F1 (which trades recall for precision here).
    """
    best = max(
        sweep,
        key=lambda row: (min(row["recall"], row["precision"]), -row["conf_threshold"]),
    )
    return float(best["conf_threshold"])


def choose_conf_for_recall(sweep: list[dict[str, Any]], min_precision: float) -> float:
    """The threshold with the best recall at precision >= `min_precision` (the highest
    threshold among ties); the balanced one (`choose_conf_threshold`) where none reaches it.

    A screening detector that misses a nucleus loses the cell for good; a false detection
    costs one crop the classifier calls NILM.
    """
    ok = [row for row in sweep if row["precision"] >= min_precision]
    if not ok:
        return choose_conf_threshold(sweep)
    best = max(ok, key=lambda row: (row["recall"], row["conf_threshold"]))
    return float(best["conf_threshold"])
