"""DETR's panoptic mask head (paper section 4.4).

A box detector (`DETR`, unchanged and usable alone) plus two modules:
  * `MHAttentionMap`: for every object embedding of the last decoder layer, a multi-head attention
    map over the encoder memory (queries through a linear layer, keys through the same weights as a
    1x1 convolution, so the memory keeps its spatial layout). The softmax runs jointly over heads and
    cells, as in the published code, so the maps of one object sum to 1 over all its heads.
  * `MaskHeadSmallConv`: the projected stride-32 features concatenated with those maps, then 3x3
    conv + GroupNorm(8) + ReLU blocks that add the backbone's layer3, layer2 and layer1 features
    (1x1 adapters, nearest upsampling) down to stride 4, and a final conv to one logit map per query.

Module and parameter names follow the released checkpoints (`bbox_attention.q_linear`,
`mask_head.lay1..5`, `gn1..5`, `adapter1..3`, `out_lay`), so the authors' weights load by prefix.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ModelConfig
from .backbone import feature_mask
from .detr import DETR, BackboneFeatures, as_batch

_GROUPS = 8  # GroupNorm groups in every block of the mask head (as published)


def _norm(channels: int) -> nn.GroupNorm:
    # widths that are not multiples of 8 (detr-small's 192 / 16 = 12 channels) take the largest
    # group count dividing them, instead of failing; published widths always get 8 groups
    return nn.GroupNorm(math.gcd(_GROUPS, channels), channels)


class MHAttentionMap(nn.Module):
    """Attention weights only (no values): how much each object attends to each memory cell.

    forward(queries [B,Q,d], memory [B,d,h,w], mask [B,h,w] True on padding)
    -> weights [B,Q,heads,h,w], softmax over heads*h*w jointly, exactly 0 on padding.
    """

    def __init__(self, dim: int, nheads: int):
        super().__init__()
        if dim % nheads:
            raise ValueError(f"MHAttentionMap: dim {dim} is not divisible by {nheads} heads")
        self.nheads = nheads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        for lin in (self.q_linear, self.k_linear):
            nn.init.zeros_(lin.bias)
            nn.init.xavier_uniform_(lin.weight)
        self.scale = (dim / nheads) ** -0.5

    def forward(self, queries: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        b, q, d = queries.shape
        n, (h, w) = self.nheads, memory.shape[-2:]
        qh = self.q_linear(queries).view(b, q, n, d // n)
        # the key projection as a 1x1 convolution keeps the memory's [B,d,h,w] layout
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        kh = k.view(b, n, d // n, h, w)
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return weights.flatten(2).softmax(-1).view(b, q, n, h, w)


class MaskHeadSmallConv(nn.Module):
    """FPN-style upsampling of per-object features to stride 4.

    forward(features [B,d,h,w] (projected stride-32 map), attention [B,Q,heads,h,w],
            fpns: [layer3 [B,C3,..], layer2 [B,C2,..], layer1 [B,C1,H/4,W/4]])
    -> mask logits [B*Q,1,H/4,W/4].
    Channels: d+heads -> d+heads -> d/2 -> d/4 -> d/8 -> d/16 -> 1.
    """

    def __init__(self, in_dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        dims = [in_dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if dims[-1] < 1:
            raise ValueError(f"mask head: hidden_dim {context_dim} is too small (needs at least 16)")
        self.lay1, self.gn1 = nn.Conv2d(in_dim, in_dim, 3, padding=1), _norm(in_dim)
        self.lay2, self.gn2 = nn.Conv2d(in_dim, dims[1], 3, padding=1), _norm(dims[1])
        self.lay3, self.gn3 = nn.Conv2d(dims[1], dims[2], 3, padding=1), _norm(dims[2])
        self.lay4, self.gn4 = nn.Conv2d(dims[2], dims[3], 3, padding=1), _norm(dims[3])
        self.lay5, self.gn5 = nn.Conv2d(dims[3], dims[4], 3, padding=1), _norm(dims[4])
        self.out_lay = nn.Conv2d(dims[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor, attention: Tensor, fpns: Sequence[Tensor]) -> Tensor:
        q = attention.shape[1]
        x = torch.cat([features.repeat_interleave(q, dim=0), attention.flatten(0, 1)], dim=1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        stages = ((self.adapter1, self.lay3, self.gn3), (self.adapter2, self.lay4, self.gn4),
                  (self.adapter3, self.lay5, self.gn5))
        for fpn, (adapter, lay, gn) in zip(fpns, stages):
            # adapt at batch size B, then repeat per query: Q times cheaper than adapting B*Q copies
            cur = adapter(fpn).repeat_interleave(q, dim=0)
            x = cur + F.interpolate(x, size=cur.shape[-2:], mode="nearest")
            x = F.relu(gn(lay(x)))
        return self.out_lay(x)


def backbone_levels(detr: DETR, images: Tensor) -> list[Tensor]:
    """The backbone's layer1..layer4 outputs [B,C_i,H/4..H/32,W/4..W/32] (layer4 at H/16 with DC5)."""
    return detr.backbone.body.stages(images)


def level_channels(detr: DETR) -> list[int]:
    """Channels of layer1..layer4 (64..512 for ResNet-18/34, 256..2048 for ResNet-50 and deeper)."""
    c5 = detr.backbone.num_channels
    return [c5 // 8, c5 // 4, c5 // 2, c5]


class DETRSegmentation(nn.Module):
    """DETR with the panoptic mask head. `self.detr` is a plain `DETR` (a box detector on its own).

    forward(images, mask=None, return_attention=False): images as for DETR (list of [3,H,W] or a
    padded batch [B,3,H,W] with its mask [B,H,W], True on padding). Returns DETR's dict plus
      pred_masks [B,Q,H/4,W/4] mask logits at stride 4 of the padded batch,
      and with return_attention: mask_attention [B,Q,heads,h,w] (the bbox attention maps) and
      feature_mask [B,h,w].
    `mask_queries` (optional, [B,K] query indices) computes masks for those queries only
    (pred_masks [B,K,H/4,W/4]): training needs the matched ones, and the head's cost is per query;
    `detect` then `predict_masks` split the two steps so the matching can run in between.
    """

    def __init__(self, cfg: ModelConfig, backbone_weights: str | None = None, detr: DETR | None = None):
        super().__init__()
        self.detr = detr if detr is not None else DETR(cfg, backbone_weights)
        self.cfg = self.detr.cfg
        d, heads = self.cfg.hidden_dim, self.cfg.nheads
        self.bbox_attention = MHAttentionMap(d, heads)
        c = level_channels(self.detr)
        self.mask_head = MaskHeadSmallConv(d + heads, [c[2], c[1], c[0]], d)

    def freeze_detector(self) -> None:
        """The paper's second stage: only the mask head (bbox_attention, mask_head) trains."""
        for p in self.detr.parameters():
            p.requires_grad_(False)

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                return_attention: bool = False, mask_queries: Tensor | None = None) -> dict:
        out, state = self.detect(images, mask, return_attention)
        out["pred_masks"] = self.predict_masks(state, mask_queries)
        if return_attention:
            out["mask_attention"] = state["mask_attention"]
        return out

    def detect(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
               return_attention: bool = False) -> tuple[dict, dict]:
        """The detector's outputs, and what the mask head needs (`state`, for `predict_masks`)."""
        images, mask = as_batch(images, mask)
        detr = self.detr
        levels = backbone_levels(detr, images)  # the C5 map is the detector's features, C2-C4 feed the mask head
        enc = detr.encode(BackboneFeatures(levels[-1], feature_mask(mask, levels[-1])), return_attention)
        hs, cross = detr.decode(enc, need_weights=return_attention)
        out = detr.heads(hs)
        if return_attention:
            out["attention"] = {"encoder": enc.attention, "decoder_cross": cross, "feature_mask": enc.mask}
        b, d, h, w = enc.projected.shape
        state = {"queries": hs[-1], "memory": enc.memory.transpose(1, 2).reshape(b, d, h, w), "fmask": enc.mask,
                 "src_proj": enc.projected, "fpns": [levels[2], levels[1], levels[0]]}
        return out, state

    def predict_masks(self, state: dict, mask_queries: Tensor | None = None) -> Tensor:
        """Mask logits [B,Q,H/4,W/4] (or [B,K,..] for the query indices `mask_queries` [B,K]).
        Sets state["mask_attention"] [B,Q|K,heads,h,w]."""
        queries = state["queries"]  # [B,Q,d]
        if mask_queries is not None:
            queries = queries.gather(1, mask_queries[..., None].expand(-1, -1, queries.shape[-1]))
        fmask = state["fmask"]
        bbox_mask = self.bbox_attention(queries, state["memory"], fmask if fmask.any() else None)
        state["mask_attention"] = bbox_mask
        seg = self.mask_head(state["src_proj"], bbox_mask, state["fpns"])
        return seg.view(queries.shape[0], queries.shape[1], *seg.shape[-2:])


def build_segmentation_model(cfg: ModelConfig, backbone_weights: str | None = None) -> DETRSegmentation:
    return DETRSegmentation(cfg, backbone_weights)
