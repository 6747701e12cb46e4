"""engines.config: the contract's config.yaml files parse; every mistake is one sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.backends import BACKENDS
from engines.config import (
    DynamicBatching,
    ModelConfig,
    Preprocessing,
    TensorSpec,
    VersionPolicy,
    Warmup,
    load_config,
)
from engines.errors import ModelConfigError, PapscanError

# The three configs of the contracts, verbatim.
CONTRACT_CONFIGS = {
    "cell_detector": """\
name: cell_detector
backend: [onnxruntime]          # preference order; only onnxruntime exists in the spine
max_batch_size: 8
version_policy: {latest: 1}     # or "all" or {specific: [1, 2]}
input:
  - {name: images, data_type: TYPE_FP32, dims: [3, 512, 512]}
output:
  - {name: output0, data_type: TYPE_FP32, dims: [5, -1]}
preprocessing: {mpp: 0.5, input_size: [512, 512], mean: [0.0, 0.0, 0.0], std: [255.0, 255.0, 255.0], channel_order: RGB, layout: NCHW}
labels: [nucleus]
postprocessing: {kind: yolo, conf_threshold: 0.25, iou_threshold: 0.5}
""",  # noqa: E501
    "cell_classifier": """\
name: cell_classifier
backend: [onnxruntime]
max_batch_size: 256
input:  [{name: crops, data_type: TYPE_FP32, dims: [3, 96, 96]}]
output: [{name: probs, data_type: TYPE_FP32, dims: [3]}, {name: features, data_type: TYPE_FP32, dims: [64]}]
preprocessing: {mpp: 0.5, input_size: [96, 96], mean: [123.7, 116.3, 103.5], std: [58.4, 57.1, 57.4], channel_order: RGB, layout: NCHW}
labels: [NILM, LSIL, HSIL]
""",  # noqa: E501
    "roi_classifier": """\
name: roi_classifier
backend: [onnxruntime]
max_batch_size: 16
input:  [{name: cell_features, data_type: TYPE_FP32, dims: [-1, 64]}, {name: cell_mask, data_type: TYPE_FP32, dims: [-1]}]   # mask 1 = real cell, 0 = padding
output: [{name: roi_probs, data_type: TYPE_FP32, dims: [3]}, {name: attention, data_type: TYPE_FP32, dims: [-1]}]
labels: [NILM, LSIL, HSIL]
""",  # noqa: E501
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
def test_contract_configs_parse(tmp_path: Path, name: str) -> None:
    config = load_config(_write(tmp_path, name, CONTRACT_CONFIGS[name]))
    assert isinstance(config, ModelConfig)
    assert config.name == name
    assert config.backend == ("onnxruntime",)
    assert config.version_policy == VersionPolicy(kind="latest", latest=1)
    assert all(spec.dtype == np.float32 for spec in config.inputs + config.outputs)
    assert config.path == tmp_path / name / "config.yaml"


def test_detector_fields(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "cell_detector", CONTRACT_CONFIGS["cell_detector"]))
    assert config.max_batch_size == 8
    assert config.inputs == (TensorSpec("images", "TYPE_FP32", (3, 512, 512)),)
    assert config.outputs == (TensorSpec("output0", "TYPE_FP32", (5, -1)),)
    assert config.preprocessing == Preprocessing(
        mpp=0.5,
        input_size=(512, 512),
        mean=(0.0, 0.0, 0.0),
        std=(255.0, 255.0, 255.0),
        channel_order="RGB",
        layout="NCHW",
    )
    assert config.labels == ("nucleus",)
    assert config.postprocessing == {"kind": "yolo", "conf_threshold": 0.25, "iou_threshold": 0.5}
    assert config.dynamic_batching is None
    assert config.full_shape(config.inputs[0], 4) == (4, 3, 512, 512)


def test_roi_classifier_has_no_preprocessing(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "roi_classifier", CONTRACT_CONFIGS["roi_classifier"]))
    assert config.preprocessing is None
    assert config.postprocessing == {}
    assert [spec.dims for spec in config.inputs] == [(-1, 64), (-1,)]


@pytest.mark.parametrize(
    ("data_type", "dtype"),
    [
        ("TYPE_FP32", np.float32),
        ("TYPE_FP16", np.float16),
        ("TYPE_INT64", np.int64),
        ("TYPE_INT32", np.int32),
        ("TYPE_UINT8", np.uint8),
        ("TYPE_BOOL", np.bool_),
    ],
)
def test_data_types_map_to_numpy(data_type: str, dtype: type) -> None:
    assert TensorSpec("x", data_type, (1,)).dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    ("yaml_policy", "expected", "served"),
    [
        (None, VersionPolicy("latest", 1), [7]),
        ("{latest: 2}", VersionPolicy("latest", 2), [3, 7]),
        ("all", VersionPolicy("all"), [1, 3, 7]),
        ("{all: {}}", VersionPolicy("all"), [1, 3, 7]),
        ("{specific: [3, 1, 9]}", VersionPolicy("specific", versions=(1, 3, 9)), [1, 3]),
    ],
)
def test_version_policies(
    tmp_path: Path, yaml_policy: str | None, expected: VersionPolicy, served: list[int]
) -> None:
    text = CONTRACT_CONFIGS["cell_classifier"]
    if yaml_policy is not None:
        text += f"version_policy: {yaml_policy}\n"
    config = load_config(_write(tmp_path, "cell_classifier", text))
    assert config.version_policy == expected
    assert config.version_policy.select([7, 1, 3]) == served


@pytest.mark.parametrize("delay", ["max_queue_delay_ms: 2", "max_queue_delay_microseconds: 2000"])
def test_dynamic_batching_is_parsed(tmp_path: Path, delay: str) -> None:
    text = CONTRACT_CONFIGS["cell_classifier"] + (
        f"dynamic_batching: {{preferred_batch_size: [256, 64], {delay}}}\n"
    )
    config = load_config(_write(tmp_path, "cell_classifier", text))
    assert config.dynamic_batching == DynamicBatching((64, 256), 2.0)


def test_instances_precision_and_warmup_are_parsed(tmp_path: Path) -> None:
    text = CONTRACT_CONFIGS["cell_classifier"] + (
        "instance_count: 2\nprecision: INT8\nwarmup: {batch_sizes: [8, 1], data: random}\n"
    )
    config = load_config(_write(tmp_path, "cell_classifier", text))
    assert (config.instance_count, config.precision) == (2, "INT8")
    assert config.warmup == Warmup(batch_sizes=(1, 8), data="random")


def test_defaults_of_the_optional_fields(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "cell_classifier", CONTRACT_CONFIGS["cell_classifier"]))
    assert (config.instance_count, config.precision) == (1, "FP16")
    assert config.warmup == Warmup()
    assert config.severity is None


@pytest.mark.parametrize(
    ("labels", "severity"),
    [
        ("[NILM, LSIL, HSIL]", "[NILM, LSIL, HSIL]"),
        ("[NILM, HSIL, LSIL]", "[NILM, LSIL, HSIL]"),  # outputs in another order than severity
    ],
)
def test_severity_is_parsed(tmp_path: Path, labels: str, severity: str) -> None:
    text = CONTRACT_CONFIGS["cell_classifier"].replace("labels: [NILM, LSIL, HSIL]", "")
    text += f"labels: {labels}\nseverity: {severity}\n"
    config = load_config(_write(tmp_path, "cell_classifier", text))
    assert config.severity == ("NILM", "LSIL", "HSIL")


def test_severity_needs_labels(tmp_path: Path) -> None:
    text = CONTRACT_CONFIGS["cell_classifier"].replace("labels: [NILM, LSIL, HSIL]", "")
    path = _write(tmp_path, "cell_classifier", text + "severity: [NILM]\n")
    with pytest.raises(ModelConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: severity must be given only with labels, got ['NILM']"


def _set(key: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        raw[key] = value

    return edit


def _drop(key: str) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        del raw[key]

    return edit


def _edit_input(key: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        raw["input"][0][key] = value

    return edit


def _edit_pre(key: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        if value is _MISSING:
            del raw["preprocessing"][key]
        else:
            raw["preprocessing"][key] = value

    return edit


_MISSING = object()

# (case, edit of a valid config, the whole expected message after "<path>: ")
CONFIG_ERRORS = [
    ("missing name", _drop("name"), "name is required (the model's folder name)"),
    ("missing input", _drop("input"), "input is required (a list of tensors)"),
    (
        "missing max_batch_size",
        _drop("max_batch_size"),
        "max_batch_size is required (a non-negative integer)",
    ),
    (
        "max_batch_size wrong type",
        _set("max_batch_size", "eight"),
        "max_batch_size must be a non-negative integer, got 'eight'",
    ),
    (
        "max_batch_size negative",
        _set("max_batch_size", -1),
        "max_batch_size must be a non-negative integer, got -1",
    ),
    (
        "max_batch_size bool",
        _set("max_batch_size", True),
        "max_batch_size must be a non-negative integer, got True",
    ),
    (
        "unknown key",
        _set("platform", "onnxruntime_onnx"),
        "unknown field 'platform' (known fields: name, backend, max_batch_size, version_policy, "
        "input, output, dynamic_batching, instance_count, precision, warmup, preprocessing, "
        "labels, severity, postprocessing)",
    ),
    (
        "name mismatch",
        _set("name", "cell_detector"),
        "name must be the model's folder name 'tiny_classifier', got 'cell_detector'",
    ),
    (
        "unknown backend",
        _set("backend", ["onnxruntime", "tensorflow"]),
        f"backend[1] must be one of {', '.join(BACKENDS)}, got 'tensorflow'",
    ),
    (
        "backend not a list",
        _set("backend", "onnxruntime"),
        f"backend must be a non-empty list of backend names from {', '.join(BACKENDS)}, "
        "got 'onnxruntime'",
    ),
    (
        "bad data_type",
        _edit_input("data_type", "TYPE_FLOAT"),
        "input[0].data_type must be one of TYPE_FP32, TYPE_FP16, TYPE_INT64, TYPE_INT32, "
        "TYPE_UINT8, TYPE_BOOL, got 'TYPE_FLOAT'",
    ),
    (
        "dims zero",
        _edit_input("dims", [3, 0, 4]),
        "input[0].dims[1] must be a positive integer or -1, got 0",
    ),
    (
        "dims below -1",
        _edit_input("dims", [3, -2, 4]),
        "input[0].dims[1] must be a positive integer or -1, got -2",
    ),
    (
        "dims float",
        _edit_input("dims", [3, 4.5, 4]),
        "input[0].dims[1] must be a positive integer or -1, got 4.5",
    ),
    (
        "dims not a list",
        _edit_input("dims", "3x4x4"),
        "input[0].dims must be a non-empty list of positive integers or -1, got '3x4x4'",
    ),
    (
        "tensor unknown key",
        _edit_input("format", "FORMAT_NCHW"),
        "unknown field 'format' in input[0] (known fields: name, data_type, dims)",
    ),
    (
        "tensor missing dims",
        lambda raw: raw["input"][0].pop("dims"),
        "input[0].dims is required (a list of positive integers or -1)",
    ),
    (
        "duplicate output names",
        lambda raw: raw["output"].append(dict(raw["output"][0])),
        "output[2].name must be unique among the tensors, got 'probs'",
    ),
    (
        "labels not strings",
        _set("labels", ["NILM", 2]),
        "labels must be a list of non-empty strings, got ['NILM', 2]",
    ),
    (
        "severity not a permutation of labels",
        _set("severity", ["NILM", "LSIL"]),
        "severity must be the labels ['NILM', 'LSIL', 'HSIL'] ordered from least to most "
        "severe, each once, starting with the normal class 'NILM', got ['NILM', 'LSIL']",
    ),
    (
        "severity with an unknown label",
        _set("severity", ["NILM", "LSIL", "SCC"]),
        "severity must be the labels ['NILM', 'LSIL', 'HSIL'] ordered from least to most "
        "severe, each once, starting with the normal class 'NILM', got ['NILM', 'LSIL', 'SCC']",
    ),
    (
        "severity not normal first",
        _set("severity", ["LSIL", "NILM", "HSIL"]),
        "severity must be the labels ['NILM', 'LSIL', 'HSIL'] ordered from least to most "
        "severe, each once, starting with the normal class 'NILM', got ['LSIL', 'NILM', 'HSIL']",
    ),
    (
        "severity repeats a label",
        _set("severity", ["NILM", "LSIL", "HSIL", "HSIL"]),
        "severity must be the labels ['NILM', 'LSIL', 'HSIL'] ordered from least to most "
        "severe, each once, starting with the normal class 'NILM', "
        "got ['NILM', 'LSIL', 'HSIL', 'HSIL']",
    ),
    (
        "severity not a list",
        _set("severity", "NILM < LSIL < HSIL"),
        "severity must be the labels ['NILM', 'LSIL', 'HSIL'] ordered from least to most "
        "severe, each once, starting with the normal class 'NILM', got 'NILM < LSIL < HSIL'",
    ),
    (
        "version policy latest zero",
        _set("version_policy", {"latest": 0}),
        "version_policy.latest must be a positive integer, got 0",
    ),
    (
        "version policy unknown",
        _set("version_policy", "newest"),
        "version_policy must be all, {latest: N}, {all: {}} or {specific: [versions]}, "
        "got 'newest'",
    ),
    (
        "version policy specific",
        _set("version_policy", {"specific": ["v1"]}),
        "version_policy.specific must be a non-empty list of positive integers, got ['v1']",
    ),
    (
        "preprocessing mpp",
        _edit_pre("mpp", 0),
        "preprocessing.mpp must be a positive number of microns per pixel, got 0",
    ),
    (
        "preprocessing missing std",
        _edit_pre("std", _MISSING),
        "preprocessing.std is required (see the config.yaml format)",
    ),
    (
        "preprocessing input_size",
        _edit_pre("input_size", [4]),
        "preprocessing.input_size must be [width, height] in positive integer pixels, got [4]",
    ),
    (
        "preprocessing mean length",
        _edit_pre("mean", [0.0, 0.0]),
        "preprocessing.mean must be a list of 3 numbers, one per channel, got [0.0, 0.0]",
    ),
    (
        "preprocessing std zero",
        _edit_pre("std", [1.0, 0.0, 1.0]),
        "preprocessing.std must be a list of 3 positive numbers, one per channel, "
        "got [1.0, 0.0, 1.0]",
    ),
    (
        "preprocessing channel order",
        _edit_pre("channel_order", "RGBA"),
        "preprocessing.channel_order must be RGB or BGR, got 'RGBA'",
    ),
    (
        "preprocessing layout",
        _edit_pre("layout", "CHW"),
        "preprocessing.layout must be NCHW or NHWC, got 'CHW'",
    ),
    (
        "preprocessing unknown key",
        _edit_pre("resize", "bilinear"),
        "unknown field 'resize' in preprocessing "
        "(known fields: mpp, input_size, mean, std, channel_order, layout)",
    ),
    (
        "preprocessing size disagrees with dims",
        _edit_pre("input_size", [8, 8]),
        "input[0].dims must be [3, 8, 8] to agree with preprocessing.input_size "
        "[width, height] [8, 8] and layout NCHW, got [3, 4, 4]",
    ),
    (
        "unbatched image without batch dim",
        _set("max_batch_size", 0),
        "input[0].dims must be [-1, 3, 4, 4] to agree with preprocessing.input_size "
        "[width, height] [4, 4] and layout NCHW, got [3, 4, 4]",
    ),
    (
        "NHWC layout with NCHW dims",
        _edit_pre("layout", "NHWC"),
        "input[0].dims must be [4, 4, 3] to agree with preprocessing.input_size "
        "[width, height] [4, 4] and layout NHWC, got [3, 4, 4]",
    ),
    (
        "dynamic batching preferred too big",
        _set("dynamic_batching", {"preferred_batch_size": [16]}),
        "dynamic_batching.preferred_batch_size must be a list of integers from 1 to "
        "max_batch_size (8), got [16]",
    ),
    (
        "dynamic batching both delays",
        _set("dynamic_batching", {"max_queue_delay_ms": 1, "max_queue_delay_microseconds": 1000}),
        "dynamic_batching must be given max_queue_delay_ms or max_queue_delay_microseconds, "
        "not both, got {'max_queue_delay_ms': 1, 'max_queue_delay_microseconds': 1000}",
    ),
    (
        "dynamic batching negative delay",
        _set("dynamic_batching", {"max_queue_delay_ms": -1}),
        "dynamic_batching.max_queue_delay_ms must be a non-negative number, got -1",
    ),
    (
        "dynamic batching unknown key",
        _set("dynamic_batching", {"max_queue_delay": 1}),
        "unknown field 'max_queue_delay' in dynamic_batching (known fields: "
        "preferred_batch_size, max_queue_delay_ms, max_queue_delay_microseconds)",
    ),
    (
        "instance count zero",
        _set("instance_count", 0),
        "instance_count must be a positive integer, got 0",
    ),
    (
        "precision lower case",
        _set("precision", "fp16"),
        "precision must be one of FP32, FP16, INT8, got 'fp16'",
    ),
    (
        "warmup batch too big",
        _set("warmup", {"batch_sizes": [1, 9]}),
        "warmup.batch_sizes must be a list of integers from 1 to max_batch_size (8), got [1, 9]",
    ),
    (
        "warmup data",
        _set("warmup", {"data": "ones"}),
        "warmup.data must be zero or random, got 'ones'",
    ),
    (
        "postprocessing not a mapping",
        _set("postprocessing", ["yolo"]),
        "postprocessing must be a mapping of settings, got ['yolo']",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"),
    [pytest.param(edit, message, id=case) for case, edit, message in CONFIG_ERRORS],
)
def test_config_errors_are_one_sentence(
    tmp_path: Path,
    classifier_config: dict[str, Any],
    config_writer: Any,
    edit: Any,
    message: str,
) -> None:
    edit(classifier_config)
    path = config_writer(tmp_path / "tiny_classifier", classifier_config)
    with pytest.raises(ModelConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)
    assert isinstance(info.value, PapscanError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: tiny\ninput: [{name: x\n",
            "the file is not valid YAML (expected ',' or '}', but got '<stream end>' "
            "at line 3, column 1)",
            id="malformed yaml",
        ),
        pytest.param(
            "name: tiny\n  backend: [onnxruntime]\n",
            "the file is not valid YAML (mapping values are not allowed here at line 2, column 10)",
            id="bad indentation",
        ),
        pytest.param(
            "name: tiny\nname: tiny\n",
            "the file is not valid YAML (duplicate key 'name' at line 2, column 1)",
            id="duplicate key",
        ),
        pytest.param("", "the file is empty, expected a model config", id="empty"),
        pytest.param(
            "- name: tiny\n",
            "the file must be a mapping with fields name, backend, max_batch_size, "
            "version_policy, input, output, dynamic_batching, instance_count, precision, warmup, "
            "preprocessing, labels, severity, postprocessing, got [{'name': 'tiny'}]",
            id="top level list",
        ),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "tiny", text)
    with pytest.raises(ModelConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny" / "config.yaml"
    with pytest.raises(ModelConfigError, match="the model config file does not exist"):
        load_config(path)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "cell_classifier", CONTRACT_CONFIGS["cell_classifier"]))
    with pytest.raises(AttributeError):
        config.max_batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("max_batch_size", "layout", "dims"),
    [(0, "NCHW", [1, 3, 4, 4]), (8, "NHWC", [4, 4, 3]), (8, "NCHW", [3, -1, -1])],
)
def test_image_dims_agree_with_preprocessing(
    tmp_path: Path,
    classifier_config: dict[str, Any],
    config_writer: Any,
    max_batch_size: int,
    layout: str,
    dims: list[int],
) -> None:
    classifier_config["max_batch_size"] = max_batch_size
    classifier_config["preprocessing"]["layout"] = layout
    classifier_config["input"][0]["dims"] = dims
    config = load_config(config_writer(tmp_path / "tiny_classifier", classifier_config))
    assert config.inputs[0].dims == tuple(dims)
    assert config.is_batched == (max_batch_size > 0)
