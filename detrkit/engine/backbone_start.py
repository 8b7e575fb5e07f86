"""What the backbone starts from, decided once per run and recorded (log, config.json, checkpoints).

In order: `backbone_weights` "imagenet" or a path (weights/imagenet.py); else, with pretrain_steps or
pretrain_dense_steps > 0, the self-pretraining fallback on the training set's own crops
(engine/pretrain.py) and then windows at the detector's scale (engine/dense_pretrain.py); else random
weights, which a frozen backbone cannot recover from -- the log says so.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class BackboneStart:
    # "imagenet", "file", "pretrained-crops" (crops, then windows when pretrain_dense_steps), "pretrained-dense"
    # (windows only), "random" or "checkpoint" (fine-tuning / resuming)
    kind: str
    description: str  # in words, for the log and the summary
    details: dict = field(default_factory=dict)  # e.g. pretraining accuracy and crop count

    def to_dict(self) -> dict:
        return asdict(self)


def self_pretrains(train_cfg: TrainConfig) -> bool:
    """Whether a fresh run pretrains its own backbone: no weights given, and pretraining steps asked for."""
    return ((train_cfg.backbone_weights or "none").strip() == "none"
            and (train_cfg.pretrain_steps > 0 or train_cfg.pretrain_dense_steps > 0))


def start_backbone(model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig, dataset,
                   device: torch.device, progress: bool = True) -> BackboneStart:
    """Give `model.backbone.body` its starting weights per `train_cfg`; returns what was done.

    dataset: the training `DetectionDataset` (used only by the self-pretraining fallback, which takes at
    most its share of --max-minutes)."""
    spec = (train_cfg.backbone_weights or "none").strip()
    body = model.backbone.body
    if spec != "none":
        from ..weights.imagenet import load_backbone_weights

        description = load_backbone_weights(body, model_cfg.backbone, spec, progress)
        start = BackboneStart("imagenet" if spec == "imagenet" else "file", description)
        if train_cfg.pretrain_steps > 0 or train_cfg.pretrain_dense_steps > 0:
            log.info("backbone weights given (%s): self-pretraining skipped", spec)
    elif self_pretrains(train_cfg):
        start = self_pretrain(body, model_cfg, train_cfg, dataset, device, progress)
    else:
        start = BackboneStart("random", "random weights (no backbone_weights, no pretraining)")
        if train_cfg.lr_backbone <= 0 or not model_cfg.train_backbone:
            log.warning("the backbone is random AND frozen: its features carry little; set backbone_weights "
                        "(imagenet or a file) or pretrain_steps")
    log.info("backbone start: %s", start.description)
    return start


def self_pretrain(body: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig, dataset, device: torch.device,
                  progress: bool) -> BackboneStart:
    """The fallback where no weights can be had: crop classification, then dense windows (each phase
    when its step count is > 0, each within its share of --max-minutes)."""
    from .run_plan import dense_pretrain_seconds, pretrain_seconds

    net, parts, details = None, [], {}
    if train_cfg.pretrain_steps > 0:
        from .pretrain import pretrain_backbone

        pre = pretrain_backbone(body, model_cfg.backbone, dataset, train_cfg, model_cfg.num_classes, device,
                                progress, max_seconds=pretrain_seconds(train_cfg))
        what = "box and background crops" if pre.background else "box crops"
        placed = "" if math.isnan(pre.box_error) else f", box L1 {pre.box_error:.3f}"
        parts.append(f"the training set's {what} ({pre.steps} steps, held-out accuracy {pre.accuracy:.3f}{placed})")
        net, details = pre.classifier, pre.to_dict()
    dense = train_cfg.pretrain_dense_steps > 0
    if dense and net is not None and train_cfg.pretrain_dense_when == "weak":
        from .feature_probe import probe_backbone

        probe = probe_backbone(body, dataset, model_cfg, device)
        dense = probe is not None and probe.weak  # too few objects to tell: no evidence the phase would pay
        if probe is not None:
            details["crop_feature_probe"] = {**probe.to_dict(), "weak": probe.weak}
        log.info("crop features: %s -> dense pretraining %s", probe.text() if probe else "too few objects to probe",
                 "runs (the features are weak)" if dense else "skipped")
    if dense:
        from .dense_pretrain import dense_pretrain

        dense = dense_pretrain(net, body, dataset, model_cfg, train_cfg, device, progress,
                               max_seconds=dense_pretrain_seconds(train_cfg))
        parts.append(f"windows of its images at the detector's scale ({dense.steps} steps, centre-cell "
                     f"accuracy {dense.accuracy:.3f})")
        details.update(dense.to_dict())
    kind = "pretrained-crops" if train_cfg.pretrain_steps > 0 else "pretrained-dense"
    return BackboneStart(kind, "self-pretrained on " + ", then ".join(parts), details)


def backbone_start_part(model: nn.Module, train_set, cfg: TrainConfig, device: torch.device, progress: bool,
                        write_record, ema=None) -> BackboneStart:
    """The run's backbone-start stage (a fresh run, not fine-tuning): rank 0 gives the backbone its
    start, every rank receives it, the EMA copy restarts from it; write_record(dict) logs it
    (metrics.jsonl). -> what was done (the same on every rank)."""
    from . import distributed as dist_utils

    start = None
    if dist_utils.rank() == 0:
        start = start_backbone(model, model.cfg, cfg, train_set.dataset, device, progress)
        write_record({"type": "backbone_start", **start.to_dict()})
    start = dist_utils.all_gather_object(start)[0]
    dist_utils.broadcast_module(model.backbone)
    if ema is not None:
        ema.module.load_state_dict(model.state_dict())
    return start
