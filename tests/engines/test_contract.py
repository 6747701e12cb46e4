"""engines.contract: the three scan models must fit together, or load fails in one sentence.

Each case copies the shipped repository and edits one `config.yaml`, as a person exporting
a mismatched model would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engines.contract import SCAN_MODELS, check_scan_models, check_scan_repository
from engines.errors import ModelContractError, ModelLoadError, PapscanError
from engines.repository import ModelRepository, default_repository_path


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(default_repository_path(), tmp_path / "models"))


def edit_config(repo: Path, model: str, old: str, new: str) -> None:
    path = repo / model / "config.yaml"
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new))


def refusal(repo: Path) -> str:
    with pytest.raises(ModelContractError) as info:
        check_scan_repository(ModelRepository(repo))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model repository {repo}: ")
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, PapscanError)
    return message.removeprefix(f"model repository {repo}: ")


LABELS = "labels: [NILM, LSIL, HSIL]"
SEVERITY = "severity: [NILM, LSIL, HSIL]"
FEATURES = "{name: features, data_type: TYPE_FP32, dims: [64]}"
CLS_PRE = "preprocessing: {mpp: 0.5, input_size: [96, 96]"

# (case, edits as (model, old, new), the whole expected message after "model repository …: ")
MISMATCHES: list[tuple[str, list[tuple[str, str, str]], str]] = [
    (
        "labels differ",
        [
            ("roi_classifier", LABELS, "labels: [NILM, LSIL, SCC]"),
            ("roi_classifier", SEVERITY, "severity: [NILM, LSIL, SCC]"),
        ],
        "cell_classifier and roi_classifier carry different labels: cell_classifier has "
        "[NILM, LSIL, HSIL], roi_classifier has [NILM, LSIL, SCC] (both must list the same "
        "classes in the same order)",
    ),
    (
        "label order differs",
        [("roi_classifier", LABELS, "labels: [NILM, HSIL, LSIL]")],
        "cell_classifier and roi_classifier carry the same labels in a different order: "
        "cell_classifier has [NILM, LSIL, HSIL], roi_classifier has [NILM, HSIL, LSIL] "
        "(both must list the same classes in the same order)",
    ),
    (
        "severity missing on one",
        [("roi_classifier", SEVERITY, "")],
        "roi_classifier declares no severity order while cell_classifier declares "
        "[NILM, LSIL, HSIL]; cell_classifier and roi_classifier must both list their labels "
        "from least to most severe, normal first (e.g. severity: [NILM, LSIL, HSIL] in "
        "config.yaml)",
    ),
    (
        "severity missing on both",
        [("cell_classifier", SEVERITY, ""), ("roi_classifier", SEVERITY, "")],
        "cell_classifier and roi_classifier declare no severity order; cell_classifier and "
        "roi_classifier must both list their labels from least to most severe, normal first "
        "(e.g. severity: [NILM, LSIL, HSIL] in config.yaml)",
    ),
    (
        "severity differs",
        [("roi_classifier", SEVERITY, "severity: [NILM, HSIL, LSIL]")],
        "cell_classifier and roi_classifier disagree on the severity order: cell_classifier "
        "has [NILM, LSIL, HSIL], roi_classifier has [NILM, HSIL, LSIL]",
    ),
    (
        "feature size differs",
        [("cell_classifier", FEATURES, FEATURES.replace("[64]", "[128]"))],
        "cell_classifier and roi_classifier disagree on the cell feature size: "
        "cell_classifier's output 'features' has 128 values per cell but roi_classifier's "
        "input 'cell_features' takes 64 values",
    ),
    (
        "features renamed",
        [("cell_classifier", "{name: features,", "{name: embedding,")],
        "cell_classifier has no output 'features' (its outputs: probs, embedding), which the "
        "scan needs to hand roi_classifier its cell features",
    ),
    (
        "cell mask renamed",
        [("roi_classifier", "{name: cell_mask,", "{name: mask,")],
        "roi_classifier has no input 'cell_mask' (its inputs: cell_features, mask), which the "
        "scan needs to mark which of cell_classifier's cells are real in each padded ROI",
    ),
    (
        "detector input renamed",
        [("cell_detector", "{name: images,", "{name: image,")],
        "cell_detector has no input 'images' (its inputs: image), which the scan needs to feed "
        "it the ROI images that cell_classifier's crops are cut from",
    ),
    (
        "probs size differs from labels",
        [
            (
                "cell_classifier",
                "{name: probs, data_type: TYPE_FP32, dims: [3]}",
                "{name: probs, data_type: TYPE_FP32, dims: [4]}",
            )
        ],
        "cell_classifier's output 'probs' has 4 values but its labels [NILM, LSIL, HSIL] name "
        "3 classes, so its classes cannot be matched with roi_classifier's",
    ),
    (
        "mpp differs",
        [("cell_classifier", CLS_PRE, CLS_PRE.replace("mpp: 0.5", "mpp: 0.25"))],
        "cell_detector and cell_classifier expect different resolutions: cell_detector "
        "0.5 µm/px, cell_classifier 0.25 µm/px (the cell crops are cut from the detector's ROI "
        "images, so both must be equal)",
    ),
]


@pytest.mark.parametrize(
    ("edits", "message"),
    [pytest.param(edits, message, id=case) for case, edits, message in MISMATCHES],
)
def test_mismatched_models_are_refused_in_one_sentence(
    repo_copy: Path, edits: list[tuple[str, str, str]], message: str
) -> None:
    for model, old, new in edits:
        edit_config(repo_copy, model, old, new)
    assert refusal(repo_copy) == message


def test_the_shipped_repository_fits_together() -> None:
    detector, classifier, roi = check_scan_repository(ModelRepository(default_repository_path()))
    assert (detector.name, classifier.name, roi.name) == SCAN_MODELS
    assert classifier.severity == roi.severity == ("NILM", "LSIL", "HSIL")
    assert detector.severity is None  # one class: no order needed


def test_configs_without_a_path_name_no_repository(repo_copy: Path) -> None:
    edit_config(repo_copy, "roi_classifier", SEVERITY, "")
    repo = ModelRepository(repo_copy)
    configs = [repo.config(name) for name in SCAN_MODELS]
    with pytest.raises(ModelContractError, match=r"^model repository /elsewhere: roi_classifier"):
        check_scan_models(*configs, repository="/elsewhere")


def test_the_config_writers_declare_a_matching_severity(tmp_path: Path) -> None:
    """train's config writers declare `severity` (default: the labels' order) that fits."""
    import yaml

    from train.export.configs import classifier_config, roi_config

    repo = Path(shutil.copytree(default_repository_path(), tmp_path / "models"))
    labels = ["NILM", "LSIL", "HSIL"]
    write: Callable[[str, dict], None] = lambda name, raw: (  # noqa: E731
        (repo / name / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    )
    write("cell_classifier", classifier_config(96, 0.5, labels, 64))
    write("roi_classifier", roi_config(labels, 64))
    _, classifier, roi = check_scan_repository(ModelRepository(repo))
    assert classifier.severity == roi.severity == tuple(labels)

    write("roi_classifier", roi_config(labels, 64, severity=["NILM", "HSIL", "LSIL"]))
    assert "disagree on the severity order" in refusal(repo)
