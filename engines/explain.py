"""Integrated gradients of a model's class output over its image input, and a heat map.

Paper 001 (Wang et al., *Towards Interpretable Attention Networks for Cervical Cancer
Analysis*, shared/papers/001_e26595dff0242cd0.txt) explains its cell classifier with
integrated gradients (Sundararajan, Taly and Yan, 2017): the attribution of input element
i is ``(x_i - x'_i) * ∫₀¹ ∂f(x' + α(x - x'))/∂x_i dα`` for a baseline x'. Its
completeness axiom says the attributions sum to ``f(x) - f(x')``; what is left over (the
convergence delta) measures how well the path integral was approximated.

The integral is the trapezoid rule over `steps` equal intervals (steps + 1 points, the
end points at half weight), halved while the delta is too large (see
`integrated_gradients`), run as batches through the model's exported PyTorch program
(`model.pt2`), loaded here with autograd on: the pytorch backend serves under
`torch.inference_mode()`, which keeps no gradients. The program crosses from `train` as a
file, as every model does; nothing here knows the network's Python class.

Baselines, in pixel space before the model's normalisation:

- ``blur`` (the default): the crop under a Gaussian blur of `BLUR_SIGMA_UM` µm. It keeps
  the crop's stain and brightness and removes the structure at and below nuclear scale
  (nuclear edge, chromatin, the nucleus-cytoplasm border), which is what grades a cell;
  the attributions then say which of that structure moved the output (Sturmfels, Lundberg
  and Lee, *Visualizing the Impact of Feature Attribution Baselines*, Distill 2020).
  Its weakness: the shipped classifier calls most blurred crops HSIL (a smeared dark
  blob), so for an HSIL call f(x) - f(x') can be a few hundredths, and the map shows
  what made the cell *more* HSIL than its own blur.
- ``black``: zeros, the usual choice for natural images. In bright-field cytology dark
  means densely stained, so a dark nucleus lies *near* this baseline and gets little
  attribution however much it matters (IG scales by ``x - x'``), while bright glass lies
  as far from it as a pixel can. On ten held-out CRIC abnormal cells its maps put 5.6 %
  (median) of their mass in the central 6 µm disc that holds the labelled nucleus, no more
  than the disc's 4.9 % of the crop; blur put 10.7 %.
- ``white``: glass (255), "no cell here". Background pixels equal the baseline and get
  exactly zero attribution by construction, so the map cannot show the model looking
  at the background even when it does (15.9 % in the disc on the same cells).

Importing this module imports no runtime; torch is imported on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.backends.pytorch import read_exported_program
from engines.config import ModelConfig
from engines.errors import BackendUnavailableError, ModelLoadError, ModelNotFoundError
from engines.hashing import cached_file_sha256
from engines.preprocess import BACKGROUND_RGB, to_input
from engines.repository import ModelRepository

__all__ = [
    "BASELINES",
    "BLUR_SIGMA_UM",
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "Attribution",
    "GradientProgram",
    "baseline_image",
    "heat_map",
    "integrated_gradients",
    "load_gradient_program",
]

BASELINES = ("blur", "black", "white")
DEFAULT_STEPS = 32
#: Most trapezoid intervals an adaptive run may halve its way to (see `integrated_gradients`).
MAX_STEPS = 256
#: Convergence: |delta| <= RTOL * |f(x) - f(x')| + ATOL, in units of the output.
RTOL = 0.05
ATOL = 0.005
#: The blur baseline's Gaussian sigma: about half a small nucleus (NILM nuclei are
#: 5–8 µm across), so nuclei and chromatin are smeared into their surroundings.
BLUR_SIGMA_UM = 4.0
PROGRAM_NAME = "model.pt2"


@dataclass(frozen=True)
class Attribution:
    """Integrated gradients of one class output over one image.

    Attributes:
        values: `[3, H, W]` float32, one attribution per input element (the model's
            normalised input), in the units of the output: they sum to about
            `output - baseline_output`.
        target: index of the explained class in the model's labels.
        label: its label.
        output: the class output at the image, f(x).
        baseline_output: the class output at the baseline, f(x').
        outputs: every class's output at the image, in label order.
        steps: trapezoid intervals along the path.
        baseline: which baseline (one of `BASELINES`).
    """

    values: np.ndarray
    target: int
    label: str
    output: float
    baseline_output: float
    outputs: tuple[float, ...]
    steps: int
    baseline: str

    @property
    def output_difference(self) -> float:
        """f(x) - f(x'): what the attributions should sum to."""
        return self.output - self.baseline_output

    @property
    def convergence_delta(self) -> float:
        """Sum of attributions minus f(x) - f(x'); 0 for an exact integral."""
        return float(self.values.sum(dtype=np.float64)) - self.output_difference


def _import_torch() -> Any:
    try:
        import torch
        import torch.export.passes  # noqa: F401 - `torch.export` does not import it
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(
            f"explanations need the torch package, which cannot be imported ({exc})"
        ) from exc
    return torch


class GradientProgram:
    """One model version's `model.pt2`, run with autograd on to take input gradients.

    Parameters are frozen (only the input needs a gradient). Calls hold no state, so many
    threads may run it at once, each with its own graph.

    Args:
        config: the model's config; its first input is the image, and its class output is
            the first output with one value per label.
        version: the version number.
        version_dir: the version folder holding `model.pt2`.
        device: ``cpu`` or ``cuda[:N]``.

    Raises:
        ModelNotFoundError: the folder has no `model.pt2`.
        ModelLoadError: PyTorch cannot load it, or it lacks a class output.
        BackendUnavailableError: torch cannot be imported.
    """

    def __init__(
        self, config: ModelConfig, version: int, version_dir: Path, device: str = "cpu"
    ) -> None:
        torch = _import_torch()
        path = Path(version_dir) / PROGRAM_NAME
        if not path.is_file():
            raise ModelNotFoundError(
                f"{path}: model '{config.name}' version {version} has no exported PyTorch "
                "program, which explanations need"
            )
        if config.preprocessing is None or config.preprocessing.layout.upper() != "NCHW":
            raise ModelLoadError(f"model '{config.name}' does not declare an NCHW image input")
        self.config = config
        self.version = version
        self.path = path
        self.sha256 = cached_file_sha256(path)
        self.input_name = config.inputs[0].name
        self.output_index = _class_output_index(config)
        self._torch = torch
        self._device = torch.device(device)
        program = read_exported_program(torch, path)
        if self._device.type != "cpu":
            program = torch.export.passes.move_to_device_pass(program, self._device)
        args_spec, kwargs_spec = program.call_spec.in_spec.children()
        self._by_keyword = args_spec.num_leaves == 0 and bool(kwargs_spec.context)
        self._output_key = (
            config.outputs[self.output_index].name
            if program.call_spec.out_spec.type is dict
            else None
        )
        self._module = program.module()
        for parameter in self._module.parameters():
            parameter.requires_grad_(False)

    def __repr__(self) -> str:
        return f"GradientProgram({self.config.name}@{self.version}, {self.sha256[:12]})"

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.config.labels)

    def class_outputs(self, x: Any) -> Any:
        """The class output `[N, n_labels]` for a `[N, 3, H, W]` torch input (autograd on)."""
        if self._by_keyword:
            result = self._module(**{self.input_name: x})
        else:
            result = self._module(x)
        if self._output_key is not None:
            return result[self._output_key]
        if isinstance(result, list | tuple):
            return result[self.output_index]
        return result


def _class_output_index(config: ModelConfig) -> int:
    n = len(config.labels)
    for i, spec in enumerate(config.outputs):
        if n and tuple(spec.dims)[-1:] == (n,):
            return i
    raise ModelLoadError(
        f"model '{config.name}' has no output with one value per label ({n} labels)"
    )


_load_lock = threading.Lock()


def load_gradient_program(
    repository: ModelRepository, name: str, version: int | None = None, device: str = "cpu"
) -> GradientProgram:
    """Load `name`'s `model.pt2` for gradients: `version`, or the highest one served.

    Raises:
        ModelNotFoundError: no such model or served version, or no `model.pt2`.
        ModelLoadError, BackendUnavailableError: as `GradientProgram`.
    """
    config = repository.config(name)
    served = repository.versions(name)
    if version is None:
        if not served:
            raise ModelNotFoundError(f"model '{name}' has no served version")
        version = served[-1]
    elif version not in served:
        raise ModelNotFoundError(f"model '{name}' does not serve version {version}")
    with _load_lock:  # torch.export.load is not documented as thread-safe
        return GradientProgram(config, version, repository.path / name / str(version), device)


def baseline_image(crop: np.ndarray, kind: str, mpp: float) -> np.ndarray:
    """The baseline for `crop` (`H×W×3` uint8 RGB at `mpp` µm/px), `H×W×3` float32 0–255.

    Raises:
        ValueError: `kind` is not one of `BASELINES`.
    """
    if kind == "blur":
        sigma_px = BLUR_SIGMA_UM / mpp
        blurred = cv2.GaussianBlur(
            crop.astype(np.float32), (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT
        )
        return blurred
    if kind == "black":
        return np.zeros(crop.shape, np.float32)
    if kind == "white":
        return np.full(crop.shape, float(BACKGROUND_RGB), np.float32)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def integrated_gradients(
    program: GradientProgram,
    crop: np.ndarray,
    target: int | str,
    steps: int = DEFAULT_STEPS,
    baseline: str = "blur",
    max_steps: int = MAX_STEPS,
    rtol: float = RTOL,
    batch_size: int = 64,
) -> Attribution:
    """Integrated gradients of `program`'s class `target` over one crop.

    The crop is normalised exactly as the scanner normalises it (`engines.preprocess`);
    so is the baseline, so attributions are per element of the model's input.

    The path is first cut into `steps` intervals; while the convergence delta exceeds
    `rtol * |f(x) - f(x')| + ATOL` and `steps < max_steps`, every interval is halved
    (the trapezoid rule on a nested grid reuses every gradient already taken). A
    classifier's softmax output can swing sharply and more than once along the path, which
    a fixed 32-step rule can miss by most of f(x) - f(x').

    Args:
        program: the model.
        crop: `H×W×3` uint8 RGB at the model's mpp and input size.
        target: class index or label.
        steps: trapezoid intervals to start with (`steps + 1` model evaluations), >= 1.
        baseline: one of `BASELINES`.
        max_steps: most intervals; equal to `steps` for a fixed rule.
        rtol: relative tolerance on the convergence delta.
        batch_size: path points per forward/backward pass.

    Returns:
        The attributions and the outputs at both ends of the path; `steps` says how many
        intervals were used.

    Raises:
        ValueError: bad target, steps, baseline or crop shape.
    """
    torch = program._torch
    prep = program.config.preprocessing
    width, height = prep.input_size
    if crop.shape != (height, width, 3) or crop.dtype != np.uint8:
        raise ValueError(f"crop must be {height}×{width}×3 uint8, got {crop.shape} {crop.dtype}")
    if not 1 <= steps <= max_steps:
        raise ValueError(f"steps must be 1 to max_steps ({max_steps}), got {steps}")
    index = _target_index(program.labels, target)
    start = torch.from_numpy(to_input(baseline_image(crop, baseline, prep.mpp)[None], prep))
    end = torch.from_numpy(to_input(crop[None], prep))
    start, end = start.to(program._device), end.to(program._device)

    def gradients(alphas: np.ndarray) -> tuple[Any, np.ndarray]:
        """Sum of the target's input gradients over the path points, and its outputs there."""
        total = torch.zeros_like(end, dtype=torch.float64)
        outputs = [np.zeros((0, len(program.labels)))]
        for first in range(0, len(alphas), batch_size):
            a = torch.from_numpy(alphas[first : first + batch_size]).float()
            a = a.to(program._device)[:, None, None, None]
            path = (start + a * (end - start)).requires_grad_(True)
            out = program.class_outputs(path)
            (grads,) = torch.autograd.grad(out[:, index].sum(), path)
            total += grads.double().sum(0, keepdim=True)
            outputs.append(out.detach().double().cpu().numpy())
        return total, np.concatenate(outputs)

    ends, outputs = gradients(np.array([0.0, 1.0]))
    baseline_output, at_x = float(outputs[0, index]), outputs[1]
    expected = float(at_x[index]) - baseline_output
    inner, _ = gradients(np.arange(1, steps) / steps)
    diff = (end - start).double()
    while True:
        values = diff * (0.5 * ends + inner) / steps
        delta = float(values.sum()) - expected
        if abs(delta) <= rtol * abs(expected) + ATOL or 2 * steps > max_steps:
            break
        midpoints, _ = gradients((2 * np.arange(steps) + 1) / (2 * steps))
        inner += midpoints
        steps *= 2
    return Attribution(
        values=values[0].float().cpu().numpy(),
        target=index,
        label=program.labels[index],
        output=float(at_x[index]),
        baseline_output=baseline_output,
        outputs=tuple(float(v) for v in at_x),
        steps=steps,
        baseline=baseline,
    )


def _target_index(labels: Sequence[str], target: int | str) -> int:
    if isinstance(target, str):
        if target not in labels:
            raise ValueError(f"target must be one of {', '.join(labels)}, not {target!r}")
        return list(labels).index(target)
    if not 0 <= target < len(labels):
        raise ValueError(f"target index must be 0 to {len(labels) - 1}, got {target}")
    return int(target)


def heat_map(values: np.ndarray, sigma_px: float = 1.0, percentile: float = 99.0) -> np.ndarray:
    """Per-pixel |attribution| summed over channels, smoothed, scaled to 0–1.

    Args:
        values: `[3, H, W]` attributions.
        sigma_px: Gaussian smoothing, input pixels (0: none).
        percentile: the value mapped to 1 (higher ones are clipped), so a few extreme
            pixels do not wash out the rest.

    Returns:
        `H×W` float32 in [0, 1]; all zeros where every attribution is 0.
    """
    magnitude = np.abs(values).sum(axis=0).astype(np.float32)
    if sigma_px > 0:
        magnitude = cv2.GaussianBlur(magnitude, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    scale = float(np.percentile(magnitude, percentile))
    if scale <= 0:
        return np.zeros(magnitude.shape, np.float32)
    return np.clip(magnitude / scale, 0.0, 1.0)
