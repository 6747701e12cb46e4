"""A small convolutional cell classifier with squeeze-and-excitation channel attention.

The CPU-sized seed of the attention cell classifiers in papscan's papers: Su et al.,
*Cervical Cell Image Classification Based On Multiple Attention Fusion*
(shared/papers/000_d19e9f605dfeb994.txt) put SE (+ SAM) attention in the later ResNet
stages; here a four-stage plain CNN (conv-BN-ReLU) carries SE in its last two stages, then
global average pooling, a 64-d embedding (`features`, fed to the ROI classifier) and a
linear head over NILM / LSIL / HSIL.

Input: `[B, 3, 96, 96]` float32, a 48 µm field at 0.5 mpp centred on a nucleus, RGB,
normalised with the config's mean/std. Outputs of `forward`: logits `[B, C]` and features
`[B, 64]`; `CellClassifierExport` wraps it to emit softmaxed `probs` for ONNX.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.models.registry import register_model


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel attention (Hu et al.), as used in paper 000.

    Args:
        channels: Input and output channels.
        reduction: Bottleneck ratio of the excitation MLP.
        act_layer: Activation of the bottleneck.
    """

    def __init__(
        self, channels: int, reduction: int = 8, act_layer: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.act(self.fc1(s))
        s = self.gate(self.fc2(s))
        return x * s


class ConvBlock(nn.Module):
    """Two 3x3 conv-norm-act layers, optional SE, then 2x2 max pooling (halves H and W).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        use_se: Add squeeze-and-excitation after the convolutions.
        act_layer: Activation class.
        norm_layer: Normalisation class (takes the channel count).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        use_se: bool = False,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = act_layer()
        self.se = SqueezeExcite(out_chs, act_layer=act_layer) if use_se else nn.Identity()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.se(x)
        return self.pool(x)


class EmbeddingClassifier(nn.Module):
    """A cell classifier that returns `(logits, features)`: subclasses define
    `forward_features` (image -> `embed_dim` embedding), `drop` and `head`. The scan's
    ROI classifier consumes the features; the classes come from the head."""

    embed_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Embedding -> logits `[B, num_classes]` (or the embedding if `pre_logits`)."""
        if pre_logits:
            return features
        return self.head(self.drop(features))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(logits [B, C], features [B, embed_dim])`."""
        features = self.forward_features(x)
        logits = self.forward_head(features)
        return logits, features


class SeCellNet(EmbeddingClassifier):
    """Stem (stride 2) + four `ConvBlock` stages + GAP + embedding + linear head.

    Args:
        num_classes: Output classes (3: NILM, LSIL, HSIL).
        channels: Channels of the four stages.
        se_stages: Which stages (0-based) carry SE attention.
        stem_chs: Channels of the stride-2 stem convolution.
        embed_dim: Size of the `features` embedding.
        drop_rate: Dropout before the head.
        act_layer: Activation class.
        norm_layer: 2-d normalisation class.
    """

    def __init__(
        self,
        num_classes: int = 3,
        channels: tuple[int, ...] = (24, 48, 96, 128),
        se_stages: tuple[int, ...] = (2, 3),
        stem_chs: int = 16,
        embed_dim: int = 64,
        drop_rate: float = 0.2,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"SeCellNet needs 4 stage widths, got {channels}")
        if any(s not in range(4) for s in se_stages):
            raise ValueError(f"se_stages must be within 0..3, got {se_stages}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_chs, 3, stride=2, padding=1, bias=False),
            norm_layer(stem_chs),
            act_layer(),
        )
        stages = []
        in_chs = stem_chs
        for i, out_chs in enumerate(channels):
            stages.append(
                ConvBlock(
                    in_chs,
                    out_chs,
                    use_se=i in se_stages,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
            )
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(
            nn.Linear(in_chs, embed_dim), nn.BatchNorm1d(embed_dim), act_layer()
        )
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, embed_dim]` embedding."""
        x = self.stem(x)
        x = self.stages(x)
        x = self.pool(x).flatten(1)
        return self.embed(x)


class CellClassifierExport(nn.Module):
    """Export wrapper: `crops` -> (`probs` softmaxed [B, C], `features` [B, embed_dim])."""

    def __init__(self, model: SeCellNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.model(crops)
        return torch.softmax(logits, dim=1), features


def _create(model_args: dict[str, Any], **kwargs: Any) -> SeCellNet:
    """Build with the variant's arguments, any of which `kwargs` may override."""
    return SeCellNet(**{**model_args, **kwargs})


@register_model
def se_cellnet_small(**kwargs: Any) -> SeCellNet:
    """Stages (24, 48, 96, 128), SE in stages 3-4, 64-d features (paper 000's SE, CPU-sized)."""
    return _create({"channels": (24, 48, 96, 128), "se_stages": (2, 3)}, **kwargs)


@register_model
def se_cellnet_tiny(**kwargs: Any) -> SeCellNet:
    """Four narrow stages (16, 32, 64, 96) with SE in stages 3-4; for smoke runs and tests."""
    return _create({"channels": (16, 32, 64, 96), "se_stages": (2, 3), "stem_chs": 12}, **kwargs)
