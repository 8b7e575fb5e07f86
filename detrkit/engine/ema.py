"""Exponential moving average of a model's weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`module`: a frozen copy whose floating-point weights follow the model's as
    w <- decay * w + (1 - decay) * w_model after each `update`; other buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(src[k].detach(), 1.0 - self.decay)
            else:
                v.copy_(src[k])
