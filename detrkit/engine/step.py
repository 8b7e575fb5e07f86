"""One optimizer step of DETR training, usable on its own (the training loop and `bench` run it).

`TrainStep.accumulate(images, targets)` runs forward, loss and backward on one micro-batch (under
bf16 autocast when asked); `TrainStep.apply(lr_factor)` sets the learning rates, clips the gradient
norm and steps AdamW (and the EMA), or skips the step when a loss or the gradient was not finite.
`TrainStep(images, targets)` does both for a batch that is a whole step.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..device import resolve_amp
from ..config import TrainConfig
from ..losses import SetCriterion, split_aux
from ..model.detr import BackboneFeatures, pad_images
from . import distributed as dist_utils
from .ema import ModelEMA

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 5


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: transformer + heads at lr, backbone at lr_backbone (absent if <= 0)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr, "initial_lr": cfg.lr, "name": "transformer"}]
    if backbone and cfg.lr_backbone > 0:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "initial_lr": cfg.lr_backbone,
                       "name": "backbone"})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel is several times faster than the per-tensor loop on
    CPU as well as on CUDA. extra: training-only parameters (convergence switches), trained with the
    transformer."""
    groups = param_groups(model, cfg)
    if extra is not None:
        groups[0]["params"] = groups[0]["params"] + [p for p in extra.parameters() if p.requires_grad]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@dataclass
class StepOutcome:
    """What one optimizer step did. losses: the logged terms (aux layers only in the total "loss"),
    averaged over the micro-batches; images: images that contributed on this process."""

    applied: bool  # the optimizer stepped
    skipped: bool  # a non-finite loss or gradient: no update
    grad_norm: float | None
    losses: dict[str, float] = field(default_factory=dict)
    images: int = 0


class TrainStep:
    """Forward, loss, backward, clip and AdamW for one model.

    model: the DETR being trained; extra: the training-only queries of the convergence switches
    (engine/convergence.py; None when they are off), then `module` = TrainingModel(model, extra) is what
    runs and the criterion is a ConvergenceLoss; runner: what is called for the forward (`module`, or its
    DDP wrapper); cached_features: the batches hold cached backbone features [C,h,w], not images.
    cfg.accumulate micro-batches make one optimizer step (each loss is divided by it).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig, device: torch.device, *, ema: ModelEMA | None = None,
                 runner: nn.Module | None = None, cached_features: bool = False, extra: nn.Module | None = None):
        from .convergence import TrainingModel

        self.model, self.criterion, self.optimizer, self.ema = model, criterion, optimizer, ema
        self.extra = extra
        self.module = TrainingModel(model, extra) if extra is not None else model
        self.runner = runner if runner is not None else self.module
        self.cached_features = cached_features
        self.device = device
        self.accum = max(1, cfg.accumulate)
        self.clip = cfg.clip_max_norm if cfg.clip_max_norm > 0 else float("inf")
        self.amp_dtype = torch.bfloat16 if resolve_amp(cfg.amp, device) == "bf16" else None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.nonfinite_streak = 0
        self._reset()

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainConfig, device: torch.device) -> "TrainStep":
        """The step `train` runs for `model` (a DETR on `device`): its backbone frozen when
        lr_backbone <= 0, the Hungarian set loss, fused AdamW, and the EMA when cfg.ema_decay is set;
        with a convergence switch on (dn_groups, query_groups), the training-only queries and their loss."""
        from .convergence import ConvergenceLoss, TrainingQueries

        if cfg.lr_backbone <= 0:
            model.backbone.requires_grad_(False)
        criterion = SetCriterion.from_config(cfg, model.cfg.num_classes).to(device)
        extra = TrainingQueries.from_config(cfg, model).to(device)
        if not extra.active:
            extra = None
        else:
            criterion = ConvergenceLoss(criterion, cfg.dn_loss_coef, cfg.enc_aux_coef, cfg.attn_guide_coef)
        optimizer = build_optimizer(model, cfg, extra)
        ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
        return cls(model, criterion, optimizer, cfg, device, ema=ema, extra=extra)

    def _reset(self) -> None:
        self._bad, self._images, self._losses = False, 0, {}

    def accumulate(self, images: list, targets: list[dict], sync: bool = True) -> None:
        """Forward + backward of one micro-batch. images: [3,H,W] tensors, or [C,h,w] cached backbone
        features; targets: dicts with labels [n] and boxes [n,4] cxcywh. sync=False: under DDP, skip
        the gradient all-reduce (a micro-batch that is not the step's last)."""
        # every rank must take the same path, or the DDP all-reduce in backward would hang
        if dist_utils.all_reduce_max([float(len(images) == 0)], self.device)[0] > 0:
            return
        count = len(images)
        images = [im.to(self.device, non_blocking=True) for im in images]
        inputs = BackboneFeatures(*pad_images(images)) if self.cached_features else images
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        no_sync = not sync and isinstance(self.runner, nn.parallel.DistributedDataParallel)
        with self.runner.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                outputs = self.runner(inputs, targets) if self.extra is not None else self.runner(inputs)
            losses = self.criterion(outputs, targets)
            total = self.criterion.total(losses)
            if dist_utils.all_reduce_max([float(not torch.isfinite(total).item())], self.device)[0] > 0:
                self._bad = True
                return
            (total / self.accum).backward()
        self._images += count
        for k, v in losses.items():
            if split_aux(k)[1] is None:  # aux-layer terms: logged in the total only
                self._losses[k] = self._losses.get(k, 0.0) + float(v.detach()) / self.accum
        self._losses["loss"] = self._losses.get("loss", 0.0) + float(total.detach()) / self.accum

    def apply(self, lr_factor: float = 1.0, step: int = 0) -> StepOutcome:
        """Set every group's lr to initial_lr * lr_factor, clip, step (or skip), zero the gradients.
        `step` only names the step in warnings. Raises NonFiniteLossError after 5 skips in a row."""
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor
        bad, images, losses = self._bad, self._images, self._losses
        self._reset()
        grad_norm = None
        if not bad and images > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
            bad = not math.isfinite(grad_norm)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step,
                        self.nonfinite_streak)
            if self.nonfinite_streak >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient (step {step}); "
                    "lower the learning rate or check the data")
            return StepOutcome(False, True, grad_norm)
        if images == 0:
            return StepOutcome(False, False, grad_norm)
        self.nonfinite_streak = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return StepOutcome(True, False, grad_norm, losses, images)

    def __call__(self, images: list, targets: list[dict], lr_factor: float = 1.0) -> StepOutcome:
        """One whole optimizer step on one batch."""
        self.accumulate(images, targets)
        return self.apply(lr_factor)
