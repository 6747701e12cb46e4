"""CRIC Cervix (Rezende et al., Scientific Data 2021): cells cut around their nucleus.

`<data>/cric/classifications.csv` lists 11,534 cells of 400 conventional Pap smear images
(1376x1020 PNG): `image_id, image_filename, image_doi, cell_id, bethesda_system,
nucleus_x, nucleus_y`. Each cell becomes a fixed-size square centred on its nucleus, cut
as the scanner cuts it (`engines.preprocess.cut_crops`, white beyond the image; 100 px by
default, the size of CRIC's own cell crops), resized to the requested size. Classes are
the six Bethesda ones (`BETHESDA_CLASSES`; the table's "Negative for intraepithelial
lesion" is NILM); cells of one image share a group.

Only the images present are used: papscan's shared data holds the table and 1 of the 400
images, so the other rows are skipped (and counted in one log line).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from engines.preprocess import cut_crops
from train.data.crops import fit_square
from train.data.labels import BETHESDA_CLASSES, CRIC_TO_BETHESDA
from train.data.types import ImageSet

logger = logging.getLogger(__name__)

CRIC_CROP_PX = 100
CRIC_COLUMNS = (
    "image_id",
    "image_filename",
    "cell_id",
    "bethesda_system",
    "nucleus_x",
    "nucleus_y",
)


def read_cric_table(path: Path) -> list[dict[str, str]]:
    """Read `classifications.csv` as rows of strings.

    Raises:
        FileNotFoundError: The table is missing.
        ValueError: A needed column is missing, or a class is not a CRIC Bethesda class.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CRIC table not found at {path}.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CRIC_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}")
        rows = list(reader)
    unknown = sorted({r["bethesda_system"] for r in rows} - set(CRIC_TO_BETHESDA))
    if unknown:
        raise ValueError(f"{path}: unknown Bethesda classes {unknown}")
    return rows


def load_cric(
    root: Path,
    size_px: int,
    crop_px: int = CRIC_CROP_PX,
    images_dir: Path | None = None,
) -> ImageSet:
    """Load every CRIC cell whose image is present, as a nucleus-centred square.

    Args:
        root: The shared data folder (holding `cric/classifications.csv`).
        size_px: Side of the returned images.
        crop_px: Side of the square cut around each nucleus, in source-image pixels.
        images_dir: Folder of the PNG images; defaults to `root/cric/full_images`.

    Returns:
        An `ImageSet` named `cric` with `BETHESDA_CLASSES`, grouped by image.

    Raises:
        FileNotFoundError: The table is missing, or none of its images is present.
        ValueError: `crop_px` is not positive, or the table is malformed.
    """
    if crop_px < 1:
        raise ValueError(f"crop_px must be positive, got {crop_px}")
    base = root / "cric"
    images_dir = base / "full_images" if images_dir is None else images_dir
    rows = read_cric_table(base / "classifications.csv")
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image_filename"], []).append(row)
    present = [name for name in sorted(by_image) if (images_dir / name).is_file()]
    if not present:
        raise FileNotFoundError(f"none of the {len(by_image)} CRIC images is in {images_dir}.")
    images, labels, sources, groups = [], [], [], []
    for name in present:
        cells = by_image[name]
        with Image.open(images_dir / name) as opened:
            image = np.asarray(opened.convert("RGB"))
        centres = np.asarray([[float(r["nucleus_x"]), float(r["nucleus_y"])] for r in cells])
        for row, crop in zip(cells, cut_crops(image, centres, crop_px, crop_px), strict=True):
            images.append(fit_square(Image.fromarray(crop), size_px))
            labels.append(BETHESDA_CLASSES.index(CRIC_TO_BETHESDA[row["bethesda_system"]]))
            sources.append(f"cric/{name}#cell{row['cell_id']}")
            groups.append(int(row["image_id"]))
    skipped = len(rows) - len(images)
    logger.info(
        "cric: %d cells from %d of %d images; %d cells skipped (image not in %s)",
        len(images),
        len(present),
        len(by_image),
        skipped,
        images_dir,
    )
    return ImageSet(
        "cric",
        np.stack(images),
        np.asarray(labels, np.int64),
        BETHESDA_CLASSES,
        sources,
        np.asarray(groups, np.int64),
    )
