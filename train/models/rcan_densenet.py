"""DenseNet-121 with an RCAN residual-in-residual channel-attention module (RCAN-DenseNet-121).

Wang, Armin, Denman, Petersson, Ahmedt-Aristizabal, *Towards Interpretable Attention
Networks for Cervical Cancer Analysis* (shared/papers/001_e26595dff0242cd0.txt): its best
model on SIPaKMeD multi-cell images (91.09 %, isolated cells 96.33 %) is DenseNet-121 with
the residual channel attention of RCAN (Zhang et al., ECCV 2018): residual-in-residual
(RIR) = residual groups of RCABs (conv3x3-ReLU-conv3x3, channel attention, identity add),
each group closed by a conv3x3 and its own skip, the groups closed by a conv3x3 and a long
skip. Channel attention is squeeze-and-excitation (RCAN's CA layer is the same operation;
papscan's `SqueezeExcite` keeps at least 8 hidden units, so at 32 channels and reduction 16
the CA is 32-8-32 rather than RCAN's 32-2-32).

Where the attention goes: the paper's text does not say. The authors' released code
(github.com/suikei-wang/Towards-Interpretable-Attention-Networks-for-Cervical-Cancer-Analysis,
`models/AttentionDenseNet.py`) wraps the last dense layer of dense block 4 (`denselayer16`)
so that its `growth_rate` new feature maps are channel-attended before they join the block's
concatenation; no transition is touched. The RIR module sits in that same place here, at the
growth-rate width (32), after the last dense layer of every block listed in `rir_blocks`
(default: block 4 only). At 32 channels the module is cheap (about 0.1 M parameters for two
groups of two RCABs), whereas an RCAB on a 1024-channel block output would cost ~19 M per
block, more than twice DenseNet-121 itself. The depth (`n_groups`, `n_rcabs`) is not given
anywhere; RCAN's super-resolution setting of 10 x 20 is far deeper than a 7 x 7 map needs.

`densenet121` is the plain baseline of the paper's tables (7.98 M parameters at 1000
classes, as torchvision's). `drop_rate` is dropout before the classifier (the authors' code
uses 0.5 there).

Input: `[B, in_chans, H, W]` float32, H and W >= 64 (the paper uses 224 x 224).
`forward_features` returns the final `[B, 1024, H/32, W/32]` map (after norm5 and ReLU);
`forward_head` pools it to the `[B, num_features]` vector and classifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from train.models.cell_cnn import SqueezeExcite
from train.models.registry import register_model


class ResidualChannelAttentionBlock(nn.Module):
    """RCAB: conv3x3 - act - conv3x3 - channel attention, plus the identity.

    Args:
        channels: Input and output channels.
        reduction: Channel-attention bottleneck ratio (RCAN: 16).
        act_layer: Activation class.
    """

    def __init__(
        self, channels: int, reduction: int = 16, act_layer: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.ca = SqueezeExcite(channels, reduction=reduction, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.conv2(y)
        y = self.ca(y)
        return x + y


class ResidualGroup(nn.Module):
    """RCAN residual group: `n_rcabs` RCABs, a conv3x3, and a skip around them all.

    Args:
        channels: Input and output channels.
        n_rcabs: RCABs in the group.
        reduction: Channel-attention bottleneck ratio.
        act_layer: Activation class.
    """

    def __init__(
        self,
        channels: int,
        n_rcabs: int,
        reduction: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ResidualChannelAttentionBlock(channels, reduction, act_layer) for _ in range(n_rcabs))
        )
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(x)
        y = self.conv(y)
        return x + y


class ResidualInResidual(nn.Module):
    """RCAN's RIR body: `n_groups` residual groups, a conv3x3, and the long skip.

    Args:
        channels: Input and output channels.
        n_groups: Residual groups.
        n_rcabs: RCABs per group.
        reduction: Channel-attention bottleneck ratio.
        act_layer: Activation class.
    """

    def __init__(
        self,
        channels: int,
        n_groups: int = 2,
        n_rcabs: int = 2,
        reduction: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if n_groups < 1 or n_rcabs < 1:
            raise ValueError(f"n_groups and n_rcabs must be >= 1, got {n_groups}, {n_rcabs}")
        self.groups = nn.Sequential(
            *(ResidualGroup(channels, n_rcabs, reduction, act_layer) for _ in range(n_groups))
        )
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.groups(x)
        y = self.conv(y)
        return x + y


class DenseLayer(nn.Module):
    """DenseNet-BC layer: norm-act-conv1x1 (to `bn_size * growth_rate`) - norm-act-conv3x3.

    Returns only its `growth_rate` new maps (the block concatenates them), after the
    optional `attention` module.

    Args:
        in_chs: Input channels (everything concatenated so far).
        growth_rate: New channels produced.
        bn_size: Bottleneck width multiplier.
        attention: Module applied to the new maps, or None.
        act_layer: Activation class.
        norm_layer: Normalisation class (takes the channel count).
    """

    def __init__(
        self,
        in_chs: int,
        growth_rate: int,
        bn_size: int = 4,
        attention: nn.Module | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        mid_chs = bn_size * growth_rate
        self.norm1 = norm_layer(in_chs)
        self.act1 = act_layer()
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = norm_layer(mid_chs)
        self.act2 = act_layer()
        self.conv2 = nn.Conv2d(mid_chs, growth_rate, 3, padding=1, bias=False)
        self.attention = attention if attention is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.act1(self.norm1(x)))
        x = self.conv2(self.act2(self.norm2(x)))
        return self.attention(x)


class DenseBlock(nn.Module):
    """`num_layers` dense layers, each fed the concatenation of the input and all earlier outputs.

    Args:
        num_layers: Dense layers.
        in_chs: Input channels; the block outputs `in_chs + num_layers * growth_rate`.
        growth_rate: Channels each layer adds.
        bn_size: Bottleneck width multiplier.
        last_attention: Attention on the last layer's new maps, or None.
        act_layer: Activation class.
        norm_layer: Normalisation class.
    """

    def __init__(
        self,
        num_layers: int,
        in_chs: int,
        growth_rate: int,
        bn_size: int = 4,
        last_attention: nn.Module | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(
                in_chs + i * growth_rate,
                growth_rate,
                bn_size,
                attention=last_attention if i == num_layers - 1 else None,
                act_layer=act_layer,
                norm_layer=norm_layer,
            )
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transition(nn.Sequential):
    """DenseNet transition: norm-act-conv1x1 (compression) then 2x2 average pooling."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__(
            norm_layer(in_chs),
            act_layer(),
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class RcanDenseNet(nn.Module):
    """DenseNet-BC with an optional RIR channel-attention module in chosen dense blocks.

    Args:
        num_classes: Output classes.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        block_config: Dense layers per block (DenseNet-121: 6, 12, 24, 16).
        growth_rate: Channels each dense layer adds.
        stem_chs: Channels of the 7x7 stem convolution.
        bn_size: Dense-layer bottleneck width multiplier.
        rir_blocks: Dense blocks (1-based) whose last layer's new maps pass through an RIR.
        rir_groups: Residual groups per RIR.
        rir_rcabs: RCABs per residual group.
        ca_reduction: Channel-attention bottleneck ratio.
        act_layer: Activation class.
        norm_layer: 2-d normalisation class.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        stem_chs: int = 64,
        bn_size: int = 4,
        rir_blocks: Sequence[int] = (),
        rir_groups: int = 2,
        rir_rcabs: int = 2,
        ca_reduction: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}"
            )
        if not block_config or min(block_config) < 1:
            raise ValueError(f"block_config must list positive layer counts, got {block_config}")
        if not set(rir_blocks) <= set(range(1, len(block_config) + 1)):
            raise ValueError(f"rir_blocks must lie within 1..{len(block_config)}, got {rir_blocks}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False),
            norm_layer(stem_chs),
            act_layer(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        chs = stem_chs
        for index, num_layers in enumerate(block_config, start=1):
            rir = None
            if index in rir_blocks:
                rir = ResidualInResidual(
                    growth_rate, rir_groups, rir_rcabs, ca_reduction, act_layer
                )
            stages.append(
                DenseBlock(num_layers, chs, growth_rate, bn_size, rir, act_layer, norm_layer)
            )
            chs += num_layers * growth_rate
            if index < len(block_config):
                stages.append(Transition(chs, chs // 2, act_layer, norm_layer))
                chs //= 2
        self.stages = nn.Sequential(*stages)
        self.final_norm = norm_layer(chs)
        self.final_act = act_layer()
        self.num_features = chs
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> feature map `[B, num_features, H/32, W/32]`."""
        x = self.stem(x)
        x = self.stages(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits `[B, num_classes]` (pooled `[B, num_features]` if `pre_logits`)."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.classifier(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> logits `[B, num_classes]`."""
        x = self.forward_features(x)
        return self.forward_head(x)


def _create(model_args: dict[str, Any], **kwargs: Any) -> RcanDenseNet:
    """Build with the variant's arguments, any of which `kwargs` may override."""
    return RcanDenseNet(**{**model_args, **kwargs})


@register_model
def densenet121(**kwargs: Any) -> RcanDenseNet:
    """DenseNet-121 (blocks 6-12-24-16, growth 32), paper 001's baseline."""
    return _create({"block_config": (6, 12, 24, 16)}, **kwargs)


@register_model
def rcan_densenet121(**kwargs: Any) -> RcanDenseNet:
    """DenseNet-121 with an RIR (2 groups x 2 RCABs) on dense block 4's last layer (paper 001)."""
    return _create({"block_config": (6, 12, 24, 16), "rir_blocks": (4,)}, **kwargs)
