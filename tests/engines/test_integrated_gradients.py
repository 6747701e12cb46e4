"""Integrated gradients (`engines.explain`) on tiny exported programs whose answers are
known, and on the shipped cell classifier over a real cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.explain import (  # noqa: E402
    Attribution,
    heat_map,
    integrated_gradients,
    load_gradient_program,
)
from engines.repository import ModelRepository, default_repository_path  # noqa: E402

SIDE = 8
CONFIG = f"""\
name: tiny
backend: [pytorch]
max_batch_size: 300
input:
  - {{name: crops, data_type: TYPE_FP32, dims: [3, {SIDE}, {SIDE}]}}
output:
  - {{name: features, data_type: TYPE_FP32, dims: [4]}}
  - {{name: probs, data_type: TYPE_FP32, dims: [2]}}
preprocessing: {{mpp: 0.5, input_size: [{SIDE}, {SIDE}], mean: [127.5, 127.5, 127.5],
  std: [127.5, 127.5, 127.5], channel_order: RGB, layout: NCHW}}
labels: [a, b]
"""


class Linear(torch.nn.Module):
    """probs = W·x (not normalised): integrated gradients are exact, (x - x')·W."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(2, 3 * SIDE * SIDE, generator=g))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = crops.flatten(1)
        return flat[:, :4], flat @ self.weight.T


class CentreOnly(torch.nn.Module):
    """A steep softmax over the mean of the central 4×4 pixels: the rest cannot matter."""

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = crops[:, :, 2:6, 2:6].mean(dim=(1, 2, 3))
        logits = torch.stack([-8 * centre, 8 * centre], dim=1)
        return crops.flatten(1)[:, :4], torch.softmax(logits, dim=1)


def _repository(tmp_path: Path, module: torch.nn.Module) -> ModelRepository:
    folder = tmp_path / "repo" / "tiny"
    (folder / "1").mkdir(parents=True)
    (folder / "config.yaml").write_text(CONFIG)
    batch = torch.export.Dim("batch", min=1, max=300)
    program = torch.export.export(
        module.eval(),
        (),
        {"crops": torch.zeros(2, 3, SIDE, SIDE)},
        dynamic_shapes={"crops": {0: batch}},
    )
    torch.export.save(program, str(folder / "1" / "model.pt2"))
    return ModelRepository(tmp_path / "repo")


def _crop(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def test_linear_model_attributions_are_exact(tmp_path: Path) -> None:
    repo = _repository(tmp_path, Linear())
    program = load_gradient_program(repo, "tiny")
    crop = _crop()
    a = integrated_gradients(program, crop, "b", steps=4, baseline="black", max_steps=4)
    x = (crop.astype(np.float32) - 127.5) / 127.5
    x0 = np.full_like(x, -1.0)
    weight = Linear().weight.detach().numpy()[1].reshape(3, SIDE, SIDE)
    expected = (x - x0).transpose(2, 0, 1) * weight
    np.testing.assert_allclose(a.values, expected, rtol=1e-4, atol=1e-4)
    assert abs(a.convergence_delta) < 1e-3 * max(1.0, abs(a.output_difference))
    assert (a.label, a.target, a.steps) == ("b", 1, 4)


def test_pixels_that_cannot_change_the_output_get_zero(tmp_path: Path) -> None:
    program = load_gradient_program(_repository(tmp_path, CentreOnly()), "tiny")
    crop = _crop(1)
    for baseline in ("black", "white", "blur"):
        a = integrated_gradients(program, crop, 1, baseline=baseline)
        outside = np.ones((SIDE, SIDE), bool)
        outside[2:6, 2:6] = False
        assert np.abs(a.values[:, outside]).max() == 0.0, baseline
        if baseline == "black":  # the centre does move the output against black
            assert np.abs(a.values[:, ~outside]).sum() > 0.01
        assert abs(a.convergence_delta) <= 0.05 * abs(a.output_difference) + 0.005


def test_steps_are_halved_until_the_integral_converges(tmp_path: Path) -> None:
    program = load_gradient_program(_repository(tmp_path, CentreOnly()), "tiny")
    crop = np.full((SIDE, SIDE, 3), 250, np.uint8)  # steep softmax: far from linear
    coarse = integrated_gradients(program, crop, 1, steps=1, baseline="black", max_steps=1)
    fine = integrated_gradients(program, crop, 1, steps=1, baseline="black", max_steps=256)
    assert fine.steps > 1
    assert abs(fine.convergence_delta) <= 0.05 * abs(fine.output_difference) + 0.005
    assert abs(fine.convergence_delta) < abs(coarse.convergence_delta)
    assert fine.output_difference == pytest.approx(coarse.output_difference)


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    program = load_gradient_program(_repository(tmp_path, Linear()), "tiny")
    with pytest.raises(ValueError, match="target must be one of a, b"):
        integrated_gradients(program, _crop(), "c")
    with pytest.raises(ValueError, match="baseline must be one of"):
        integrated_gradients(program, _crop(), 0, baseline="grey")
    with pytest.raises(ValueError, match="crop must be"):
        integrated_gradients(program, np.zeros((4, 4, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="steps must be"):
        integrated_gradients(program, _crop(), 0, steps=0)


def test_heat_map_is_scaled_to_one_at_the_percentile() -> None:
    values = np.zeros((3, 16, 16), np.float32)
    values[0, 4:8, 4:8] = -2.0  # the sign does not matter: |attr|
    values[1, 4:8, 4:8] = 1.0
    heat = heat_map(values, sigma_px=0, percentile=99)
    assert heat.shape == (16, 16) and heat.max() == 1.0 and heat[0, 0] == 0.0
    assert heat_map(np.zeros((3, 4, 4)), sigma_px=1).max() == 0.0


def _cric_cell(shared_data: Path) -> tuple[np.ndarray, str]:
    """One held-out CRIC HSIL cell as the scanner would crop it at 0.5 µm/px (the fields
    are about 0.25 µm/px; see train/data/real_fields.py)."""
    import csv

    import cv2

    from engines.preprocess import cut_crops, resample

    table = shared_data / "cric" / "fields" / "cells.csv"
    if not table.is_file():
        pytest.skip(f"{table} is absent")
    with table.open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["bethesda_system"] == "HSIL")
    image = cv2.imread(str(shared_data / "cric" / "fields" / "images" / row["image"]))
    image = resample(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), 0.5)
    centre = np.array([[float(row["x"]) * 0.5, float(row["y"]) * 0.5]])
    return cut_crops(image, centre, 96, 96)[0], row["bethesda_system"]


@pytest.mark.slow
def test_completeness_on_the_shipped_cell_classifier_for_a_real_cell(shared_data: Path) -> None:
    crop, _ = _cric_cell(shared_data)
    program = load_gradient_program(ModelRepository(default_repository_path()), "cell_classifier")
    for baseline in ("blur", "black"):
        a: Attribution = integrated_gradients(program, crop, "HSIL", baseline=baseline)
        assert np.isfinite(a.values).all()
        assert abs(a.convergence_delta) <= 0.05 * abs(a.output_difference) + 0.005, (
            baseline,
            a.steps,
            a.convergence_delta,
            a.output_difference,
        )
        # The path's end is the model's own call on the crop, run one at a time.
        with torch.no_grad():
            from engines.preprocess import to_input

            x = torch.from_numpy(to_input(crop[None], program.config.preprocessing))
            alone = program.class_outputs(x)[0].numpy()
        np.testing.assert_allclose(a.outputs, alone, atol=1e-4)
