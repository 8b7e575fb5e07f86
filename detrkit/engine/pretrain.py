"""Backbone pretraining by classifying the training set's own box crops.

The paper starts from an ImageNet-classification ResNet, freezes its batch norm and trains it ten
times slower than the transformer. Where no pretrained weights can be had (no network, or a domain far
from ImageNet: shapes, cells), `pretrain_backbone` gives the same start cheaply: the ResNet (with
trainable batch norm) learns to name the object in crops cut around each training box, at several
margins of context, then its weights and batch statistics go into the detector's backbone, whose
frozen batch norm takes them as they are. Only the training annotations are used.

Crop classification alone is degenerate where the classes are few or trivially separated: with one
class there is nothing to learn, and classes that differ only in size are told apart by the crop's
scale. With `background` (TrainConfig.pretrain_background) the crops of boxes are mixed with as many
crops of the same sizes cut where no object is, as one more class: object-vs-background is never
trivial, and it is what a detector's features need first.

With `pretrain_box_coef` (TrainConfig) each side of a box crop gets its own margin and the classifier
also gives the box's place in its crop (four more outputs, L1): crop classification alone teaches what
an object is, not where its edges are, and a frozen backbone's features are all DETR's box head reads.

Stuff classes (categories with COCO panoptic's `isthing: 0`, e.g. sky) are regions, not objects: their
box spans much of the image, and squashed into one crop it mixes every region it touches. Their crops
are square patches inside the box instead, and with stuff every pixel is labelled, so no background
crops are cut. Measured on the panoptic main job's data (300 steps): crop accuracy 0.916 against 0.816.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..device import resolve_amp
from ..config import TrainConfig
from ..data.dataset import DetectionDataset
from ..data.images import ImageError, load_image
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .budget import StepsInTime
from .schedule import lr_factor

log = logging.getLogger(__name__)

CROPS_PER_BOX = 3  # one crop per margin draw; margins in [0.05, 0.6] of the box's longer side
# a stuff patch is easy to name (a colour, a texture) and every image has stuff: with 3 patches a box, half
# the crops taught what the backbone already knew. Panoptic main job data, 300 steps, crops of the
# validation images: things 0.934 / stuff 0.899 with 1 patch a box, 0.861 / 0.930 with 3
PATCHES_PER_STUFF_BOX = 1
HELD_OUT = 0.1  # share of crops kept aside to report the classifier's accuracy
MAX_CROPS = 30_000  # 370 MB of 64 px uint8 crops; a few hundred steps of batch 64 see fewer


BACKGROUND_MAX_IOU = 0.2  # a background crop overlaps every box of its image less than this
BACKGROUND_TRIES = 10


def _background_box(boxes: Tensor, w: int, h: int, generator: torch.Generator) -> list[float] | None:
    """A box of the size of one of `boxes` [N,4] xyxy, placed where it overlaps none of them much."""
    from torchvision.ops import box_iou

    for _ in range(BACKGROUND_TRIES):
        k = int(torch.randint(len(boxes), (), generator=generator))
        bw = min(float(boxes[k, 2] - boxes[k, 0]), w - 1.0)
        bh = min(float(boxes[k, 3] - boxes[k, 1]), h - 1.0)
        x0 = float(torch.rand((), generator=generator)) * (w - bw)
        y0 = float(torch.rand((), generator=generator)) * (h - bh)
        cand = torch.tensor([[x0, y0, x0 + bw, y0 + bh]])
        if float(box_iou(cand, boxes.float()).max()) < BACKGROUND_MAX_IOU:
            return cand[0].tolist()
    return None


class Crops(NamedTuple):
    images: Tensor  # [N,3,size,size] uint8
    labels: Tensor  # [N] int64 (the number of classes for background)
    boxes: Tensor  # [N,4] float32 xyxy in [0,1] of the crop: where its box lies; nan for background and stuff


def box_crops(dataset: DetectionDataset, size: int, generator: torch.Generator,
              max_crops: int = MAX_CROPS, background: bool = False, each_side: bool = False) -> Crops:
    """Crops around the (non-crowd) training boxes, resized to size x size: images in random order
    until `max_crops`.
    background: also one crop per box cut where no object is (overlap < BACKGROUND_MAX_IOU), labelled
    the number of classes (one class more). each_side: every side of a box crop gets its own margin
    (else one margin for all four), so the box is anywhere in the crop, not only at its centre.
    Unreadable images are skipped with a warning."""
    threads = torch.get_num_threads()
    # each crop is a few tiny ops: with two threads their synchronisation costs 50x the work (19 vs
    # 0.3 ms a crop measured on a busy 2-core machine)
    torch.set_num_threads(1)
    try:
        return _box_crops(dataset, size, generator, max_crops, background, each_side)
    finally:
        torch.set_num_threads(threads)


def _margins(generator: torch.Generator, each_side: bool) -> list[float]:
    """Left, top, right, bottom margins as shares of the box's longer side, in [0.05, 0.6]."""
    draws = torch.rand(4 if each_side else 1, generator=generator).tolist()
    return [0.05 + 0.55 * d for d in (draws if each_side else draws * 4)]


def _box_crops(dataset: DetectionDataset, size: int, generator: torch.Generator, max_crops: int,
               background: bool, each_side: bool) -> Crops:
    num_classes = len(dataset.index.class_names)
    to_index = dataset.index.category_to_index
    stuff = {to_index[cid] for cid in dataset.index.stuff_ids if cid in to_index}
    crops, labels, where = [], [], []
    order = torch.randperm(len(dataset), generator=generator).tolist()
    for i in tqdm(order, desc="crops", leave=False, disable=len(dataset) < 500):
        if len(crops) >= max_crops:
            break
        rec = dataset.images[i]
        boxes, classes = dataset.boxes(i)
        if len(boxes) == 0:
            continue
        try:
            image = TF.pil_to_tensor(load_image(rec.file))
        except ImageError as e:
            log.warning("backbone pretraining: skipping %s (%s)", rec.file, e.problem)
            continue
        h, w = image.shape[-2:]

        def cut(x0, y0, x1, y1, label, margins, is_box):
            longer = max(x1 - x0, y1 - y0)
            left, top = max(0, int(x0 - margins[0] * longer)), max(0, int(y0 - margins[1] * longer))
            right, bottom = min(w, math.ceil(x1 + margins[2] * longer)), min(h, math.ceil(y1 + margins[3] * longer))
            if bottom <= top or right <= left:
                return
            crop = image[None, :, top:bottom, left:right].float()
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
            crops.append(crop.round().clamp(0, 255).to(torch.uint8))
            labels.append(label)
            cw, ch = right - left, bottom - top
            where.append([(x0 - left) / cw, (y0 - top) / ch, (x1 - left) / cw, (y1 - top) / ch] if is_box
                         else [math.nan] * 4)

        for (x0, y0, x1, y1), c in zip(boxes.tolist(), classes.tolist()):
            is_stuff = c in stuff
            for _ in range(PATCHES_PER_STUFF_BOX if is_stuff else CROPS_PER_BOX):
                if is_stuff:  # a patch of the region: its whole box squashed is a mix of regions
                    side = min(x1 - x0, y1 - y0) * (0.3 + 0.4 * float(torch.rand((), generator=generator)))
                    px = x0 + float(torch.rand((), generator=generator)) * (x1 - x0 - side)
                    py = y0 + float(torch.rand((), generator=generator)) * (y1 - y0 - side)
                    cut(px, py, px + side, py + side, c, [0.0] * 4, False)
                else:
                    cut(x0, y0, x1, y1, c, _margins(generator, each_side), True)
        if background and not stuff:  # with stuff every pixel is labelled: a "background" patch is stuff
            for _ in range(len(boxes) * CROPS_PER_BOX):
                bg = _background_box(boxes, w, h, generator)
                if bg is not None:
                    cut(*bg, num_classes, _margins(generator, False), False)
    if not crops:
        raise ValueError(f"{dataset.index.source}: backbone pretraining needs boxes, and the training set has none")
    return Crops(torch.stack(crops), torch.tensor(labels, dtype=torch.int64),
                 torch.tensor(where, dtype=torch.float32).clamp(0, 1))


def _normalise(crops: Tensor) -> Tensor:
    return TF.normalize(crops.float() / 255, IMAGENET_MEAN, IMAGENET_STD)


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, bar, step: int) -> None:
    """One pretraining step's backward and update; the bar shows the loss every 10 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 10 == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.update(1)


def load_net_into_body(net: nn.Module, body: nn.Module) -> None:
    """A torchvision ResNet's conv1..layer4 weights and batch statistics into a `ResNetBody`."""
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"pretrained backbone does not fit: missing {missing}, unexpected {unexpected}")


@dataclass
class PretrainResult:
    accuracy: float  # on the held-out crops (nan when there are fewer than 20 crops)
    num_crops: int
    classifier: nn.Module  # the trained torchvision ResNet, in eval mode
    steps: int = 0  # steps run (fitted to --max-steps / the time share)
    background: bool = False  # background crops were one more class
    box_error: float = float("nan")  # held-out mean L1 of the box in the crop (nan without pretrain_box_coef)

    def to_dict(self) -> dict[str, float]:
        d = {"pretrain_accuracy": self.accuracy, "pretrain_crops": float(self.num_crops), "pretrain_steps": self.steps}
        if not math.isnan(self.box_error):
            d["pretrain_box_l1"] = self.box_error
        return d


def pretrain_steps_for(cfg: TrainConfig) -> int:
    """The pretraining steps a run plans: cfg.pretrain_steps, at most --max-steps (which caps this phase
    as well as the DETR steps it counts)."""
    steps = cfg.pretrain_steps
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def pretrain_backbone(body: nn.Module, backbone_name: str, dataset: DetectionDataset, cfg: TrainConfig,
                      num_classes: int, device: torch.device, progress: bool = True,
                      max_seconds: float | None = None, clock=time.monotonic) -> PretrainResult:
    """Train `backbone_name` (torchvision ResNet, batch norm) to classify box crops for
    `pretrain_steps_for(cfg)` steps, then load its conv1..layer4 weights and batch statistics into `body`
    (a `ResNetBody`). max_seconds: the time this phase may take (crops included); after a few steps the
    step count is fitted to it, so the cosine runs down within the time instead of being cut."""
    t0 = clock()
    g = torch.Generator().manual_seed(cfg.seed)
    # with stuff classes (panoptic data) every pixel is labelled: there is no background to cut
    background = cfg.pretrain_background and not dataset.index.stuff_ids
    # no more crops than the steps will see once (cutting them is the slow part on many small boxes)
    max_crops = min(MAX_CROPS, max(1000, cfg.pretrain_steps * cfg.pretrain_batch_size))
    box_coef = cfg.pretrain_box_coef
    crops, labels, where = box_crops(dataset, cfg.pretrain_crop_size, g, max_crops, background=background,
                                     each_side=box_coef > 0)
    if not background and num_classes == 1:
        log.warning("backbone pretraining: one class and no background crops, so crop classification "
                    "teaches nothing (set pretrain_background)")
    num_classes += int(background)
    order = torch.randperm(len(crops), generator=g)
    n_val = int(len(crops) * HELD_OUT) if len(crops) >= 20 else 0
    val, train = order[:n_val], order[n_val:]
    torch.manual_seed(cfg.seed)
    # with box_coef the last 4 outputs are the box in the crop (xyxy in [0,1], through a sigmoid)
    outputs = num_classes + (4 if box_coef > 0 else 0)
    # channels-last: oneDNN's convolutions run ~1.15x faster on these crops (batch 64 of 64 px, bf16, 2-core Xeon)
    net = getattr(torchvision.models, backbone_name)(num_classes=outputs).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_amp(cfg.amp, device) == "bf16")
    bs = min(cfg.pretrain_batch_size, len(train))
    fit = StepsInTime(pretrain_steps_for(cfg), max_seconds, t0, clock, "backbone pretraining")
    bar = tqdm(total=fit.total, desc="pretrain backbone", disable=not progress, dynamic_ncols=True, unit="step")
    net.train()
    step = 0
    while step < fit.total:
        bar.total = fit.update(step)
        lr = cfg.pretrain_lr * lr_factor(step, fit.total, "cosine")
        for group in opt.param_groups:
            group["lr"] = lr
        pick = train[torch.randint(len(train), (bs,), generator=g)]
        x = _normalise(crops[pick])
        flip = torch.rand(bs, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device, memory_format=torch.channels_last)
        with torch.autocast(**amp):
            out = net(x).float()
        loss = F.cross_entropy(out[:, :num_classes], labels[pick].to(device))
        if box_coef > 0:
            loss = loss + box_coef * _box_loss(out[:, num_classes:], _flip_boxes(where[pick], flip).to(device))
        optimizer_step(opt, loss, bar, step)
        step += 1
    bar.close()
    net.eval()
    accuracy = box_error = float("nan")
    if n_val:
        with torch.no_grad(), torch.autocast(**amp):
            out = torch.cat([net(_normalise(crops[val[i:i + 256]]).to(device)).float().cpu() for i in range(0, n_val, 256)])
        accuracy = float((out[:, :num_classes].argmax(1) == labels[val]).float().mean())
        if box_coef > 0:
            box_error = float(_box_loss(out[:, num_classes:], where[val]))
    load_net_into_body(net, body)
    log.info("backbone pretrained on %d crops (%s) for %d steps: held-out accuracy %.3f%s", len(crops),
             "boxes and background" if background else "boxes", step, accuracy,
             f", box L1 {box_error:.3f} of the crop side" if box_coef > 0 else "")
    return PretrainResult(accuracy, len(crops), net, step, background, box_error)


def _flip_boxes(boxes: Tensor, flip: Tensor) -> Tensor:
    """boxes [N,4] xyxy in [0,1] of crops mirrored left-right where flip [N] is set."""
    mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    return torch.where(flip[:, None], mirrored, boxes)


def _box_loss(raw: Tensor, target: Tensor) -> Tensor:
    """Mean L1 between sigmoid(raw) [N,4] and target [N,4] xyxy over the crops that have a box
    (target not nan); 0 when none has."""
    has_box = ~target.isnan().any(1)
    if not has_box.any():
        return raw.sum() * 0
    return F.l1_loss(raw[has_box].sigmoid(), target[has_box])

