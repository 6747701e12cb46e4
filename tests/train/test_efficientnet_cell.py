"""EfficientNet-Lite cell classifiers: logits and small features, the ImageNet start versus
a random one, and ONNX export through `CellClassifierExport` with a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from train.export.onnx_export import check_dynamic_batch, export_onnx, max_abs_diff_vs_torch
from train.models import create_model, is_model
from train.models.cell_cnn import CellClassifierExport
from train.models.efficientnet_cell import EfficientNetLiteCell
from train.pretrained import load_efficientnet_lite


def _crops(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(seed))


def test_variants_are_registered() -> None:
    assert all(is_model(f"efficientnet_lite{i}_cell") for i in range(3))


def test_forward_gives_logits_and_small_features() -> None:
    model = create_model("efficientnet_lite0_cell", num_classes=3).eval()
    assert model.embed_dim == 128 and model.num_features == 1280
    with torch.no_grad():
        logits, features = model(_crops())
    assert logits.shape == (2, 3) and features.shape == (2, 128)
    assert (features >= 0).all() and torch.isfinite(logits).all()
    assert torch.equal(model.forward_head(features, pre_logits=True), features)


def test_embed_dim_and_classes_are_configurable() -> None:
    model = create_model("efficientnet_lite0_cell", num_classes=5, embed_dim=32, pretrained=False)
    logits, features = model.eval()(_crops())
    assert logits.shape == (2, 5) and features.shape == (2, 32)


def test_pretrained_backbone_is_imagenet_and_random_is_not() -> None:
    torch.manual_seed(0)
    pretrained = create_model("efficientnet_lite0_cell").eval()
    torch.manual_seed(0)
    random = create_model("efficientnet_lite0_cell", pretrained=False).eval()
    imagenet = load_efficientnet_lite("lite0", num_classes=0).state_dict()
    got = pretrained.backbone.state_dict()
    assert got.keys() == imagenet.keys()
    assert all(torch.equal(got[k], imagenet[k]) for k in got)
    # same seed: the projection and head match, so any difference is the backbone
    assert torch.equal(pretrained.head.weight, random.head.weight)
    with torch.no_grad():
        assert not torch.allclose(pretrained(_crops())[1], random(_crops())[1], atol=1e-3)


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="lite3"):
        EfficientNetLiteCell("lite3", pretrained=False)


def test_onnx_export_with_dynamic_batch(tmp_path: Path) -> None:
    wrapper = CellClassifierExport(create_model("efficientnet_lite0_cell")).eval()
    path = export_onnx(
        wrapper,
        (torch.zeros(2, 3, 96, 96),),
        tmp_path / "cell_classifier.onnx",
        ["crops"],
        ["probs", "features"],
        {"crops": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    sample = _crops(5, seed=1).numpy()
    assert max_abs_diff_vs_torch(wrapper, path, {"crops": sample}) < 1e-4
    shapes = check_dynamic_batch(path, lambda b: {"crops": np.resize(sample, (b, 3, 96, 96))})
    assert shapes == {"1": [[1, 3], [1, 128]], "7": [[7, 3], [7, 128]]}
