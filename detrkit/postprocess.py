"""Model outputs -> detections in original-image pixels (reference section 7)."""
from __future__ import annotations

from dataclasses import dataclass

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

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result records (bbox xywh pixels)."""
        xywh = box_convert(self.boxes, "xyxy", "xywh").tolist()
        return [
            {"image_id": image_id, "category_id": int(c), "bbox": [round(v, 3) for v in b], "score": float(s)}
            for b, c, s in zip(xywh, self.category_ids, self.scores.tolist())
        ]


def postprocess(pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor | list,
                threshold: float | None = None, top_k: int | None = None) -> list[dict[str, Tensor]]:
    """pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1], orig_sizes [B,2] (h, w)
    -> per image {scores [K], labels [K], boxes [K,4] xyxy pixels}, sorted by score.

    Softmax over all classes, drop "no object", keep each query's best class. Without a threshold or
    top_k all Q predictions are kept (what COCO evaluation wants).
    """
    prob = pred_logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
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
        results.append({"scores": s[order], "labels": lab[order], "boxes": b[order]})
    return results
