"""Dense backbone pretraining: each feature cell learns to name the object centred near it, on windows
of the training images at the detector's own scale.

Crop classification (engine/pretrain.py) teaches a ResNet what the objects are, but not where the
detector reads it: its average pool may find a shape's evidence on the crop's edges, at the crop's
scale. At the detector's input a large object's centre cell sees flat interior and a small one is a
fraction of a cell, so the frozen features DETR gets name few objects. Measured on the hard synthetic
set (4 shapes on textured backgrounds): a linear probe on the centre cell's feature scores 0.38 (chance
0.27) after crop pretraining with 0.95 crop accuracy; 400 steps of this phase raise it to 0.50 (0.72 for
objects over 96 px).

This phase runs the encoder head's objective (engine/convergence.py: sigmoid focal class per cell, box
offsets, L1 + GIoU, cells within 1.5 cells of a centre) on the ResNet's last feature map itself. Its
inputs are the run's own training augmentation, cut into windows of WINDOW_CELLS x WINDOW_CELLS cells:
the pixel scale of the detector's input, at a fraction of the cost of whole images. Its batch
statistics come from those windows too, which is what the frozen batch norm then keeps.

It costs time that DETR then lacks: in 15 float32 minutes on 2 cores it gave the main job and BCCD
fewer steps than it saved, so `detr-tiny` runs it only where a linear probe finds the crop features
weak (engine/feature_probe.py; docs/convergence.md).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from tqdm import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.dataset import BadSample, DetectionDataset
from ..data.transforms import make_transforms
from ..device import resolve_amp
from ..model.backbone import ResNetBody, dilate_layer4, feature_mask
from ..model.detr import pad_images
from .convergence import ENC_FOCAL_WEIGHT, EncoderHead, encoder_losses
from .budget import StepsInTime
from .pretrain import load_net_into_body, optimizer_step
from .schedule import lr_factor

log = logging.getLogger(__name__)

WINDOW_CELLS = 5  # a window's side in feature cells (160 px at stride 32)
MIN_VISIBLE = 0.25  # an object cut by the window keeps its label when this share of its area is inside
BATCH = 16
MAX_EMPTY_BATCHES = 10  # batches in a row with no readable image: the data is broken, not unlucky
EVAL_IMAGES = 64  # training images (whole, at the inference size) the centre-cell accuracy is measured on
# The stem keeps the crop phase's weights: edges and colours need no relearning at the detector's scale, and
# without their backward a step costs 0.40 s instead of 0.49 (batch 16, 160 px, 2-core float32 Xeon)
FROZEN = ("conv1", "bn1", "layer1")


def window(image: Tensor, target: dict, side: int, generator: torch.Generator) -> tuple[Tensor, dict]:
    """A random side x side window of image [3,H,W] (the whole image where it is smaller), with its boxes:
    target["boxes"] [N,4] cxcywh in [0,1] of the image -> of the window, clipped to it; boxes with less
    than MIN_VISIBLE of their area inside are dropped (with their labels)."""
    h, w = image.shape[-2:]
    wh, ww = min(side, h), min(side, w)
    y0 = int(torch.randint(h - wh + 1, (), generator=generator))
    x0 = int(torch.randint(w - ww + 1, (), generator=generator))
    boxes = torchvision.ops.box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    boxes = boxes - torch.tensor([x0, y0, x0, y0])
    boxes = torch.stack([boxes[:, 0].clamp(0, ww), boxes[:, 1].clamp(0, wh), boxes[:, 2].clamp(0, ww),
                         boxes[:, 3].clamp(0, wh)], dim=-1)
    keep = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1) >= MIN_VISIBLE * area.clamp(min=1e-6)
    boxes = torchvision.ops.box_convert(boxes[keep] / torch.tensor([ww, wh, ww, wh]), "xyxy", "cxcywh")
    return image[:, y0:y0 + wh, x0:x0 + ww], {**target, "boxes": boxes, "labels": target["labels"][keep]}


def _features(net: nn.Module, x: Tensor) -> Tensor:
    """conv1..layer4 of a torchvision ResNet (the detector's own body over the same modules):
    [B,3,H,W] -> [B,C,H/32,W/32]."""
    return ResNetBody(net)(x)


@dataclass
class DensePretrainResult:
    accuracy: float  # share of objects whose centre cell's best class is theirs (whole training images)
    steps: int

    def to_dict(self) -> dict[str, float]:
        return {"dense_accuracy": self.accuracy, "dense_steps": self.steps}


def dense_pretrain(net: nn.Module | None, body: nn.Module, dataset: DetectionDataset, model_cfg: ModelConfig,
                   cfg: TrainConfig, device: torch.device, progress: bool = True, max_seconds: float | None = None,
                   clock=time.monotonic) -> DensePretrainResult:
    """Train `net` (a torchvision ResNet with batch norm, e.g. the crop phase's classifier; None: a fresh
    one of model_cfg.backbone) for cfg.pretrain_dense_steps (fitted to max_seconds) on windows of the
    training images under the run's own augmentation, then load it into `body` (a `ResNetBody`)."""
    t0 = clock()
    num_classes = model_cfg.num_classes
    frozen = FROZEN if net is not None else ()  # from random weights the stem must learn too
    if net is None:
        torch.manual_seed(cfg.seed)
        net = getattr(torchvision.models, model_cfg.backbone)()
    if model_cfg.dilation:  # the detector's stride-16 map (the crop phase's classifier is not dilated)
        dilate_layer4(net.layer4)
    # channels-last: oneDNN's convolutions (and their backward) run 1.4x faster on windows this size
    net = net.to(device, memory_format=torch.channels_last).train()
    for name in frozen:
        getattr(net, name).requires_grad_(False)
    channels = net.fc.in_features
    head = EncoderHead(channels, num_classes).to(device)
    samples = DetectionDataset(dataset.index, make_transforms(cfg, model_cfg, train=True), skip_bad=True)
    params = [p for p in (*net.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_dense_lr, weight_decay=cfg.weight_decay)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_amp(cfg.amp, device) == "bf16")
    side = WINDOW_CELLS * (16 if model_cfg.dilation else 32)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    planned = min(cfg.pretrain_dense_steps, cfg.max_steps) if cfg.max_steps is not None else cfg.pretrain_dense_steps
    fit = StepsInTime(planned, max_seconds, t0, clock, "dense backbone pretraining")
    bar = tqdm(total=fit.total, desc="dense pretrain", disable=not progress, dynamic_ncols=True, unit="step")
    skipped, step, empty = 0, 0, 0
    while step < fit.total:
        bar.total = fit.update(step)
        for group in opt.param_groups:
            group["lr"] = cfg.pretrain_dense_lr * lr_factor(step, fit.total, "cosine")
        batch = []
        for i in torch.randint(len(samples), (BATCH,), generator=g).tolist():
            item = samples[i]
            if isinstance(item, BadSample):
                skipped += 1
                continue
            batch.append(window(*item, side, g))
        empty = 0 if batch else empty + 1
        if empty >= MAX_EMPTY_BATCHES:
            raise ValueError(f"{dataset.index.source}: dense backbone pretraining read no image in "
                             f"{empty * BATCH} draws: the training images are unreadable")
        if not batch:
            continue
        x, mask = pad_images([b[0] for b in batch])
        with torch.autocast(**amp):
            f = _features(net, x.to(device, memory_format=torch.channels_last))
            logits, offsets = head(f.flatten(2).transpose(1, 2))
        targets = [{k: b[1][k].to(device) for k in ("boxes", "labels")} for b in batch]
        losses = encoder_losses({"logits": logits, "offsets": offsets, "mask": feature_mask(mask.to(device), f)},
                                targets, num_classes)
        loss = (ENC_FOCAL_WEIGHT * losses["loss_enc_focal"] + cfg.bbox_loss_coef * losses["loss_enc_bbox"]
                + cfg.giou_loss_coef * losses["loss_enc_giou"])
        optimizer_step(opt, loss, bar, step)
        step += 1
    bar.close()
    if skipped:
        log.warning("dense backbone pretraining: %d unreadable training image(s) skipped", skipped)
    net.eval()
    accuracy = centre_cell_accuracy(net, head, dataset, model_cfg, device)
    load_net_into_body(net, body)
    log.info("backbone dense-pretrained on windows of %d px for %d steps: centre-cell accuracy %.3f", side, step,
             accuracy)
    return DensePretrainResult(accuracy, step)


@torch.no_grad()
def centre_cell_accuracy(net: nn.Module, head: nn.Module, dataset: DetectionDataset, model_cfg: ModelConfig,
                         device: torch.device, images: int = EVAL_IMAGES) -> float:
    """On up to `images` training images at the inference size: the share of objects whose centre cell's
    highest class score is their class (nan when there are none)."""
    samples = DetectionDataset(dataset.index, make_transforms(None, model_cfg, train=False), skip_bad=True)
    hits = total = 0
    for i in range(min(images, len(samples))):
        item = samples[i]
        if isinstance(item, BadSample) or len(item[1]["labels"]) == 0:
            continue
        f = _features(net, item[0][None].to(device))
        logits, _ = head(f.flatten(2).transpose(1, 2))
        h, w = f.shape[-2:]
        cx, cy = item[1]["boxes"][:, 0], item[1]["boxes"][:, 1]
        cell = (cy * h).long().clamp(max=h - 1) * w + (cx * w).long().clamp(max=w - 1)
        hits += int((logits[0, cell.to(device)].argmax(-1).cpu() == item[1]["labels"]).sum())
        total += len(cell)
    return hits / total if total else float("nan")
