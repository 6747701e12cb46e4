"""The Herlev Pap smear single-cell set: 7 classes, normal / abnormal, or Bethesda.

`<data>/herlev/<class>/*.jpg`: 696 whole-cell crops, padded to square, 200-224 px, at an
unrecorded magnification. Label schemes (maps in `train.data.labels`):

- `classes`: the 7 folders (`HERLEV_CLASSES`);
- `binary`: normal_* -> normal, the dysplasias and carcinoma in situ -> abnormal;
- `bethesda`: normal_* -> NILM, light -> LSIL, moderate / severe / in situ -> HSIL.

File names are `<image>-<image>-<cell>.jpg`; cells whose names share the part before the
last `-` come from one Herlev field image (458 fields, up to 7 cells each, never across
classes), so that prefix is the item's group and splits keep a field's cells together.
Their scale: `train.data.scanner_crops.herlev_scanner_crops` puts them on the scanner's
field at the set's stated 0.201 µm/px (this copy was resized to 200-224 px, so sizes are
approximate).
"""

from __future__ import annotations

import logging
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
