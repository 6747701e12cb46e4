"""PyTorch backend: runs `model.pt2`, a program written by `torch.export.save`.

The program is loaded with `torch.export.load` and run as its `.module()`: eagerly by
default, or compiled with `torch.compile` (Inductor) when the environment variable
`PAPSCAN_TORCH_COMPILE=1` (or `compiled=True`); compiling costs seconds to minutes on the
first inference of each new shape, which the warm-up pays. `describe()` says which.

The program must take the config's inputs by name (exported with
``torch.export.export(module, (), {name: tensor, ...})``, the way `train` exports; a
program exported with positional inputs is called in the config's input order) and
return the config's outputs as a tuple (or a lone tensor) in the config's output order,
or as a dict keyed by the config's output names. `load` checks names, element types,
ranks, fixed dims and the dynamic dims against the config.

A program exported on the CPU runs on a GPU after `torch.export.passes.move_to_device_pass`
(devices traced into the graph, e.g. by `torch.arange`, move with it). Inputs may be host
numpy arrays (shared with torch, not copied, on the CPU) or device arrays exposing
`__cuda_array_interface__` (used in place on the GPU; copied to the host when the program
runs on the CPU). `infer` runs under `torch.inference_mode()` and holds no state between
calls, so any number of threads may call it at once; on a GPU they share the default
stream.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engines.backends.base import Device, check_names, check_tensor, first_line, run_warmup
from engines.errors import BackendUnavailableError, ModelLoadError
from engines.tensors import is_device_array

if TYPE_CHECKING:
    from engines.config import ModelConfig, TensorSpec

logger = logging.getLogger(__name__)

COMPILE_ENV = "PAPSCAN_TORCH_COMPILE"

# torch's names for the element types of the config's data types.
_WHERE = "the exported program"
_TORCH_TYPES = {
    "TYPE_FP32": "float32",
    "TYPE_FP16": "float16",
    "TYPE_INT64": "int64",
    "TYPE_INT32": "int32",
    "TYPE_UINT8": "uint8",
    "TYPE_BOOL": "bool",
}


def _import_torch() -> Any:
    """Imports torch on first use, so importing papscan starts no runtime."""
    try:
        import torch
        import torch.export.passes  # noqa: F401 - `torch.export` does not import it
    except (ImportError, OSError) as exc:  # OSError: a torch whose shared libraries are broken
        raise BackendUnavailableError(
            f"the pytorch backend needs the torch package, which cannot be imported ({exc})"
        ) from exc
    return torch


class PyTorchBackend:
    """Runs one model version's `model.pt2` (a `torch.export` program) with PyTorch.

    On ``device=auto`` it runs on CUDA device `index` where `torch.cuda.is_available()`,
    else on the CPU; ``device=cuda`` without CUDA is unavailable.

    Args:
        config: The model's config.
        compiled: Run the program through `torch.compile`; None reads
            `PAPSCAN_TORCH_COMPILE` (``1`` compiled, ``0`` or unset eager).
    """

    name: ClassVar[str] = "pytorch"
    artifact_name: ClassVar[str] = "model.pt2"

    def __init__(self, config: ModelConfig, compiled: bool | None = None) -> None:
        self.config = config
        self._compiled_arg = compiled
        self._compiled = False
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._artifact: Path | None = None
        self._input_names: list[str] = []
        self._by_keyword = True
        self._output_keys: list[str] | None = None

    @classmethod
    def find_artifact(cls, version_dir: Path) -> Path | None:
        path = Path(version_dir) / cls.artifact_name
        return path if path.is_file() else None

    @classmethod
    def unavailable_reason(cls, device: Device) -> str | None:
        try:
            torch = _import_torch()
        except BackendUnavailableError:
            return "the torch package cannot be imported"
        if device.kind != "cuda":
            return None
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        if device.index >= torch.cuda.device_count():
            return f"torch sees no CUDA device {device.index}"
        return None

    def load(self, version_dir: Path, device: Device) -> None:
        torch = _import_torch()
        artifact = Path(version_dir) / self.artifact_name
        if not artifact.is_file():
            raise ModelLoadError(f"{artifact}: the exported PyTorch program does not exist")
        target = self._target_device(torch, device)
        compiled = self._compile_requested()
        program = read_exported_program(torch, artifact)
        self._check_program(program, artifact)
        if target.type != "cpu":
            program = torch.export.passes.move_to_device_pass(program, target)
        module = program.module()
        if compiled:
            # dynamic=True: one graph serves every batch size (1 gets its own, as 0/1 do).
            module = torch.compile(module, dynamic=True)
        self._torch = torch
        self._device = target
        self._compiled = compiled
        self._module = module
        self._artifact = artifact

    def warmup(self) -> None:
        run_warmup(self, self._artifact)

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise ModelLoadError(f"{self.config.name}: the pytorch backend is not loaded")
        torch = self._torch
        with torch.inference_mode():
            feed = {name: self._tensor(inputs[name]) for name in self._input_names}
            if self._by_keyword:
                result = self._module(**feed)
            else:
                result = self._module(*feed.values())
            outputs = self._ordered_outputs(result)
            return {
                spec.name: tensor.cpu().numpy()
                for spec, tensor in zip(self.config.outputs, outputs, strict=True)
            }

    def close(self) -> None:
        on_gpu = self._device is not None and self._device.type == "cuda"
        self._module = None
        if on_gpu:
            self._torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        torch = _import_torch()
        return {
            "backend": self.name,
            "runtime_version": torch.__version__,
            "device": str(self._device) if self._device is not None else None,
            "mode": "compiled (torch.compile)" if self._compiled else "eager",
            "artifact": str(self._artifact) if self._artifact else None,
        }

    # --- loading ---------------------------------------------------------------------------

    def _compile_requested(self) -> bool:
        if self._compiled_arg is not None:
            return bool(self._compiled_arg)
        value = os.environ.get(COMPILE_ENV, "0").strip()
        if value not in ("", "0", "1"):
            raise BackendUnavailableError(
                f"{COMPILE_ENV} must be 1 (torch.compile) or 0 (eager), got {value!r}"
            )
        return value == "1"

    @staticmethod
    def _target_device(torch: Any, device: Device) -> Any:
        if device.kind == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available() and device.index < torch.cuda.device_count():
            return torch.device("cuda", device.index)
        if device.kind == "cuda":
            raise BackendUnavailableError(f"torch sees no CUDA device {device.index} here")
        return torch.device("cpu")

    def _check_program(self, program: Any, artifact: Path) -> None:
        """Raises ModelLoadError where the program's signature disagrees with the config."""
        names, by_keyword = _program_input_names(program)
        config_inputs = [spec.name for spec in self.config.inputs]
        check_names(self.config, names, [s.name for s in self.config.outputs], artifact, _WHERE)
        if not by_keyword and names != config_inputs:
            raise ModelLoadError(
                f"{artifact}: the exported program takes its inputs by position in the order "
                f"{names}, not the config's order {config_inputs}; export them by name"
            )
        input_values = dict(zip(names, _user_input_values(program), strict=True))
        for spec in self.config.inputs:
            self._check_tensor(program, spec, input_values[spec.name], artifact, "input")
        output_keys, output_values = self._program_outputs(program, artifact)
        for spec, value in zip(self.config.outputs, output_values, strict=True):
            self._check_tensor(program, spec, value, artifact, "output")
        self._input_names = config_inputs if by_keyword else names
        self._by_keyword = by_keyword
        self._output_keys = output_keys

    def _program_outputs(self, program: Any, artifact: Path) -> tuple[list[str] | None, list]:
        """(dict keys in config order or None for a tuple, output values in config order)."""
        out_spec = program.call_spec.out_spec
        values = _user_output_values(program)
        config_outputs = [spec.name for spec in self.config.outputs]
        if out_spec.type is dict:
            keys = list(out_spec.context)
            missing = [name for name in config_outputs if name not in keys]
            if missing or len(values) != len(keys):
                raise ModelLoadError(
                    f"{artifact}: the exported program's outputs {sorted(keys)} lack "
                    f"the config's output(s) {missing}"
                )
            by_key = dict(zip(keys, values, strict=True))
            return config_outputs, [by_key[name] for name in config_outputs]
        if len(values) != len(config_outputs):
            raise ModelLoadError(
                f"{artifact}: the exported program returns {len(values)} tensor(s) but the "
                f"config lists {len(config_outputs)} output(s) {config_outputs}; return them "
                "as a tuple in that order"
            )
        return None, values

    def _check_tensor(
        self, program: Any, spec: TensorSpec, value: Any, artifact: Path, kind: str
    ) -> None:
        shape = list(value.shape) if hasattr(value, "shape") else []
        check_tensor(
            self.config,
            spec,
            kind=kind,
            dtype=str(getattr(value, "dtype", "not a tensor")).removeprefix("torch."),
            expected_dtype=_TORCH_TYPES[spec.data_type],
            shape=shape,
            artifact=artifact,
            where=_WHERE,
        )
        if self.config.is_batched:
            self._check_batch_dim(program, spec, shape[0], artifact, kind)
        config_shape = self.config.full_shape(spec)
        for axis in range(1 if self.config.is_batched else 0, len(config_shape)):
            have = shape[axis]
            if config_shape[axis] == -1 and kind == "input" and isinstance(have, int):
                raise ModelLoadError(
                    f"{artifact}: input '{spec.name}' has dim {axis} fixed to {have} in "
                    f"{_WHERE} but dynamic (-1) in the config; export it with a "
                    "torch.export.Dim"
                )

    def _check_batch_dim(
        self, program: Any, spec: TensorSpec, batch_dim: Any, artifact: Path, kind: str
    ) -> None:
        max_batch = self.config.max_batch_size
        if isinstance(batch_dim, int) or kind != "input":  # fixed ones: see check_tensor
            return
        bounds = _symbol_range(program, batch_dim)
        if bounds is not None and (bounds[0] > 1 or bounds[1] < max_batch):
            raise ModelLoadError(
                f"{artifact}: input '{spec.name}' accepts batch sizes {bounds[0]} to {bounds[1]} "
                f"in the exported program but the config's max_batch_size is {max_batch}; export "
                f"it with torch.export.Dim('batch', min=1, max={max_batch})"
            )

    # --- inference -------------------------------------------------------------------------

    def _tensor(self, array: Any) -> Any:
        torch = self._torch
        if is_device_array(array) and not isinstance(array, np.ndarray):
            return torch.as_tensor(array, device=self._device)  # in place on its own GPU
        array = np.asarray(array)
        if any(stride < 0 for stride in array.strides):  # torch.from_numpy refuses those
            array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array)  # shares the array's memory
        return tensor if self._device.type == "cpu" else tensor.to(self._device)

    def _ordered_outputs(self, result: Any) -> Sequence[Any]:
        if self._output_keys is not None:
            return [result[key] for key in self._output_keys]
        if isinstance(result, list | tuple):
            return result
        return (result,)


def _program_input_names(program: Any) -> tuple[list[str], bool]:
    """The program's input names, and whether it takes them by keyword.

    A program exported with keyword inputs names them in its call spec; one exported with
    positional inputs has only its placeholder names (the forward's parameter names).
    """
    args_spec, kwargs_spec = program.call_spec.in_spec.children()
    keywords = list(kwargs_spec.context or [])
    placeholders = list(program.graph_signature.user_inputs)
    if args_spec.num_leaves == 0 and keywords:
        return keywords, True
    return placeholders, False


def _user_input_values(program: Any) -> list[Any]:
    """The traced (fake) tensors of the program's user inputs, in call order."""
    wanted = list(program.graph_signature.user_inputs)
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    return [nodes[name].meta.get("val") for name in wanted]


def _user_output_values(program: Any) -> list[Any]:
    """The traced (fake) tensors of the program's user outputs, in flattened order."""
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    values = [getattr(arg, "meta", {}).get("val") for arg in output_node.args[0]]
    # Outputs that mutate buffers come first; the user outputs are the last ones.
    return values[len(values) - len(program.graph_signature.user_outputs) :]


def _symbol_range(program: Any, dim: Any) -> tuple[int | float, int | float] | None:
    """(lower, upper) bounds of a symbolic dim in the program, or None when unknown."""
    expr = getattr(getattr(dim, "node", None), "expr", None)
    bounds = program.range_constraints.get(expr) if expr is not None else None
    if bounds is None:
        return None
    lower = int(bounds.lower) if bounds.lower.is_finite else 0
    upper = int(bounds.upper) if bounds.upper.is_finite else float("inf")
    return lower, upper


def read_exported_program(torch: Any, artifact: Path) -> Any:
    """`torch.export.load` of a `.pt2`, its failures as one ModelLoadError sentence.

    Raises:
        ModelLoadError: the file is not an exported program PyTorch can load.
    """
    # A .pt2 is a zip archive; checking first spares the user torch's logged traceback.
    if not zipfile.is_zipfile(artifact):
        raise ModelLoadError(
            f"{artifact}: PyTorch cannot load the exported program (not a zip archive)"
        )
    try:
        return torch.export.load(str(artifact))
    except Exception as exc:  # torch raises RuntimeError, zipfile and pickle errors
        raise ModelLoadError(
            f"{artifact}: PyTorch cannot load the exported program ({first_line(exc)})"
        ) from exc
