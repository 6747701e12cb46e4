"""A model's `config.yaml`, parsed once and validated on load (Triton field names).

The format: `name`, `backend` (preference list), `max_batch_size`, `version_policy`,
`input`/`output` tensors (`name`, `data_type`, `dims`), `dynamic_batching`
(`preferred_batch_size`, `max_queue_delay_ms`), `instance_count`, `precision`, `warmup`
(`batch_sizes`, `data`), `preprocessing`, `labels`, `severity`, `postprocessing`. `dims`
exclude the batch dimension when `max_batch_size > 0`; `-1` marks a dynamic dimension.
`severity` (optional) lists the labels from least to most severe: a permutation of `labels`
that starts with the normal class, `labels[0]`.

Every mistake raises `ModelConfigError` with one sentence naming the file, the field and
what is expected, e.g. ``.../cell_detector/config.yaml: max_batch_size must be a
non-negative integer, got 'eight'``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from engines.backends import BACKENDS
from engines.errors import ModelConfigError, ModelInputError

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"

#: Triton data types papscan accepts, and the numpy dtype each one maps to.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "TYPE_FP32": np.dtype(np.float32),
    "TYPE_FP16": np.dtype(np.float16),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_UINT8": np.dtype(np.uint8),
    "TYPE_BOOL": np.dtype(np.bool_),
}

_TOP_LEVEL_FIELDS = (
    "name",
    "backend",
    "max_batch_size",
    "version_policy",
    "input",
    "output",
    "dynamic_batching",
    "instance_count",
    "precision",
    "warmup",
    "preprocessing",
    "labels",
    "severity",
    "postprocessing",
)
_TENSOR_FIELDS = ("name", "data_type", "dims")
_PREPROCESSING_FIELDS = ("mpp", "input_size", "mean", "std", "channel_order", "layout")
_DYNAMIC_BATCHING_FIELDS = (
    "preferred_batch_size",
    "max_queue_delay_ms",
    "max_queue_delay_microseconds",  # Triton's spelling, accepted as an alternative
)
_WARMUP_FIELDS = ("batch_sizes", "data")
#: Compute precisions a backend may build for (TensorRT); ONNX Runtime and PyTorch run
#: their artifact as exported.
PRECISIONS = ("FP32", "FP16", "INT8")
WARMUP_DATA = ("zero", "random")
_CHANNEL_ORDERS = ("RGB", "BGR")
_LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model.

    Attributes:
        name: Tensor name, as in the model artifact.
        data_type: Triton data type, e.g. ``TYPE_FP32``.
        dims: Shape without the batch dimension when the model batches
            (`max_batch_size > 0`), with it otherwise; ``-1`` is dynamic.
    """

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of `data_type`."""
        return NUMPY_DTYPES[self.data_type]


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects of its image input; the pipeline resamples and normalises to it.

    Attributes:
        mpp: Microns per pixel the model was trained at.
        input_size: (width, height) of the image input in pixels at `mpp`.
        mean: Per-channel value subtracted, in `channel_order`, on the 0–255 scale.
        std: Per-channel divisor applied after the mean, in `channel_order`.
        channel_order: ``RGB`` or ``BGR``.
        layout: ``NCHW`` or ``NHWC`` (with the batch dimension).
    """

    mpp: float
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str
    layout: str


@dataclass(frozen=True)
class VersionPolicy:
    """Which numeric version folders of a model are served (Triton's `version_policy`).

    Attributes:
        kind: ``latest`` (the `latest` highest versions), ``all``, or ``specific``.
        latest: How many of the highest versions are served, for ``latest``.
        versions: The versions served, for ``specific``.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """Returns the versions this policy serves out of `available`, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.latest :]

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "specific":
            return f"{{specific: {list(self.versions)}}}"
        return f"{{latest: {self.latest}}}"


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's `dynamic_batching` block: what `engines.batcher.DynamicBatcher` aims for.

    Attributes:
        preferred_batch_size: Batch sizes the batcher runs as soon as it has gathered
            one, each ≤ `max_batch_size`; empty means "run at `max_batch_size`".
        max_queue_delay_ms: Longest the oldest request waits for others, in milliseconds.
    """

    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_ms: float = 0.0


@dataclass(frozen=True)
class Warmup:
    """What a backend runs before it is ready (`warmup` in the config).

    Attributes:
        batch_sizes: Batch sizes run once each; empty means 1 and `max_batch_size`.
        data: ``zero`` or ``random`` (seeded uniform [0, 1), the same on every run).
    """

    batch_sizes: tuple[int, ...] = ()
    data: str = "zero"


@dataclass(frozen=True)
class ModelConfig:
    """A validated `config.yaml`.

    Attributes:
        name: Model name; equals its folder in the repository.
        backend: Backend names in order of preference (keys of `engines.backends.BACKENDS`).
        max_batch_size: Largest batch one inference takes; 0 means the model has no batch
            dimension and `dims` are full shapes.
        inputs: The `input` tensors, in the order of the config.
        outputs: The `output` tensors, in the order of the config.
        version_policy: Which version folders are served.
        dynamic_batching: The batcher's settings, or None when the model is not batched
            dynamically.
        instance_count: How many executions of the model may run at once (batcher
            threads; a TensorRT execution context each).
        precision: ``FP32``, ``FP16`` or ``INT8``: what a TensorRT engine is built for.
        warmup: What runs before the model is ready.
        preprocessing: What the image input expects, or None for a model without one.
        labels: Class names, in the order of the model's class outputs.
        severity: The same names from least to most severe (the normal class, `labels[0]`,
            first), or None when the config declares no order.
        postprocessing: Free-form settings read by the consumer (e.g. ``kind: yolo``).
        path: The file this config was read from.
    """

    name: str
    backend: tuple[str, ...]
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    precision: str = "FP16"
    warmup: Warmup = field(default_factory=Warmup)
    preprocessing: Preprocessing | None = None
    labels: tuple[str, ...] = ()
    severity: tuple[str, ...] | None = None
    postprocessing: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def is_batched(self) -> bool:
        """Whether tensors carry a leading batch dimension not listed in `dims`."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec:
        """The input tensor `name`.

        Raises:
            ModelInputError: The model has no such input.
        """
        return _spec_named(self.inputs, name, f"{self.name} has no input")

    def output(self, name: str) -> TensorSpec:
        """The output tensor `name`.

        Raises:
            ModelInputError: The model has no such output.
        """
        return _spec_named(self.outputs, name, f"{self.name} has no output")

    def full_shape(self, spec: TensorSpec, batch_size: int | None = None) -> tuple[int, ...]:
        """`spec`'s shape with the batch dimension (``batch_size``, or -1) put in front."""
        if not self.is_batched:
            return spec.dims
        return (-1 if batch_size is None else batch_size, *spec.dims)


def _spec_named(specs: tuple[TensorSpec, ...], name: str, missing: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ModelInputError(f"{missing} '{name}' (tensors: {', '.join(s.name for s in specs)})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping repeating a key (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_config(path: str | Path) -> ModelConfig:
    """Reads and validates a model's `config.yaml`.

    Args:
        path: The config file; its parent folder's name must equal the config's `name`.

    Returns:
        The parsed config.

    Raises:
        ModelConfigError: The file is missing, is not YAML, or a field is missing, unknown
            or invalid; the message is one sentence naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: the model config file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: the model config file cannot be read ({exc})") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ModelConfigError(
            f"{path}: the file is not valid YAML ({_yaml_reason(exc)})"
        ) from None
    return _Parser(path).config(raw)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Parser:
    """Turns the raw YAML of one file into a `ModelConfig`, failing with one sentence."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field_name: str, expected: str, got: Any) -> ModelConfigError:
        return ModelConfigError(f"{self.path}: {field_name} must be {expected}, got {got!r}")

    def mapping(self, value: Any, field_name: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field_name, f"a mapping with fields {', '.join(known)}", value)
        for key in value:
            if key not in known:
                where = f"'{key}'" if field_name == "the file" else f"'{key}' in {field_name}"
                raise ModelConfigError(
                    f"{self.path}: unknown field {where} (known fields: {', '.join(known)})"
                )
        return value

    def required(self, raw: Mapping[str, Any], key: str, field_name: str, expected: str) -> Any:
        if key not in raw:
            raise ModelConfigError(f"{self.path}: {field_name} is required ({expected})")
        return raw[key]

    def config(self, raw: Any) -> ModelConfig:
        if raw is None:
            raise ModelConfigError(f"{self.path}: the file is empty, expected a model config")
        raw = self.mapping(raw, "the file", _TOP_LEVEL_FIELDS)
        name = self.name(raw)
        backend = self.backend(self.required(raw, "backend", "backend", "a list of backends"))
        max_batch_size = self.required(
            raw, "max_batch_size", "max_batch_size", "a non-negative integer"
        )
        if not _is_int(max_batch_size) or max_batch_size < 0:
            raise self.fail("max_batch_size", "a non-negative integer", max_batch_size)
        inputs = self.tensors(self.required(raw, "input", "input", "a list of tensors"), "input")
        outputs = self.tensors(
            self.required(raw, "output", "output", "a list of tensors"), "output"
        )
        labels = self.labels(raw.get("labels", []))
        config = ModelConfig(
            name=name,
            backend=backend,
            max_batch_size=max_batch_size,
            inputs=inputs,
            outputs=outputs,
            version_policy=self.version_policy(raw.get("version_policy", {"latest": 1})),
            dynamic_batching=self.dynamic_batching(raw.get("dynamic_batching"), max_batch_size),
            instance_count=self.instance_count(raw.get("instance_count", 1)),
            precision=self.precision(raw.get("precision", "FP16")),
            warmup=self.warmup(raw.get("warmup"), max_batch_size),
            preprocessing=self.preprocessing(raw.get("preprocessing")),
            labels=labels,
            severity=self.severity(raw.get("severity"), labels),
            postprocessing=self.postprocessing(raw.get("postprocessing", {})),
            path=self.path,
        )
        self.check_preprocessing_matches_input(config)
        return config

    def name(self, raw: Mapping[str, Any]) -> str:
        name = self.required(raw, "name", "name", "the model's folder name")
        folder = self.path.parent.name
        if not isinstance(name, str) or not name:
            raise self.fail("name", f"the model's folder name '{folder}'", name)
        if name != folder:
            raise self.fail("name", f"the model's folder name '{folder}'", name)
        return name

    def backend(self, value: Any) -> tuple[str, ...]:
        known = ", ".join(BACKENDS)
        expected = f"a non-empty list of backend names from {known}"
        if not isinstance(value, list) or not value:
            raise self.fail("backend", expected, value)
        for i, item in enumerate(value):
            if item not in BACKENDS:
                raise self.fail(f"backend[{i}]", f"one of {known}", item)
        if len(set(value)) != len(value):
            raise self.fail("backend", "a list without repeated names", value)
        return tuple(value)

    def tensors(self, value: Any, field_name: str) -> tuple[TensorSpec, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(
                field_name,
                "a non-empty list of tensors like {name: x, data_type: TYPE_FP32, dims: [3]}",
                value,
            )
        specs = tuple(self.tensor(item, f"{field_name}[{i}]") for i, item in enumerate(value))
        names = [spec.name for spec in specs]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise self.fail(f"{field_name}[{i}].name", "unique among the tensors", name)
        return specs

    def tensor(self, value: Any, field_name: str) -> TensorSpec:
        raw = self.mapping(value, field_name, _TENSOR_FIELDS)
        name = self.required(raw, "name", f"{field_name}.name", "the tensor's name")
        if not isinstance(name, str) or not name:
            raise self.fail(f"{field_name}.name", "a non-empty string", name)
        data_type = self.required(
            raw, "data_type", f"{field_name}.data_type", f"one of {', '.join(NUMPY_DTYPES)}"
        )
        if data_type not in NUMPY_DTYPES:
            raise self.fail(
                f"{field_name}.data_type", f"one of {', '.join(NUMPY_DTYPES)}", data_type
            )
        dims = self.required(raw, "dims", f"{field_name}.dims", "a list of positive integers or -1")
        if not isinstance(dims, list) or not dims:
            raise self.fail(
                f"{field_name}.dims", "a non-empty list of positive integers or -1", dims
            )
        for i, dim in enumerate(dims):
            if not _is_int(dim) or (dim <= 0 and dim != -1):
                raise self.fail(f"{field_name}.dims[{i}]", "a positive integer or -1", dim)
        return TensorSpec(name=name, data_type=data_type, dims=tuple(dims))

    def version_policy(self, value: Any) -> VersionPolicy:
        expected = "all, {latest: N}, {all: {}} or {specific: [versions]}"
        if value == "all":
            return VersionPolicy(kind="all")
        if not isinstance(value, Mapping) or len(value) != 1:
            raise self.fail("version_policy", expected, value)
        ((kind, arg),) = value.items()
        if kind == "all" and arg in (None, {}):
            return VersionPolicy(kind="all")
        if kind == "latest":
            if not _is_int(arg) or arg < 1:
                raise self.fail("version_policy.latest", "a positive integer", arg)
            return VersionPolicy(kind="latest", latest=arg)
        if kind == "specific":
            if not isinstance(arg, list) or not arg or not all(_is_int(v) and v >= 1 for v in arg):
                raise self.fail(
                    "version_policy.specific", "a non-empty list of positive integers", arg
                )
            return VersionPolicy(kind="specific", versions=tuple(sorted(set(arg))))
        raise self.fail("version_policy", expected, value)

    def dynamic_batching(self, value: Any, max_batch_size: int) -> DynamicBatching | None:
        if value is None:
            return None
        raw = self.mapping(value, "dynamic_batching", _DYNAMIC_BATCHING_FIELDS)
        if max_batch_size == 0:
            raise self.fail(
                "max_batch_size", "positive when dynamic_batching is set", max_batch_size
            )
        preferred = raw.get("preferred_batch_size", [])
        if not isinstance(preferred, list) or not all(
            _is_int(b) and 1 <= b <= max_batch_size for b in preferred
        ):
            raise self.fail(
                "dynamic_batching.preferred_batch_size",
                f"a list of integers from 1 to max_batch_size ({max_batch_size})",
                preferred,
            )
        if "max_queue_delay_ms" in raw and "max_queue_delay_microseconds" in raw:
            raise self.fail(
                "dynamic_batching",
                "given max_queue_delay_ms or max_queue_delay_microseconds, not both",
                dict(raw),
            )
        if "max_queue_delay_microseconds" in raw:
            delay_us = raw["max_queue_delay_microseconds"]
            if not _is_int(delay_us) or delay_us < 0:
                raise self.fail(
                    "dynamic_batching.max_queue_delay_microseconds",
                    "a non-negative integer",
                    delay_us,
                )
            delay_ms = delay_us / 1000.0
        else:
            delay_ms = raw.get("max_queue_delay_ms", 0)
            if not _is_number(delay_ms) or delay_ms < 0:
                raise self.fail(
                    "dynamic_batching.max_queue_delay_ms", "a non-negative number", delay_ms
                )
        return DynamicBatching(
            preferred_batch_size=tuple(sorted(set(preferred))), max_queue_delay_ms=float(delay_ms)
        )

    def instance_count(self, value: Any) -> int:
        if not _is_int(value) or value < 1:
            raise self.fail("instance_count", "a positive integer", value)
        return value

    def precision(self, value: Any) -> str:
        if value not in PRECISIONS:
            raise self.fail("precision", f"one of {', '.join(PRECISIONS)}", value)
        return value

    def warmup(self, value: Any, max_batch_size: int) -> Warmup:
        if value is None:
            return Warmup()
        raw = self.mapping(value, "warmup", _WARMUP_FIELDS)
        sizes = raw.get("batch_sizes", [])
        limit = max(max_batch_size, 1)
        if not isinstance(sizes, list) or not all(_is_int(b) and 1 <= b <= limit for b in sizes):
            raise self.fail(
                "warmup.batch_sizes",
                f"a list of integers from 1 to max_batch_size ({limit})",
                sizes,
            )
        if sizes and max_batch_size == 0:
            raise self.fail("warmup.batch_sizes", "empty for a model without batching", sizes)
        data = raw.get("data", "zero")
        if data not in WARMUP_DATA:
            raise self.fail("warmup.data", " or ".join(WARMUP_DATA), data)
        return Warmup(batch_sizes=tuple(sorted(set(sizes))), data=data)

    def preprocessing(self, value: Any) -> Preprocessing | None:
        if value is None:
            return None
        raw = self.mapping(value, "preprocessing", _PREPROCESSING_FIELDS)
        for key in _PREPROCESSING_FIELDS:
            self.required(raw, key, f"preprocessing.{key}", "see the config.yaml format")
        mpp = raw["mpp"]
        if not _is_number(mpp) or mpp <= 0:
            raise self.fail("preprocessing.mpp", "a positive number of microns per pixel", mpp)
        size = raw["input_size"]
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(_is_int(s) and s > 0 for s in size)
        ):
            raise self.fail(
                "preprocessing.input_size", "[width, height] in positive integer pixels", size
            )
        channel_order = raw["channel_order"]
        if channel_order not in _CHANNEL_ORDERS:
            raise self.fail(
                "preprocessing.channel_order", " or ".join(_CHANNEL_ORDERS), channel_order
            )
        layout = raw["layout"]
        if layout not in _LAYOUTS:
            raise self.fail("preprocessing.layout", " or ".join(_LAYOUTS), layout)
        mean = raw["mean"]
        if not isinstance(mean, list) or len(mean) != 3 or not all(_is_number(m) for m in mean):
            raise self.fail("preprocessing.mean", "a list of 3 numbers, one per channel", mean)
        std = raw["std"]
        if (
            not isinstance(std, list)
            or len(std) != 3
            or not all(_is_number(s) and s > 0 for s in std)
        ):
            raise self.fail(
                "preprocessing.std", "a list of 3 positive numbers, one per channel", std
            )
        return Preprocessing(
            mpp=float(mpp),
            input_size=(size[0], size[1]),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            channel_order=channel_order,
            layout=layout,
        )

    def check_preprocessing_matches_input(self, config: ModelConfig) -> None:
        """The preprocessing block describes input[0]: its channels and size must agree.

        A batched model's input[0] may also be a set of such images per item, `[-1, C, H,
        W]` (an ROI's cell crops), each image preprocessed alike.
        """
        pre = config.preprocessing
        if pre is None:
            return
        spec = config.inputs[0]
        # Without a batch dimension in the config, dims hold it first: [N, C, H, W].
        batch = [] if config.is_batched else [-1]
        width, height = pre.input_size
        image = [3, height, width] if pre.layout == "NCHW" else [height, width, 3]
        expected = batch + image

        def fits(dims: list[int]) -> bool:
            return len(spec.dims) == len(dims) and all(
                -1 in (have, want) or have == want
                for have, want in zip(spec.dims, dims, strict=True)
            )

        agrees = fits(expected) or (config.is_batched and fits([-1, *image]))
        if not agrees:
            raise self.fail(
                "input[0].dims",
                f"{expected} to agree with preprocessing.input_size [width, height] "
                f"{list(pre.input_size)} and layout {pre.layout}",
                list(spec.dims),
            )

    def labels(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail("labels", "a list of non-empty strings", value)
        if len(set(value)) != len(value):
            raise self.fail("labels", "a list without repeated names", value)
        return tuple(value)

    def severity(self, value: Any, labels: tuple[str, ...]) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not labels:
            raise self.fail("severity", "given only with labels", value)
        expected = (
            f"the labels {list(labels)} ordered from least to most severe, each once, "
            f"starting with the normal class '{labels[0]}'"
        )
        if (
            not isinstance(value, list)
            or sorted(value, key=str) != sorted(labels)
            or value[0] != labels[0]
        ):
            raise self.fail("severity", expected, value)
        return tuple(value)

    def postprocessing(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail("postprocessing", "a mapping of settings", value)
        return dict(value)
