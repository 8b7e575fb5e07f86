"""The panoptic training/evaluation dataset: (image tensor, target with boxes, labels and masks).

Targets as `DetectionDataset`'s (boxes cxcywh normalised by the transformed size, contiguous labels,
image_id, orig_size, size) plus `masks [N,h,w]` bool at the transformed size: one per non-crowd
segment, things and stuff alike (stuff are objects with a box for the detector). The masks follow
every geometric transform (torchvision `tv_tensors.Mask`: nearest resizing). An unreadable image or
segment PNG gives a `BadSample` (counted and skipped by the training loop), never a crash mid-run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .dataset import BadSample
from .images import ImageError, load_image
from .panoptic import PanopticFormatError, PanopticIndex, read_segment_ids
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, NormalizeBoxes, RandomShortSideResize, RandomSizeCrop)

log = logging.getLogger(__name__)


class _DropEmpty(torch.nn.Module):
    """Remove objects whose box or mask became empty (pushed out by a crop), with their labels and masks."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes, masks = target["boxes"], target["masks"]
        b = boxes.as_subclass(torch.Tensor)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & masks.flatten(1).any(1)
        if bool(keep.all()):
            return image, target
        return image, {"boxes": tv_tensors.wrap(b[keep], like=boxes), "labels": target["labels"][keep],
                       "masks": tv_tensors.Mask(masks[keep])}


def _finish() -> list:
    return [v2.ClampBoundingBoxes(), _DropEmpty(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), NormalizeBoxes()]


def panoptic_transforms(train: bool, scales: Sequence[int], max_size: int, crop_resize: Sequence[int] = (),
                        crop_size: Sequence[int] = (), hflip: bool = True) -> v2.Compose:
    """The paper's augmentation (flip, random resize, optional resize-crop-resize) applied to the image,
    the boxes and the masks together; eval: shorter side scales[0]."""
    if not train:
        return v2.Compose([RandomShortSideResize([scales[0]], max_size)] + _finish())
    steps: list = [v2.RandomHorizontalFlip(0.5)] if hflip else []
    resize = RandomShortSideResize(scales, max_size)
    if crop_resize and crop_size:
        steps.append(v2.RandomChoice([resize, v2.Compose([RandomShortSideResize(crop_resize),
                                                          RandomSizeCrop(crop_size[0], crop_size[1]), resize])],
                                     p=[0.5, 0.5]))
    else:
        steps.append(resize)
    return v2.Compose(steps + _finish())


class PanopticDataset(Dataset):
    """`dataset[i] -> (image [3,H,W], target)` or `BadSample`; see the module docstring."""

    def __init__(self, index: PanopticIndex, transforms: v2.Compose, skip_bad: bool = True):
        self.index = index
        self.records = list(index.records)
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.category_ids = [cid for cid, _, _ in index.categories]
        self.to_class = {cid: i for i, cid in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            image = load_image(rec.image.file)
            ids = read_segment_ids(rec.png)
            if ids.shape != (image.height, image.width):
                raise PanopticFormatError(f"{rec.png}: PNG is {ids.shape[1]}x{ids.shape[0]} but the image is "
                                          f"{image.width}x{image.height}")
        except (ImageError, PanopticFormatError) as e:
            if self.skip_bad:
                return BadSample(index=i, path=Path(getattr(e, "path", rec.png)), reason=str(e))
            raise
        segs = [s for s in rec.segments if not s.iscrowd and s.category_id in self.to_class]
        masks = np.stack([ids == s.id for s in segs]) if segs else np.zeros((0, *ids.shape), dtype=bool)
        keep = masks.reshape(len(segs), -1).any(1)  # a listed segment without pixels is no target
        segs = [s for s, k in zip(segs, keep) if k]
        masks = masks[keep]
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        h, w = ids.shape
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.to_class[s.category_id] for s in segs], dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        }
        image_t, target = self.transforms(image, target)
        return image_t, {
            "boxes": target["boxes"].reshape(-1, 4).to(torch.float32),
            "labels": target["labels"].to(torch.int64),
            "masks": target["masks"].as_subclass(torch.Tensor).to(torch.bool),
            "image_id": int(rec.image.id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor(list(image_t.shape[-2:]), dtype=torch.int64),
        }
