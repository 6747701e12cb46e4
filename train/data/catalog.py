"""One entry point to every labelled image set: `open_image_set(spec, size_px)`.

Specs (`dataset_specs()`):

| spec | classes | images |
| --- | --- | --- |
| `herlev` | Herlev's 7 | 696 cells, 458 field groups |
| `herlev:binary` | normal / abnormal | as `herlev` |
| `herlev:bethesda` | NILM / LSIL / HSIL | as `herlev` |
| `sipakmed` | SIPaKMeD's 5 | cells of the first layout present (`train.data.sipakmed`) |
| `cric` | 6 Bethesda | nucleus-centred 100 px cells of the images present |
| `sipakmed+cric` | paper 004's 11 (CRIC's 6, then SIPaKMeD's 5) | both sets |
| `lbc` | NL / LSIL / HSIL / SCC (ROI labels) | 693 whole fields |
| a folder path | its subfolders, sorted | the images in each subfolder |

Every image comes back `size_px` square. Single-cell crops that are not square (SIPaKMeD's
cell boxes, a class folder's images) are padded with white to a square, then resized, so
a cell keeps its shape; Herlev, CRIC crops and LBC fields are square already and are only
resized (LBC fields keep the stretch they were stored with).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from train.data.cric import load_cric
from train.data.crops import read_square_rgb
from train.data.herlev import herlev_image_set
from train.data.labels import SIPAKMED_CRIC_CLASSES
from train.data.lbc import load_lbc
from train.data.paths import default_data_root
from train.data.sipakmed import load_sipakmed
from train.data.types import ImageSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Loader = Callable[[Path, int], ImageSet]


def _sipakmed_cric(root: Path, size_px: int) -> ImageSet:
    """SIPaKMeD and CRIC in paper 004's 11 classes; groups kept apart between the sets."""
    parts = [load_cric(root, size_px), load_sipakmed(root, size_px)]
    labels, groups, offset = [], [], 0
    for part in parts:
        to_union = np.asarray([SIPAKMED_CRIC_CLASSES.index(c) for c in part.classes], np.int64)
        labels.append(to_union[part.labels])
        _, local = np.unique(part.group_ids, return_inverse=True)
        groups.append(local + offset)
        offset += local.max() + 1 if len(local) else 0
    return ImageSet(
        "sipakmed+cric",
        np.concatenate([p.images for p in parts]),
        np.concatenate(labels),
        SIPAKMED_CRIC_CLASSES,
        [s for p in parts for s in p.sources],
        np.concatenate(groups).astype(np.int64),
    )


# spec -> (folders under the data root it reads, loader)
_SPECS: dict[str, tuple[tuple[str, ...], Loader]] = {
    "herlev": (("herlev",), lambda root, size: herlev_image_set(root, size, "classes")),
    "herlev:binary": (("herlev",), lambda root, size: herlev_image_set(root, size, "binary")),
    "herlev:bethesda": (("herlev",), lambda root, size: herlev_image_set(root, size, "bethesda")),
    "sipakmed": (("sipakmed",), load_sipakmed),
    "cric": (("cric",), load_cric),
    "sipakmed+cric": (("sipakmed", "cric"), _sipakmed_cric),
    "lbc": (("lbc_mendeley",), load_lbc),
}


def dataset_specs() -> list[str]:
    """The named specs `open_image_set` takes (besides a folder path)."""
    return list(_SPECS)


def load_class_folders(folder: Path, size_px: int) -> ImageSet:
    """Load a folder of class subfolders of images (classes sorted by name).

    Args:
        folder: Holds one subfolder per class (hidden ones are skipped).
        size_px: Side of the returned images (padded with white to square, then resized).

    Returns:
        An `ImageSet` named by the folder, one group per image.

    Raises:
        FileNotFoundError: The folder has no class subfolder, or no image in them.
    """
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders.")
    images, labels, sources = [], [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_square_rgb(path, size_px))
                labels.append(label)
                sources.append(f"{cls}/{path.name}")
    if not images:
        raise FileNotFoundError(f"the class subfolders of {folder} hold no {IMAGE_SUFFIXES} image.")
    return ImageSet(
        str(folder), np.stack(images), np.asarray(labels, np.int64), tuple(classes), sources
    )


def open_image_set(spec: str, size_px: int, root: Path | None = None) -> ImageSet:
    """Open a labelled image set by name, or a folder of class subfolders.

    Args:
        spec: One of `dataset_specs()`, or the path of a folder of class subfolders.
        size_px: Side of the returned (square) images.
        root: The shared data folder; defaults to `train.data.paths.default_data_root()`.

    Returns:
        The `ImageSet`, named by the spec.

    Raises:
        ValueError: `size_px` is not positive, or `spec` is neither a known name nor a path.
        FileNotFoundError: The set's folder (or the given path) does not exist.
    """
    if isinstance(size_px, bool) or not isinstance(size_px, int) or size_px < 1:
        raise ValueError(f"size_px must be a positive integer, got {size_px!r}")
    if spec in _SPECS:
        root = default_data_root() if root is None else Path(root)
        folders, loader = _SPECS[spec]
        for name in folders:
            if not (root / name).is_dir():
                present = (
                    sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                )
                raise FileNotFoundError(
                    f"dataset '{spec}' needs {root / name}, which does not exist "
                    f"({root} holds: {', '.join(present) or 'nothing'})."
                )
        return loader(root, size_px)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_class_folders(path, size_px)
    if path.exists() or "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"{spec} is not a folder of class subfolders.")
    raise ValueError(
        f"unknown dataset '{spec}'; use one of {', '.join(dataset_specs())} "
        "or the path of a folder of class subfolders"
    )
