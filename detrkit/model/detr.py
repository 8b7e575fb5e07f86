"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads, as public blocks."""
from __future__ import annotations

from typing import NamedTuple, Sequence

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


class BackboneFeatures(NamedTuple):
    """What the backbone hands the transformer: features [B,C,h,w] and their padding mask [B,h,w]
    (True on padding). Passing one to `DETR.forward` skips the backbone (a frozen backbone's cached
    features)."""

    features: Tensor
    mask: Tensor


class Encoded(NamedTuple):
    """The encoder's output and what the decoder needs beside it.

    memory [B,N,d], pos [B,N,d] (position embedding of the N = h*w tokens, row-major),
    key_mask [B,N] (True on padding) or None when nothing is padded, mask [B,h,w] (the feature mask),
    attention [Le,B,heads,N,N] or None (only when asked for), projected [B,d,h,w] (the encoder's input:
    the backbone features after the 1x1 projection, for heads such as the panoptic mask head).
    """

    memory: Tensor
    pos: Tensor
    key_mask: Tensor | None
    mask: Tensor
    attention: Tensor | None
    projected: Tensor


def as_batch(images: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A list of [3,H_i,W_i] images (padded here) or a padded batch [B,3,H,W] with its mask [B,H,W]
    (None: nothing padded) -> (batch [B,3,H,W], mask [B,H,W], True on padding)."""
    if isinstance(images, (list, tuple)):
        if mask is not None:
            raise ValueError("pass a mask only with a padded batch tensor, not with a list of images")
        return pad_images(images)
    if mask is None:
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    return images, mask


class DETR(nn.Module):
    """The detection transformer, as four public blocks that `forward` composes:

    features(images, mask) -> BackboneFeatures     backbone: [B,C,h,w] and its mask [B,h,w]
    encode(features) -> Encoded                     1x1 projection, position embedding, encoder
    decode(encoded) -> (hs [L,B,Q,d], cross [L,B,heads,Q,N] | None)   object queries through the decoder
    heads(hs) -> {pred_logits, pred_boxes, aux_outputs}               class and box heads

    forward(images, mask=None, return_attention=False, batch_invariant=False): images is a list of
    ImageNet-normalised [3,H,W] tensors (padded and masked here), a padded batch [B,3,H,W] with its
    mask [B,H,W] (True on padding; None means no padding), or `BackboneFeatures` (backbone skipped).
    Returns a dict:
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

    def forward(self, images: Tensor | Sequence[Tensor] | BackboneFeatures, mask: Tensor | None = None,
                return_attention: bool = False, batch_invariant: bool = False) -> dict:
        """See the class docstring. batch_invariant (list input only): run the backbone on each image
        unpadded and pad the feature maps instead, so every image gets exactly its batch-of-one result
        (zero padding otherwise leaks into the convolutions near the border)."""
        if isinstance(images, BackboneFeatures):
            if mask is not None:
                raise ValueError("BackboneFeatures carry their own mask; pass no mask with them")
            feats = images
        else:
            feats = self.features(images, mask, per_image=batch_invariant)
        return self.from_features(feats, return_attention)

    def features(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                 per_image: bool = False) -> BackboneFeatures:
        """The backbone: images as in `forward` -> BackboneFeatures ([B,C,h,w], mask [B,h,w]).

        per_image (list input only): no image is padded before the backbone, the feature maps are
        padded after it, so an image's features do not depend on the others in the batch. Images of
        the same size go through together (no padding needed): one call per size, not per image."""
        if per_image and isinstance(images, (list, tuple)):
            if mask is not None:
                raise ValueError("pass a mask only with a padded batch tensor, not with a list of images")
            return BackboneFeatures(*pad_images(self._unpadded_features(images)))
        return BackboneFeatures(*self.backbone(*as_batch(images, mask)))

    def _unpadded_features(self, images: Sequence[Tensor]) -> list[Tensor]:
        """[3,H_i,W_i] images -> their backbone maps [C,h_i,w_i], in order; same-size images batched."""
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(i)
        out: list[Tensor | None] = [None] * len(images)
        for idx in by_size.values():
            for i, f in zip(idx, self.backbone.body(torch.stack([images[i] for i in idx]))):
                out[i] = f.contiguous()
        return out

    def from_features(self, feats: BackboneFeatures, return_attention: bool = False) -> dict:
        """Everything after the backbone: encode, decode, heads -> the output dict of `forward`."""
        enc = self.encode(feats, return_attention)
        hs, cross = self.decode(enc, need_weights=return_attention)
        out = self.heads(hs)
        if return_attention:
            out["attention"] = {"encoder": enc.attention, "decoder_cross": cross, "feature_mask": enc.mask}
        return out

    def encode(self, feats: BackboneFeatures, need_weights: bool = False) -> Encoded:
        """1x1 projection to d channels, position embedding, encoder -> `Encoded` (memory [B,N,d])."""
        features, fmask = feats
        pos = self.position(fmask).to(features.dtype).flatten(2).transpose(1, 2)  # [B,N,d]
        projected = self.input_proj(features)  # [B,d,h,w]
        # An all-False mask changes nothing; dropping it lets attention use the unmasked fast path.
        key_mask = fmask.flatten(1) if (need_weights or torch.jit.is_tracing() or fmask.any()) else None
        memory, weights = self.transformer.encode(projected.flatten(2).transpose(1, 2), pos, key_mask, need_weights)
        return Encoded(memory, pos, key_mask, fmask, weights, projected)

    def decode(self, enc: Encoded, queries: Tensor | None = None, self_attn_mask: Tensor | None = None,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Object queries through the decoder -> (hs [L,B,Q,d] every layer after the shared norm,
        cross-attention [L,B,heads,Q,N] or None).

        queries [B,Q,d]: the query embeddings to decode (default: the learned ones, expanded to the
        batch); extra queries (e.g. denoising groups) are appended by the caller. self_attn_mask
        [Q,Q] bool (True: query i must not attend to query j) keeps such groups apart."""
        if queries is None:
            queries = self.query_embed.weight[None].expand(enc.memory.shape[0], -1, -1)
        return self.transformer.decode(enc.memory, enc.pos, enc.key_mask, queries, self_attn_mask, need_weights)

    def heads(self, hs: Tensor) -> dict:
        """Decoder states hs [L,B,Q,d] -> {pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1],
        aux_outputs (with aux_loss): the same two keys for layers 0..L-2}."""
        logits = self.class_embed(hs)  # [L,B,Q,C+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L,B,Q,4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def weights_version(self) -> tuple:
        """Changes whenever a parameter or buffer is replaced or modified in place (a cache key for
        derived copies such as `optimize_for_inference`'s)."""
        tensors = (*self.parameters(), *self.buffers())
        return tuple(id(t) for t in tensors) + tuple(t._version for t in tensors)


def build_model(cfg: ModelConfig, backbone_weights: str | None = None) -> DETR:
    return DETR(cfg, backbone_weights)
