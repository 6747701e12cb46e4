"""PyTorch -> ONNX export and the checks every exported model passes.

Uses the TorchScript-based exporter (`dynamo=False`): it needs no extra package and keeps
the tensor names given here, which the model configs refer to.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export `module` (put in eval mode) to an ONNX file and check the graph.

    Args:
        module: The export wrapper (its outputs are the model's named outputs).
        example_inputs: Tensors traced through the module.
        path: Output `.onnx` file (parent folders created).
        input_names: ONNX input names, in `forward` order.
        output_names: ONNX output names, in output order.
        dynamic_axes: Per tensor name, {axis: symbolic name} of the dynamic axes.
        opset: ONNX opset version.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            example_inputs,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    logger.info("exported %s (opset %d, %.1f kB)", path, opset, path.stat().st_size / 1024)
    return path


def write_fp16_onnx(onnx_path: Path, target: Path) -> Path:
    """`onnx_path` with FP16 weights and arithmetic, FP32 inputs and outputs, at `target`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True))
    model.topological_sort()  # the converter appends the input casts after their users
    onnx.save(model.model, str(target))
    onnx.checker.check_model(str(target))
    return target


def onnx_session(path: Path) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on `path` (deterministic single-session settings)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff_vs_torch(module: nn.Module, path: Path, inputs: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch over every output.

    Args:
        module: The export wrapper, called with the inputs in `inputs`' order.
        path: Its ONNX file.
        inputs: Input name -> float32 array.

    Returns:
        max |onnx - torch| over all outputs (0.0 for empty outputs).
    """
    session = onnx_session(path)
    onnx_out = session.run(None, dict(inputs))
    with torch.no_grad():
        torch_out = module.eval()(*(torch.from_numpy(v) for v in inputs.values()))
    if isinstance(torch_out, torch.Tensor):
        torch_out = (torch_out,)
    diff = 0.0
    for a, b in zip(onnx_out, torch_out, strict=True):
        if a.shape != tuple(b.shape):
            raise ValueError(f"ONNX output shape {a.shape} differs from torch {tuple(b.shape)}")
        if a.size:
            diff = max(diff, float(np.abs(a - b.numpy()).max()))
    return diff


def check_dynamic_batch(
    path: Path, make_inputs: object, batch_sizes: Sequence[int] = (1, 7)
) -> dict[str, list[list[int]]]:
    """Run the ONNX model at several batch sizes and check outputs are finite and batched.

    Args:
        path: The ONNX file.
        make_inputs: Callable `batch_size -> {name: array}`.
        batch_sizes: Batch sizes to run.

    Returns:
        {str(batch size): output shapes}, for the model card.

    Raises:
        ValueError: An output has the wrong batch size or holds NaN/inf.
    """
    session = onnx_session(path)
    shapes: dict[str, list[list[int]]] = {}
    for b in batch_sizes:
        outs = session.run(None, make_inputs(b))  # type: ignore[operator]
        for o in outs:
            if o.shape[0] != b:
                raise ValueError(f"{path}: batch {b} gave an output of shape {o.shape}")
            if not np.isfinite(o).all():
                raise ValueError(f"{path}: batch {b} gave non-finite outputs")
        shapes[str(b)] = [list(o.shape) for o in outs]
    return shapes


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_io_names(path: Path) -> tuple[list[str], list[str]]:
    """(input names, output names) of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [
        o.name for o in model.graph.output
    ]
