"""Panoptic model outputs -> a segment map + segments_info per image, and instance masks for mask AP.

Panoptic (the paper's procedure): keep the queries whose best real class
scores above 0.85; give each pixel to the kept query with the highest mask logit; queries of the
same stuff class form one segment; segments of 4 pixels or fewer are dropped (their pixels go to the
next best query, recomputed until none is that small). Pixels of no segment are void (id 0).
Mask logits (stride 4 of the padded batch) are cropped to the image's own area and resized
bilinearly to the original image size before the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .data.panoptic import id2rgb

PANOPTIC_THRESHOLD = 0.85
MIN_SEGMENT_AREA = 4  # pixels: segments this small or smaller are dropped


@dataclass
class PanopticResult:
    """One image: ids [H,W] int64 segment ids (0 void) at the original size, and segments_info
    dicts {id, category_id, isthing, iscrowd, bbox xywh, area, score, label}."""

    ids: np.ndarray
    segments: list[dict]

    def to_rgb(self) -> np.ndarray:
        """The COCO panoptic PNG content [H,W,3] uint8."""
        return id2rgb(self.ids)


def _crop_resize(masks: Tensor, proc_size: tuple[int, int], orig_size: tuple[int, int]) -> Tensor:
    """[K,h4,w4] logits of the padded batch -> [K,H,W] at the original size (the image's own area)."""
    h4 = min(masks.shape[-2], -(-proc_size[0] // 4))
    w4 = min(masks.shape[-1], -(-proc_size[1] // 4))
    return F.interpolate(masks[None, :, :h4, :w4].float(), size=orig_size, mode="bilinear", align_corners=False)[0]


def _segment_table(ids: np.ndarray, info: dict[int, dict]) -> list[dict]:
    out = []
    for sid, meta in info.items():
        ys, xs = np.nonzero(ids == sid)
        if len(xs) == 0:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        out.append({"id": sid, **meta, "iscrowd": 0,
                    "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "area": int(len(xs))})
    return out


def panoptic_postprocess(pred_logits: Tensor, pred_masks: Tensor, proc_size: tuple[int, int],
                         orig_size: tuple[int, int], is_thing: list[bool], category_ids: list[int],
                         class_names: list[str] | None = None, threshold: float = PANOPTIC_THRESHOLD,
                         min_area: int = MIN_SEGMENT_AREA) -> PanopticResult:
    """One image. pred_logits [Q,C+1], pred_masks [Q,h4,w4] logits; proc_size (h, w) the image's
    size as the model saw it (unpadded), orig_size (H, W) the output size; is_thing [C] per class
    index; category_ids [C] the dataset ids written to segments_info."""
    prob = pred_logits.float().softmax(-1)
    scores, labels = prob[:, :-1].max(-1)
    keep = torch.nonzero(scores > threshold).flatten()
    H, W = orig_size
    if len(keep) == 0:
        return PanopticResult(np.zeros((H, W), dtype=np.int64), [])
    logits = _crop_resize(pred_masks[keep], proc_size, orig_size)  # [K,H,W]
    labels_k, scores_k = labels[keep].tolist(), scores[keep].tolist()
    # segment of each kept query: stuff queries of one class share the first one's segment
    alive = list(range(len(keep)))
    while True:
        owner = logits[alive].argmax(0).numpy()  # index into alive
        next_id = 1
        segment_of_query = {}
        stuff_first: dict[int, int] = {}
        for j, q in enumerate(alive):
            lab = labels_k[q]
            if not is_thing[lab] and lab in stuff_first:
                segment_of_query[j] = stuff_first[lab]
                continue
            segment_of_query[j] = next_id
            if not is_thing[lab]:
                stuff_first[lab] = next_id
            next_id += 1
        lut = np.array([segment_of_query[j] for j in range(len(alive))], dtype=np.int64)
        ids = lut[owner]
        areas = np.bincount(ids.ravel(), minlength=next_id)
        small = {j for j in range(len(alive)) if areas[segment_of_query[j]] <= min_area}
        if not small or len(small) == len(alive):
            break
        alive = [q for j, q in enumerate(alive) if j not in small]
    info = {}
    for j, q in enumerate(alive):
        sid = int(segment_of_query[j])
        lab = labels_k[q]
        if sid in info:  # a merged stuff segment: keep the best score
            info[sid]["score"] = max(info[sid]["score"], scores_k[q])
            continue
        info[sid] = {"category_id": int(category_ids[lab]), "isthing": bool(is_thing[lab]), "score": scores_k[q],
                     **({"label": class_names[lab]} if class_names else {})}
    segments = [s for s in _segment_table(ids, info) if s["area"] > min_area]
    kept_ids = np.array([s["id"] for s in segments], dtype=np.int64)
    ids = np.where(np.isin(ids, kept_ids), ids, 0)
    return PanopticResult(ids, segments)


def instance_masks(pred_logits: Tensor, pred_masks: Tensor, proc_size: tuple[int, int],
                   orig_size: tuple[int, int], top_k: int | None = None) -> dict[str, Tensor]:
    """Per query (best real class, its probability) a binary mask sigmoid > 0.5 at the original size:
    what COCO mask AP scores. -> {scores [K], labels [K], masks [K,H,W] bool}, by descending score."""
    scores, labels = pred_logits.float().softmax(-1)[:, :-1].max(-1)
    order = scores.argsort(descending=True)
    if top_k is not None:
        order = order[:top_k]
    masks = _crop_resize(pred_masks[order], proc_size, orig_size).sigmoid() > 0.5
    return {"scores": scores[order], "labels": labels[order], "masks": masks}
