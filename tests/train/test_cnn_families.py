"""The CNN attention families of papers 000 and 001: attention-fusion ResNet-50 and its
ablations, RCAN-DenseNet-121, RAN-ResNet-50. Forward/backward, parameter counts against the
literature, where the attention sits, the DNL and SAM blocks, ONNX export with dynamic batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import train.models.attention_fusion as af
import train.models.rcan_densenet as rd
import train.models.residual_attention as ra
from train.export.onnx_export import export_onnx, max_abs_diff_vs_torch
from train.models.cell_cnn import SqueezeExcite
from train.models.registry import create_model, is_model

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": af.resnet50,
    "se_resnet50": af.se_resnet50,
    "sam_resnet50": af.sam_resnet50,
    "dnl_resnet50": af.dnl_resnet50,
    "se_sam_resnet50": af.se_sam_resnet50,
    "se_sam_dnl_resnet50": af.se_sam_dnl_resnet50,
    "densenet121": rd.densenet121,
    "rcan_densenet121": rd.rcan_densenet121,
    "ran_resnet50": ra.ran_resnet50,
}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm trained-looking statistics and non-zero scales.

    The zero-initialised last BNs (and the DNL's output norm) would otherwise silence the
    residual branches, and with them the attention an export test should exercise.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) * 0.5 + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean.data = torch.randn(c, generator=gen) * 0.1
            m.running_var.data = torch.rand(c, generator=gen) + 0.5


# --- every builder --------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, drop_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(features), model(x))


@pytest.mark.parametrize("name", ["se_sam_dnl_resnet50", "rcan_densenet121", "ran_resnet50"])
@pytest.mark.parametrize("size", [(80, 80), (97, 71)])
def test_main_models_take_other_sizes_and_channels(name: str, size: tuple[int, int]) -> None:
    model = BUILDERS[name](num_classes=5, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, 5)


def test_builders_are_registered() -> None:
    assert all(is_model(name) for name in BUILDERS)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: af.AttentionFusionResNet(attention=("cbam",)), "attention"),
        (lambda: af.AttentionFusionResNet(dnl_stage=1), "dnl_stage"),
        (lambda: af.AttentionFusionResNet(fuse_stages=()), "fuse_stages"),
        (lambda: af.SpatialAttention(kernel_size=2), "kernel_size"),
        (lambda: af.DisentangledNonLocal(30, reduction=4), "reduction"),
        (lambda: rd.RcanDenseNet(rir_blocks=(5,)), "rir_blocks"),
        (lambda: ra.ResidualAttentionNet(modules_per_stage=(1, 1)), "modules_per_stage"),
        (lambda: ra.ran_resnet50(num_classes=0), "num_classes"),
    ],
)
def test_bad_arguments_raise(build: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


# --- parameter counts -----------------------------------------------------------------


def test_baselines_match_the_reference_implementations_exactly() -> None:
    """Plain ResNet-50 and DenseNet-121 are torchvision's (25.6 M, 8.0 M) to the parameter."""
    assert _count(af.resnet50(num_classes=1000)) == _count(torchvision.models.resnet50())
    assert _count(af.resnet50(num_classes=1000)) == 25_557_032
    assert _count(rd.densenet121(num_classes=1000)) == _count(torchvision.models.densenet121())
    assert _count(rd.densenet121(num_classes=1000)) == 7_978_856


def test_se_in_every_stage_is_se_resnet50() -> None:
    """SE in all four stages with the stage-5 head is Hu et al.'s SE-ResNet-50 (28.1 M)."""
    model = af.AttentionFusionResNet(
        num_classes=1000, attention=("se",), attention_stages=(2, 3, 4, 5), fuse_stages=(5,)
    )
    assert _count(model) == _count(timm.create_model("seresnet50", pretrained=False))


def test_ablations_add_parameters_in_order_and_by_exact_parts() -> None:
    counts = {name: _count(BUILDERS[name](num_classes=1000)) for name in list(BUILDERS)[:6]}
    fused = _count(af.resnet50(num_classes=1000, fuse_stages=(3, 4, 5)))
    order = ["resnet50", "sam_resnet50", "se_resnet50", "se_sam_resnet50", "dnl_resnet50"]
    assert [counts[n] for n in order] == sorted(counts[n] for n in order)
    assert counts["se_sam_dnl_resnet50"] == max(counts.values())

    # The 3584-wide head over 2048: 1536 more inputs for each of the 1000 classes.
    assert fused - counts["resnet50"] == 1536 * 1000
    # SAM is a 1x1 conv on one channel (weight + bias) in each of the 13 stage 2-4 blocks.
    assert counts["sam_resnet50"] - fused == 13 * 2
    assert counts["se_sam_resnet50"] - counts["se_resnet50"] == 13 * 2
    se_params = sum(
        _count(SqueezeExcite(c, reduction=16)) * n for c, n in ((256, 3), (512, 4), (1024, 6))
    )
    assert counts["se_resnet50"] - fused == se_params
    dnl_params = _count(af.DisentangledNonLocal(2048))
    assert counts["dnl_resnet50"] - fused == dnl_params
    assert counts["se_sam_dnl_resnet50"] - counts["se_sam_resnet50"] == dnl_params


@pytest.mark.parametrize("name", ["se_sam_dnl_resnet50", "densenet121", "ran_resnet50"])
def test_head_is_the_only_part_that_depends_on_num_classes(name: str) -> None:
    big, small = BUILDERS[name](num_classes=1000), BUILDERS[name](num_classes=7)
    assert _count(big) - _count(small) == 993 * (big.num_features + 1)


def test_rcan_densenet_adds_one_rir_module() -> None:
    plain, rcan = rd.densenet121(num_classes=1000), rd.rcan_densenet121(num_classes=1000)
    rir = rd.ResidualInResidual(32, n_groups=2, n_rcabs=2)
    assert _count(rcan) - _count(plain) == _count(rir)
    assert _count(rcan) < 1.02 * _count(plain)


@pytest.mark.parametrize(
    ("modules_per_stage", "published"), [((1, 1, 1), 31.9e6), ((1, 2, 3), 51.3e6)]
)
def test_ran_matches_attention_56_and_92(modules_per_stage: tuple[int, ...], published: float):
    """Within 3 % of the RAN paper's Attention-56 / -92 (31.9 M / 51.3 M at 1000 classes).

    The paper rounds to 0.1 M and leaves the mask branch's unit count per level and the 1x1
    convs' biases open; measured here: 31.81 M (-0.3 %) and 52.47 M (+2.3 %).
    """
    model = ra.ran_resnet50(num_classes=1000, modules_per_stage=modules_per_stage)
    assert abs(_count(model) - published) <= 0.03 * published


# --- where the attention sits -----------------------------------------------------------


def test_se_then_sam_in_stages_2_to_4_and_dnl_after_stage_5() -> None:
    model = af.se_sam_dnl_resnet50()
    for stage in model.stages[:3]:
        for block in stage:
            assert isinstance(block, af.Bottleneck)
            assert [type(m) for m in block.attn] == [SqueezeExcite, af.SpatialAttention]
    *blocks, dnl = model.stages[3]
    assert all(isinstance(b.attn, nn.Identity) for b in blocks)
    assert isinstance(dnl, af.DisentangledNonLocal)
    assert model.num_features == 512 + 1024 + 2048
    assert af.resnet50().num_features == 2048
    assert not any(isinstance(m, af.DisentangledNonLocal) for m in af.se_sam_resnet50().modules())


def test_rir_sits_on_the_last_dense_layer_of_block_4() -> None:
    model = rd.rcan_densenet121()
    blocks = [m for m in model.stages if isinstance(m, rd.DenseBlock)]
    assert [len(b.layers) for b in blocks] == [6, 12, 24, 16]
    rirs = [m for m in model.modules() if isinstance(m, rd.ResidualInResidual)]
    assert len(rirs) == 1 and blocks[3].layers[-1].attention is rirs[0]
    assert not any(isinstance(m, rd.ResidualInResidual) for m in rd.densenet121().modules())


# --- the attention blocks -----------------------------------------------------------------


def test_sam_map_is_a_spatial_gate_in_unit_range() -> None:
    torch.manual_seed(0)
    sam = af.SpatialAttention()
    x = torch.randn(2, 8, 5, 7) * 3
    weights = sam.attention_map(x)
    assert weights.shape == (2, 1, 5, 7)
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(sam(x), x * weights)
    # A function of the channel mean only: the order of the channels does not matter.
    torch.testing.assert_close(sam.attention_map(x[:, torch.randperm(8)]), weights)


def test_dnl_pairwise_term_is_whitened() -> None:
    """A constant added at every position moves every query and key alike and cancels."""
    torch.manual_seed(0)
    dnl = af.DisentangledNonLocal(16).eval()
    x = torch.randn(2, 16, 4, 5)
    shift = torch.randn(1, 16, 1, 1) * 5
    with torch.no_grad():
        pairwise = dnl.pairwise_attention(x)
        assert pairwise.shape == (2, 20, 20)
        torch.testing.assert_close(pairwise.sum(-1), torch.ones(2, 20))
        torch.testing.assert_close(dnl.pairwise_attention(x + shift), pairwise)

        def raw(t: torch.Tensor) -> torch.Tensor:
            q, k = dnl.query(t).flatten(2), dnl.key(t).flatten(2)
            return torch.softmax(q.transpose(1, 2) @ k * dnl.scale, dim=-1)

        # Without the mean subtraction the key's shift would reweight the positions.
        assert not torch.allclose(raw(x + shift), raw(x), atol=1e-3)
        # The unary term: one distribution over key positions, shared by every query.
        unary = dnl.unary_attention(x)
        assert unary.shape == (2, 1, 20)
        torch.testing.assert_close(unary.sum(-1), torch.ones(2, 1))


def test_dnl_output_matches_its_formula() -> None:
    torch.manual_seed(0)
    dnl = af.DisentangledNonLocal(16).eval()
    _randomize_norms(dnl)
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        q, k, v = (conv(x).flatten(2) for conv in (dnl.query, dnl.key, dnl.value))
        q, k = q - q.mean(2, keepdim=True), k - k.mean(2, keepdim=True)
        pairwise = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8**0.5, dim=-1)
        unary = torch.softmax(dnl.unary(x).flatten(2), dim=-1)
        y = torch.einsum("bij,bcj->bci", pairwise + unary, v).reshape(2, 8, 3, 4)
        torch.testing.assert_close(dnl(x), x + dnl.norm(dnl.proj(y)))
        # Zero-initialised output norm: a fresh block is the identity.
        torch.testing.assert_close(af.DisentangledNonLocal(16).eval()(x), x)


@pytest.mark.parametrize("size", [(16, 16), (13, 11)])
def test_ran_mask_is_full_size_and_in_unit_range(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    mask = ra.SoftMaskBranch(8, num_pools=3).eval()
    with torch.no_grad():
        m = mask(torch.randn(2, 8, *size))
    assert m.shape == (2, 8, *size)
    assert (m >= 0).all() and (m <= 1).all()


# --- ONNX -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_onnx_export_with_dynamic_batch_matches_torch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=5).eval()
    _randomize_norms(model)
    path = export_onnx(
        model,
        (torch.randn(2, 3, 64, 64),),
        tmp_path / f"{name}.onnx",
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        images = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        assert max_abs_diff_vs_torch(model, path, {"images": images}) <= 1e-4
