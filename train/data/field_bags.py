"""Fields as bags of cell features, computed by a model repository as a scan computes them.

The ROI classifier consumes what the scan gives it: the cell classifier's `features` of
the crops cut around the cells the detector found. `field_bag` reproduces that path with
the repository's own engines (`engines.model.Model`): the detector over the field at its
mpp (tiled, cores kept, as the worker does), `engines.preprocess.cut_crops` with the
classifier's field, the classifier's `features` and `probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.model import Model
from engines.postprocess import box_centres
from engines.preprocess import cut_crops, to_input
from train.data.lbc import detect_field
from train.data.real_fields import RealField
from train.data.scanner_crops import resample_to_mpp


@dataclass(frozen=True)
class FieldBag:
    """One field's detected cells.

    Attributes:
        features: [N, D] float32 cell-classifier features.
        probs: [N, C] float32 cell-classifier probabilities.
        centres: [N, 2] nucleus centres, px at the detector's mpp.
    """

    features: np.ndarray
    probs: np.ndarray
    centres: np.ndarray


def classify_crops(classifier: Model, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`features` and `probs` of uint8 NHWC crops through the repository's classifier."""
    config = classifier.config
    if not len(crops):
        dim = next(o.dims[-1] for o in config.outputs if o.name == "features")
        return np.zeros((0, dim), np.float32), np.zeros((0, len(config.labels)), np.float32)
    out = classifier.infer({config.inputs[0].name: to_input(crops, config.preprocessing)})
    return out["features"], out["probs"]


def field_bag(field: RealField, detector: Model, classifier: Model) -> FieldBag:
    """Detect, cut and classify one field's cells as a scan of it would."""
    prep = detector.config.preprocessing
    image = resample_to_mpp(field.load(), field.mpp, prep.mpp)
    post = detector.config.postprocessing
    found = detect_field(detector, image, post["conf_threshold"], post["iou_threshold"])
    centres = box_centres(found.boxes)
    c_prep = classifier.config.preprocessing
    field_px = round(c_prep.input_size[0] * c_prep.mpp / prep.mpp)
    crops = cut_crops(image, centres, field_px, c_prep.input_size[0])
    features, probs = classify_crops(classifier, crops)
    return FieldBag(features.astype(np.float32), probs.astype(np.float32), centres)
