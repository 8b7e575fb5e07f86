"""Image + box transforms for training and evaluation (torchvision.transforms.v2).

A transform takes `(image, target)` with `image` a `PIL.Image` (or uint8 tensor) and
`target = {"boxes": tv_tensors.BoundingBoxes (XYXY pixels), "labels": int64 [N]}` and returns
`(image [3,H,W] float32 ImageNet-normalised, target)` with `target["boxes"]` a plain float32 tensor
`[N,4]` in cxcywh normalised by the transformed image size. Boxes follow every geometric step;
boxes that end up empty after a crop are removed together with their labels.

Training follows the paper: horizontal flip 0.5, then with probability 0.5
either a random shorter-side resize, or resize / random crop / random shorter-side resize.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the shortest side an image is resized to: the authors' rule gives 0 px for very thin images (10000x10
# at 1333 px), which no resize can produce; 16 px keeps a little content in the one feature cell
MIN_SIDE = 16


def resized_shape(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to `size`, unless the longer side would exceed `max_size`.

    The authors' rule: when the longer side would pass `max_size`, the shorter side target becomes
    round(max_size * short / long); the longer side is then int(target * long / short). Kept exactly,
    rounding included (very elongated images can end a few pixels past `max_size`, as in the reference),
    so evaluation sizes match the authors'.
    """
    if min(height, width) < 1:
        raise ValueError(f"cannot resize an image of {width}x{height} pixels")
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    floor = min(MIN_SIDE, max_size) if max_size is not None else 0
    if size < floor:
        # too thin for the rule (e.g. 10000x10 -> a short side of 1 px, a feature map of 0 cells): the
        # short side is floored and the long side capped, stretching the image; boxes are relative, so
        # predictions still map back onto the original
        long_side = min(int(floor * max(height, width) / min(height, width)), max(max_size or 0, floor))
        return (floor, long_side) if height <= width else (long_side, floor)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomShortSideResize(v2.Transform):
    """Resize so the shorter side is one of `sizes` (chosen uniformly), longer side <= `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        if not sizes:
            raise ValueError("RandomShortSideResize: sizes must not be empty")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": list(resized_shape(h, w, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Random crop whose width and height are each drawn uniformly in [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)

        def draw(extent: int) -> int:
            hi = min(extent, self.max_size)
            lo = min(self.min_size, hi)  # an image smaller than min_size is kept whole on that axis
            return int(torch.randint(lo, hi + 1, ()))

        ch, cw = draw(h), draw(w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class NormalizeBoxes(v2.Transform):
    """XYXY pixel `BoundingBoxes` -> plain float32 tensor cxcywh in [0,1] of the image size."""

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = inpt.canvas_size
        boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        return boxes.as_subclass(torch.Tensor).to(torch.float32) / scale


class DropEmptyBoxes(torch.nn.Module):
    """Remove boxes of zero width or height (e.g. pushed out by a crop) together with their labels.

    Unlike `v2.SanitizeBoundingBoxes` (min 1 px) this keeps tiny but real boxes, as the authors do.
    Works on `(image, {"boxes": BoundingBoxes, "labels": ...})`.
    """

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        xyxy = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        if bool(keep.all()):
            return image, target
        out = dict(target)
        out["boxes"] = tv_tensors.wrap(boxes.as_subclass(torch.Tensor)[keep], like=boxes)
        out["labels"] = target["labels"][keep]
        return image, out


def _finish() -> list[v2.Transform]:
    """Common tail: drop empty boxes, tensor + ImageNet normalisation, boxes to normalised cxcywh."""
    return [
        v2.ClampBoundingBoxes(),
        DropEmptyBoxes(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        NormalizeBoxes(),
    ]


def train_transforms(
    scales: Sequence[int],
    max_size: int,
    crop_resize: Sequence[int],
    crop_size: Sequence[int],
    hflip: bool = True,
) -> v2.Compose:
    """The paper's training augmentation (see module docstring). `crop_size` = (min, max) crop side."""
    if len(crop_size) != 2:
        raise ValueError(f"crop_size must be (min, max), got {crop_size!r}")
    steps: list[v2.Transform] = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps.append(
        v2.RandomChoice(
            [
                RandomShortSideResize(scales, max_size),
                v2.Compose([
                    RandomShortSideResize(crop_resize),
                    RandomSizeCrop(crop_size[0], crop_size[1]),
                    RandomShortSideResize(scales, max_size),
                ]),
            ],
            p=[0.5, 0.5],
        )
    )
    return v2.Compose(steps + _finish())


def eval_transforms(image_size: int, max_size: int) -> v2.Compose:
    """Deterministic: shorter side `image_size`, longer side at most `max_size`."""
    return v2.Compose([RandomShortSideResize([image_size], max_size)] + _finish())


def basic_transforms() -> v2.Compose:
    """No resizing: only tensor conversion, normalisation and box normalisation."""
    return v2.Compose(_finish())


def make_transforms(train_cfg, model_cfg, train: bool) -> v2.Compose:
    """The transforms a run uses, from `TrainConfig` (augmentation) and `ModelConfig` (eval size)."""
    if train:
        return train_transforms(
            train_cfg.train_scales, train_cfg.train_max_size, train_cfg.crop_resize,
            tuple(train_cfg.crop_size), hflip=train_cfg.hflip,
        )
    return eval_transforms(model_cfg.image_size, model_cfg.max_image_size)


def resize_for_inference(image: Image.Image, image_size: int, max_size: int) -> torch.Tensor:
    """RGB `PIL.Image` -> normalised float tensor [3,H,W]: `eval_transforms` itself, so a prediction
    sees exactly the pixels the evaluation of the same file sees (the 8-bit image is resized)."""
    empty = make_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), image.height, image.width)
    return eval_transforms(image_size, max_size)(image, empty)[0]


def make_target(boxes_xyxy: torch.Tensor, labels: torch.Tensor, height: int, width: int) -> dict[str, Any]:
    """Wrap pixel XYXY boxes [N,4] and labels [N] for the transforms above."""
    boxes = tv_tensors.BoundingBoxes(
        boxes_xyxy.reshape(-1, 4).to(torch.float32), format="XYXY", canvas_size=(height, width)
    )
    return {"boxes": boxes, "labels": labels.reshape(-1).to(torch.int64)}


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "resized_shape", "RandomShortSideResize", "RandomSizeCrop",
    "NormalizeBoxes", "DropEmptyBoxes", "train_transforms", "eval_transforms", "basic_transforms", "make_transforms",
    "resize_for_inference", "make_target",
]
