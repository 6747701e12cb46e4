"""CVM-Cervix: Xception and DeiT-tiny in parallel, fused by a two-layer GELU MLP.

Liu et al., *CVM-Cervix: A Hybrid Cervical Pap-Smear Image Classification Framework Using
CNN, Visual Transformer and Multilayer Perceptron* (shared/papers/004_f065bcbeb670a7ac.txt).
A CNN module (the "official" Xception less its classifier, 2048 features, local detail) and
a visual-transformer module (DeiT-tiny *without* the distillation token less its classifier,
192 features, global context) see the same cell image; their features are concatenated
("serial early fusion", 2240 features) and an MLP of two fully connected layers with GELU
classifies them. The paper trains on 224 x 224 crops with AdamW (lr 2e-4, batch 16).

Backbone choices, both built by timm without weights:

- `legacy_xception` is Chollet's original Xception (the Keras "official" model the paper
  cites, ported through Cadene's pretrainedmodels): 20.8 M parameters without its fc,
  22.9 M with a 1000-class fc, as in the Xception paper. timm's `xception41/65/71` are the
  DeepLab "aligned" variants (deeper middle flow, strided separable convolutions instead of
  max pooling; 24.9-40.3 M parameters) and are not the model the paper used.
- `deit_tiny_patch16_224` is DeiT-tiny with only the class token (192-d, 12 blocks,
  3 heads); `deit_tiny_distilled_patch16_224` would add the distillation token the paper
  found worse. Its patch grid is fixed by `img_size`, so inputs must be that size.

The paper does not give the MLP's hidden width; it is 2240 (the input width, as timm's
`Mlp` defaults to), which is what makes the whole model the paper's "about 120 MB":
20.8 M + 5.5 M + 5.0 M parameters = 31.4 M = 119.7 MiB in FP32 at 11 classes. The paper
gives no dropout either; `drop_rate` (default 0) drops the hidden layer.

Input: `[B, in_chans, img_size, img_size]` float32, normalised. `forward` returns logits
`[B, num_classes]`; `forward_head(x, pre_logits=True)` returns the `[B, 2240]` fused
feature (the one the paper visualises with t-SNE), `num_features` wide.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from train.models.registry import register_model


class FusionMlp(nn.Module):
    """Two fully connected layers with an activation between them (the paper's MLP module).

    Args:
        in_features: Width of the fused feature.
        hidden_features: Width of the hidden layer.
        num_classes: Output classes.
        drop_rate: Dropout on the hidden activations.
        act_layer: Activation class.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        num_classes: int,
        drop_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        return self.fc2(x)


class CvmCervix(nn.Module):
    """CNN module + visual-transformer module, concatenated, then `FusionMlp`.

    Args:
        num_classes: Output classes.
        in_chans: Input image channels.
        img_size: Square input size in pixels (fixes DeiT's patch grid; multiple of 16).
        drop_rate: Dropout in the MLP's hidden layer.
        cnn_name: timm name of the CNN module.
        vit_name: timm name of the visual-transformer module.
        mlp_hidden: Hidden width of the MLP; `None` uses the fused width (2240).
        act_layer: Activation of the MLP.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        img_size: int = 224,
        drop_rate: float = 0.0,
        cnn_name: str = "legacy_xception",
        vit_name: str = "deit_tiny_patch16_224",
        mlp_hidden: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if img_size < 32 or img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16 and at least 32, got {img_size}")
        self.num_classes = num_classes
        self.img_size = img_size
        self.cnn = timm.create_model(cnn_name, pretrained=False, num_classes=0, in_chans=in_chans)
        self.vit = timm.create_model(
            vit_name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size
        )
        self.num_features = self.cnn.num_features + self.vit.num_features
        self.head = FusionMlp(
            self.num_features,
            mlp_hidden or self.num_features,
            num_classes,
            drop_rate=drop_rate,
            act_layer=act_layer,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> fused feature `[B, 2240]` (CNN's 2048, then DeiT's 192)."""
        local_features = self.cnn(x)
        global_features = self.vit(x)
        return torch.cat([local_features, global_features], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Fused feature -> logits `[B, num_classes]` (the fused feature if `pre_logits`)."""
        if pre_logits:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> logits `[B, num_classes]`."""
        x = self.forward_features(x)
        return self.forward_head(x)


@register_model
def cvm_cervix(**kwargs: Any) -> CvmCervix:
    """Xception (2048) + DeiT-tiny without distillation (192) + 2240-2240-C GELU MLP (paper 004)."""
    return CvmCervix(**kwargs)
