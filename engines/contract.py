"""Whether the three models of a scan fit together, checked from their configs at load.

A scan runs `cell_detector` on ROI images, cuts cell crops from those images for
`cell_classifier`, and classifies each ROI from its cells with `roi_classifier`, which is
of one of two kinds, told apart by its input names (`roi_kind`):

- ``features``: it pools the classifier's per-cell `features` (attention MIL): inputs
  `cell_features` [N, D] and `cell_mask` [N];
- ``crops``: it reads the cells' pixels itself (paper 002's global-local network): inputs
  `cells` [N, 3, S, S], crops it has the scan cut for it by its own `preprocessing` (mpp,
  size, mean/std), and `mask` [N].

So:

- tensors: the detector takes `images` and returns `output0`; the cell classifier returns
  `probs` (and `features` for a ``features`` ROI classifier); the ROI classifier takes its
  kind's inputs and returns `roi_probs` and `attention`;
- sizes: `features` has as many values per cell as the last dimension of `cell_features`,
  and each classifier's class output has one value per label;
- classes: both classifiers carry identical labels in the same order, and declare the same
  explicit `severity` order (least to most severe, the normal class first), which the
  slide-level rules follow;
- resolution: the detector and the cell classifier expect the same mpp (the crops are cut
  from the detector's ROI images); a ``crops`` ROI classifier declares the mpp and size of
  its crops (any field: they are cut from the detector's ROI images and resampled).

`check_scan_models` raises `ModelContractError` (a `ModelLoadError`) with one sentence naming
the repository, the two models and what differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from engines.config import ModelConfig, TensorSpec
from engines.errors import ModelContractError

if TYPE_CHECKING:
    from engines.repository import ModelRepository

#: The scan's models, by role: detector, cell classifier, ROI classifier.
SCAN_MODELS = ("cell_detector", "cell_classifier", "roi_classifier")
DETECTOR_INPUTS = ("images",)
DETECTOR_OUTPUTS = ("output0",)
CLASSIFIER_OUTPUTS = ("probs", "features")
#: The inputs of each kind of ROI classifier (`roi_kind`).
ROI_INPUTS = {"features": ("cell_features", "cell_mask"), "crops": ("cells", "mask")}
ROI_OUTPUTS = ("roi_probs", "attention")
RoiKind = Literal["features", "crops"]
#: Relative difference below which two mpp values count as the same.
MPP_REL_TOL = 1e-6

_Refuse = Callable[[str], ModelContractError]


def check_scan_models(
    detector: ModelConfig,
    classifier: ModelConfig,
    roi: ModelConfig,
    repository: str | Path | None = None,
) -> None:
    """Refuses three model configs that cannot run one scan together.

    Args:
        detector: The `cell_detector` config.
        classifier: The `cell_classifier` config.
        roi: The `roi_classifier` config.
        repository: The repository named in the message; default the folder the configs
            were read from.

    Raises:
        ModelContractError: One sentence naming the repository, the two models that do not
            fit and what differs.
    """
    where = f"model repository {repository or _repository_of(detector, classifier, roi)}"

    def refuse(sentence: str) -> ModelContractError:
        return ModelContractError(f"{where}: {sentence}")

    kind = roi_kind(roi)
    _check_tensors(detector, classifier, roi, kind, refuse)
    _check_sizes(classifier, roi, kind, refuse)
    _check_labels(classifier, roi, refuse)
    _check_severity(classifier, roi, refuse)
    _check_mpp(detector, classifier, refuse)
    if kind == "crops":
        _check_crops(detector, roi, refuse)


def roi_kind(roi: ModelConfig) -> RoiKind:
    """``crops`` for an ROI classifier that takes the cells' crops (an input named `cells`),
    else ``features`` (it pools the cell classifier's features)."""
    return "crops" if any(spec.name == "cells" for spec in roi.inputs) else "features"


def check_scan_repository(
    repository: ModelRepository, names: tuple[str, str, str] = SCAN_MODELS
) -> tuple[ModelConfig, ModelConfig, ModelConfig]:
    """Reads the configs of a repository's scan models and checks that they fit together.

    Args:
        repository: The model repository.
        names: The detector, cell classifier and ROI classifier, in that order.

    Returns:
        The three configs, in the order of `names`.

    Raises:
        ModelNotFoundError: A model is missing.
        ModelConfigError: A config is invalid.
        ModelContractError: The models do not fit together.
    """
    detector, classifier, roi = (repository.config(name) for name in names)
    check_scan_models(detector, classifier, roi, repository.path)
    return detector, classifier, roi


def _repository_of(*configs: ModelConfig) -> str:
    folders = {str(c.path.parent.parent) for c in configs if c.path is not None}
    return folders.pop() if len(folders) == 1 else "(unnamed)"


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(spec.name for spec in specs) or "none"


def _listed(values: tuple[str, ...] | None) -> str:
    return f"[{', '.join(values or ())}]"


#: What the scan does with each tensor; `{partner}` is the other model involved.
_PURPOSE = {
    "images": "feed it the ROI images that {partner}'s crops are cut from",
    "output0": "find the cells {partner} classifies",
    "probs": "label each cell before {partner} pools them",
    "features": "hand {partner} its cell features",
    "cell_features": "hand it {partner}'s cell features",
    "cell_mask": "mark which of {partner}'s cells are real in each padded ROI",
    "cells": "hand it the crops of the cells {partner} finds",
    "mask": "mark which of {partner}'s cells are real in each padded ROI",
    "roi_probs": "classify each ROI from {partner}'s cells",
    "attention": "weigh {partner}'s cells within each ROI",
}


def _check_tensors(
    detector: ModelConfig,
    classifier: ModelConfig,
    roi: ModelConfig,
    kind: RoiKind,
    refuse: _Refuse,
) -> None:
    # A crops ROI classifier reads pixels: it needs no features, and its cells are the
    # detector's.
    classifier_outputs = CLASSIFIER_OUTPUTS if kind == "features" else ("probs",)
    wanted = (
        (detector, "input", DETECTOR_INPUTS, classifier),
        (detector, "output", DETECTOR_OUTPUTS, classifier),
        (classifier, "output", classifier_outputs, roi),
        (roi, "input", ROI_INPUTS[kind], classifier if kind == "features" else detector),
        (roi, "output", ROI_OUTPUTS, classifier),
    )
    for config, kind, names, partner in wanted:
        specs = config.inputs if kind == "input" else config.outputs
        have = {spec.name for spec in specs}
        for name in names:
            if name not in have:
                purpose = _PURPOSE[name].format(partner=partner.name)
                raise refuse(
                    f"{config.name} has no {kind} '{name}' (its {kind}s: {_names(specs)}), "
                    f"which the scan needs to {purpose}"
                )


def _check_sizes(classifier: ModelConfig, roi: ModelConfig, kind: RoiKind, refuse: _Refuse) -> None:
    if kind == "features":
        features = classifier.output("features").dims[-1]
        cell_features = roi.input("cell_features").dims[-1]
        if features != cell_features or features == -1:
            raise refuse(
                f"{classifier.name} and {roi.name} disagree on the cell feature size: "
                f"{classifier.name}'s output 'features' has {_size(features)} per cell but "
                f"{roi.name}'s input 'cell_features' takes {_size(cell_features)}"
            )
    for config, output in ((classifier, "probs"), (roi, "roi_probs")):
        classes = config.output(output).dims[-1]
        if classes != len(config.labels):
            partner = roi if config is classifier else classifier
            raise refuse(
                f"{config.name}'s output '{output}' has {_size(classes)} but its labels "
                f"{_listed(config.labels)} name {len(config.labels)} classes, so its classes "
                f"cannot be matched with {partner.name}'s"
            )


def _size(dim: int) -> str:
    return "a dynamic number of values" if dim == -1 else f"{dim} values"


def _check_labels(classifier: ModelConfig, roi: ModelConfig, refuse: _Refuse) -> None:
    if classifier.labels == roi.labels:
        return
    how = (
        "the same labels in a different order"
        if sorted(classifier.labels) == sorted(roi.labels)
        else "different labels"
    )
    raise refuse(
        f"{classifier.name} and {roi.name} carry {how}: {classifier.name} has "
        f"{_listed(classifier.labels)}, {roi.name} has {_listed(roi.labels)} "
        "(both must list the same classes in the same order)"
    )


def _check_severity(classifier: ModelConfig, roi: ModelConfig, refuse: _Refuse) -> None:
    missing = [c.name for c in (classifier, roi) if c.severity is None]
    if missing:
        declares = "declare" if len(missing) == 2 else "declares"
        others = [c for c in (classifier, roi) if c.severity is not None]
        besides = (
            f" while {others[0].name} declares {_listed(others[0].severity)}" if others else ""
        )
        raise refuse(
            f"{' and '.join(missing)} {declares} no severity order{besides}; {classifier.name} "
            f"and {roi.name} must both list their labels from least to most severe, normal "
            f"first (e.g. severity: {_listed(classifier.labels)} in config.yaml)"
        )
    if classifier.severity != roi.severity:
        raise refuse(
            f"{classifier.name} and {roi.name} disagree on the severity order: "
            f"{classifier.name} has {_listed(classifier.severity)}, {roi.name} has "
            f"{_listed(roi.severity)}"
        )


def _check_mpp(detector: ModelConfig, classifier: ModelConfig, refuse: _Refuse) -> None:
    for config, need in (
        (detector, "the mpp and size of its ROI images"),
        (classifier, "the mpp and size of its cell crops"),
    ):
        if config.preprocessing is None:
            partner = classifier if config is detector else detector
            raise refuse(
                f"{config.name} declares no preprocessing ({need}), so it cannot be matched "
                f"with {partner.name}"
            )
    det_mpp, cls_mpp = detector.preprocessing.mpp, classifier.preprocessing.mpp
    if not math.isclose(det_mpp, cls_mpp, rel_tol=MPP_REL_TOL):
        raise refuse(
            f"{detector.name} and {classifier.name} expect different resolutions: "
            f"{detector.name} {det_mpp:g} µm/px, {classifier.name} {cls_mpp:g} µm/px "
            "(the cell crops are cut from the detector's ROI images, so both must be equal)"
        )


def _check_crops(detector: ModelConfig, roi: ModelConfig, refuse: _Refuse) -> None:
    """A crops ROI classifier must say how its crops are cut: their mpp and size (any
    field fits: they are cut from the detector's ROI images and resampled)."""
    if roi.preprocessing is None:
        raise refuse(
            f"{roi.name} takes cell crops but declares no preprocessing (the mpp, size, "
            f"mean and std of its crops), so they cannot be cut from {detector.name}'s ROI "
            "images"
        )
