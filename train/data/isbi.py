"""ISBI 2014 overlapping cervical cytology EDF images as detector ROIs with nucleus boxes.

The set (`<data>/isbi2014_edf/`) holds 12 grayscale 1024x1024 extended-depth-of-field
images and one nucleus label map per image. The shipped `nuclei_bboxes.csv` is wrong for
EDF000–EDF003, whose label maps hold nucleus *outlines* drawn in a handful of grey values
shared by many nuclei (so one "label" spans the whole image); boxes are therefore derived
here from the maps: fill the outlines, then take connected components.

The images' pixel size is not recorded. Their nuclei have a median side of ~24 px, while
normal squamous nuclei are ~7 µm across (~14 px at 0.5 mpp); `ISBI_SCALE_TO_05MPP` = 0.6
brings them to the detector's scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

ISBI_SCALE_TO_05MPP = 0.6
MIN_NUCLEUS_SIDE_PX = 5  # at the source scale: smaller components are outline fragments


@dataclass(frozen=True)
class BoxedImage:
    """An RGB image with nucleus boxes.

    Attributes:
        name: Source image name plus the crop offset, for the data card.
        image: HxWx3 uint8 RGB.
        boxes_xyxy: [K, 4] float32 nucleus boxes (x0, y0, x1, y1) in this image's pixels.
    """

    name: str
    image: np.ndarray
    boxes_xyxy: np.ndarray


def list_isbi_images(root: Path) -> list[str]:
    """Return the sorted image stems (`EDF000`, ...) under `root/isbi2014_edf`."""
    folder = root / "isbi2014_edf" / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"ISBI 2014 images not found at {folder}.")
    return sorted(p.stem for p in folder.glob("EDF*.png"))


def nucleus_boxes_from_labelmap(labelmap: np.ndarray) -> np.ndarray:
    """Derive nucleus boxes from an ISBI label map (filled regions or outlines).

    Args:
        labelmap: HxW integer map; non-zero pixels belong to nuclei (or their outlines).

    Returns:
        [K, 4] float32 boxes (x0, y0, x1, y1), exclusive x1/y1, in map pixels.
    """
    filled = ndimage.binary_fill_holes(labelmap > 0)
    labels, _ = ndimage.label(filled)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if min(x1 - x0, y1 - y0) < MIN_NUCLEUS_SIDE_PX:
            continue
        boxes.append((x0, y0, x1, y1))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def load_isbi_image(root: Path, stem: str, scale: float = ISBI_SCALE_TO_05MPP) -> BoxedImage:
    """Load one ISBI image as RGB, rescaled by `scale`, with its nucleus boxes.

    Args:
        root: The shared data folder.
        stem: Image stem, e.g. `EDF004`.
        scale: Resize factor to the detector's 0.5 mpp.

    Returns:
        The rescaled 3-channel image (grey copied to R, G, B) and its boxes.
    """
    base = root / "isbi2014_edf"
    gray = Image.open(base / "images" / f"{stem}.png").convert("L")
    labelmap = np.asarray(Image.open(base / "nuclei_labelmaps" / f"{stem}_GT.png"))
    boxes = nucleus_boxes_from_labelmap(labelmap) * scale
    size = (round(gray.width * scale), round(gray.height * scale))
    gray = gray.resize(size, Image.Resampling.LANCZOS)
    rgb = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    return BoxedImage(name=stem, image=rgb, boxes_xyxy=boxes)


def tile_boxed_image(
    item: BoxedImage, roi_px: int = 512, min_visible: float = 0.6
) -> list[BoxedImage]:
    """Cut an image into corner-anchored `roi_px` squares (overlapping where it is smaller
    than a multiple), keeping boxes at least `min_visible` of whose area is inside.

    Images smaller than `roi_px` are padded with white (background of a cytology slide).
    """
    h, w = item.image.shape[:2]
    if h < roi_px or w < roi_px:
        pad = np.full((max(h, roi_px), max(w, roi_px), 3), 255, np.uint8)
        pad[:h, :w] = item.image
        item = BoxedImage(item.name, pad, item.boxes_xyxy)
        h, w = pad.shape[:2]
    xs = sorted({0, w - roi_px, *range(0, w - roi_px, roi_px)})
    ys = sorted({0, h - roi_px, *range(0, h - roi_px, roi_px)})
    out = []
    for y0 in ys:
        for x0 in xs:
            out.append(crop_boxed_image(item, x0, y0, roi_px, min_visible))
    return out


def crop_boxed_image(
    item: BoxedImage, x0: int, y0: int, size_px: int, min_visible: float
) -> BoxedImage:
    """Crop a square of `size_px` at (x0, y0); clip boxes, drop those mostly outside."""
    img = item.image[y0 : y0 + size_px, x0 : x0 + size_px]
    b = item.boxes_xyxy - np.array([x0, y0, x0, y0], np.float32)
    clipped = np.clip(b, 0, size_px)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = inside >= min_visible * np.maximum(area, 1e-6)
    return BoxedImage(f"{item.name}@{x0},{y0}", np.ascontiguousarray(img), clipped[keep])


def isbi_rois(root: Path, stems: list[str], roi_px: int = 512) -> list[BoxedImage]:
    """All `roi_px` ROIs (with nucleus boxes, 0.5 mpp) from the named ISBI images."""
    rois: list[BoxedImage] = []
    for stem in stems:
        rois.extend(tile_boxed_image(load_isbi_image(root, stem), roi_px))
    logger.info(
        "isbi: %d images -> %d ROIs, %d nuclei",
        len(stems),
        len(rois),
        sum(len(r.boxes_xyxy) for r in rois),
    )
    return rois
