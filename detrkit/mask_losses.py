"""Mask losses of the panoptic model: sigmoid focal + DICE on matched queries.

Each predicted mask (logits at stride 4) is upsampled bilinearly to its target's padded image size;
both losses are summed over the matched masks and divided by the box count (as the box losses are).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
MASK_WEIGHTS = {"loss_mask": 1.0, "loss_dice": 1.0}


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """logits, targets [K,P] (P pixels; targets in {0,1}) -> sum over masks of
    1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), divided by num_boxes. p = sigmoid(logits)."""
    p = logits.sigmoid()
    per_mask = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return per_mask.sum() / num_boxes


def focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> Tensor:
    """logits, targets [K,P] -> the sigmoid focal loss averaged over each mask's pixels, summed over
    masks, divided by num_boxes."""
    per_pixel = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return per_pixel.mean(-1).sum() / num_boxes


def pad_masks(masks: list[Tensor]) -> Tensor:
    """Per-image target masks [N_b,H_b,W_b] -> [sum N_b, H, W] zero-padded bottom/right to the largest
    image, which is how the images were padded."""
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    out = masks[0].new_zeros((sum(len(m) for m in masks), h, w), dtype=torch.float32)
    i = 0
    for m in masks:
        out[i: i + len(m), : m.shape[-2], : m.shape[-1]] = m.float()
        i += len(m)
    return out


def mask_losses(pred_masks: Tensor, targets: list[dict], tgt_indices: list[Tensor], num_boxes: float,
                padded_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """pred_masks [B,K,h,w] logits of the matched queries in match order (row b holds image b's
    matched queries first; rows past len(tgt_indices[b]) are padding and ignored);
    targets[b]["masks"] [N_b,H_b,W_b] bool; tgt_indices[b] [K_b] the target index of each match.
    padded_size: (H, W) of the padded image batch (default: the largest target mask).
    -> {loss_mask (focal), loss_dice}."""
    src, tgt = [], []
    for b, (t, j) in enumerate(zip(targets, tgt_indices)):
        if len(j):
            src.append(pred_masks[b, : len(j)])
            tgt.append(t["masks"][j.to(t["masks"].device)])
    if not src:  # no targets in the batch: the masks get no gradient, the losses are 0
        zero = pred_masks.sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero}
    src_t = torch.cat(src).float()
    tgt_t = pad_masks(tgt)
    if padded_size is not None and tuple(tgt_t.shape[-2:]) != tuple(padded_size):
        tgt_t = F.pad(tgt_t, (0, padded_size[1] - tgt_t.shape[-1], 0, padded_size[0] - tgt_t.shape[-2]))
    src_t = F.interpolate(src_t[:, None], size=tgt_t.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    src_t, tgt_t = src_t.flatten(1), tgt_t.to(src_t.device).flatten(1)
    return {"loss_mask": focal_loss(src_t, tgt_t, num_boxes), "loss_dice": dice_loss(src_t, tgt_t, num_boxes)}
