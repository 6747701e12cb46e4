"""The Mendeley liquid-based cytology set: whole fields, or fields as bags of detected cells.

`<data>/lbc_mendeley/<NL,LSIL,HSIL,SCC>/*.jpg` (Hussain et al., Mendeley Data zddtpgzv63,
CC BY 4.0): 693 fields (432 / 79 / 126 / 56) with one label each, ROI-level (the label of
the smear, not of each cell). The 2048x1536 camera frames were stored as 512x512 JPEGs (x
÷4, y ÷3), so cells are stretched vertically, and the magnification was not recorded.
File names are `<class>_<slide> (<n>).jpg`; fields sharing the part before ` (<n>)` are
taken to come from one slide and share a group (61 slides: NL 43, LSIL 4, HSIL 10, SCC 4).

`load_lbc` returns the fields as an `ImageSet`, resized from the stored 512x512 (so with
the stored stretch). `lbc_cell_bags` finds cells in each field with papscan's shipped
`cell_detector` (through `engines`, as worker/pipeline/scan.py does: `to_input`, the
model, `decode_yolo` with the config's thresholds) and cuts a fixed square around the N
most confident ones, for the ROI networks.

The detector's scale. It expects 0.5 µm/px. Each field is resized to `LBC_DETECT_SIZE_PX`
= 512x384 before detection: the stored field with its 4:3 restored, which is the 2048x1536
camera frame ÷4 and, by the size of its superficial cells (~90 px for 45-55 µm), about
0.5 µm/px (`train.data.real_fields`, where the scorecard and the default ROI classifier
take the same scale). An earlier detector, trained on synthetic cells, fitted LBC nuclei
best at 768x576; the real-data detector finds them at their estimated size.

Bags are cached as `<cache_dir>/lbc_bags_<key>.npz`, the key hashing the field files, the
settings and the detector's files, since detection over all 693 fields takes ~70 s on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from engines.model import Model
from engines.postprocess import Detections, decode_yolo
from engines.preprocess import BACKGROUND_RGB, cut_crops, to_input
from engines.repository import ModelRepository, default_repository_path
from train.data.labels import LBC_CLASSES
from train.data.types import CellBags, ImageSet

logger = logging.getLogger(__name__)

LBC_FIELD_PX = 512
LBC_DETECT_SIZE_PX = (512, 384)  # (width, height) at the detector's 0.5 µm/px
DETECTOR_NAME = "cell_detector"
_SLIDE_NAME = re.compile(r"(?P<slide>.*?)\s*\(\d+\)")


def lbc_fields(root: Path) -> list[tuple[str, int]]:
    """List the fields as (path relative to `root`, class index), class then name order.

    Raises:
        FileNotFoundError: The set's folder or one of its class folders is missing.
    """
    base = root / "lbc_mendeley"
    if not base.is_dir():
        raise FileNotFoundError(f"Mendeley LBC data not found at {base}.")
    missing = [c for c in LBC_CLASSES if not (base / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"Mendeley LBC at {base} lacks the class folders {missing}.")
    return [
        (str(path.relative_to(root)), label)
        for label, cls in enumerate(LBC_CLASSES)
        for path in sorted((base / cls).glob("*.jpg"))
    ]


def slide_of(source: str) -> str:
    """The slide a field belongs to: its file name before ` (<n>)`, lower case."""
    stem = Path(source).stem
    match = _SLIDE_NAME.fullmatch(stem)
    return (match["slide"] if match else stem).strip(" _").lower()


def _read_field(root: Path, source: str) -> Image.Image:
    with Image.open(root / source) as image:
        return image.convert("RGB")


def load_lbc(root: Path, size_px: int) -> ImageSet:
    """Load every field, resized to `size_px` square, with its ROI class.

    Args:
        root: The shared data folder (holding `lbc_mendeley/`).
        size_px: Side of the returned images (the stored fields are 512x512).

    Returns:
        An `ImageSet` named `lbc` with `LBC_CLASSES`, grouped by slide.
    """
    fields = lbc_fields(root)
    images = []
    for source, _ in fields:
        image = _read_field(root, source)
        if image.size != (size_px, size_px):
            image = image.resize((size_px, size_px), Image.Resampling.LANCZOS)
        images.append(np.asarray(image))
    sources = [s for s, _ in fields]
    _, groups = np.unique(np.asarray([slide_of(s) for s in sources]), return_inverse=True)
    logger.info("lbc: %d fields from %d slides", len(fields), groups.max() + 1)
    return ImageSet(
        "lbc",
        np.stack(images),
        np.asarray([label for _, label in fields], np.int64),
        LBC_CLASSES,
        sources,
        groups.astype(np.int64),
    )


def tile_origins(width: int, height: int, tile_px: int) -> list[tuple[int, int]]:
    """Top-left corners of `tile_px` squares covering a `width`x`height` image, row-major.

    Tiles overlap where the image is not a multiple of `tile_px`; an image smaller than a
    tile gets one tile at (0, 0) (padded by the caller).
    """
    xs = sorted({0, *range(0, max(width - tile_px, 0), tile_px), max(width - tile_px, 0)})
    ys = sorted({0, *range(0, max(height - tile_px, 0), tile_px), max(height - tile_px, 0)})
    return [(x, y) for y in ys for x in xs]


def _core_bounds(starts: list[int], tile_px: int) -> list[tuple[float, float]]:
    """Split an axis between overlapping tiles at the middle of each overlap."""
    cuts = [(a + tile_px + b) / 2 for a, b in zip(starts, starts[1:], strict=False)]
    edges = [-np.inf, *cuts, np.inf]
    return list(zip(edges, edges[1:], strict=False))


def detect_field(
    model: Model, image: np.ndarray, conf_threshold: float, iou_threshold: float
) -> Detections:
    """Detect cells in an image of any size at the detector's scale, tile by tile.

    The image is cut into the detector's input squares (overlapping, white beyond the
    image); each tile keeps the cells whose centre lies in its core (the overlaps split in
    the middle), as the worker keeps a cell only in its ROI's core, so none is counted twice.

    Args:
        model: The loaded `cell_detector` (`engines.model.Model`).
        image: HxWx3 uint8 RGB at the detector's mpp.
        conf_threshold: Minimum detection score.
        iou_threshold: NMS overlap within a tile.

    Returns:
        Boxes (x0, y0, x1, y1) in `image` pixels and their scores, strongest first.
    """
    config = model.config
    tile_px = config.preprocessing.input_size[0]
    height, width = image.shape[:2]
    origins = tile_origins(width, height, tile_px)
    tiles = np.full((len(origins), tile_px, tile_px, 3), BACKGROUND_RGB, np.uint8)
    for t, (x0, y0) in enumerate(origins):
        patch = image[y0 : y0 + tile_px, x0 : x0 + tile_px]
        tiles[t, : patch.shape[0], : patch.shape[1]] = patch
    raw = model.infer({config.inputs[0].name: to_input(tiles, config.preprocessing)})
    found = decode_yolo(raw[config.outputs[0].name], conf_threshold, iou_threshold)
    xs, ys = sorted({x for x, _ in origins}), sorted({y for _, y in origins})
    x_cores = dict(zip(xs, _core_bounds(xs, tile_px), strict=True))
    y_cores = dict(zip(ys, _core_bounds(ys, tile_px), strict=True))
    boxes, scores = [], []
    for (x0, y0), det in zip(origins, found, strict=True):
        b = det.boxes + np.array([x0, y0, x0, y0], np.float32)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        (kx0, kx1), (ky0, ky1) = x_cores[x0], y_cores[y0]
        keep = (cx >= kx0) & (cx < kx1) & (cy >= ky0) & (cy < ky1) & (cx < width) & (cy < height)
        boxes.append(b[keep])
        scores.append(det.scores[keep])
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    order = np.argsort(-all_scores, kind="stable")
    return Detections(all_boxes[order], all_scores[order])


def _detector_digest(repository: ModelRepository) -> str:
    """Hash of the detector's config and the files of the version it would load."""
    version = repository.versions(DETECTOR_NAME)[-1]
    h = hashlib.sha256(f"{DETECTOR_NAME}@{version}".encode())
    folder = repository.path / DETECTOR_NAME
    for path in [folder / "config.yaml", *sorted((folder / str(version)).iterdir())]:
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _cache_key(root: Path, sources: list[str], settings: dict[str, object], detector: str) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(detector.encode())
    for source in sources:
        h.update(source.encode())
        h.update(hashlib.sha256((root / source).read_bytes()).digest())
    return h.hexdigest()


def lbc_cell_bags(
    root: Path,
    crop_px: int = 96,
    cells_per_field: int = 32,
    cache_dir: Path = Path("runs/cache"),
    detect_size_px: tuple[int, int] = LBC_DETECT_SIZE_PX,
    fields: Sequence[str] | None = None,
    repository: Path | None = None,
    device: str = "auto",
) -> CellBags:
    """Each field as a bag of its `cells_per_field` most confident detected cells.

    Args:
        root: The shared data folder (holding `lbc_mendeley/`).
        crop_px: Side of the square cut around each cell, at the detector's 0.5 µm/px
            (96 is the cell classifier's field).
        cells_per_field: Cells kept per field (N); fields with fewer are padded with white
            crops and `mask` False.
        cache_dir: Where bags are cached as .npz (created if absent).
        detect_size_px: (width, height) each field is resized to before detection.
        fields: Only these fields (paths relative to `root`, as `ImageSet.sources`); None
            for all 693.
        repository: Model repository holding `cell_detector`; None for the one shipped
            with `engines`.
        device: Where the detector runs (`auto`, `cpu`, `cuda`, ...).

    Returns:
        `CellBags` named `lbc` with `LBC_CLASSES`: crops [R, N, crop_px, crop_px, 3] at
        the detector's scale, strongest cell first; `centres_px` in the stored 512x512
        field's pixels.

    Raises:
        ValueError: A size or count is not positive, or a named field is not in the set.
        FileNotFoundError: The set is missing.
    """
    if crop_px < 1 or cells_per_field < 1 or min(detect_size_px) < 1:
        raise ValueError("crop_px, cells_per_field and detect_size_px must be positive")
    listed = lbc_fields(root)
    if fields is not None:
        label_of = dict(listed)
        unknown = [f for f in fields if f not in label_of]
        if unknown:
            raise ValueError(f"not Mendeley LBC fields under {root}: {unknown[:3]}")
        listed = [(f, label_of[f]) for f in fields]
    sources = [s for s, _ in listed]
    repo = ModelRepository(repository or default_repository_path())
    settings: dict[str, object] = {
        "crop_px": crop_px,
        "cells_per_field": cells_per_field,
        "detect_size_px": list(detect_size_px),
    }
    key = _cache_key(root, sources, settings, _detector_digest(repo))
    path = Path(cache_dir) / f"lbc_bags_{key[:20]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            bags = CellBags(
                "lbc",
                cached["crops"],
                cached["mask"],
                cached["labels"],
                LBC_CLASSES,
                cached["sources"].tolist(),
                cached["centres_px"],
            )
        logger.info("lbc bags: %d fields from the cache %s", len(bags), path)
        return bags
    bags = _build_bags(root, listed, crop_px, cells_per_field, detect_size_px, repo, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.npz")
    np.savez_compressed(
        partial,
        crops=bags.crops,
        mask=bags.mask,
        labels=bags.labels,
        sources=np.asarray(bags.sources),
        centres_px=bags.centres_px,
    )
    partial.replace(path)  # a cache file is complete or absent
    return bags


def _build_bags(
    root: Path,
    listed: list[tuple[str, int]],
    crop_px: int,
    cells_per_field: int,
    detect_size_px: tuple[int, int],
    repo: ModelRepository,
    device: str,
) -> CellBags:
    start = time.perf_counter()
    n_fields = len(listed)
    crops = np.full((n_fields, cells_per_field, crop_px, crop_px, 3), BACKGROUND_RGB, np.uint8)
    mask = np.zeros((n_fields, cells_per_field), bool)
    centres = np.zeros((n_fields, cells_per_field, 2), np.float32)
    found = np.zeros(n_fields, np.int64)
    width, height = detect_size_px
    with repo.load(DETECTOR_NAME, device=device) as model:
        post = model.config.postprocessing
        conf = float(post.get("conf_threshold", 0.25))
        iou = float(post.get("iou_threshold", 0.5))
        for r, (source, _) in enumerate(listed):
            field = _read_field(root, source)
            field_size = field.size
            image = np.asarray(field.resize((width, height), Image.Resampling.LANCZOS))
            det = detect_field(model, image, conf, iou)
            found[r] = len(det)
            top = det.boxes[:cells_per_field]
            xy = (top[:, :2] + top[:, 2:]) / 2
            n = len(top)
            crops[r, :n] = cut_crops(image, xy, crop_px, crop_px)
            mask[r, :n] = True
            centres[r, :n] = xy * np.array(
                [field_size[0] / width, field_size[1] / height], np.float32
            )
    logger.info(
        "lbc bags: %d fields in %.1f s; cells found per field mean %.1f, min %d, max %d; "
        "%d fields with fewer than %d",
        n_fields,
        time.perf_counter() - start,
        found.mean() if n_fields else 0.0,
        found.min() if n_fields else 0,
        found.max() if n_fields else 0,
        int((found < cells_per_field).sum()),
        cells_per_field,
    )
    return CellBags(
        "lbc",
        crops,
        mask,
        np.asarray([label for _, label in listed], np.int64),
        LBC_CLASSES,
        [s for s, _ in listed],
        centres,
    )
