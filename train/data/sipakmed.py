"""SIPaKMeD (Plissiti et al., ICIP 2018) single cells in five classes, from any of its layouts.

The set ships one folder per class (`SIPAKMED_CLASSES`), in one of these layouts, all
under `<data>/sipakmed/`:

- `cropped`: `im_<Class>/im_<Class>/CROPPED/NNN_KK.bmp`, cell KK of cluster image NNN,
  cut by the authors to the cell's bounding box (4,049 cells in the full release). The
  flatter `<Class>/CROPPED/` and `im_<Class>/<Class>/CROPPED/` are read too.
- `clusters`: the cluster images `im_<Class>/im_<Class>/NNN.bmp` with one boundary file
  per annotated cell, `NNN_cytKK.dat` (cytoplasm) and `NNN_nucKK.dat` (nucleus): one
  `x,y` point a line, in image pixels. Each cell is cut to its cytoplasm polygon's
  bounding box, as the authors' crops are.
- `full_field`: `<Class>/full_field/images/*.jpg` with `cell_bboxes.csv`
  (`image,class,x0,y0,x1,y1,img_w,img_h`), the JPEG sample of cluster fields papscan's
  shared data holds (21 Metaplastic fields, 60 cells); each box is cut out.

The three describe the same cells, so one layout is read, never a mix. Crops are padded
with white to a square and resized (`train.data.crops.fit_square`), which keeps each
cell's shape. The cells of one cluster image share a group, so a split never puts cells of
one field on both sides.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from train.data.crops import fit_square
from train.data.labels import SIPAKMED_CLASSES
from train.data.types import ImageSet

logger = logging.getLogger(__name__)

SIPAKMED_LAYOUTS = ("cropped", "clusters", "full_field")
_CROP_NAME = re.compile(r"(?P<field>.+)_(?P<cell>\d+)")
_CYT_NAME = re.compile(r"(?P<field>.+)_cyt(?P<cell>\d+)")


def read_dat_polygon(path: Path) -> np.ndarray:
    """Read a SIPaKMeD boundary file: one `x,y` point a line (commas or spaces).

    Returns:
        [K, 2] float64 (x, y) points in image pixels.

    Raises:
        ValueError: A line does not hold two numbers, or the file has no point.
    """
    points = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            x, y = (float(v) for v in fields[:2])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'x,y', got {line.strip()!r}") from None
        points.append((x, y))
    if not points:
        raise ValueError(f"{path} holds no boundary point")
    return np.asarray(points, np.float64)


def _class_dir(base: Path, cls: str) -> Path | None:
    """The folder of one class's images (cluster .bmp files and CROPPED/), in any layout."""
    for candidate in (
        base / f"im_{cls}" / f"im_{cls}",
        base / f"im_{cls}" / cls,
        base / f"im_{cls}",
        base / cls / f"im_{cls}",
        base / cls,
    ):
        if (candidate / "CROPPED").is_dir() or any(candidate.glob("*.bmp")):
            return candidate
    return None


def sipakmed_layouts(root: Path) -> list[str]:
    """The layouts present under `root/sipakmed`, in `SIPAKMED_LAYOUTS` order."""
    base = root / "sipakmed"
    found = set()
    for cls in SIPAKMED_CLASSES:
        folder = _class_dir(base, cls)
        if folder is not None and any((folder / "CROPPED").glob("*.bmp")):
            found.add("cropped")
        if folder is not None and any(folder.glob("*_cyt*.dat")):
            found.add("clusters")
        if (base / cls / "full_field" / "cell_bboxes.csv").is_file():
            found.add("full_field")
    return [layout for layout in SIPAKMED_LAYOUTS if layout in found]


def _cropped_cells(base: Path) -> Iterator[tuple[str, str, str, Image.Image]]:
    for cls in SIPAKMED_CLASSES:
        folder = _class_dir(base, cls)
        if folder is None:
            continue
        for path in sorted((folder / "CROPPED").glob("*.bmp")):
            match = _CROP_NAME.fullmatch(path.stem)
            field = match["field"] if match else path.stem
            with Image.open(path) as image:
                yield cls, field, str(path.relative_to(base.parent)), image.convert("RGB")


def _bbox(points: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) around points, clipped to the image, at least 1 px."""
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)


def _cluster_cells(base: Path) -> Iterator[tuple[str, str, str, Image.Image]]:
    for cls in SIPAKMED_CLASSES:
        folder = _class_dir(base, cls)
        if folder is None:
            continue
        field, image = "", Image.new("RGB", (1, 1))
        for dat in sorted(folder.glob("*_cyt*.dat")):
            match = _CYT_NAME.fullmatch(dat.stem)
            if match is None:
                continue
            image_path = folder / f"{match['field']}.bmp"
            if match["field"] != field:
                if not image_path.is_file():
                    raise FileNotFoundError(f"{dat} has no cluster image {image_path.name}")
                field = match["field"]
                with Image.open(image_path) as opened:
                    image = opened.convert("RGB")
            box = _bbox(read_dat_polygon(dat), image.width, image.height)
            source = f"{image_path.relative_to(base.parent)}#cell{match['cell']}"
            yield cls, field, source, image.crop(box)


def _full_field_cells(base: Path) -> Iterator[tuple[str, str, str, Image.Image]]:
    for cls in SIPAKMED_CLASSES:
        folder = base / cls / "full_field"
        table = folder / "cell_bboxes.csv"
        if not table.is_file():
            continue
        with table.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            if row["class"] != cls:
                raise ValueError(f"{table}: a {row['class']!r} row in the {cls} folder")
        opened: dict[str, Image.Image] = {}
        for i, row in enumerate(rows):
            name = row["image"]
            if name not in opened:
                with Image.open(folder / "images" / name) as image:
                    opened[name] = image.convert("RGB")
            image = opened[name]
            corners = np.asarray([[row["x0"], row["y0"]], [row["x1"], row["y1"]]], np.float64)
            box = _bbox(corners, image.width, image.height)
            source = f"sipakmed/{cls}/full_field/images/{name}#row{i}"
            yield cls, Path(name).stem, source, image.crop(box)


_READERS = {
    "cropped": _cropped_cells,
    "clusters": _cluster_cells,
    "full_field": _full_field_cells,
}


def load_sipakmed(root: Path, size_px: int, layout: str = "auto") -> ImageSet:
    """Load SIPaKMeD's cells as `size_px` squares, labelled by the five classes.

    Args:
        root: The shared data folder (holding `sipakmed/`).
        size_px: Side of the returned images.
        layout: `cropped`, `clusters`, `full_field`, or `auto` for the first one present.

    Returns:
        An `ImageSet` named `sipakmed` with `SIPAKMED_CLASSES` (a class whose folder is
        absent simply has no item), grouped by cluster image.

    Raises:
        ValueError: Unknown layout.
        FileNotFoundError: The layout (or any layout, for `auto`) is absent.
    """
    if layout != "auto" and layout not in _READERS:
        raise ValueError(
            f"unknown SIPaKMeD layout {layout!r}; use auto or one of {SIPAKMED_LAYOUTS}"
        )
    base = root / "sipakmed"
    present = sipakmed_layouts(root)
    if layout == "auto":
        if not present:
            raise FileNotFoundError(f"no SIPaKMeD layout {SIPAKMED_LAYOUTS} found under {base}.")
        layout = present[0]
    elif layout not in present:
        raise FileNotFoundError(
            f"no SIPaKMeD {layout} layout under {base} (present: {present or 'none'})."
        )
    images, labels, sources, fields = [], [], [], []
    for cls, field, source, crop in _READERS[layout](base):
        images.append(fit_square(crop, size_px))
        labels.append(SIPAKMED_CLASSES.index(cls))
        sources.append(source)
        fields.append(f"{cls}/{field}")
    _, groups = np.unique(np.asarray(fields), return_inverse=True)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(SIPAKMED_CLASSES))
    logger.info(
        "sipakmed (%s): %d cells in %d fields, per class %s",
        layout,
        len(images),
        groups.max() + 1,
        dict(zip(SIPAKMED_CLASSES, counts.tolist(), strict=True)),
    )
    return ImageSet(
        "sipakmed",
        np.stack(images),
        np.asarray(labels, np.int64),
        SIPAKMED_CLASSES,
        sources,
        groups.astype(np.int64),
    )
