"""Whole-cell images padded to a square: `fit_square` and `read_square_rgb`.

Fixed-field crops around a nucleus and normalisation are the scanner's own
(`engines.preprocess.cut_crops`, `engines.preprocess.normalise`): training imports them
from there, so train and serve cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from engines.preprocess import BACKGROUND_RGB
from engines.preprocess import normalise as normalise  # re-export: train/loops/supervised.py


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
