"""Cell crops cut exactly as the scanner cuts them, from real images of known scale.

The scanner delivers each ROI at the detector's mpp and cuts a fixed field (the cell
classifier's input size at its mpp) centred on each detected nucleus, white beyond the
image (`engines.preprocess.cut_crops`). Training and the scorecard cut real cells the same
way: resample the whole image to the target mpp first (`resample_to_mpp`), then call the
same `cut_crops`, so the classifier never sees a crop the scanner would not make.

Herlev's single-cell images are not fields: each is one cell, padded to a square, at the
set's acquisition scale (`HERLEV_MPP`, 0.201 µm/px as Jantzen et al. describe the set's
microscope and camera). They are resampled to the target mpp and pasted, centred, on a
white field of the crop's size: the cell at its true size, glass around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from engines.preprocess import BACKGROUND_RGB, cut_crops, resample
from train.data.herlev import herlev_image_set
from train.data.labels import BETHESDA_TO_PAPSCAN
from train.data.real_fields import RealField
from train.data.types import ImageSet

HERLEV_MPP = 0.201


def resample_to_mpp(image: np.ndarray, mpp: float, target_mpp: float) -> np.ndarray:
    """An HxWx3 image at `mpp` resampled to `target_mpp`, as the scanner resamples ROIs."""
    scale = mpp / target_mpp
    if abs(scale - 1.0) < 1e-3:
        return image
    return resample(image, scale)


def field_cell_crops(
    field: RealField, target_mpp: float, field_px: int, image: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The crops of a field's marked nuclei, as the scanner would cut them.

    Args:
        field: A real field with points (CRIC's labelled nuclei, SIPaKMeD's cells…).
        target_mpp: The classifier's mpp (the scanner's ROI mpp).
        field_px: The classifier's input side at `target_mpp`.
        image: The field already loaded (else it is loaded here).

    Returns:
        `[K, field_px, field_px, 3]` uint8 crops and `[K, 2]` centres at `target_mpp`.
    """
    image = field.load() if image is None else image
    scaled = resample_to_mpp(image, field.mpp, target_mpp)
    centres = field.points * (field.mpp / target_mpp)
    return cut_crops(scaled, centres, field_px, field_px), centres


def paste_centred(image: np.ndarray, field_px: int) -> np.ndarray:
    """An image centred on a white `field_px` square (cropped where larger)."""
    out = np.full((field_px, field_px, 3), BACKGROUND_RGB, np.uint8)
    h, w = image.shape[:2]
    sy, sx = max(0, (h - field_px) // 2), max(0, (w - field_px) // 2)
    part = image[sy : sy + field_px, sx : sx + field_px]
    oy, ox = (field_px - part.shape[0]) // 2, (field_px - part.shape[1]) // 2
    out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
    return out


def herlev_scanner_crops(
    root: Path, target_mpp: float, field_px: int, classes: tuple[str, ...]
) -> ImageSet:
    """Herlev cells at `target_mpp` on a white field, labelled on papscan's grades.

    Args:
        root: The shared data folder.
        target_mpp: The classifier's mpp.
        field_px: The classifier's input side.
        classes: The caller's class names (must hold NILM, LSIL, HSIL).

    Returns:
        An `ImageSet` named `herlev:scanner`, grouped by Herlev field.
    """
    source = herlev_image_set(root, 1, "bethesda")  # labels, sources and groups only
    crops = []
    for rel in source.sources:
        with Image.open(root / rel) as im:
            crops.append(
                paste_centred(
                    resample_to_mpp(np.asarray(im.convert("RGB")), HERLEV_MPP, target_mpp), field_px
                )
            )
    to_caller = np.asarray([classes.index(BETHESDA_TO_PAPSCAN[c]) for c in source.classes])
    return ImageSet(
        "herlev:scanner",
        np.stack(crops),
        to_caller[source.labels],
        classes,
        source.sources,
        source.groups,
    )
