"""Every registered model runs forward and backward; the MIL model masks padding."""

from __future__ import annotations

import pytest
import torch

from train.models import create_model, list_models
from train.models.mil import AttentionMil, masked_softmax

#: CPU-sized arguments for the paper-sized families, so one forward/backward stays quick.
SMALL_KWARGS: dict[str, dict] = {
    "cvm_cervix": {"img_size": 64},
    "global_local_roi": {"backbone": "resnet18", "embed_dim": 32, "attn_dim": 32, "num_heads": 4},
    # lite1/lite2 starts are in the optional `pretrained` extra; CI installs only lite0
    "efficientnet_lite1_cell": {"pretrained": False},
    "efficientnet_lite2_cell": {"pretrained": False},
}
SEED_MODELS = ("se_cellnet_small", "se_cellnet_tiny")


def _inputs(name: str, batch: int = 2, cells: int = 5) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    if name == "gated_attention_mil":
        mask = torch.ones(batch, cells)
        mask[1, 3:] = 0
        return torch.randn(batch, cells, 64), mask
    if name == "global_local_roi":
        mask = torch.ones(batch, cells, dtype=torch.bool)
        mask[1, 3:] = False
        return torch.randn(batch, cells, 3, 32, 32), mask
    return (torch.randn(batch, 3, 64, 64),)


@pytest.mark.parametrize("name", list_models())
def test_model_forward_backward(name: str) -> None:
    """timm's test_model_forward: every registered model trains a step without NaN."""
    model = create_model(name, num_classes=3, **SMALL_KWARGS.get(name, {})).train()
    out = model(*_inputs(name))
    outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    assert outputs[0].shape == (2, 3)
    assert all(torch.isfinite(o).all() for o in outputs)
    sum(o.float().sum() for o in outputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_classifiers_give_logits_and_features(name: str) -> None:
    logits, features = create_model(name).eval()(*_inputs(name))
    assert logits.shape == (2, 3) and features.shape == (2, 64)


def test_registry_rejects_unknown_and_duplicates() -> None:
    from train.models.registry import register_model

    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def se_cellnet_small() -> torch.nn.Module:  # noqa: F811
            return torch.nn.Identity()


def test_cellnet_rejects_bad_widths() -> None:
    with pytest.raises(ValueError):
        create_model("se_cellnet_small", channels=(8, 16))


def test_mil_padding_gets_zero_attention() -> None:
    model: AttentionMil = create_model("gated_attention_mil").eval()
    x = torch.randn(3, 6, 64)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    with torch.no_grad():
        logits, attention = model(x, mask)
    assert torch.all(attention[mask == 0] == 0)
    torch.testing.assert_close(attention.sum(1), torch.ones(3))
    assert attention[2, 0] == pytest.approx(1.0)
    # padding content must not change the result
    x2 = x.clone()
    x2[mask == 0] = 1e3
    with torch.no_grad():
        logits2, attention2 = model(x2, mask)
    torch.testing.assert_close(logits, logits2)
    torch.testing.assert_close(attention, attention2)


@pytest.mark.parametrize("cells", [0, 5])
def test_mil_empty_bags_are_finite(cells: int) -> None:
    model = create_model("gated_attention_mil").eval()
    x = torch.randn(2, cells, 64, requires_grad=True)
    logits, attention = model(x, torch.zeros(2, cells))
    assert logits.shape == (2, 3) and attention.shape == (2, cells)
    assert torch.isfinite(logits).all()
    assert torch.all(attention == 0)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(probs[0], probs[1])
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_masked_softmax_extreme_scores() -> None:
    scores = torch.tensor([[1e6, -1e6, 3.0], [-1e6, -1e6, -1e6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = masked_softmax(scores, mask)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert w[0, 2] == 0
