"""The training/evaluation dataset: a `DatasetIndex` read as (image tensor, target dict) pairs.

Target per image (docs/design.md): `boxes [N,4]` cxcywh normalised by the transformed unpadded size,
`labels [N]` int64 contiguous class indices, `image_id` int, `orig_size [2]` (h, w) of the upright
image as loaded, `size [2]` (h, w) after the transforms. Crowd regions are not targets, boxes are
clamped to the image and boxes of zero area are dropped.

A file that cannot be read yields a `BadSample` (with `skip_bad`) rather than killing a long run;
`collate` separates those so the training loop, in the main process, can count and list them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .images import ImageError, load_image
from .index import DatasetIndex
from .transforms import basic_transforms, make_target

log = logging.getLogger(__name__)


@dataclass
class BadSample:
    """Stands in for an image that could not be loaded (picklable, so it crosses DataLoader workers)."""

    index: int
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _clamp_xyxy(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def _non_degenerate(boxes: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(boxes).all(dim=1)
    return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class DetectionDataset(Dataset):
    """`dataset[i] -> (image [3,H,W] float, target dict)` or a `BadSample` when the image is unreadable.

    `transforms(image: PIL.Image, {"boxes": BoundingBoxes XYXY px, "labels"})` must return the
    normalised image tensor and normalised cxcywh boxes (see `detrkit.data.transforms`); None means
    no resizing (`basic_transforms()`).
    """

    def __init__(self, index: DatasetIndex, transforms: Callable | None = None, skip_bad: bool = True):
        self.index = index
        self.transforms = transforms if transforms is not None else basic_transforms()
        self.skip_bad = skip_bad
        self.images = list(index.images)
        to_class = index.category_to_index
        by_image = index.annotations_by_image()
        self.num_degenerate = 0  # boxes of zero area after clamping to the declared image size
        self.num_crowd = 0
        self.num_unknown_category = 0
        # all boxes in one tensor with per-image offsets: few Python objects, cheap to share with workers
        all_boxes: list[torch.Tensor] = []
        all_labels: list[torch.Tensor] = []
        counts: list[int] = []
        for rec in self.images:
            boxes, labels = [], []
            for a in by_image.get(rec.id, []):
                if a.iscrowd:
                    self.num_crowd += 1
                    continue
                if a.category_id not in to_class:
                    self.num_unknown_category += 1
                    continue
                x, y, w, h = (float(v) for v in a.bbox)
                boxes.append([x, y, x + w, y + h])
                labels.append(to_class[a.category_id])
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            lab = torch.tensor(labels, dtype=torch.int64)
            if rec.width and rec.height:
                b = _clamp_xyxy(b, rec.width, rec.height)
            keep = _non_degenerate(b)
            self.num_degenerate += int((~keep).sum())
            all_boxes.append(b[keep])
            all_labels.append(lab[keep])
            counts.append(int(keep.sum()))
        self._boxes = torch.cat(all_boxes) if all_boxes else torch.zeros(0, 4)  # XYXY pixels [M,4]
        self._labels = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.int64)  # [M]
        self._offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)  # image i: [off[i], off[i+1])
        if self.num_degenerate:
            log.warning("%s: dropped %d box(es) of zero area (after clamping to the image)",
                        index.source, self.num_degenerate)
        if self.num_unknown_category:
            log.warning("%s: left out %d box(es) with a category id not in the category list",
                        index.source, self.num_unknown_category)

    def __len__(self) -> int:
        return len(self.images)

    def landscape(self, i: int) -> bool | None:
        """Whether image i is wider than tall, from its declared size (None: no size declared)."""
        rec = self.images[i]
        return rec.width >= rec.height if rec.width and rec.height else None

    def boxes(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i's training boxes before any transform: XYXY pixels [N,4] float32, class indices [N]."""
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._boxes[lo:hi], self._labels[lo:hi]

    @property
    def num_boxes(self) -> int:
        return len(self._boxes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]] | BadSample:
        if i < 0:
            i += len(self.images)
        rec = self.images[i]
        try:
            image = load_image(rec.file)
        except ImageError as e:
            if self.skip_bad:
                return BadSample(index=i, path=Path(rec.file), reason=e.problem)
            raise
        width, height = image.size
        # declared and real sizes can disagree (e.g. an unapplied EXIF rotation in the tool that wrote them)
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        boxes = _clamp_xyxy(self._boxes[lo:hi], width, height)
        labels = self._labels[lo:hi]
        keep = _non_degenerate(boxes)
        if not bool(keep.all()):
            log.debug("%s: %d box(es) fall outside the %dx%d image", rec.file, int((~keep).sum()), width, height)
        image_t, target = self.transforms(image, make_target(boxes[keep], labels[keep], height, width))
        return image_t, {
            "boxes": target["boxes"].reshape(-1, 4).to(torch.float32),
            "labels": target["labels"].to(torch.int64),
            "image_id": int(rec.id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(list(image_t.shape[-2:]), dtype=torch.int64),
        }


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[BadSample]]:
    """DataLoader collate: (images, targets, bad samples). Images keep their sizes; the model pads them."""
    images, targets, bad = [], [], []
    for item in batch:
        if isinstance(item, BadSample):
            bad.append(item)
        else:
            images.append(item[0])
            targets.append(item[1])
    return images, targets, bad
