"""The frozen detector's outputs for the mask head, computed once per augmented view.

In the paper's second stage the detector never changes, yet running it (backbone and transformer) is
most of a mask-head step's cost. `MaskHeadCache` runs it once on `views` augmented versions of each
training image (view v of image i is the sample `SeededSamples` draws in epoch v) and keeps, per
image and at the image's own size (no batch padding), what the matcher and the head read: the last
decoder layer's pred_logits and pred_boxes, the queries, the memory, its feature mask, the projected
features and the layer3..layer1 maps, with the target. `cached_batch` pads a batch of them back into
what `DETRSegmentation.detect` returns. Under a time budget the caching takes at most its share
(`CacheLimit`): it stops after fewer views when another would not fit.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data.dataset import BadSample
from ..model.detr import pad_images
from .feature_cache import CacheLimit, cached_views

log = logging.getLogger(__name__)

FPN_STRIDES = (16, 8, 4)  # the ResNet's layer3, layer2, layer1: the mask head's fpns, in its order
TARGET_KEYS = ("labels", "boxes", "masks")  # what the matcher and the mask losses read

Detect = Callable[[list], tuple[dict, dict]]  # images -> (outputs, state) in float32, no gradients


class MaskHeadCache(Dataset):
    """Item i (in the current `epoch`) -> (cached entry of view epoch mod views, target) or the BadSample.

    samples: a `SeededSamples` of (image, target); detect: the frozen detector (eval mode, no_grad);
    stride: the memory's (32; 16 with a dilated layer4); dtype: how the maps are stored.
    """

    def __init__(self, samples, detect: Detect, views: int, *, stride: int = 32, dtype=torch.float32,
                 batch_size: int = 8, progress: bool = True, limit: CacheLimit | None = None):
        if views < 1:
            raise ValueError(f"MaskHeadCache: views must be >= 1, got {views}")
        self.epoch = 0

        def run(chunk: list) -> list:
            entries = _detect_chunk(detect, [image for image, _ in chunk], stride, dtype)
            return [(entry, {key: target[key] for key in TARGET_KEYS}) for entry, (_, target) in zip(entries, chunk)]

        bar = tqdm(total=views * len(samples), desc="cache detector", disable=not progress, dynamic_ncols=True,
                   unit="img")
        self.items = cached_views(samples, views, run, batch_size, bar, limit)
        bar.close()
        self.views = len(self.items)  # epoch e serves view e mod views: only the views that were cached
        log.info("cached the frozen detector's outputs for %d view(s) x %d images (%.0f MiB)", self.views,
                 len(samples), self.views * _mebibytes(self.items[0]))

    def __len__(self) -> int:
        return len(self.items[0])

    def __getitem__(self, i: int):
        return self.items[self.epoch % self.views][i]


@torch.no_grad()
def _detect_chunk(detect: Detect, images: list, stride: int, dtype) -> list[dict]:
    outputs, state = detect(images)
    return [_entry(outputs, state, j, tuple(im.shape[-2:]), stride, dtype) for j, im in enumerate(images)]


def _entry(outputs: dict, state: dict, j: int, size: tuple[int, int], stride: int, dtype) -> dict:
    """Image j of a detected batch, each map cut to the size the image alone gives (ceil(size / stride),
    the ResNet's arithmetic), so re-padding a batch of entries gives the padded batch's sizes."""
    h, w = size

    def cut(t: torch.Tensor, s: int, as_dtype=dtype) -> torch.Tensor:
        # a copy, not a view: a view would keep the whole batch's storage alive
        return t[j, ..., : math.ceil(h / s), : math.ceil(w / s)].to("cpu", as_dtype, copy=True).contiguous()

    def row(t: torch.Tensor) -> torch.Tensor:
        return t[j].to("cpu", torch.float32, copy=True)

    return {"pred_logits": row(outputs["pred_logits"]), "pred_boxes": row(outputs["pred_boxes"]),
            "queries": row(state["queries"]), "memory": cut(state["memory"], stride),
            "fmask": cut(state["fmask"], stride, torch.bool), "src_proj": cut(state["src_proj"], stride),
            "fpns": [cut(f, s) for f, s in zip(state["fpns"], FPN_STRIDES)]}


def cached_batch(entries: list[dict], device: torch.device) -> tuple[dict, dict]:
    """Cached entries -> (outputs, state) as `detect` gives them for a batch: each map zero-padded
    bottom/right to the batch max, fmask True on that padding, float32 on `device`."""

    def padded(key: str, level: int | None = None) -> torch.Tensor:
        maps = [e[key] if level is None else e[key][level] for e in entries]
        return pad_images(maps)[0].to(device, torch.float32)

    memory = padded("memory")
    fmask = torch.ones((len(entries), *memory.shape[-2:]), dtype=torch.bool)
    for i, e in enumerate(entries):
        fmask[i, : e["fmask"].shape[0], : e["fmask"].shape[1]] = e["fmask"]
    outputs = {k: torch.stack([e[k] for e in entries]).to(device) for k in ("pred_logits", "pred_boxes")}
    state = {"queries": torch.stack([e["queries"] for e in entries]).to(device), "memory": memory,
             "fmask": fmask.to(device), "src_proj": padded("src_proj"),
             "fpns": [padded("fpns", level) for level in range(len(FPN_STRIDES))]}
    return outputs, state


def _mebibytes(items: list) -> float:
    """The stored size of one view's entries and targets."""
    total = 0
    for item in items:
        if isinstance(item, BadSample):
            continue
        entry, target = item
        tensors = [v for v in entry.values() if torch.is_tensor(v)] + entry["fpns"] + list(target.values())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total / 2**20
