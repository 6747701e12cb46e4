"""The real field images of `../shared/data`, each with its scale, nuclei and diagnosis.

One type, `RealField`, for every set whose images are fields of a smear (not single-cell
crops): what the detector learns nuclei from, what the scorecard scans as small slides.
Pixels load lazily (`RealField.load`), so listing a set costs only its tables.

None of these sets records microns per pixel. Each scale below is estimated from the sizes
of things whose physical size is known: intermediate-cell nuclei (about 7-8 µm across),
neutrophils (10-12 µm), superficial squamous cells (45-55 µm across their cytoplasm),
measured by hand on a few images of each set; they are good to perhaps ±20 %.

- `cric_fields`: 158 conventional Pap fields, 1280x959: 0.25 µm/px (superficial cells
  ~190 px across, neutrophils ~40 px).
- `cervix93`: 69 EDF greyscale LBC frames, 1280x960: 0.25 (intermediate nuclei ~30 px).
- `isbi2014`: 12 EDF greyscale frames, 1024x1024: 0.30 (nuclei ~23 px; train/data/isbi.py).
- `lbc_nuclei`: 51 LBC tiles, 512x512 (a 512x384 frame, letterboxed): 0.50 (superficial
  cells ~90-100 px, pyknotic nuclei ~10 px).
- `lbc`: 693 Mendeley LBC fields stored 512x512, loaded de-stretched to 512x384 (the
  2048x1536 frame ÷4): 0.50 (superficial cells ~90 px).
- `sipakmed_metaplastic`: 21 SIPaKMeD fields, 2048x1536: 0.16 (intermediate nuclei
  ~45-50 px, metaplastic cells ~190 px).

Labels: CRIC points carry a Bethesda class (only squamous cells are labelled: unlabelled
nuclei are not negatives); Cervix93, ISBI and the LBC nucleus tiles mark every nucleus
(`exhaustive`), so they also measure precision; SIPaKMeD marks the annotated metaplastic
cells only (their box centres as points). A field's `label` is its diagnosis in Bethesda
names: the Mendeley folder (NL is NILM), the Cervix93 frame grade, CRIC's worst labelled
cell, NILM for the benign metaplastic fields.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from engines.postprocess import box_centres
from train.data.heldout import assign_parts, isbi_part
from train.data.isbi import nucleus_boxes_from_labelmap
from train.data.labels import BETHESDA_TO_PAPSCAN, CRIC_TO_BETHESDA, LBC_CLASSES, LBC_TO_BETHESDA
from train.data.lbc import slide_of

CRIC_FIELDS_MPP = 0.25
CERVIX93_MPP = 0.25
ISBI_MPP = 0.30
LBC_NUCLEI_MPP = 0.50
LBC_MPP = 0.50
LBC_LOAD_SIZE = (512, 384)  # (width, height): the stored 512x512 field with its 4:3 restored
SIPAKMED_MPP = 0.16
#: What the cards record of the scales above.
REAL_SCALES = {
    "cric_fields": {
        "mpp": CRIC_FIELDS_MPP,
        "from": "superficial cells ~190 px, neutrophils ~40 px",
    },
    "cervix93": {"mpp": CERVIX93_MPP, "from": "intermediate-cell nuclei ~30 px"},
    "isbi2014": {"mpp": ISBI_MPP, "from": "nuclei ~23 px"},
    "lbc_nuclei": {"mpp": LBC_NUCLEI_MPP, "from": "superficial cells ~90-100 px"},
    "lbc": {"mpp": LBC_MPP, "from": "superficial cells ~90 px in the de-stretched 512x384 field"},
    "sipakmed_metaplastic": {"mpp": SIPAKMED_MPP, "from": "intermediate nuclei ~45-50 px"},
    "note": "estimates from known cell and nucleus sizes (train/data/real_fields.py), ±20 %",
}
SEVERITY = ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC")  # The Bethesda System's order
CERVIX93_GRADES = {"negative": "NILM", "nilm": "NILM", "lsil": "LSIL", "hsil": "HSIL"}
MIN_MASK_NUCLEUS_PX = 3  # LBC nucleus-mask components smaller than this are JPEG specks


@dataclass(frozen=True)
class RealField:
    """One real field image with what is known of it.

    Attributes:
        set_name: The set (`cric_fields`, `cervix93`, `isbi2014`, `lbc_nuclei`, `lbc`,
            `sipakmed_metaplastic`).
        name: The image's file name within the set.
        group: The split unit (field, or slide for `lbc`).
        path: The image file.
        mpp: Estimated microns per pixel of the image as `load` returns it.
        label: The field's diagnosis, a Bethesda name (`SEVERITY`), or None.
        points: [K, 2] float32 nucleus centres (x, y) in loaded pixels.
        point_labels: Bethesda name per point (CRIC), else empty.
        boxes: [K, 4] float32 nucleus boxes (x0, y0, x1, y1) in loaded pixels, or [0, 4].
        exhaustive: Every nucleus in the image is marked (so unmatched detections are
            false positives).
        resize_to: (width, height) the stored image is resized to on load, or None.
        grey: The image is greyscale (copied to R, G, B on load).
    """

    set_name: str
    name: str
    group: str
    path: Path
    mpp: float
    label: str | None
    points: np.ndarray
    point_labels: tuple[str, ...] = ()
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    exhaustive: bool = False
    resize_to: tuple[int, int] | None = None
    grey: bool = False

    @property
    def grade(self) -> str | None:
        """The field's diagnosis on papscan's three grades (NILM / LSIL / HSIL)."""
        return None if self.label is None else BETHESDA_TO_PAPSCAN[self.label]

    def load(self) -> np.ndarray:
        """The image as HxWx3 uint8 RGB at `mpp`."""
        with Image.open(self.path) as im:
            im = im.convert("L" if self.grey else "RGB")
            if self.resize_to is not None and im.size != self.resize_to:
                im = im.resize(self.resize_to, Image.Resampling.LANCZOS)
            a = np.asarray(im)
        return np.repeat(a[:, :, None], 3, axis=2) if self.grey else np.ascontiguousarray(a)


def worst(labels: list[str] | tuple[str, ...]) -> str:
    """The most severe of some Bethesda names."""
    return max(labels, key=SEVERITY.index)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}.")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cric_fields(root: Path) -> list[RealField]:
    """CRIC Cervix fields with their labelled squamous nuclei (`cric/fields/`)."""
    base = root / "cric" / "fields"
    _require(base / "cells.csv", "CRIC fields")
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in _read_csv(base / "cells.csv"):
        by_image.setdefault(row["image"], []).append(row)
    out = []
    for name in sorted(by_image):
        rows = by_image[name]
        labels = tuple(CRIC_TO_BETHESDA[r["bethesda_system"]] for r in rows)
        points = np.array([[float(r["x"]), float(r["y"])] for r in rows], np.float32)
        out.append(
            RealField(
                "cric_fields",
                name,
                name,
                base / "images" / name,
                CRIC_FIELDS_MPP,
                worst(labels),
                points,
                labels,
            )
        )
    return out


def cervix93_frames(root: Path) -> list[RealField]:
    """Cervix93 EDF frames with every nucleus as a point, and the frame's grade."""
    base = root / "cervix93"
    _require(base / "nuclei_points.csv", "Cervix93")
    grades = {r["image"]: r["grade"] for r in _read_csv(base / "frame_labels.csv")}
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in grades}
    for row in _read_csv(base / "nuclei_points.csv"):
        points.setdefault(row["image"], []).append((float(row["x"]), float(row["y"])))
    return [
        RealField(
            "cervix93",
            name,
            name,
            base / "frames" / name,
            CERVIX93_MPP,
            CERVIX93_GRADES[grades[name].strip().lower()],
            np.array(points[name], np.float32).reshape(-1, 2),
            exhaustive=True,
            grey=True,
        )
        for name in sorted(points)
        if (base / "frames" / name).is_file()
    ]


def isbi_fields(root: Path) -> list[RealField]:
    """ISBI 2014 EDF images with every nucleus as a box (from the label maps)."""
    base = root / "isbi2014_edf"
    _require(base / "images", "ISBI 2014")
    out = []
    for path in sorted((base / "images").glob("EDF*.png")):
        labelmap = np.asarray(Image.open(base / "nuclei_labelmaps" / f"{path.stem}_GT.png"))
        boxes = nucleus_boxes_from_labelmap(labelmap)
        centres = box_centres(boxes)
        out.append(
            RealField(
                "isbi2014",
                path.name,
                path.stem,
                path,
                ISBI_MPP,
                None,
                centres,
                boxes=boxes,
                exhaustive=True,
                grey=True,
            )
        )
    return out


def mask_boxes(mask: np.ndarray, min_px: int = MIN_MASK_NUCLEUS_PX) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) of the connected components of a binary nucleus mask."""
    labels, _ = ndimage.label(ndimage.binary_fill_holes(mask))
    boxes = [
        (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        for sl in ndimage.find_objects(labels)
        if sl is not None and min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) >= min_px
    ]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def lbc_nuclei_tiles(root: Path) -> list[RealField]:
    """Liquid-based tiles with nucleus masks (Mendeley jks43dkjj7), as nucleus boxes."""
    base = root / "lbc_nuclei"
    _require(base / "images", "LBC nucleus tiles")
    out = []
    for path in sorted((base / "images").glob("*.jpg")):
        mask = np.asarray(Image.open(base / "masks" / path.name).convert("L")) > 127
        boxes = mask_boxes(mask)
        centres = box_centres(boxes)
        out.append(
            RealField(
                "lbc_nuclei",
                path.name,
                path.stem,
                path,
                LBC_NUCLEI_MPP,
                None,
                centres,
                boxes=boxes,
                exhaustive=True,
            )
        )
    return out


def lbc_fields(root: Path) -> list[RealField]:
    """Mendeley LBC fields with their ROI-level diagnosis, grouped by slide."""
    base = root / "lbc_mendeley"
    _require(base, "Mendeley LBC")
    return [
        RealField(
            "lbc",
            path.name,
            slide_of(path.name),
            path,
            LBC_MPP,
            LBC_TO_BETHESDA[cls],
            np.zeros((0, 2), np.float32),
            resize_to=LBC_LOAD_SIZE,
        )
        for cls in LBC_CLASSES
        for path in sorted((base / cls).glob("*.jpg"))
    ]


def sipakmed_metaplastic_fields(root: Path) -> list[RealField]:
    """Benign SIPaKMeD metaplastic fields; the annotated cells' box centres as points."""
    base = root / "sipakmed" / "Metaplastic" / "full_field"
    _require(base / "cell_bboxes.csv", "SIPaKMeD metaplastic fields")
    cells: dict[str, list[tuple[float, ...]]] = {}
    for row in _read_csv(base / "cell_bboxes.csv"):
        cells.setdefault(row["image"], []).append(
            tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))
        )
    out = []
    for name in sorted(cells):
        boxes = np.array(cells[name], np.float32).reshape(-1, 4)
        centres = box_centres(boxes)
        out.append(
            RealField(
                "sipakmed_metaplastic",
                name,
                name,
                base / "images" / name,
                SIPAKMED_MPP,
                "NILM",
                centres,
            )
        )
    return out


REAL_SETS: dict[str, Callable[[Path], list[RealField]]] = {
    "cric_fields": cric_fields,
    "cervix93": cervix93_frames,
    "isbi2014": isbi_fields,
    "lbc_nuclei": lbc_nuclei_tiles,
    "lbc": lbc_fields,
    "sipakmed_metaplastic": sipakmed_metaplastic_fields,
}


def field_parts(fields: list[RealField]) -> dict[str, str]:
    """Group -> `train` / `val` / `test` for the fields of one set (train/data/heldout.py)."""
    if not fields:
        return {}
    set_name = fields[0].set_name
    if set_name == "isbi2014":
        return {f.group: isbi_part(f.group) for f in fields}
    return assign_parts(set_name, [(f.group, f.label or "-") for f in fields])


def load_real_set(root: Path, set_name: str, part: str | None = None) -> list[RealField]:
    """The fields of one real set, or only those of one part (`train`, `val`, `test`).

    Raises:
        KeyError: Unknown set.
        FileNotFoundError: The set is not under `root`.
    """
    fields = REAL_SETS[set_name](root)
    if part is None:
        return fields
    parts = field_parts(fields)
    return [f for f in fields if parts[f.group] == part]
