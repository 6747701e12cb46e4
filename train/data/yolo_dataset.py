"""Write ROIs with nucleus boxes as an ultralytics YOLO dataset folder and its YAML."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from train.data.isbi import BoxedImage

logger = logging.getLogger(__name__)


def write_yolo_split(root: Path, split: str, items: Iterable[BoxedImage]) -> int:
    """Write `root/images/<split>/*.png` and `root/labels/<split>/*.txt`.

    Label lines are `class cx cy w h`, normalised to the image size.

    Returns:
        The number of images written. An image with no boxes gets an empty label file
        (a background image for ultralytics).
    """
    img_dir = root / "images" / split
    lbl_dir = root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, item in enumerate(items):
        h, w = item.image.shape[:2]
        stem = f"{split}_{i:05d}"
        Image.fromarray(item.image).save(img_dir / f"{stem}.png", compress_level=1)
        lines = []
        for x0, y0, x1, y1 in np.asarray(item.boxes_xyxy, np.float64):
            cx, cy, bw, bh = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h
            lines.append(f"0 {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
        (lbl_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        n += 1
    logger.info("yolo dataset %s: %d images", split, n)
    return n


def write_dataset_yaml(root: Path, names: list[str], splits: dict[str, str]) -> Path:
    """Write `root/data.yaml` for ultralytics (absolute `path`, split folders, class names)."""
    spec = {"path": str(root.resolve()), **splits, "names": dict(enumerate(names))}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
