"""The transformer-bearing families: CVM-Cervix (paper 004) and the global-local ROI network
(paper 002): forward/backward, parameter counts, padding, pseudo-labels, ONNX export.

The family modules are imported by fixtures, not at the top: importing one registers its
builders, and `test_models.py` parametrises over `list_models()` at collection time with
inputs these two families do not take.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from train.export.onnx_export import (
    check_dynamic_batch,
    export_onnx,
    max_abs_diff_vs_torch,
    onnx_io_names,
    onnx_session,
)

CVM_SIZE = 64
CROP = 64
SLOTS = 6
TINY = {"backbone": "resnet18", "embed_dim": 64, "attn_dim": 64, "num_heads": 4}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_finite_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.fixture(scope="module")
def cvm() -> ModuleType:
    return importlib.import_module("train.models.cvm_cervix")


@pytest.fixture(scope="module")
def gl() -> ModuleType:
    return importlib.import_module("train.models.global_local")


def _bag(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops `[batch, SLOTS, 3, CROP, CROP]` and a mask with padding at the end and inside."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randn(batch, SLOTS, 3, CROP, CROP, generator=gen)
    mask = torch.ones(batch, SLOTS, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1 % batch, [1, 3]] = False
    return cells, mask


# --- CVM-Cervix -----------------------------------------------------------------------


def test_cvm_forward_backward_and_heads(cvm: ModuleType) -> None:
    torch.manual_seed(0)
    model = cvm.cvm_cervix(num_classes=3, img_size=CVM_SIZE, drop_rate=0.1).train()
    x = torch.randn(2, 3, CVM_SIZE, CVM_SIZE)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    assert model.num_features == 2240
    fused = model.forward_features(x)
    assert fused.shape == (2, 2240)
    assert model.forward_head(fused, pre_logits=True) is fused
    logits.logsumexp(dim=1).sum().backward()
    _assert_finite_grads(model)


def test_cvm_parameter_counts(cvm: ModuleType) -> None:
    model = cvm.cvm_cervix(num_classes=11)
    assert model.cnn.num_features == 2048 and model.vit.num_features == 192
    assert 20.7e6 < _count(model.cnn) < 23.0e6  # Xception without its fc: 20.8 M
    assert 5.4e6 < _count(model.vit) < 5.7e6  # DeiT-tiny without its head: 5.5 M
    assert _count(model.head) == 2240 * 2240 + 2240 + 2240 * 11 + 11
    assert not hasattr(model.vit, "dist_token") or model.vit.dist_token is None
    # The paper's "about 120 MB" of FP32 weights.
    assert 115 < _count(model) * 4 / 2**20 < 125


def test_cvm_rejects_bad_arguments(cvm: ModuleType) -> None:
    with pytest.raises(ValueError, match="img_size"):
        cvm.cvm_cervix(img_size=70)
    with pytest.raises(ValueError, match="num_classes"):
        cvm.cvm_cervix(num_classes=0)


def test_cvm_onnx_matches_torch(cvm: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cvm.cvm_cervix(num_classes=3, img_size=CVM_SIZE).eval()
    path = export_onnx(
        model,
        (torch.zeros(2, 3, CVM_SIZE, CVM_SIZE),),
        tmp_path / "cvm.onnx",
        ["crops"],
        ["logits"],
        {"crops": {0: "batch"}, "logits": {0: "batch"}},
    )
    x = np.random.default_rng(0).normal(size=(3, 3, CVM_SIZE, CVM_SIZE)).astype(np.float32)
    for batch in (1, 3):
        assert max_abs_diff_vs_torch(model, path, {"crops": x[:batch]}) <= 1e-4
    shapes = check_dynamic_batch(path, lambda b: {"crops": x[:b]}, (1, 3))
    assert shapes == {"1": [[1, 3]], "3": [[3, 3]]}


# --- Global-local ROI network ---------------------------------------------------------


def test_global_local_forward_backward(gl: ModuleType) -> None:
    torch.manual_seed(0)
    model = gl.global_local_roi(**TINY, drop_rate=0.1).train()
    cells, mask = _bag()
    out = model(cells, mask)
    assert isinstance(out, gl.GlobalLocalOutput)
    assert out.roi_logits.shape == (2, 3)
    assert out.cell_logits.shape == (2, SLOTS, 3)
    assert out.ca_scores.shape == (2, SLOTS)
    torch.testing.assert_close(out.ca_scores.sum(dim=1), torch.ones(2))
    assert torch.all(out.ca_scores[~mask] == 0) and torch.all(out.cell_logits[~mask] == 0)
    loss, parts = gl.global_local_loss(out, torch.tensor([1, 2]), mask)
    assert set(parts) == {"roi", "cell"}
    assert loss.item() == pytest.approx(parts["roi"] + 0.25 * parts["cell"], rel=1e-5)
    loss.backward()
    _assert_finite_grads(model)


@pytest.mark.parametrize("train_mode", [False, True])
def test_padded_cells_change_nothing(gl: ModuleType, train_mode: bool) -> None:
    torch.manual_seed(0)
    model = gl.global_local_roi(**TINY).train(train_mode)
    cells, mask = _bag()
    labels = torch.tensor([2, 1])
    noisy = cells.clone()
    noisy[~mask] = 100 * torch.randn_like(noisy[~mask])
    out, out_noisy = model(cells, mask), model(noisy, mask)
    for a, b in zip(out, out_noisy, strict=True):
        assert torch.equal(a, b)
    loss, _ = gl.global_local_loss(out, labels, mask)
    loss_noisy, _ = gl.global_local_loss(out_noisy, labels, mask)
    assert torch.equal(loss, loss_noisy)


def test_padding_equals_the_unpadded_bag(gl: ModuleType) -> None:
    """Real cells in slots 0, 2, 5 of 6 give what the 3-cell bag gives with no padding."""
    torch.manual_seed(0)
    model = gl.global_local_roi(**TINY).eval()
    cells, _ = _bag(batch=1)
    real = [0, 2, 5]
    mask = torch.zeros(1, SLOTS, dtype=torch.bool)
    mask[0, real] = True
    padded = model(cells, mask)
    alone = model(cells[:, real], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(padded.roi_logits, alone.roi_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.ca_scores[:, real], alone.ca_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded.cell_logits[:, real], alone.cell_logits, rtol=0, atol=1e-5)


def test_att_blstm_is_a_bidirectional_lstm_over_the_real_cells(gl: ModuleType) -> None:
    """Eq. 1-2 against `nn.LSTM(bidirectional=True)` run on the real cells alone."""
    torch.manual_seed(0)
    blstm = gl.AttBiLstm(8, 4)
    reference = nn.LSTM(8, 4, batch_first=True, bidirectional=True)
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        getattr(reference, name).data.copy_(getattr(blstm.forward_lstm, name))
        getattr(reference, name + "_reverse").data.copy_(getattr(blstm.backward_lstm, name))
    x = torch.randn(1, 7, 8)
    mask = torch.tensor([[False, True, True, False, True, True, False]])
    h, _ = reference(x[:, mask[0]])
    a = torch.softmax(blstm.w(torch.tanh(h)).squeeze(-1), dim=1)
    expected = torch.tanh(torch.sum(a.unsqueeze(-1) * h, dim=1))
    with torch.no_grad():
        torch.testing.assert_close(blstm(x, mask), expected, rtol=0, atol=1e-6)


def test_empty_bag_is_finite(gl: ModuleType) -> None:
    model = gl.global_local_roi(**TINY).eval()
    cells, mask = _bag()
    mask[1] = False
    out = model(cells, mask)
    assert all(torch.isfinite(t).all() for t in out)
    assert torch.all(out.ca_scores[1] == 0)
    torch.testing.assert_close(out.roi_logits[1], model.head.bias.detach())


@pytest.mark.parametrize(
    ("n_real", "k"), [(0, 0), (1, 0), (2, 1), (5, 1), (10, 1), (20, 2), (25, 3), (30, 3)]
)
def test_pseudo_label_count(gl: ModuleType, n_real: int, k: int) -> None:
    """k = ceil(10 % of the real cells), at most half of them; padding never counts."""
    slots = n_real + 4
    mask = torch.zeros(1, slots, dtype=torch.bool)
    mask[0, 2 : 2 + n_real] = True
    scores = torch.rand(1, slots, generator=torch.Generator().manual_seed(n_real))
    weights, targets = gl.pseudo_cell_labels(scores, torch.tensor([2]), mask, 3)
    assert int(targets[0, :, 2].sum()) == k  # top cells: positives of the HSIL branch
    assert int((weights[0, :, 2] - targets[0, :, 2]).sum()) == k  # least: its negatives
    assert torch.all(weights[0, ~mask[0]] == 0)


def test_pseudo_label_rules(gl: ModuleType) -> None:
    """Paper 002, section 2.4: which branch gets which cells for NILM, LSIL and HSIL ROIs."""
    slots = 24
    mask = torch.ones(3, slots, dtype=torch.bool)
    mask[:, [3, 7, 8, 20]] = False  # 20 real cells: k = 2
    scores = torch.linspace(0.0, 1.0, slots).repeat(3, 1)
    scores[:, [3, 7]] = 10.0  # padding with the highest and the lowest scores is ignored
    scores[:, [8, 20]] = -10.0
    scores[:, 11], scores[:, 5] = 5.0, 4.0  # the two top real cells
    scores[:, 2], scores[:, 17] = -5.0, -4.0  # the two least real cells
    top = torch.zeros(slots, dtype=torch.bool)
    top[[11, 5]] = True
    least = torch.zeros(slots, dtype=torch.bool)
    least[[2, 17]] = True
    none = torch.zeros(slots)
    weights, targets = gl.pseudo_cell_labels(scores, torch.tensor([0, 1, 2]), mask, 3)

    # NILM ROI: every real cell is a positive of the NILM branch, nothing else is fed.
    assert torch.equal(weights[0, :, 0], mask[0].float())
    assert torch.equal(targets[0, :, 0], mask[0].float())
    assert torch.equal(weights[0, :, 1], none) and torch.equal(weights[0, :, 2], none)
    # LSIL ROI: LSIL branch gets top positives and least negatives; NILM gets top negatives.
    assert torch.equal(weights[1, :, 1], (top | least).float())
    assert torch.equal(targets[1, :, 1], top.float())
    assert torch.equal(weights[1, :, 0], top.float())
    assert torch.equal(targets[1, :, 0], none)
    assert torch.equal(weights[1, :, 2], none)
    # HSIL ROI: HSIL branch as above; NILM and LSIL branches get the top cells as negatives.
    assert torch.equal(weights[2, :, 2], (top | least).float())
    assert torch.equal(targets[2, :, 2], top.float())
    for branch in (0, 1):
        assert torch.equal(weights[2, :, branch], top.float())
        assert torch.equal(targets[2, :, branch], none)


def test_cell_loss_by_hand(gl: ModuleType) -> None:
    """L_cell = per ROI, sum over branches of the mean BCE on their cells, / C; batch mean."""
    logits = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(0))
    scores = torch.arange(10.0).repeat(2, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    out = gl.GlobalLocalOutput(torch.zeros(2, 3), logits, scores)
    _, parts = gl.global_local_loss(out, torch.tensor([0, 2]), mask)

    def bce(x: torch.Tensor, target: float) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(x, torch.full_like(x, target))

    nilm_roi = bce(logits[0, :, 0], 1.0) / 3
    hsil_roi = torch.cat([bce(logits[1, 9:, 2], 1.0)[None], bce(logits[1, :1, 2], 0.0)[None]])
    hsil_roi = (hsil_roi.mean() + bce(logits[1, 9:, 0], 0.0) + bce(logits[1, 9:, 1], 0.0)) / 3
    assert parts["cell"] == pytest.approx(float((nilm_roi + hsil_roi) / 2), rel=1e-5)


def test_cell_probabilities(gl: ModuleType) -> None:
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    out = gl.GlobalLocalOutput(torch.zeros(2, 3), logits, torch.zeros(2, 5))
    probs = gl.cell_probabilities(out)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2, 5))
    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))


def test_global_local_rejects_bad_arguments(gl: ModuleType) -> None:
    with pytest.raises(ValueError, match="backbone"):
        gl.global_local_roi(backbone="vgg16")
    with pytest.raises(ValueError, match="num_heads"):
        gl.global_local_roi(**{**TINY, "num_heads": 5})
    model = gl.global_local_roi(**TINY)
    cells, mask = _bag()
    with pytest.raises(ValueError, match="bool"):
        model(cells, mask.float())
    with pytest.raises(ValueError, match="pseudo_fraction"):
        gl.pseudo_cell_labels(torch.zeros(2, SLOTS), torch.tensor([0, 1]), mask, 3, 0.7)


def test_global_local_paper_size(gl: ModuleType) -> None:
    """ResNet-50, D = 768, d = 1024, on 224-pixel crops (the 7 x 7 grid, no resizing)."""
    model = gl.global_local_roi().eval()
    assert _count(model.backbone) == 23_508_032  # torchvision ResNet-50 without its fc
    assert 52.0e6 < _count(model) < 53.0e6
    with torch.no_grad():
        out = model(torch.randn(1, 2, 3, 224, 224), torch.ones(1, 2, dtype=torch.bool))
    assert out.roi_logits.shape == (1, 3) and out.cell_logits.shape == (1, 2, 3)


def test_global_local_onnx_matches_torch(gl: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    wrapper = gl.GlobalLocalExport(gl.global_local_roi(**TINY)).eval()
    cells, mask = _bag()
    names = ["roi_probs", "cell_probs", "attention"]
    path = export_onnx(
        wrapper,
        (cells, mask.float()),
        tmp_path / "global_local.onnx",
        ["cells", "mask"],
        names,
        {
            "cells": {0: "batch", 1: "cells"},
            "mask": {0: "batch", 1: "cells"},
            "roi_probs": {0: "batch"},
            "cell_probs": {0: "batch", 1: "cells"},
            "attention": {0: "batch", 1: "cells"},
        },
    )
    assert onnx_io_names(path) == (["cells", "mask"], names)
    rng = np.random.default_rng(0)
    for batch, slots in ((1, SLOTS), (3, 9)):
        x = rng.normal(size=(batch, slots, 3, CROP, CROP)).astype(np.float32)
        m = np.ones((batch, slots), np.float32)
        m[0, slots - 2 :] = 0
        m[-1, 1] = 0
        assert max_abs_diff_vs_torch(wrapper, path, {"cells": x, "mask": m}) <= 1e-4
    x = rng.normal(size=(3, SLOTS, 3, CROP, CROP)).astype(np.float32)
    m = np.ones((3, SLOTS), np.float32)
    m[2] = 0  # an all-padding bag
    _, cell_probs, attention = onnx_session(path).run(None, {"cells": x, "mask": m})
    assert np.all(cell_probs[2] == 0) and np.all(attention[2] == 0)
    shapes = check_dynamic_batch(path, lambda b: {"cells": x[:b], "mask": m[:b]}, (1, 3))
    assert shapes["3"] == [[3, 3], [3, SLOTS, 3], [3, SLOTS]]
