"""ResNet-50 with SE + SAM in series, a Disentangled Non-Local block and multi-stage fusion.

Su, Shi, Peng, Zheng, *Cervical Cell Image Classification Based On Multiple Attention
Fusion* (shared/papers/000_d19e9f605dfeb994.txt). The paper counts ResNet-50 in five
stages: stage 1 is the 7x7 stem (with its max pool), stages 2-5 are the bottleneck stages
conv2_x..conv5_x (3, 4, 6, 3 blocks; 256, 512, 1024, 2048 channels).

- Every bottleneck of stages 2-4 carries SE (Hu et al., channel attention, reduction 16)
  followed in series by SAM (channel-mean map -> 1x1 conv -> sigmoid -> scale, eqs. 4-6),
  on the residual branch before the identity is added, where SE-ResNet puts SE.
- A Disentangled Non-Local block (Yin et al., ECCV 2020) follows the last bottleneck of
  stage 5: a whitened pairwise term (query and key embeddings minus their spatial means,
  softmax over key positions) plus a unary term (its own 1x1 conv over the input at each
  key position, its own softmax), summed, applied to a value embedding, projected back by
  1x1 conv + norm and added to the input.
- The outputs of stages 3, 4 and 5 are globally average pooled and concatenated
  (512 + 1024 + 2048 = 3584 features) into the FC classifier.

The ablations of Table I are builders of the one model that differ only by arguments:
`resnet50`, `se_resnet50`, `sam_resnet50`, `dnl_resnet50`, `se_sam_resnet50` and the full
`se_sam_dnl_resnet50`. The paper's "ResNet50" row cites the standard network [He et al.],
so `resnet50` classifies from stage 5 only (25.6 M parameters at 1000 classes, as
published). The attention ablations keep the paper's stage 3-5 fusion head: the paper
credits the whole gap between "SE + SAM" and "Ours" to the DNL block, which holds only if
both share that head. Any builder takes `fuse_stages=...` to change this.

Not in the paper, chosen here: the last BN of each residual branch and the DNL output norm
start at zero (timm's `zero_init_last`, mmseg's DNL `zeros_init`), so every block starts as
an identity; SAM's map is a sigmoid (the paper's eq. 5 omits it; its figure gates with it).

Input: `[B, in_chans, H, W]` float32, H and W >= 64 (the paper uses 80 x 80 cells).
`forward` returns logits `[B, num_classes]`; `forward_features` returns the pooled,
concatenated `[B, num_features]` vector (the stages differ in resolution, so there is no
single feature map), which `forward_head(..., pre_logits=True)` returns unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from train.models.cell_cnn import SqueezeExcite
from train.models.registry import register_model

STAGE_CHANNELS = {2: 256, 3: 512, 4: 1024, 5: 2048}
"""Output channels of ResNet-50's bottleneck stages, by the paper's stage number."""

ATTENTION_NAMES = ("se", "sam")


class SpatialAttention(nn.Module):
    """SAM: a spatial gate from the channel-mean map (paper 000, eqs. 4-6).

    Args:
        kernel_size: Size of the convolution on the 1-channel mean map (the paper's 1).
    """

    def __init__(self, kernel_size: int = 1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SAM kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Sigmoid()

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> spatial weights `[B, 1, H, W]` in [0, 1]."""
        x = x.mean(dim=1, keepdim=True)
        x = self.conv(x)
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class DisentangledNonLocal(nn.Module):
    """Disentangled Non-Local block (Yin et al., ECCV 2020), the mmseg `DNLHead` block.

    With query `q_i`, key `k_j` and value `v_j` embeddings (1x1 convs) at N positions:
    `y_i = sum_j [softmax_j((q_i - mean q)^T (k_j - mean k) / sqrt(d)) + softmax_j(m_j)] v_j`,
    where `m_j` is the unary conv's response at key position j; output `x + norm(W_o y)`.

    Args:
        channels: Input and output channels.
        reduction: Embedding width is `channels // reduction`.
        norm_layer: Normalisation of the output projection (its scale starts at zero).
    """

    def __init__(
        self, channels: int, reduction: int = 2, norm_layer: type[nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        if reduction < 1 or channels % reduction:
            raise ValueError(f"DNL reduction {reduction} must divide channels {channels}")
        embed_chs = channels // reduction
        self.scale = embed_chs**-0.5
        self.query = nn.Conv2d(channels, embed_chs, 1)
        self.key = nn.Conv2d(channels, embed_chs, 1)
        self.value = nn.Conv2d(channels, embed_chs, 1)
        self.unary = nn.Conv2d(channels, 1, 1)
        self.proj = nn.Conv2d(embed_chs, channels, 1, bias=False)
        self.norm = norm_layer(channels)
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the output norm's scale, so that the block starts as the identity."""
        if getattr(self.norm, "weight", None) is not None:
            nn.init.zeros_(self.norm.weight)

    def pairwise_attention(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> whitened pairwise weights `[B, N, N]` (rows: query positions)."""
        q = self.query(x).flatten(2)
        k = self.key(x).flatten(2)
        q = q - q.mean(dim=2, keepdim=True)
        k = k - k.mean(dim=2, keepdim=True)
        logits = torch.matmul(q.transpose(1, 2), k) * self.scale
        return torch.softmax(logits, dim=-1)

    def unary_attention(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> unary weights `[B, 1, N]`, the same for every query position."""
        return torch.softmax(self.unary(x).flatten(2), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.pairwise_attention(x) + self.unary_attention(x)
        v = self.value(x).flatten(2)
        y = torch.matmul(v, attention.transpose(1, 2))
        y = y.reshape(x.shape[0], -1, x.shape[2], x.shape[3])
        y = self.norm(self.proj(y))
        return x + y


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3) with optional attention on its residual branch.

    Args:
        in_chs: Input channels.
        planes: Bottleneck width; the block outputs `4 * planes` channels.
        stride: Stride of the 3x3 convolution (and of the projection shortcut).
        attn_layer: Builds the attention (channels -> module) applied after the last
            conv-norm, before the identity is added; None for a plain block.
        act_layer: Activation class.
        norm_layer: Normalisation class (takes the channel count).
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        attn_layer: Callable[[int], nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.attn = attn_layer(out_chs) if attn_layer is not None else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), norm_layer(out_chs)
            )
        self.act3 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x = self.attn(x)
        return self.act3(x + shortcut)


def make_attention(
    names: Sequence[str],
    channels: int,
    se_reduction: int = 16,
    sam_kernel_size: int = 1,
    act_layer: type[nn.Module] = nn.ReLU,
) -> nn.Module:
    """Attention modules applied in series, in the order named ("se", "sam").

    Raises:
        ValueError: An unknown name.
    """
    layers: list[nn.Module] = []
    for name in names:
        if name == "se":
            layers.append(SqueezeExcite(channels, reduction=se_reduction, act_layer=act_layer))
        elif name == "sam":
            layers.append(SpatialAttention(sam_kernel_size))
        else:
            raise ValueError(f"unknown attention {name!r}; choose from {ATTENTION_NAMES}")
    return nn.Sequential(*layers)


class AttentionFusionResNet(nn.Module):
    """ResNet-50 with attention in the bottlenecks, an optional DNL block and stage fusion.

    Stages are numbered as in the paper: 1 is the stem, 2-5 the bottleneck stages.

    Args:
        num_classes: Output classes.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        layers: Bottlenecks per stage 2-5 (ResNet-50: 3, 4, 6, 3).
        attention: Attention applied in series in each bottleneck, e.g. ("se", "sam").
        attention_stages: Stages whose bottlenecks carry `attention`.
        dnl_stage: Stage followed by a Disentangled Non-Local block, or None.
        fuse_stages: Stages whose globally pooled outputs are concatenated for the head.
        se_reduction: SE bottleneck ratio.
        sam_kernel_size: SAM convolution size.
        dnl_reduction: DNL embedding ratio (width = channels // dnl_reduction).
        zero_init_last: Start each bottleneck's last BN at zero (block = identity).
        act_layer: Activation class.
        norm_layer: 2-d normalisation class.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        layers: Sequence[int] = (3, 4, 6, 3),
        attention: Sequence[str] = (),
        attention_stages: Sequence[int] = (2, 3, 4),
        dnl_stage: int | None = None,
        fuse_stages: Sequence[int] = (3, 4, 5),
        se_reduction: int = 16,
        sam_kernel_size: int = 1,
        dnl_reduction: int = 2,
        zero_init_last: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}"
            )
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must give 4 positive block counts, got {tuple(layers)}")
        unknown = set(attention) - set(ATTENTION_NAMES)
        if unknown or len(set(attention)) != len(attention):
            raise ValueError(f"attention must be distinct names from {ATTENTION_NAMES}")
        stages = set(STAGE_CHANNELS)
        if not set(attention_stages) <= stages or not set(fuse_stages) <= stages:
            raise ValueError(f"attention_stages and fuse_stages must lie within {sorted(stages)}")
        if not fuse_stages:
            raise ValueError("fuse_stages must name at least one stage")
        if dnl_stage is not None and dnl_stage not in stages:
            raise ValueError(f"dnl_stage must be one of {sorted(stages)} or None, got {dnl_stage}")
        self.num_classes = num_classes
        self.fuse_stages = tuple(sorted(set(fuse_stages)))
        self.num_features = sum(STAGE_CHANNELS[s] for s in self.fuse_stages)
        attn_layer = partial(
            make_attention,
            tuple(attention),
            se_reduction=se_reduction,
            sam_kernel_size=sam_kernel_size,
            act_layer=act_layer,
        )

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False),
            norm_layer(64),
            act_layer(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.stages = nn.ModuleList()
        in_chs = 64
        for stage, depth in zip(STAGE_CHANNELS, layers, strict=True):
            planes = STAGE_CHANNELS[stage] // Bottleneck.expansion
            use_attn = bool(attention) and stage in attention_stages
            blocks: list[nn.Module] = []
            for i in range(depth):
                blocks.append(
                    Bottleneck(
                        in_chs,
                        planes,
                        stride=2 if i == 0 and stage > 2 else 1,
                        attn_layer=attn_layer if use_attn else None,
                        act_layer=act_layer,
                        norm_layer=norm_layer,
                    )
                )
                in_chs = STAGE_CHANNELS[stage]
            if stage == dnl_stage:
                blocks.append(DisentangledNonLocal(in_chs, dnl_reduction, norm_layer=norm_layer))
            self.stages.append(nn.Sequential(*blocks))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck) and zero_init_last and isinstance(m.bn3, nn.BatchNorm2d):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, DisentangledNonLocal):
                m.reset_output()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> pooled stage outputs, concatenated `[B, num_features]`."""
        x = self.stem(x)
        pooled = []
        for stage, blocks in zip(STAGE_CHANNELS, self.stages, strict=True):
            x = blocks(x)
            if stage in self.fuse_stages:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Fused vector -> logits `[B, num_classes]` (the vector itself if `pre_logits`)."""
        if pre_logits:
            return x
        return self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> logits `[B, num_classes]`."""
        x = self.forward_features(x)
        return self.forward_head(x)


def _create(model_args: dict[str, Any], **kwargs: Any) -> AttentionFusionResNet:
    """Build with the variant's arguments, any of which `kwargs` may override."""
    return AttentionFusionResNet(**{**model_args, **kwargs})


@register_model
def resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """Plain ResNet-50 classifying from stage 5 only (paper 000's "ResNet50" row)."""
    return _create({"fuse_stages": (5,)}, **kwargs)


@register_model
def se_resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """ResNet-50 with SE in stages 2-4 and the stage 3-5 fusion head (paper 000's "SE")."""
    return _create({"attention": ("se",)}, **kwargs)


@register_model
def sam_resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """ResNet-50 with SAM in stages 2-4 and the stage 3-5 fusion head (paper 000's "SAM")."""
    return _create({"attention": ("sam",)}, **kwargs)


@register_model
def dnl_resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """ResNet-50 with a DNL block after stage 5 and the stage 3-5 fusion head ("DNL")."""
    return _create({"dnl_stage": 5}, **kwargs)


@register_model
def se_sam_resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """ResNet-50 with SE then SAM in stages 2-4 and the stage 3-5 fusion head ("SE + SAM")."""
    return _create({"attention": ("se", "sam")}, **kwargs)


@register_model
def se_sam_dnl_resnet50(**kwargs: Any) -> AttentionFusionResNet:
    """SE then SAM in stages 2-4, DNL after stage 5, stages 3-5 fused (paper 000's model)."""
    return _create({"attention": ("se", "sam"), "dnl_stage": 5}, **kwargs)
