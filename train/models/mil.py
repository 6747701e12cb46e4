"""Gated-attention multiple-instance ROI classifier (CLAM-like).

The lightweight stand-in for the global-local attention network of Shi et al.,
*Global-Local Attention Network for Weakly Supervised Cervical Cytology ROI Analysis*
(shared/papers/002_9ffaad4266315e55.txt), which a later issue builds: an ROI is a bag of
cells, each a 64-d feature from the cell classifier; gated attention pooling (Ilse et al.;
CLAM's `Attn_Net_Gated`) weighs the cells, the weighted mean feeds a linear head over
NILM / LSIL / HSIL.

Inputs: `cell_features [B, N, D]` float32, `cell_mask [B, N]` float32 (1 real cell,
0 padding). Outputs: `roi_probs [B, C]` (softmax) and `attention [B, N]` (softmax over the
real cells, exactly 0 on padding). A bag with no real cell (N = 0 or an all-zero mask)
gets all-zero attention, a zero bag feature and so the head's bias alone, which training
pushes towards NILM; nothing divides by zero, so no NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.models.registry import register_model


class GatedAttention(nn.Module):
    """Gated attention scores `w^T (tanh(V h) * sigmoid(U h))` per instance.

    Args:
        in_dim: Instance feature size.
        hidden_dim: Size of the V and U projections.
        drop_rate: Dropout on the projections.
    """

    def __init__(self, in_dim: int, hidden_dim: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(drop_rate))
        self.u = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(drop_rate))
        self.w = nn.Linear(hidden_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """`[B, N, in_dim]` -> unnormalised scores `[B, N]`."""
        return self.w(self.v(h) * self.u(h)).squeeze(-1)


_LOW = -1e30  # stands for -inf on padding; finite, so all-padding rows give exp(0) * 0 = 0


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 restricted to `mask > 0`; rows with no real entry become all 0.

    Written with a max-shift and a finite stand-in for -inf (no division by zero) so it
    exports to ONNX and stays finite for N = 0 and for all-padding rows.

    Args:
        scores: `[B, N]`.
        mask: `[B, N]`, 1 real, 0 padding.

    Returns:
        `[B, N]` weights summing to 1 over real entries (0 where none is real).
    """
    mask = (mask > 0).to(scores.dtype)
    shifted = torch.where(mask > 0, scores, torch.full_like(scores, _LOW))
    # A sentinel column keeps amax defined when N = 0 (built from a reduction, so its
    # shape [B, 1] stays dynamic in ONNX); it is below any real score.
    sentinel = mask.sum(dim=1, keepdim=True) * 0.0 + _LOW
    row_max = torch.amax(torch.cat([shifted, sentinel], dim=1), dim=1, keepdim=True)
    e = torch.exp(shifted - row_max) * mask
    total = e.sum(dim=1, keepdim=True)
    return e / torch.clamp(total, min=1e-12)


class AttentionMil(nn.Module):
    """Instance projection + gated attention pooling + linear ROI head.

    Args:
        in_dim: Cell feature size (the cell classifier's embedding, 64).
        embed_dim: Projected instance size.
        attn_dim: Hidden size of the gated attention.
        num_classes: ROI classes (3).
        drop_rate: Dropout on instance embeddings and attention.
    """

    def __init__(
        self,
        in_dim: int = 64,
        embed_dim: int = 64,
        attn_dim: int = 32,
        num_classes: int = 3,
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.proj = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(drop_rate))
        self.attention = GatedAttention(embed_dim, attn_dim, drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(
        self, cell_features: torch.Tensor, cell_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the bag feature `[B, embed_dim]` and attention `[B, N]`."""
        h = self.proj(cell_features)
        scores = self.attention(h)
        attention = masked_softmax(scores, cell_mask)
        bag = torch.sum(attention.unsqueeze(-1) * h, dim=1)
        return bag, attention

    def forward_head(self, bag: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Bag feature -> ROI logits `[B, C]` (or the bag feature if `pre_logits`)."""
        if pre_logits:
            return bag
        return self.head(bag)

    def forward(
        self, cell_features: torch.Tensor, cell_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(logits [B, C], attention [B, N])`."""
        if cell_features.ndim != 3 or cell_features.shape[-1] != self.in_dim:
            raise ValueError(
                f"cell_features must be [B, N, {self.in_dim}], got {tuple(cell_features.shape)}"
            )
        bag, attention = self.forward_features(cell_features, cell_mask)
        logits = self.forward_head(bag)
        return logits, attention


class RoiClassifierExport(nn.Module):
    """Export wrapper: (`cell_features`, `cell_mask`) -> (`roi_probs` softmaxed, `attention`)."""

    def __init__(self, model: AttentionMil) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, cell_features: torch.Tensor, cell_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bag, attention = self.model.forward_features(cell_features, cell_mask)
        logits = self.model.forward_head(bag)
        return torch.softmax(logits, dim=1), attention


@register_model
def gated_attention_mil(**kwargs: Any) -> AttentionMil:
    """Gated attention MIL over 64-d cell features, 3 ROI classes (stand-in for paper 002)."""
    return AttentionMil(**kwargs)
