"""What the dataset loaders return: labelled images, and ROIs as bags of cell crops.

Every loader (Herlev, SIPaKMeD, CRIC, the Mendeley LBC set, class folders) returns an
`ImageSet`; the ROI networks train on `CellBags` (cells detected in each field and cut at a
fixed size). Both carry their class names and per-item sources, and hash themselves so a
run folder can say exactly which data it saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def _digest(*arrays: np.ndarray, names: tuple[str, ...], sources: list[str]) -> str:
    h = hashlib.sha256()
    h.update("\n".join(names).encode())
    h.update("\n".join(sources).encode())
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ImageSet:
    """Images with one class each.

    Attributes:
        name: The dataset spec it was opened with (`herlev`, `herlev:binary`, …).
        images: [N, H, W, 3] uint8 RGB, all one size.
        labels: [N] int64 indices into `classes`.
        classes: Class names, index order.
        sources: [N] where each image came from (relative path, crop id).
        groups: [N] int64 group ids: items of one group (crops of one field) are never
            split between train and test. Defaults to one group per item.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    sources: list[str]
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be [N, H, W, 3] uint8")
        if len(self.labels) != n or len(self.sources) != n:
            raise ValueError(f"{self.name}: images, labels and sources differ in length")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"{self.name}: groups and images differ in length")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: a label is outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def group_ids(self) -> np.ndarray:
        """Group of each item (its own index where no groups were given)."""
        return np.arange(len(self)) if self.groups is None else self.groups

    def sha256(self) -> str:
        """Hash of class names, sources, labels and pixels."""
        return _digest(self.labels, self.images, names=self.classes, sources=self.sources)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The items at `index`, in that order."""
        index = np.asarray(index, np.int64)
        return ImageSet(
            self.name,
            self.images[index],
            self.labels[index],
            self.classes,
            [self.sources[i] for i in index],
            None if self.groups is None else self.groups[index],
        )


@dataclass(frozen=True)
class CellBags:
    """ROIs (fields) as bags of fixed-size cell crops, one class per ROI.

    Attributes:
        name: The dataset spec it was built from (`lbc`, …).
        crops: [R, N, S, S, 3] uint8, N cells per ROI at most, padded with white.
        mask: [R, N] bool, True where a slot holds a real cell.
        labels: [R] int64 indices into `classes`.
        classes: ROI class names.
        sources: [R] the field each bag came from.
        centres_px: [R, N, 2] (x, y) of each cell in its field's pixels (0 where padded).
    """

    name: str
    crops: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    sources: list[str]
    centres_px: np.ndarray

    def __post_init__(self) -> None:
        r = len(self.crops)
        if self.crops.ndim != 5 or self.crops.dtype != np.uint8:
            raise ValueError(f"{self.name}: crops must be [R, N, S, S, 3] uint8")
        if self.mask.shape != self.crops.shape[:2] or len(self.labels) != r:
            raise ValueError(f"{self.name}: crops, mask and labels disagree in shape")
        if len(self.sources) != r or self.centres_px.shape != (*self.crops.shape[:2], 2):
            raise ValueError(f"{self.name}: sources or centres disagree with crops")

    def __len__(self) -> int:
        return len(self.crops)

    def sha256(self) -> str:
        """Hash of class names, sources, labels, masks and pixels."""
        return _digest(self.labels, self.mask, self.crops, names=self.classes, sources=self.sources)

    def subset(self, index: np.ndarray) -> CellBags:
        """The bags at `index`, in that order."""
        index = np.asarray(index, np.int64)
        return CellBags(
            self.name,
            self.crops[index],
            self.mask[index],
            self.labels[index],
            self.classes,
            [self.sources[i] for i in index],
            self.centres_px[index],
        )
