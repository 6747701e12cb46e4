"""Pixels into model inputs: normalisation and fixed-field cell crops.

Images travel as `H×W×3` uint8 RGB; models take float32 `N×3×H×W`, normalised with the
mean and std their config declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from engines.config import Preprocessing

BACKGROUND_RGB = 255  # glass: what lies beyond the slide or the ROI image


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale an `H×W×3` image by `factor`: area averaging to shrink, bilinear to enlarge.

    The one resampling the scanner (an ROI brought to the model's mpp) and training (a
    field brought to it) share, so cells reach a model at the same scale and sharpness.
    OpenCV maps output pixels with exactly this factor (`fx`, `fy`, no `dsize`).
    """
    if factor == 1.0:
        return image
    interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`[N, H, W, 3]` uint8 into `[N, 3, H, W]` float32, `(x - mean) / std` per channel.

    Training normalises with this function too, so a model sees the same numbers in both.
    """
    x = images.astype(np.float32)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_input(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalise a batch `[N, H, W, 3]` uint8 into `[N, 3, H, W]` float32 per `prep`."""
    if prep.channel_order.upper() == "BGR":
        images = images[..., ::-1]
    return normalise(images, prep.mean, prep.std)


def cut_crops(image: np.ndarray, centres_px: np.ndarray, field_px: int, out_px: int) -> np.ndarray:
    """Cut square fields centred on points of an image, resized to the model's input.

    The field has a fixed physical size (the classifier's input size at its mpp), not the
    box's size: nuclear size is diagnostic and must survive the crop. Training cuts its
    crops with this function too (`field_px == out_px` where the image is already at the
    classifier's mpp).

    Args:
        image: `H×W×3` uint8 ROI image.
        centres_px: `[N, 2]` `(x, y)` centres in the image's pixels (rounded half to even).
        field_px: side of the field to cut, in the image's pixels.
        out_px: side of the returned crops (the classifier's input size).

    Returns:
        `[N, out_px, out_px, 3]` uint8; parts of a field outside the image are glass white.
    """
    n = len(centres_px)
    crops = np.full((n, out_px, out_px, 3), BACKGROUND_RGB, dtype=np.uint8)
    if n == 0:
        return crops
    height, width = image.shape[:2]
    half = field_px // 2
    field = np.full((field_px, field_px, 3), BACKGROUND_RGB, dtype=np.uint8)
    for i, (cx, cy) in enumerate(np.round(np.asarray(centres_px, np.float64)).astype(np.int64)):
        x0, y0 = cx - half, cy - half
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + field_px, width), min(y0 + field_px, height)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        if (sx0, sy0, sx1, sy1) == (x0, y0, x0 + field_px, y0 + field_px):
            patch = image[y0 : y0 + field_px, x0 : x0 + field_px]
        else:
            field[:] = BACKGROUND_RGB
            field[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
            patch = field
        crops[i] = (
            patch
            if field_px == out_px
            else cv2.resize(patch, (out_px, out_px), interpolation=cv2.INTER_AREA)
        )
    return crops
