"""The Herlev Pap smear single-cell set: 7 classes, normal / abnormal, or Bethesda.

`<data>/herlev/<class>/*.jpg`: 696 whole-cell crops, padded to square, 200-224 px, at an
unrecorded magnification. Label schemes (maps in `train.data.labels`):

- `classes`: the 7 folders (`HERLEV_CLASSES`);
- `binary`: normal_* -> normal, the dysplasias and carcinoma in situ -> abnormal;
- `bethesda`: normal_* -> NILM, light -> LSIL, moderate / severe / in situ -> HSIL.

File names are `<image>-<image>-<cell>.jpg`; cells whose names share the part before the
last `-` come from one Herlev field image (458 fields, up to 7 cells each, never across
classes), so that prefix is the item's group and splits keep a field's cells together.
Since the images' scale differs from the 0.5 mpp synthetic crops, the default models'
training gives them their own loss weight (train/loops/classifier.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.data.crops import read_square_rgb
from train.data.labels import (
    BINARY_CLASSES,
    HERLEV_CLASSES,
    HERLEV_TO_BETHESDA,
    HERLEV_TO_BINARY,
    PAPSCAN_CLASSES,
)
from train.data.types import ImageSet

logger = logging.getLogger(__name__)

HERLEV_SCHEMES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "classes": (HERLEV_CLASSES, {c: c for c in HERLEV_CLASSES}),
    "binary": (BINARY_CLASSES, HERLEV_TO_BINARY),
    "bethesda": (PAPSCAN_CLASSES, HERLEV_TO_BETHESDA),
}


def herlev_image_set(root: Path, size_px: int, scheme: str = "classes") -> ImageSet:
    """Load every Herlev image, resized to `size_px`, labelled by `scheme`.

    Args:
        root: The shared data folder (holding `herlev/`).
        size_px: Side of the returned images.
        scheme: `classes` (7), `binary` (normal / abnormal) or `bethesda` (NILM/LSIL/HSIL).

    Returns:
        An `ImageSet` named `herlev`, `herlev:binary` or `herlev:bethesda`, in folder then
        file-name order, grouped by field.

    Raises:
        ValueError: Unknown scheme.
        FileNotFoundError: The Herlev folder, or one of its class folders, is missing.
    """
    if scheme not in HERLEV_SCHEMES:
        raise ValueError(f"unknown Herlev scheme {scheme!r}; use one of {list(HERLEV_SCHEMES)}")
    classes, mapping = HERLEV_SCHEMES[scheme]
    base = root / "herlev"
    if not base.is_dir():
        raise FileNotFoundError(f"Herlev data not found at {base}.")
    missing = [c for c in HERLEV_CLASSES if not (base / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"Herlev at {base} lacks the class folders {missing}.")
    images, labels, sources, fields = [], [], [], []
    for folder in sorted(HERLEV_CLASSES):
        label = classes.index(mapping[folder])
        for path in sorted((base / folder).glob("*.jpg")):
            images.append(read_square_rgb(path, size_px))
            labels.append(label)
            sources.append(f"herlev/{folder}/{path.name}")
            fields.append(path.stem.rsplit("-", 1)[0])
    _, groups = np.unique(np.asarray(fields), return_inverse=True)
    name = "herlev" if scheme == "classes" else f"herlev:{scheme}"
    logger.info("%s: %d images in %d fields", name, len(images), groups.max() + 1)
    return ImageSet(
        name,
        np.stack(images),
        np.asarray(labels, np.int64),
        classes,
        sources,
        groups.astype(np.int64),
    )


@dataclass(frozen=True)
class LabelledImages:
    """Images with class indices (the default models' training loop takes these).

    Attributes:
        images: [N, H, W, 3] uint8 RGB.
        labels: [N] int64 class indices into the label list.
        sources: [N] source names (file paths or synthetic ids), for the data card.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]


def load_herlev(root: Path, labels: tuple[str, ...], size_px: int = 96) -> LabelledImages:
    """Load every Herlev image, resized to `size_px`, with its Bethesda class index.

    Args:
        root: The shared data folder.
        labels: The caller's Bethesda class order; it must hold NILM, LSIL and HSIL.
        size_px: Side of the returned images.

    Raises:
        FileNotFoundError: The Herlev folder is missing.
        ValueError: `labels` lacks one of the Bethesda classes.
    """
    missing = sorted(set(PAPSCAN_CLASSES) - set(labels))
    if missing:
        raise ValueError(f"labels {labels} lack the Herlev Bethesda classes {missing}")
    herlev = herlev_image_set(root, size_px, "bethesda")
    to_caller = np.asarray([labels.index(c) for c in herlev.classes], np.int64)
    return LabelledImages(herlev.images, to_caller[herlev.labels], herlev.sources)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), `test_fraction` of each class to test.

    Ignores groups; `train.data.splits` has the group-aware splits.

    Raises:
        ValueError: `test_fraction` is not within (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be within (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(test, np.int64))
