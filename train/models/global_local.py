"""Global-local attention network: weakly supervised ROI and cell classification.

Shi et al., *Global-Local Attention Network for Weakly Supervised Cervical Cytology ROI
Analysis* (shared/papers/002_9ffaad4266315e55.txt). An ROI is a bag of `n_c` detected cells;
only the ROI's label (NILM / LSIL / HSIL) supervises training, and the network learns to
classify both the ROI and its cells:

1. A ResNet (ResNet-50 in the paper, d_f = 2048) turns each cell crop into a stage-4
   feature map; its global average is the cell's CNN feature.
2. Global branch (eq. 1-2): an attention-based bidirectional LSTM runs over the sequence of
   cell features; attention pooling gives the ROI feature `h_ROI` (1024-d in the paper:
   512 per direction, so its width is `attn_dim`).
3. Local branch (eq. 3-6): a hybrid ViT reads each cell's stage-4 map as 1x1 patches (one
   token per spatial position, projected to D = `embed_dim`, 768 in the paper) plus a class
   token; the normalised class token is the cell's local feature `y`.
4. Cross attention (eq. 7-9): Q from `h_ROI`, K and V from the cells' `y` (single head,
   d_k = d_v = `attn_dim`); `a = softmax(QK^T / sqrt(d_k)) V`, the ROI is classified from
   `h_ROI + a`, and the softmax weights are the CA scores.
5. Cell branches: C binary classifiers on `y` ("is this cell class c"), trained on cells
   picked by their CA scores (see `pseudo_cell_labels`); `L = L_ROI + 0.25 L_cell`.

Departures from the paper's text, each for a stated reason:

- Eq. 1 writes a peephole LSTM (the `W_c c` terms it copies from Zhou et al.); this uses
  `nn.LSTM`, which has no peepholes, so the BLSTM exports as ONNX `LSTM` ops with a
  dynamic number of cells. The ViT's depth is an argument (default 2); the paper uses a
  pre-trained hybrid ViT and does not state its depth. Nothing here is pre-trained.
- The position embedding is learnt for a 7x7 stage-4 grid (224-pixel crops, as in the
  paper) and resized bilinearly for other crop sizes, so the builder needs no crop size;
  an ONNX export fixes the crop size it was traced with.

Padding: bags are padded to N slots, `mask [B, N]` (bool) marking the real cells. Padded
cells never reach the CNN (so BatchNorm statistics in training see real cells only), sit
after the real cells in both LSTM directions (the backward LSTM reads each bag's real cells
reversed, as `pack_padded_sequence` would), get CA score 0 and cell logits 0, so their
pixels change no output and no loss; the real cells may sit in any slots. A bag with no
real cell gets a zero ROI feature (the ROI head's bias), all-zero CA scores, no NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from train.models.mil import masked_softmax
from train.models.registry import register_model

_BACKBONE_WIDTHS = {"resnet50": 2048, "resnet18": 512}
_BASE_GRID = 7  # stage-4 grid of a 224-pixel crop: the paper's m = 49 patches


class GlobalLocalOutput(NamedTuple):
    """Outputs of `GlobalLocalNet.forward` (exports to ONNX as three outputs, in order).

    Attributes:
        roi_logits: `[B, C]` ROI class logits.
        cell_logits: `[B, N, C]`; `cell_logits[..., c]` is branch c's logit for "this cell
            is class c" (independent binary branches, not a softmax); 0 on padding.
        ca_scores: `[B, N]` cross-attention weights, softmaxed over the real cells, 0 on
            padding.
    """

    roi_logits: torch.Tensor
    cell_logits: torch.Tensor
    ca_scores: torch.Tensor


def resnet_trunk(name: str, in_chans: int = 3) -> nn.Sequential:
    """A torchvision ResNet without weights, pooling and fc: `[R, C, S, S]` -> stage-4 map.

    Args:
        name: "resnet50" (2048 channels) or "resnet18" (512 channels).
        in_chans: Input channels.

    Returns:
        The trunk; its output is `[R, width, ceil(S / 32), ceil(S / 32)]`.
    """
    if name not in _BACKBONE_WIDTHS:
        raise ValueError(f"backbone must be one of {sorted(_BACKBONE_WIDTHS)}, got {name!r}")
    net = getattr(torchvision.models, name)(weights=None)
    if in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


class AttBiLstm(nn.Module):
    """Bidirectional LSTM over each bag's real cells, then attention pooling (eq. 1-2).

    `H = [h_fwd ; h_bwd]`, `a = softmax(w^T tanh(H))` over the real cells,
    `h_ROI = tanh(H a^T)`. The two directions are separate `nn.LSTM`s fed gathered
    sequences: real cells first (slot order kept), and for the backward one each bag's real
    cells reversed, so padding only ever follows the real cells.

    Args:
        in_dim: Cell feature size (d_f).
        hidden_dim: Hidden size of each direction (the output is `2 * hidden_dim`).
    """

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.forward_lstm = nn.LSTM(in_dim, hidden_dim, batch_first=True)
        self.backward_lstm = nn.LSTM(in_dim, hidden_dim, batch_first=True)
        self.w = nn.Linear(2 * hidden_dim, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`x [B, N, in_dim]`, `mask [B, N]` bool -> `h_ROI [B, 2 * hidden_dim]`."""
        order, reverse, valid = _sequence_indices(mask)
        packed = _gather_cells(x, order)
        h_fwd, _ = self.forward_lstm(packed)
        h_bwd, _ = self.backward_lstm(_gather_cells(packed, reverse))
        h = torch.cat([h_fwd, _gather_cells(h_bwd, reverse)], dim=-1)
        a = masked_softmax(self.w(torch.tanh(h)).squeeze(-1), valid)
        return torch.tanh(torch.sum(a.unsqueeze(-1) * h, dim=1))


def _sequence_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices that pack each bag's real cells to the front, and reverse them.

    Args:
        mask: `[B, N]` bool, True on real cells.

    Returns:
        `order [B, N]` (slot read at each packed position: real cells in slot order, then
        padding), `reverse [B, N]` (packed position `n_real - 1 - t` for `t < n_real`, else
        `t`; its own inverse) and `valid [B, N]` (float, 1 on the packed real positions).
    """
    real = mask.long()
    n_real = real.sum(dim=1, keepdim=True)
    dest = torch.where(mask, real.cumsum(1) - 1, n_real + (1 - real).cumsum(1) - 1)
    slots = torch.cumsum(torch.ones_like(real), dim=1) - 1
    order = torch.zeros_like(real).scatter(1, dest, slots)
    reverse = torch.where(slots < n_real, n_real - 1 - slots, slots)
    return order, reverse, (slots < n_real).float()


def _gather_cells(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, N, D]` gathered along N by `index [B, N]`."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class HybridVit(nn.Module):
    """ViT over a CNN feature map with 1x1 patches and a class token (eq. 3-6).

    Args:
        in_dim: Channels of the feature map (d_c).
        embed_dim: Token width D.
        depth: Transformer blocks L.
        num_heads: Attention heads per block.
        drop_rate: Dropout after the position embedding and on the blocks' projections.
        base_grid: Side of the grid the position embedding is learnt for.
        norm_layer: Normalisation class of the blocks and the final norm.
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int = 768,
        depth: int = 2,
        num_heads: int = 8,
        drop_rate: float = 0.0,
        base_grid: int = _BASE_GRID,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.base_grid = base_grid
        self.patch_embed = nn.Linear(in_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + base_grid * base_grid, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *(
                Block(
                    embed_dim, num_heads, qkv_bias=True, proj_drop=drop_rate, norm_layer=norm_layer
                )
                for _ in range(depth)
            )
        )
        self.norm = norm_layer(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def _position_embedding(self, height: int, width: int) -> torch.Tensor:
        """`[1, 1 + height * width, D]`, resized bilinearly from the base grid if needed."""
        if (height, width) == (self.base_grid, self.base_grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, self.base_grid, self.base_grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(height, width), mode="bilinear")
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps `[R, in_dim, h, w]` -> cell features `[R, D]` (the class token)."""
        pos = self._position_embedding(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + pos)
        x = self.blocks(x)
        return self.norm(x[:, 0])


class CrossAttention(nn.Module):
    """Single-query, single-head attention of the ROI feature over its cells (eq. 7, 9).

    Args:
        query_dim: Width of the ROI feature (d_f of eq. 7).
        cell_dim: Width of the cells' local features (D).
        attn_dim: d_k = d_v; must equal `query_dim`, since eq. 8 adds `a` to `h_ROI`.
    """

    def __init__(self, query_dim: int, cell_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.scale = attn_dim**-0.5
        self.q = nn.Linear(query_dim, attn_dim, bias=False)
        self.k = nn.Linear(cell_dim, attn_dim, bias=False)
        self.v = nn.Linear(cell_dim, attn_dim, bias=False)

    def forward(
        self, roi: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`roi [B, query_dim]`, `cells [B, N, D]`, `mask [B, N]` -> (`a [B, attn_dim]`,
        CA scores `[B, N]`, 0 on padding)."""
        q = self.q(roi).unsqueeze(1)
        scores = torch.sum(q * self.k(cells), dim=-1) * self.scale
        s = masked_softmax(scores, mask.to(scores.dtype))
        a = torch.sum(s.unsqueeze(-1) * self.v(cells), dim=1)
        return a, s


class GlobalLocalNet(nn.Module):
    """Per-cell ResNet, Att-BLSTM (global), hybrid ViT (local), cross attention, heads.

    Args:
        num_classes: Classes C, ordered by severity with the normal class first
            (NILM, LSIL, HSIL); both the ROI head and the cell branches use them.
        backbone: "resnet50" (paper) or "resnet18" (CPU runs).
        embed_dim: ViT width D.
        attn_dim: Width of `h_ROI` (so 2 x the LSTM hidden size) and of the cross attention.
        depth: ViT blocks.
        num_heads: ViT attention heads.
        drop_rate: Dropout in the ViT and before both heads.
        in_chans: Crop channels.
    """

    def __init__(
        self,
        num_classes: int = 3,
        backbone: str = "resnet50",
        embed_dim: int = 768,
        attn_dim: int = 1024,
        depth: int = 2,
        num_heads: int = 8,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if attn_dim % 2:
            raise ValueError(f"attn_dim must be even (two LSTM directions), got {attn_dim}")
        self.num_classes = num_classes
        self.backbone = resnet_trunk(backbone, in_chans)
        self.cnn_dim = _BACKBONE_WIDTHS[backbone]
        self.global_branch = AttBiLstm(self.cnn_dim, attn_dim // 2)
        self.local_branch = HybridVit(self.cnn_dim, embed_dim, depth, num_heads, drop_rate)
        self.cross_attention = CrossAttention(attn_dim, embed_dim, attn_dim)
        self.num_features = attn_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(attn_dim, num_classes)
        self.cell_head = nn.Linear(embed_dim, num_classes)

    def forward_cells(
        self, cells: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the CNN and the ViT on the real cells only.

        Args:
            cells: `[B, N, C, S, S]` crops.
            mask: `[B, N]` bool, True on real cells.

        Returns:
            (CNN features `[B, N, d_f]`, ViT features `[B, N, D]`), zero on padding.
        """
        batch, slots = mask.shape
        real = torch.nonzero(mask.reshape(-1)).squeeze(1)
        crops = cells.flatten(0, 1).index_select(0, real)
        if not self.training:
            # A batch without a real cell would reach the CNN as an empty batch, which the
            # exported graph's reshapes cannot take (-1 over zero elements): in inference a
            # blank crop always rides along and is dropped after. Training keeps it out of
            # batch-norm statistics.
            crops = torch.cat([crops, crops.new_zeros((1, *crops.shape[1:]))])
        maps = self.backbone(crops)
        pooled, local = maps.mean(dim=(2, 3)), self.local_branch(maps)
        if not self.training:
            pooled, local = pooled[:-1], local[:-1]
        pooled = _scatter_rows(pooled, real, batch * slots)
        local = _scatter_rows(local, real, batch * slots)
        return pooled.reshape(batch, slots, -1), local.reshape(batch, slots, -1)

    def forward_features(
        self, cells: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the ROI feature `h_ROI + a` `[B, attn_dim]`, the cells' ViT features
        `[B, N, D]` and the CA scores `[B, N]`."""
        pooled, local = self.forward_cells(cells, mask)
        h_roi = self.global_branch(pooled, mask)
        a, ca_scores = self.cross_attention(h_roi, local, mask)
        return h_roi + a, local, ca_scores

    def forward_head(self, roi_feature: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """ROI feature -> ROI logits `[B, C]` (the feature itself if `pre_logits`)."""
        if pre_logits:
            return roi_feature
        return self.head(self.head_drop(roi_feature))

    def forward(self, cells: torch.Tensor, mask: torch.Tensor) -> GlobalLocalOutput:
        """`cells [B, N, C, S, S]`, `mask [B, N]` bool -> `GlobalLocalOutput`."""
        if cells.ndim != 5 or mask.ndim != 2 or tuple(cells.shape[:2]) != tuple(mask.shape):
            raise ValueError(
                f"cells must be [B, N, C, S, S] and mask [B, N]; got {tuple(cells.shape)} "
                f"and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        roi_feature, local, ca_scores = self.forward_features(cells, mask)
        roi_logits = self.forward_head(roi_feature)
        cell_logits = self.cell_head(self.head_drop(local))
        cell_logits = cell_logits.masked_fill(~mask.unsqueeze(-1), 0.0)
        return GlobalLocalOutput(roi_logits, cell_logits, ca_scores)


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """A `[total, D]` zero tensor with `rows [R, D]` written at row numbers `index [R]`."""
    target = rows.new_zeros(total, rows.shape[1])
    return target.scatter(0, index.unsqueeze(1).expand(-1, rows.shape[1]), rows)


def pseudo_cell_labels(
    ca_scores: torch.Tensor,
    roi_labels: torch.Tensor,
    mask: torch.Tensor,
    num_classes: int,
    fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's CA-score pseudo-labels for the C binary cell branches (section 2.4).

    With k = ceil(fraction * n_c) cells (n_c real cells; capped at floor(n_c / 2) so the
    two sets never overlap), "top" the k real cells with the highest CA score and "least"
    the k with the lowest (ties broken by slot order), for an ROI of class y:

    - y = 0 (NILM): every real cell is a positive of branch 0; no other branch is fed.
    - y > 0 (LSIL, HSIL): branch y gets the top cells as positives and the least cells as
      negatives; every branch c < y gets the top cells as negatives (an HSIL ROI's top cells
      are not NILM and not LSIL); branches c > y are not fed.

    Args:
        ca_scores: `[B, N]` CA scores (only their order within the real cells matters).
        roi_labels: `[B]` int64 ROI classes in 0..C-1, 0 the normal class.
        mask: `[B, N]` bool, True on real cells.
        num_classes: C.
        fraction: Share of the real cells taken as top and as least (0.1 in the paper).

    Returns:
        (`weights [B, N, C]`, 1 where branch c is trained on cell n, `targets [B, N, C]`,
        its binary target), both float; all zero on padding.

    Raises:
        ValueError: `fraction` is outside (0, 0.5] or a label is outside 0..C-1.
    """
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"pseudo_fraction must be in (0, 0.5], got {fraction}")
    if roi_labels.numel() and not 0 <= int(roi_labels.min()) <= int(roi_labels.max()) < num_classes:
        raise ValueError(f"roi_labels must lie in 0..{num_classes - 1}, got {roi_labels.tolist()}")
    n_real = mask.sum(dim=1, keepdim=True)
    # The tolerance keeps e.g. 10 % of 30 cells at 3 although 30 * 0.1 is 3.0000000000000004.
    k = torch.ceil(n_real.double() * fraction - 1e-9).long()
    k = torch.minimum(k, n_real // 2)
    scores = ca_scores.detach()
    top = mask & (_ranks(torch.where(mask, scores, -math.inf), descending=True) < k)
    least = mask & (_ranks(torch.where(mask, scores, math.inf), descending=False) < k)
    label = roi_labels.view(-1, 1, 1)
    branch = torch.arange(num_classes, device=mask.device).view(1, 1, -1)
    in_class = branch == label
    is_normal = label == 0
    top, least, real = top.unsqueeze(-1), least.unsqueeze(-1), mask.unsqueeze(-1)
    positive = in_class & torch.where(is_normal, real, top)
    negative = ~is_normal & ((in_class & least) | ((branch < label) & top))
    return (positive | negative).float(), positive.float()


def _ranks(keys: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank `[B, N]` (0 first) of every entry of `keys` along dim 1, ties by position."""
    order = torch.sort(keys, dim=1, descending=descending, stable=True).indices
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter(1, order, positions)


def global_local_loss(
    out: GlobalLocalOutput,
    roi_labels: torch.Tensor,
    mask: torch.Tensor,
    cell_weight: float = 0.25,
    pseudo_fraction: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's hybrid loss `L = L_ROI + lambda * L_cell`.

    `L_ROI` is the cross-entropy of the ROI logits. For each ROI, each branch's loss is the
    mean binary cross-entropy over the cells `pseudo_cell_labels` feeds it (0 if none), and
    `L_cell` is their sum over the C branches divided by C (the paper's
    `(L_NILM + L_LSIL + L_HSIL) / 3`), averaged over the ROIs of the batch.

    Args:
        out: The model's output.
        roi_labels: `[B]` int64 ROI classes.
        mask: `[B, N]` bool, True on real cells.
        cell_weight: lambda (0.25 in the paper).
        pseudo_fraction: Share of real cells taken as top / least attentive (0.1).

    Returns:
        (total loss, {"roi": L_ROI, "cell": L_cell} as floats).
    """
    if cell_weight < 0:
        raise ValueError(f"cell_weight must be non-negative, got {cell_weight}")
    num_classes = out.roi_logits.shape[1]
    roi_loss = F.cross_entropy(out.roi_logits, roi_labels)
    weights, targets = pseudo_cell_labels(
        out.ca_scores, roi_labels, mask, num_classes, pseudo_fraction
    )
    bce = F.binary_cross_entropy_with_logits(out.cell_logits, targets, reduction="none")
    branch_loss = torch.sum(bce * weights, dim=1) / torch.clamp(weights.sum(dim=1), min=1.0)
    cell_loss = branch_loss.sum(dim=1).mean() / num_classes
    total = roi_loss + cell_weight * cell_loss
    return total, {"roi": float(roi_loss.detach()), "cell": float(cell_loss.detach())}


def cell_probabilities(out: GlobalLocalOutput) -> torch.Tensor:
    """Cell class distribution `[B, N, C]` from the one-vs-rest branch logits.

    Each branch's sigmoid is its probability that the cell is its class; they are
    normalised to sum to 1 over the classes, so the argmax is the most confident branch and
    the ratios between branches are kept. Padded cells (logits 0) come out uniform, 1 / C;
    `GlobalLocalExport` zeroes them.
    """
    p = torch.sigmoid(out.cell_logits)
    return p / p.sum(dim=-1, keepdim=True)


class GlobalLocalExport(nn.Module):
    """ONNX wrapper: (`cells` `[B, N, 3, S, S]`, `mask` `[B, N]`) -> (`roi_probs` `[B, C]`,
    `cell_probs` `[B, N, C]`, `attention` `[B, N]`).

    `mask` is float32, 1 on real cells and 0 on padding (as the MIL stand-in's `cell_mask`:
    one data type for every input, which Triton-style configs and the numpy-fed checks
    handle alike). `cell_probs` and `attention` are exactly 0 on padding.
    """

    def __init__(self, model: GlobalLocalNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, cells: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = mask > 0.5
        out = self.model(cells, real)
        cell_probs = cell_probabilities(out) * real.unsqueeze(-1).to(cells.dtype)
        return torch.softmax(out.roi_logits, dim=1), cell_probs, out.ca_scores


@register_model
def global_local_roi(
    num_classes: int = 3,
    backbone: str = "resnet50",
    embed_dim: int = 768,
    attn_dim: int = 1024,
    depth: int = 2,
    num_heads: int = 8,
    drop_rate: float = 0.0,
    in_chans: int = 3,
) -> GlobalLocalNet:
    """Global-local attention network for ROI + weakly supervised cell classes (paper 002)."""
    return GlobalLocalNet(
        num_classes, backbone, embed_dim, attn_dim, depth, num_heads, drop_rate, in_chans
    )
