"""Model outputs -> detections in original-image pixels, and detections -> COCO result records.

The one place logits become detections: `Detector`, evaluation, the visualisations and `bench` all
use it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert


@dataclass
class Detections:
    """Detections of one image. boxes [K,4] xyxy pixels of the original upright image, scores [K],
    labels [K] contiguous class indices; category_ids / label_names are the dataset's ids and names of
    each box. image: the picture they were found in, when the detector was given one it could keep (a
    path, a PIL image or an array), for `plot` and `save`."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: list[int]
    label_names: list[str]
    image_size: tuple[int, int]  # (h, w)
    image: Any = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result records (`coco_records`), each with its class name under "category_name"."""
        records = coco_records(image_id, self.boxes, self.category_ids, self.scores)
        return [{**r, "category_name": n} for r, n in zip(records, self.label_names)]

    def plot(self, image: Any = None):
        """The image with the boxes, class names and scores drawn on it (a new RGB PIL image).
        image: a path, PIL image or HWC uint8 array; default: the one the detections were found in."""
        from PIL import Image

        from .viz.draw import draw_detections

        image = self.image if image is None else image
        if image is None:
            raise ValueError("Detections.plot: no image to draw on; pass the image the detections came from")
        if isinstance(image, (str, Path)):
            from .data.images import load_image

            image = load_image(image)
        elif not isinstance(image, Image.Image):
            import numpy as np

            array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(array)
        if image.size != (self.image_size[1], self.image_size[0]):
            raise ValueError(f"Detections.plot: the image is {image.size[0]}x{image.size[1]}, the detections were "
                             f"made on {self.image_size[1]}x{self.image_size[0]}")
        labels = self.labels.tolist()
        names = [""] * (max(labels) + 1 if labels else 0)
        for lab, name in zip(labels, self.label_names):
            names[lab] = name
        return draw_detections(image, self.boxes.numpy(), labels, self.scores.numpy(), names)

    def save(self, path: str | Path, image: Any = None) -> Path:
        """Write the drawn image (any image suffix) or, for a .json path, the COCO records (image_id 0)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            from .atomic import write_atomic

            write_atomic(path, json.dumps(self.to_coco(0), indent=1))
        else:
            drawn = self.plot(image)
            drawn.save(path, quality=92) if path.suffix.lower() in (".jpg", ".jpeg") else drawn.save(path)
        return path


def class_scores(pred_logits: Tensor) -> tuple[Tensor, Tensor]:
    """pred_logits [...,Q,C+1] -> (score [...,Q], label [...,Q]) of each query's best class: softmax over
    all classes, "no object" (the last column) dropped."""
    return pred_logits.float().softmax(-1)[..., :-1].max(-1)


def postprocess(pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor | list,
                threshold: float | None = None, top_k: int | None = None,
                duplicate_iou: float | None = None, classes_per_query: int = 1) -> list[dict[str, Tensor]]:
    """pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1], orig_sizes [B,2] (h, w)
    -> per image {scores [K], labels [K], boxes [K,4] xyxy pixels, queries [K] (query indices)},
    sorted by score.

    Without a threshold or top_k all predictions are kept (what COCO evaluation wants).
    duplicate_iou (ModelConfig.duplicate_iou): drop a box that overlaps a higher-scoring box of its class
    by more than this IoU, before top_k; None (the paper's post-processing) drops none.
    classes_per_query (ModelConfig.classes_per_query): each query gives its k best classes, each a
    detection with that class's probability and the query's box (Q*k per image); 1 is the paper's.
    """
    k = min(classes_per_query, pred_logits.shape[-1] - 1)
    if k == 1:
        scores, labels = class_scores(pred_logits)  # [B,Q]
    else:
        scores, labels = pred_logits.float().softmax(-1)[..., :-1].topk(k, dim=-1)  # [B,Q,k]
        scores, labels = scores.flatten(1), labels.flatten(1)  # [B,Q*k], query q's at q*k .. q*k+k-1
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32, device=pred_boxes.device).reshape(-1, 2)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # w h w h
    boxes = box_convert(pred_boxes.float(), "cxcywh", "xyxy") * scale[:, None, :]
    if k > 1:
        boxes = boxes.repeat_interleave(k, dim=1)
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        order = s.argsort(descending=True)
        if threshold is not None:
            order = order[s[order] > threshold]
        if duplicate_iou is not None:
            order = order[batched_nms(b[order], s[order], lab[order], duplicate_iou)]
        if top_k is not None:
            order = order[:top_k]
        results.append({"scores": s[order], "labels": lab[order], "boxes": b[order],
                        "queries": order // k})
    return results


def coco_records(image_id: int, boxes: Tensor, category_ids: Sequence[int], scores: Tensor) -> list[dict]:
    """COCO result records of one image: boxes [K,4] xyxy pixels -> bbox [x, y, w, h], with the
    dataset's category ids [K] and scores [K]. The one writer: `eval` and `predict` give the same."""
    xywh = box_convert(boxes.float(), "xyxy", "xywh").tolist()
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
            for b, c, s in zip(xywh, category_ids, scores.tolist())]
