"""Model outputs -> detections in original-image pixels, and detections -> COCO result records.

The one place logits become detections: `Detector`, evaluation, the visualisations and `bench` all
use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert


@dataclass
class Detections:
    """Detections of one image. boxes [K,4] xyxy pixels of the original upright image, scores [K],
    labels [K] contiguous class indices; category_ids / label_names are the dataset's ids and names."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: list[int]
    label_names: list[str]
    image_size: tuple[int, int]  # (h, w)

    def __len__(self) -> int:
        return len(self.scores)


def class_scores(pred_logits: Tensor) -> tuple[Tensor, Tensor]:
    """pred_logits [...,Q,C+1] -> (score [...,Q], label [...,Q]) of each query's best class: softmax over
    all classes, "no object" (the last column) dropped."""
    return pred_logits.float().softmax(-1)[..., :-1].max(-1)


def postprocess(pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor | list,
                threshold: float | None = None, top_k: int | None = None) -> list[dict[str, Tensor]]:
    """pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1], orig_sizes [B,2] (h, w)
    -> per image {scores [K], labels [K], boxes [K,4] xyxy pixels, queries [K] (query indices)},
    sorted by score.

    Without a threshold or top_k all Q predictions are kept (what COCO evaluation wants).
    """
    scores, labels = class_scores(pred_logits)
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32, device=pred_boxes.device).reshape(-1, 2)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # w h w h
    boxes = box_convert(pred_boxes.float(), "cxcywh", "xyxy") * scale[:, None, :]
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        order = s.argsort(descending=True)
        if threshold is not None:
            order = order[s[order] > threshold]
        if top_k is not None:
            order = order[:top_k]
        results.append({"scores": s[order], "labels": lab[order], "boxes": b[order], "queries": order})
    return results


def coco_records(image_id: int, boxes: Tensor, category_ids: Sequence[int], scores: Tensor) -> list[dict]:
    """COCO result records of one image: boxes [K,4] xyxy pixels -> bbox [x, y, w, h], with the
    dataset's category ids [K] and scores [K]. The one writer: `eval` and `predict` give the same."""
    xywh = box_convert(boxes.float(), "xyxy", "xywh").tolist()
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
            for b, c, s in zip(xywh, category_ids, scores.tolist())]
