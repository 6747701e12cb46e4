"""The Herlev Pap smear single-cell set, mapped to NILM / LSIL / HSIL.

`<data>/herlev/<class>/*.jpg`: 696 whole-cell crops, 200-224 px, at an unrecorded
magnification. Bethesda mapping: normal_* -> NILM, light_dysplastic -> LSIL,
moderate/severe_dysplastic and carcinoma_in_situ -> HSIL. Images are resized to the
classifier's input (96x96); since their scale differs from the 0.5 mpp synthetic crops,
they join training with a reduced loss weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

HERLEV_TO_BETHESDA = {
    "normal_superficiel": "NILM",
    "normal_intermediate": "NILM",
    "normal_columnar": "NILM",
    "light_dysplastic": "LSIL",
    "moderate_dysplastic": "HSIL",
    "severe_dysplastic": "HSIL",
    "carcinoma_in_situ": "HSIL",
}


@dataclass(frozen=True)
class LabelledImages:
    """Images with class indices.

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

    Raises:
        FileNotFoundError: The Herlev folder is missing.
    """
    base = root / "herlev"
    if not base.is_dir():
        raise FileNotFoundError(f"Herlev data not found at {base}.")
    images, ys, sources = [], [], []
    for folder, bethesda in sorted(HERLEV_TO_BETHESDA.items()):
        for path in sorted((base / folder).glob("*.jpg")):
            img = (
                Image.open(path).convert("RGB").resize((size_px, size_px), Image.Resampling.LANCZOS)
            )
            images.append(np.asarray(img))
            ys.append(labels.index(bethesda))
            sources.append(f"herlev/{folder}/{path.name}")
    logger.info("herlev: %d images", len(images))
    return LabelledImages(np.stack(images), np.asarray(ys, np.int64), sources)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), `test_fraction` of each class to test.

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
