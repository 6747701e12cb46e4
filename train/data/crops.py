"""Fixed-field cell crops: a square of constant physical size centred on a nucleus.

Matches the scanning pipeline (worker/pipeline/preprocess.py `cut_crops`): the field is
`input_px` pixels at the classifier's mpp, parts outside the image are glass white, and the
field is never resized to the box (nuclear size is diagnostic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND_RGB = 255


def cut_fixed_crops(image: np.ndarray, centres_px: np.ndarray, size_px: int) -> np.ndarray:
    """Cut `size_px` squares centred on points, padding with white beyond the image.

    Args:
        image: HxWx3 uint8 RGB, at the classifier's mpp.
        centres_px: [N, 2] (x, y) centres in image pixels (rounded to int).
        size_px: Side of the square field.

    Returns:
        [N, size_px, size_px, 3] uint8.
    """
    n = len(centres_px)
    crops = np.full((n, size_px, size_px, 3), BACKGROUND_RGB, np.uint8)
    h, w = image.shape[:2]
    half = size_px // 2
    for i, (cx, cy) in enumerate(np.round(np.asarray(centres_px, np.float64)).astype(np.int64)):
        x0, y0 = cx - half, cy - half
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size_px, w), min(y0 + size_px, h)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        crops[i, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return crops


def normalise(
    images_nhwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """[N, H, W, 3] uint8 RGB -> [N, 3, H, W] float32, `(x - mean) / std` per channel."""
    x = images_nhwc.astype(np.float32)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def fit_square(image: Image.Image, size_px: int) -> np.ndarray:
    """Pad an image with white to a centred square, then resize it to `size_px`.

    Padding before resizing keeps the cell's shape (a plain resize would stretch a
    non-square crop); white is the glass around a cell.

    Args:
        image: Any PIL image (converted to RGB).
        size_px: Side of the result.

    Returns:
        [size_px, size_px, 3] uint8 RGB.
    """
    if size_px < 1:
        raise ValueError(f"size_px must be positive, got {size_px}")
    image = image.convert("RGB")
    side = max(image.size)
    if image.width != image.height:
        square = Image.new("RGB", (side, side), (BACKGROUND_RGB,) * 3)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    if side != size_px:
        image = image.resize((size_px, size_px), Image.Resampling.LANCZOS)
    return np.asarray(image)


def read_square_rgb(path: Path, size_px: int) -> np.ndarray:
    """Read an image file as `fit_square(image, size_px)`."""
    with Image.open(path) as image:
        return fit_square(image, size_px)
