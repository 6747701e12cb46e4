"""Residual Attention Network on ResNet-50's bottleneck stages (RAN-ResNet-50).

Wang, Jiang, Qian, Yang, Li, Zhang, Wang, Tang, *Residual Attention Network for Image
Classification* (CVPR 2017), the attention baseline that Wang et al., *Towards
Interpretable Attention Networks for Cervical Cancer Analysis*
(shared/papers/001_e26595dff0242cd0.txt) compare to ("RAN-ResNet-50": 94.13 % on isolated
cells, 84.16 % on multi-cell images, below plain ResNet-50).

An attention module is `p` pre-activation bottleneck units, then two branches: the trunk
`T` (`t` units) and a soft mask `M` (bottom-up: max pool + `r` units per level, a skip unit
at each level but the deepest; top-down: bilinear upsampling + the skip, `r` units; then
norm-act-conv1x1 twice and a sigmoid), merged as `(1 + M) * T`, then `p` more units.
With `p, t, r = 1, 2, 1` (the RAN paper's setting):

- stem: 7x7/2 conv (64) + norm + act + 3x3/2 max pool;
- stages 1-3 (256, 512, 1024 channels; ResNet-50's widths): a unit that changes width
  (stride 2 from stage 2), then `modules_per_stage[i]` attention modules whose masks pool
  3, 2 and 1 times (56, 28, 14 px maps at 224 px input, pooled down to 7 px);
- stage 4: three 2048-channel units (the first stride 2), no attention, as in RAN;
- final norm + act, global average pooling (2048 features), FC.

`ran_resnet50` is this with one module per stage: RAN's Attention-56, whose trunk is
ResNet-50's stem, widths and depth (56 = 3 conv layers x 18 units + stem + FC) and whose
ImageNet version has 31.9 M parameters (31.8 M here, at 1000 classes). The paper 001
text only says "residual attention network based on the ResNet50 framework"; the authors'
released code trained the Attention-92 layout (1, 2, 3 modules, 51.3 M in the RAN paper),
which `ran_resnet50(modules_per_stage=(1, 2, 3))` builds.

Input: `[B, in_chans, H, W]` float32, H and W >= 64 (the paper uses 224 x 224).
`forward_features` returns the final `[B, 2048, H/32, W/32]` map (after norm + act);
`forward_head` pools it to the `[B, num_features]` vector and classifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.models.registry import register_model

STAGE_CHANNELS = (256, 512, 1024, 2048)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (He et al. 2016), the unit RAN is built from.

    Args:
        in_chs: Input channels.
        out_chs: Output channels; the bottleneck width is `out_chs // 4`.
        stride: Stride of the 3x3 convolution (and of the projection shortcut).
        act_layer: Activation class.
        norm_layer: Normalisation class (takes the channel count).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        self.norm1 = norm_layer(in_chs)
        self.act1 = act_layer()
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = norm_layer(mid_chs)
        self.act2 = act_layer()
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.norm3 = norm_layer(mid_chs)
        self.act3 = act_layer()
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        y = self.conv1(pre)
        y = self.conv2(self.act2(self.norm2(y)))
        y = self.conv3(self.act3(self.norm3(y)))
        return y + shortcut


def _units(
    channels: int, count: int, act_layer: type[nn.Module], norm_layer: type[nn.Module]
) -> nn.Sequential:
    """`count` width-preserving pre-activation units in a row."""
    return nn.Sequential(
        *(PreActBottleneck(channels, channels, 1, act_layer, norm_layer) for _ in range(count))
    )


class SoftMaskBranch(nn.Module):
    """RAN's bottom-up / top-down soft mask: `[B, C, H, W]` -> `M` `[B, C, H, W]` in [0, 1].

    Args:
        channels: Input and mask channels.
        num_pools: Max-pool levels of the bottom-up path (>= 1).
        r: Units between adjacent pooling / upsampling steps.
        act_layer: Activation class.
        norm_layer: Normalisation class.
    """

    def __init__(
        self,
        channels: int,
        num_pools: int,
        r: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_pools < 1 or r < 1:
            raise ValueError(f"num_pools and r must be >= 1, got {num_pools}, {r}")
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.ModuleList(
            _units(channels, r, act_layer, norm_layer) for _ in range(num_pools)
        )
        self.skips = nn.ModuleList(
            PreActBottleneck(channels, channels, 1, act_layer, norm_layer)
            for _ in range(num_pools - 1)
        )
        self.bottom = _units(channels, r, act_layer, norm_layer)
        self.up = nn.ModuleList(
            _units(channels, r, act_layer, norm_layer) for _ in range(num_pools - 1)
        )
        self.head = nn.Sequential(
            norm_layer(channels),
            act_layer(),
            nn.Conv2d(channels, channels, 1, bias=False),
            norm_layer(channels),
            act_layer(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = x.shape[-2:]
        skips = []
        for level, down in enumerate(self.down):
            x = down(self.pool(x))
            if level < len(self.skips):
                skips.append(self.skips[level](x))
        x = self.bottom(x)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(x + skip)
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.head(x)


class AttentionModule(nn.Module):
    """RAN attention module: `p` units, trunk `T` and soft mask `M`, `(1 + M) * T`, `p` units.

    Args:
        channels: Input and output channels.
        num_pools: Pooling levels of the mask branch.
        p: Units before the branches split and after they merge.
        t: Trunk-branch units.
        r: Mask-branch units per level.
        act_layer: Activation class.
        norm_layer: Normalisation class.
    """

    def __init__(
        self,
        channels: int,
        num_pools: int,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.pre = _units(channels, p, act_layer, norm_layer)
        self.trunk = _units(channels, t, act_layer, norm_layer)
        self.mask = SoftMaskBranch(channels, num_pools, r, act_layer, norm_layer)
        self.post = _units(channels, p, act_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask(x)
        x = (1 + mask) * trunk
        return self.post(x)


class ResidualAttentionNet(nn.Module):
    """Residual Attention Network with ResNet-50's stem and stage widths.

    Args:
        num_classes: Output classes.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
        modules_per_stage: Attention modules in stages 1-3 (Attention-56: 1, 1, 1;
            Attention-92: 1, 2, 3).
        mask_pools: Mask-branch pooling levels in stages 1-3.
        stage4_units: 2048-channel units of stage 4.
        p: Units before / after each module's branches.
        t: Trunk-branch units.
        r: Mask-branch units per level.
        act_layer: Activation class.
        norm_layer: 2-d normalisation class.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        modules_per_stage: Sequence[int] = (1, 1, 1),
        mask_pools: Sequence[int] = (3, 2, 1),
        stage4_units: int = 3,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}"
            )
        if len(modules_per_stage) != 3 or len(mask_pools) != 3:
            raise ValueError("modules_per_stage and mask_pools must give one value per stage 1-3")
        if min(modules_per_stage) < 0 or stage4_units < 1 or min(p, t) < 1:
            raise ValueError("module counts must be >= 0 and stage4_units, p and t >= 1")
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False),
            norm_layer(64),
            act_layer(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        in_chs = 64
        for index, (chs, modules, pools) in enumerate(
            zip(STAGE_CHANNELS[:3], modules_per_stage, mask_pools, strict=True)
        ):
            blocks: list[nn.Module] = [
                PreActBottleneck(in_chs, chs, 1 if index == 0 else 2, act_layer, norm_layer)
            ]
            blocks += [
                AttentionModule(chs, pools, p, t, r, act_layer, norm_layer) for _ in range(modules)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = chs
        stages.append(
            nn.Sequential(
                PreActBottleneck(in_chs, STAGE_CHANNELS[3], 2, act_layer, norm_layer),
                _units(STAGE_CHANNELS[3], stage4_units - 1, act_layer, norm_layer),
            )
        )
        self.stages = nn.Sequential(*stages)
        self.num_features = STAGE_CHANNELS[3]
        self.final_norm = norm_layer(self.num_features)
        self.final_act = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> feature map `[B, 2048, H/32, W/32]`."""
        x = self.stem(x)
        x = self.stages(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits `[B, num_classes]` (the pooled `[B, 2048]` if `pre_logits`)."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> logits `[B, num_classes]`."""
        x = self.forward_features(x)
        return self.forward_head(x)


@register_model
def ran_resnet50(**kwargs: Any) -> ResidualAttentionNet:
    """RAN Attention-56 on ResNet-50's widths: one attention module in each of stages 1-3."""
    return ResidualAttentionNet(**{"modules_per_stage": (1, 1, 1), **kwargs})
