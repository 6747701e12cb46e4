"""engines.contract: the three scan models must fit together, or load fails in one sentence.

Each case copies the shipped repository and edits one `config.yaml`, as a person exporting
a mismatched model would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engines.contract import SCAN_MODELS, check_scan_models, check_scan_repository, roi_kind
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
FEATURES = "{name: features, data_type: TYPE_FP32, dims: [128]}"
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
        [("cell_classifier", FEATURES, FEATURES.replace("[128]", "[64]"))],
        "cell_classifier and roi_classifier disagree on the cell feature size: "
        "cell_classifier's output 'features' has 64 values per cell but roi_classifier's "
        "input 'cell_features' takes 128 values",
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


# --- an ROI classifier of kind "crops" (paper 002's global-local network) ----------------


def write_glan(repo: Path, **overrides: object) -> dict:
    """Writes a global-local `roi_classifier` config (as `papscan export` of a rois run
    does) into `repo`, with top-level `overrides` (None removes a key); returns it."""
    import yaml

    from train.export.configs import global_local_config

    raw = global_local_config(32, ["NILM", "LSIL", "HSIL"], 3, mpp=1.5)
    for key, value in overrides.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (repo / "roi_classifier" / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def test_a_crops_roi_classifier_fits_at_any_field(repo_copy: Path) -> None:
    """Cells, mask in; its crops' own mpp and size (32 px at 1.5 µm/px: a 48 µm field cut
    from the detector's 0.5 µm/px ROI images), not the cell classifier's."""
    write_glan(repo_copy)
    detector, classifier, roi = check_scan_repository(ModelRepository(repo_copy))
    assert roi_kind(roi) == "crops" and roi_kind(classifier) == "features"
    assert roi.preprocessing is not None and roi.preprocessing.input_size == (32, 32)
    assert roi.preprocessing.mpp != detector.preprocessing.mpp
    assert roi.severity == classifier.severity == ("NILM", "LSIL", "HSIL")
    # It reads pixels: the cell classifier need not hand it features.
    edit_config(repo_copy, "cell_classifier", f"\n  - {FEATURES}", "")
    check_scan_repository(ModelRepository(repo_copy))


def _glan_io(raw: dict, part: str, name: str, new_name: str | None) -> list[dict]:
    """`raw[part]` with tensor `name` renamed to `new_name` (None: removed)."""
    specs = [dict(spec) for spec in raw[part] if new_name is not None or spec["name"] != name]
    for spec in specs:
        if spec["name"] == name:
            spec["name"] = new_name
    return specs


def _glan_case(**overrides: object) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        write_glan(repo, **overrides)

    return edit


def _glan_renamed(part: str, name: str, new_name: str | None) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        raw = write_glan(repo)
        write_glan(repo, **{part: _glan_io(raw, part, name, new_name)})

    return edit


CROPS_MISMATCHES: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "no preprocessing",
        _glan_case(preprocessing=None),
        "roi_classifier takes cell crops but declares no preprocessing (the mpp, size, mean "
        "and std of its crops), so they cannot be cut from cell_detector's ROI images",
    ),
    (
        "labels differ",
        _glan_case(labels=["NL", "LSIL", "HSIL"], severity=["NL", "LSIL", "HSIL"]),
        "cell_classifier and roi_classifier carry different labels: cell_classifier has "
        "[NILM, LSIL, HSIL], roi_classifier has [NL, LSIL, HSIL] (both must list the same "
        "classes in the same order)",
    ),
    (
        "severity differs",
        _glan_case(severity=["NILM", "HSIL", "LSIL"]),
        "cell_classifier and roi_classifier disagree on the severity order: cell_classifier "
        "has [NILM, LSIL, HSIL], roi_classifier has [NILM, HSIL, LSIL]",
    ),
    (
        "mask renamed",
        _glan_renamed("input", "mask", "cell_mask"),
        "roi_classifier has no input 'mask' (its inputs: cells, cell_mask), which the scan "
        "needs to mark which of cell_detector's cells are real in each padded ROI",
    ),
    (
        "no attention output",
        _glan_renamed("output", "attention", None),
        "roi_classifier has no output 'attention' (its outputs: roi_probs, cell_probs), which "
        "the scan needs to weigh cell_classifier's cells within each ROI",
    ),
    (
        "roi_probs size differs from labels",
        _glan_case(
            output=[
                {"name": "roi_probs", "data_type": "TYPE_FP32", "dims": [4]},
                {"name": "attention", "data_type": "TYPE_FP32", "dims": [-1]},
            ]
        ),
        "roi_classifier's output 'roi_probs' has 4 values but its labels [NILM, LSIL, HSIL] "
        "name 3 classes, so its classes cannot be matched with cell_classifier's",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"),
    [pytest.param(edit, message, id=case) for case, edit, message in CROPS_MISMATCHES],
)
def test_mismatched_crops_roi_classifiers_are_refused_in_one_sentence(
    repo_copy: Path, edit: Callable[[Path], None], message: str
) -> None:
    edit(repo_copy)
    assert refusal(repo_copy) == message
