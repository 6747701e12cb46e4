"""PyTorch -> exported program (`model.pt2`) and the checks every exported program passes.

`torch.export.export` runs in non-strict mode: the module's Python runs as usual and only
tensor operations are recorded, so code that caches tensors on itself (ultralytics'
Detect head) or calls `.item()` on a constant exports without changes. Inputs are given
by name, so the program's input names are the config's and `engines`' PyTorch backend
calls it with keyword arguments; the module returns its outputs as a tuple (or a lone
tensor) in the config's output order.

The batch dimension is a `torch.export.Dim` from 1 to `max_batch_size`; any other dynamic
axis (a -1 of the config, such as the ROI classifier's cell axis) is a `Dim` from 0 up,
shared by every tensor that names the same axis. torch.export specialises sizes 0 and 1
of the example inputs, so every dynamic axis of them must be at least 2 long.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.export.onnx_export import onnx_session

logger = logging.getLogger(__name__)

PT2_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Pt2Export:
    """An exported program on disk and how closely it follows the eager module.

    Attributes:
        path: The `.pt2` file.
        max_abs_diff_vs_eager: max |program - eager module| over every output and both
            checked batch sizes.
        check_batch_sizes: The batch sizes the check ran.
    """

    path: Path
    max_abs_diff_vs_eager: float
    check_batch_sizes: tuple[int, ...]


def export_pt2(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: Path,
    output_names: Sequence[str],
    *,
    max_batch_size: int,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    tolerance: float = PT2_TOLERANCE,
) -> Pt2Export:
    """Export `module` (put in eval mode) with `torch.export`, save it, and check it.

    The check loads the saved program back and runs it and the eager module at batch 1
    and at the examples' batch size.

    Args:
        module: The export wrapper: `forward` takes the inputs by their config names and
            returns the outputs as a tuple (or one tensor) in `output_names`' order.
        example_inputs: Input name -> example tensor, batch first, in the config's order;
            the batch (and every axis in `dynamic_axes`) at least 2 long.
        path: Output `.pt2` file (parent folders created).
        output_names: The config's output names, in order.
        max_batch_size: The config's `max_batch_size`: the largest batch the program takes.
        dynamic_axes: Per input name, {axis: axis name} of dynamic axes besides the batch
            (axis 0); inputs naming the same axis get the same `torch.export.Dim`.
        tolerance: Largest max |program - eager| allowed.

    Returns:
        The file and the check's result.

    Raises:
        ValueError: The examples are too small to export dynamic axes, the module returns
            another number of outputs than `output_names`, or the program differs from the
            eager module by more than `tolerance`.
    """
    module = module.eval()
    batch = _example_batch(example_inputs)
    dynamic_shapes = _dynamic_shapes(example_inputs, max_batch_size, dynamic_axes or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(
            module, (), dict(example_inputs), dynamic_shapes=dynamic_shapes, strict=False
        )
    # torch.export.save stores the example inputs too (12 MB of ROIs for the detector);
    # the program does not need them.
    program.example_inputs = None
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    batch_sizes = (1, batch)
    diff = 0.0
    for b in batch_sizes:
        inputs = {name: tensor[:b] for name, tensor in example_inputs.items()}
        with torch.no_grad():
            expected = _as_tuple(module(**inputs), output_names)
            got = _as_tuple(loaded(**inputs), output_names)
        diff = max(diff, _max_abs_diff(expected, got))
    if diff > tolerance:
        raise ValueError(
            f"{path}: the exported program differs from eager PyTorch by {diff:.2e} > {tolerance}"
        )
    logger.info(
        "exported %s (torch.export, %.1f kB, max |program - eager| %.1e at batch %s)",
        path,
        path.stat().st_size / 1024,
        diff,
        batch_sizes,
    )
    return Pt2Export(path, diff, batch_sizes)


def max_abs_diff_onnx_vs_pt2(
    onnx_path: Path,
    pt2_path: Path,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
) -> float:
    """Largest absolute difference between ONNX Runtime and the exported program.

    Args:
        onnx_path: The ONNX file.
        pt2_path: The `.pt2` file of the same model.
        inputs: Input name -> float32 array.
        output_names: The outputs compared, in the program's order.

    Returns:
        max |ONNX Runtime - exported program| over every output (0.0 for empty outputs).
    """
    onnx_out = onnx_session(onnx_path).run(list(output_names), dict(inputs))
    program = torch.export.load(pt2_path).module()
    with torch.inference_mode():
        pt2_out = _as_tuple(
            program(**{name: torch.from_numpy(a) for name, a in inputs.items()}), output_names
        )
    return _max_abs_diff(tuple(torch.from_numpy(a) for a in onnx_out), pt2_out)


def _example_batch(example_inputs: Mapping[str, torch.Tensor]) -> int:
    sizes = {int(t.shape[0]) for t in example_inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"example inputs have different batch sizes {sorted(sizes)}")
    (batch,) = sizes
    if batch < 2:
        raise ValueError(
            f"example inputs need a batch of at least 2, got {batch} "
            "(torch.export specialises sizes 0 and 1)"
        )
    return batch


def _dynamic_shapes(
    example_inputs: Mapping[str, torch.Tensor],
    max_batch_size: int,
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> dict[str, dict[int, torch.export.Dim]]:
    """Per input, {axis: Dim}: the batch (1..max_batch_size) and the named dynamic axes."""
    unknown = sorted(set(dynamic_axes) - set(example_inputs))
    if unknown:
        raise ValueError(f"dynamic_axes names inputs {unknown} the examples lack")
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    dims: dict[str, torch.export.Dim] = {}
    shapes: dict[str, dict[int, torch.export.Dim]] = {}
    for name, tensor in example_inputs.items():
        shapes[name] = {0: batch}
        for axis, axis_name in dynamic_axes.get(name, {}).items():
            if axis == 0 or tensor.shape[axis] < 2:
                raise ValueError(
                    f"example input '{name}' needs axis {axis} ('{axis_name}') of at least 2, "
                    f"got shape {tuple(tensor.shape)} (torch.export specialises sizes 0 and 1)"
                )
            shapes[name][axis] = dims.setdefault(axis_name, torch.export.Dim(axis_name, min=0))
    return shapes


def _as_tuple(result: object, output_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    outputs = (result,) if isinstance(result, torch.Tensor) else tuple(result)  # type: ignore[arg-type]
    if len(outputs) != len(output_names):
        raise ValueError(
            f"the module returns {len(outputs)} output(s) but the config lists "
            f"{len(output_names)} ({', '.join(output_names)})"
        )
    return outputs


def _max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    diff = 0.0
    for x, y in zip(a, b, strict=True):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"output shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
        if x.numel():
            diff = max(diff, float((x.float() - y.float()).abs().max()))
    return diff
