"""Read a YOLO-format detection folder into `BoxedImage`s (the reader of `yolo_dataset`).

A label file holds one `class cx cy w h` line per box, normalised to the image size, and
shares its image's stem; an image without a label file has no box. The folders found:

- ultralytics' split layout, as `train.data.yolo_dataset.write_yolo_split` writes it:
  `<root>/images/<split>/` with `<root>/labels/<split>/`;
- `<root>/images/` with `<root>/labels/` or `<root>/yolo_labels*/` (SIPaKMeD's
  `full_field/yolo_labels_cell/`);
- images directly in `<root>` with `<root>/labels/` or `<root>/yolo_labels*/` (CRIC's
  `full_images/yolo_labels/`).

Class names come from `classes.txt` (one a line, in the labels folder or `<root>`), else
from the `names` of a data YAML in `<root>` (a list or an index mapping), else are the
class numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from train.data.isbi import BoxedImage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class YoloFolder:
    """The images of a YOLO folder with their boxes and box classes.

    Attributes:
        items: One `BoxedImage` per image (name = file stem), boxes in image pixels.
        box_classes: [K] int64 class of each box, one array per item.
        class_names: Class names by index.
    """

    items: list[BoxedImage]
    box_classes: list[np.ndarray]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.items)


def _images_dir(root: Path, split: str | None) -> Path:
    if split is not None:
        return root / "images" / split
    return root / "images" if (root / "images").is_dir() else root


def _labels_dir(root: Path, split: str | None) -> Path:
    if split is not None:
        return root / "labels" / split
    candidates = [root / "labels", *sorted(p for p in root.glob("yolo_labels*") if p.is_dir())]
    for labels in candidates:
        if labels.is_dir():
            return labels
    raise FileNotFoundError(f"{root} has no labels/ or yolo_labels*/ folder.")


def _class_names(root: Path, labels_dir: Path) -> tuple[str, ...] | None:
    for path in (labels_dir / "classes.txt", root / "classes.txt"):
        if path.is_file():
            return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
        names = (yaml.safe_load(path.read_text()) or {}).get("names")
        if isinstance(names, list):
            return tuple(str(n) for n in names)
        if isinstance(names, dict):
            return tuple(str(names[i]) for i in sorted(names))
    return None


def read_yolo_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one label file into pixel boxes.

    Args:
        path: The `.txt` label file.
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        ([K, 4] float32 boxes (x0, y0, x1, y1) in pixels, [K] int64 classes).

    Raises:
        ValueError: A line is not `class cx cy w h`.
    """
    boxes, classes = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            cls = int(parts[0])
            if cls < 0:
                raise ValueError
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'class cx cy w h', got {line!r}") from None
        x0, y0 = (cx - w / 2) * width, (cy - h / 2) * height
        boxes.append((x0, y0, x0 + w * width, y0 + h * height))
        classes.append(cls)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def read_yolo_folder(
    root: Path, split: str | None = None, labels_dir: Path | None = None
) -> YoloFolder:
    """Read every image of a YOLO folder with its boxes.

    Args:
        root: The folder (see the module docstring for the layouts).
        split: Read `images/<split>` and `labels/<split>` (ultralytics' layout).
        labels_dir: The labels folder, when it is none of the usual places.

    Returns:
        The images (RGB, sorted by file name) with their boxes and classes.

    Raises:
        FileNotFoundError: No images or no labels folder.
        ValueError: A label line is malformed, or a class is outside the class names.
    """
    images_dir = _images_dir(root, split)
    found_labels = _labels_dir(root, split) if labels_dir is None else labels_dir
    paths = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}.")
    items, box_classes = [], []
    for path in paths:
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
        label_file = found_labels / f"{path.stem}.txt"
        height, width = image.shape[:2]
        if label_file.is_file():
            boxes, classes = read_yolo_labels(label_file, width, height)
        else:
            boxes, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        items.append(BoxedImage(path.stem, image, boxes))
        box_classes.append(classes)
    n_classes = max((int(c.max()) + 1 for c in box_classes if len(c)), default=1)
    names = _class_names(root, found_labels) or tuple(str(i) for i in range(n_classes))
    if n_classes > len(names):
        raise ValueError(f"{found_labels}: class {n_classes - 1} but only {len(names)} names")
    logger.info(
        "yolo folder %s: %d images, %d boxes",
        images_dir,
        len(items),
        sum(len(c) for c in box_classes),
    )
    return YoloFolder(items, box_classes, names)
