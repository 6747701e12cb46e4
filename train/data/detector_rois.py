"""Nucleus-detector ROIs from the real sets, at the detector's mpp.

Each field of a set whose every nucleus is marked (ISBI 2014, Cervix93, the LBC nucleus
tiles) is resampled to the detector's mpp and tiled into `roi_px` squares with nucleus
boxes (`train.data.isbi.tile_boxed_image`). Points become boxes of `POINT_BOX_UM` (a
typical nucleus; the scanner keeps only a box's centre for cutting a cell's crop).

CRIC fields are not used for training: only their squamous cells are labelled, so every
leucocyte and unlabelled nucleus would teach the detector that nuclei are background. They
measure recall instead (the scorecard). SIPaKMeD marks whole cells, not nuclei: likewise.

Stain: the EDF sets are greyscale and the LBC tiles Papanicolaou-coloured; each colour ROI
is also listed as a grey copy and each grey ROI as a copy tinted with a random Pap-like
colour (`pap_tint`), so the detector learns nuclei by shape and density, not by hue.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from train.data.isbi import BoxedImage, tile_boxed_image
from train.data.real_fields import RealField, load_real_set
from train.data.scanner_crops import resample_to_mpp

logger = logging.getLogger(__name__)

EXHAUSTIVE_SETS = ("isbi2014", "cervix93", "lbc_nuclei")
POINT_BOX_UM = 8.0


def field_boxes(field: RealField) -> np.ndarray:
    """The field's nucleus boxes in its own pixels (points become `POINT_BOX_UM` squares)."""
    if len(field.boxes):
        return field.boxes
    half = POINT_BOX_UM / field.mpp / 2
    p = field.points
    return np.stack([p[:, 0] - half, p[:, 1] - half, p[:, 0] + half, p[:, 1] + half], 1).astype(
        np.float32
    )


def field_rois(field: RealField, target_mpp: float, roi_px: int) -> list[BoxedImage]:
    """A field resampled to `target_mpp` and tiled into `roi_px` ROIs with nucleus boxes."""
    image = resample_to_mpp(field.load(), field.mpp, target_mpp)
    boxes = field_boxes(field) * (field.mpp / target_mpp)
    item = BoxedImage(f"{field.set_name}/{field.name}", image, boxes)
    return tile_boxed_image(item, roi_px)


def pap_tint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey image coloured like a Papanicolaou stain: dark nuclei blue-purple, glass white.

    Optical density per channel is the grey density times a random stain vector, so dark
    stays dark and white stays white.
    """
    grey = image[..., 0].astype(np.float32) / 255.0
    od = -np.log(np.clip(grey, 1 / 255, 1.0))
    stain = rng.uniform((0.6, 0.7, 0.3), (1.1, 1.2, 0.7))  # absorbs more red/green: blue-ish
    rgb = np.exp(-od[..., None] * stain[None, None, :]) * 255.0
    return np.clip(rgb, 0, 255).astype(np.uint8)


def to_grey(image: np.ndarray) -> np.ndarray:
    """An RGB image as grey in all three channels (luma)."""
    g = (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round()
    return np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)


def real_detector_rois(
    root: Path,
    part: str,
    target_mpp: float,
    roi_px: int,
    seed: int,
    stain_copies: bool = True,
    sets: tuple[str, ...] = EXHAUSTIVE_SETS,
) -> tuple[list[BoxedImage], dict[str, dict[str, int]]]:
    """The ROIs of one part of the exhaustively marked sets, with stain copies.

    Returns:
        The ROIs, and per set the counts (fields, ROIs, boxes) for the card. A set that is
        absent is skipped with a warning (and a count of 0).
    """
    rng = np.random.default_rng((seed, 0xD37))
    rois: list[BoxedImage] = []
    counts: dict[str, dict[str, int]] = {}
    for set_name in sets:
        try:
            fields = load_real_set(root, set_name, part)
        except FileNotFoundError as exc:
            logger.warning("%s skipped: %s", set_name, exc)
            counts[set_name] = {"fields": 0, "rois": 0, "boxes": 0}
            continue
        own = [r for f in fields for r in field_rois(f, target_mpp, roi_px)]
        copies = []
        if stain_copies:
            for r in own:
                grey = bool(np.all(r.image[..., 0] == r.image[..., 1]))
                img = pap_tint(r.image, rng) if grey else to_grey(r.image)
                copies.append(BoxedImage(f"{r.name}#stain", img, r.boxes_xyxy))
        rois += own + copies
        counts[set_name] = {
            "fields": len(fields),
            "rois": len(own) + len(copies),
            "boxes": int(sum(len(r.boxes_xyxy) for r in own)),
        }
    logger.info("real detector ROIs (%s): %s", part, counts)
    return rois, counts
