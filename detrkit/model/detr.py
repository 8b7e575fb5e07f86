"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads (reference section 1)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ModelConfig
from .backbone import Backbone
from .position import build_position_embedding
from .transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (the 3-layer box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad [C,H_i,W_i] images (or feature maps) bottom/right to the batch max.

    -> batch [B,C,H,W], mask [B,H,W] (True on padding).
    """
    if len(images) == 0:
        raise ValueError("pad_images: empty list of images")
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != images[0].shape[0]:
            raise ValueError(f"image {i}: expected a [C,H,W] tensor with C={images[0].shape[0]}, got shape {tuple(im.shape)}")
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    ref = images[0]
    batch = ref.new_zeros((len(images), ref.shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=ref.device)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask


class DETR(nn.Module):
    """The detection transformer.

    forward(images, mask=None, return_attention=False) where images is a list of ImageNet-normalised
    [3,H,W] tensors (padded and masked here) or a padded batch [B,3,H,W] with its mask [B,H,W]
    (True on padding; None means no padding). Returns a dict:
      pred_logits [B,Q,C+1] (last column = no object), pred_boxes [B,Q,4] cxcywh in [0,1] of the
      unpadded image, aux_outputs: list (decoder layers 0..L-2) of dicts with the same two keys.
    With return_attention: attention = {encoder [Le,B,heads,N,N], decoder_cross [Ld,B,heads,Q,N],
      feature_mask [B,h,w]} where N = h*w tokens of the feature map, row-major.
    """

    def __init__(self, cfg: ModelConfig, backbone_weights: str | None = None):
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError("ModelConfig has no classes: set class_names (the dataset's categories)")
        self.cfg = cfg
        d = cfg.hidden_dim
        self.backbone = Backbone(cfg.backbone, cfg.dilation, cfg.train_backbone, backbone_weights,
                                 cfg.backbone_norm)
        self.position = build_position_embedding(cfg.position_embedding, d)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.transformer = Transformer(d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward,
                                       cfg.dropout, cfg.pre_norm, cfg.queries_at)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                return_attention: bool = False, batch_invariant: bool = False, features: bool = False) -> dict:
        """See the class docstring. batch_invariant (list input only): run the backbone on each image
        unpadded and pad the feature maps instead, so every image gets exactly its batch-of-one result
        (zero padding otherwise leaks into the convolutions near the border). features: `images` is a
        list of backbone outputs [C,h,w] (a frozen backbone's cached features); the backbone is skipped."""
        if features:
            if not isinstance(images, (list, tuple)) or mask is not None:
                raise ValueError("features=True takes a list of [C,h,w] feature maps and no mask")
            feature_maps, fmask = pad_images(images)
            return self._forward_features(feature_maps, fmask, return_attention)
        if isinstance(images, (list, tuple)):
            if mask is not None:
                raise ValueError("pass a mask only with a padded batch tensor, not with a list of images")
            if batch_invariant:
                features, fmask = self._features_per_image(images)
            else:
                images, mask = pad_images(images)
                features, fmask = self.backbone(images, mask)
        else:
            if mask is None:
                mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
            features, fmask = self.backbone(images, mask)
        return self._forward_features(features, fmask, return_attention)

    def _features_per_image(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feats = [self.backbone.body(im[None])[0] for im in images]
        padded, fmask = pad_images(feats)
        return padded, fmask

    def _forward_features(self, features: Tensor, fmask: Tensor, return_attention: bool) -> dict:
        pos = self.position(fmask).to(features.dtype).flatten(2).transpose(1, 2)  # [B,N,d]
        src = self.input_proj(features).flatten(2).transpose(1, 2)  # [B,N,d]
        # An all-False mask changes nothing; dropping it lets attention use the unmasked fast path.
        key_mask = fmask.flatten(1) if (return_attention or torch.jit.is_tracing() or fmask.any()) else None
        hs, _, attention = self.transformer(src, key_mask, self.query_embed.weight, pos, return_attention)
        logits = self.class_embed(hs)  # [L,B,Q,C+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L,B,Q,4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if return_attention:
            out["attention"] = {**attention, "feature_mask": fmask}
        return out


def build_model(cfg: ModelConfig, backbone_weights: str | None = None) -> DETR:
    return DETR(cfg, backbone_weights)
