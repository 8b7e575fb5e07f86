"""Hungarian matching of predictions to targets.

The cost of giving target j to prediction i is
    cost_class * (-p_i(class_j)) + cost_bbox * L1(box_i, box_j) + cost_giou * (-GIoU(box_i, box_j))
with boxes in normalised cxcywh (GIoU on their xyxy corners). The whole batch's cost is one tensor
[B,Q,N_max] (targets padded to the largest image); the exact assignment is then solved per image on
the CPU by scipy.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

# Stands in for NaN/inf costs (a diverging model): such pairs are matched only when nothing else is left,
# and the value stays far from float64 overflow inside scipy's sums.
_BAD_COST = 1e9


class HungarianMatcher:
    """One-to-one assignment of the Q predictions of each image to its N targets (min(Q, N) pairs).

    __call__(outputs, targets) with outputs {pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh} and
    targets a list of B dicts {labels [N_b] int64, boxes [N_b,4] cxcywh} -> list of B pairs
    (pred_idx [K_b] int64, tgt_idx [K_b] int64) on the CPU, K_b = min(Q, N_b), pred_idx ascending.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all three costs are 0, the matching would be arbitrary")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)

    def __repr__(self) -> str:
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou})")

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> Tensor:
        """The batched cost [B,Q,N_max] in float32; columns past an image's N_b are padding."""
        logits, pred = outputs["pred_logits"].float(), outputs["pred_boxes"].float()  # float32 even under bf16
        B, Q, C1 = logits.shape
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {B} images in the outputs but {len(targets)} targets")
        sizes = [len(t["labels"]) for t in targets]
        n_max = max(sizes, default=0)
        # Padding targets: a valid box (no NaN in GIoU) of class 0; their columns are never read.
        labels = logits.new_zeros((B, n_max), dtype=torch.int64)
        boxes = logits.new_tensor([0.5, 0.5, 1.0, 1.0]).repeat(B, n_max, 1)
        for b, t in enumerate(targets):
            if len(t["boxes"]) != sizes[b]:
                raise ValueError(f"target {b}: {sizes[b]} labels but {len(t['boxes'])} boxes")
            labels[b, : sizes[b]] = t["labels"]
            boxes[b, : sizes[b]] = t["boxes"].float()
        if n_max and (labels.min() < 0 or labels.max() >= C1 - 1):
            raise ValueError(f"HungarianMatcher: target labels must lie in [0, {C1 - 1}) (the model's classes)")

        prob = logits.softmax(-1)  # [B,Q,C+1]
        cost_class = -prob.gather(2, labels[:, None, :].expand(B, Q, n_max))
        cost_bbox = torch.cdist(pred, boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(boxes, "cxcywh", "xyxy"))
        cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        return torch.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=_BAD_COST)

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        cost = self.cost_matrix(outputs, targets).cpu()
        indices = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(cost[b, :, :n].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
