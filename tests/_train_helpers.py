"""Tiny configurations and datasets shared by the engine tests."""
from __future__ import annotations

from pathlib import Path

from detrkit.config import ModelConfig, TrainConfig
from detrkit.data.synthetic import make_synthetic


def tiny_data(root: Path, n: int, seed: int = 0, variant: str = "shapes") -> Path:
    """n synthetic 64x64 PNG images; returns the COCO JSON path."""
    return make_synthetic(root, n, seed, variant, image_size=(64, 64), image_format="png")


def tiny_model(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
                dropout=0.0, num_queries=8, image_size=64, max_image_size=64)
    base.update(kw)
    return ModelConfig(**base)


def tiny_train(**kw) -> TrainConfig:
    """Fixed 64 px images, no crop, no flip (unless overridden), no per-epoch checkpoint or evaluation."""
    base = dict(lr=1e-3, lr_backbone=1e-4, batch_size=2, epochs=1, num_workers=0, train_scales=[64],
                train_max_size=64, crop_resize=[64], crop_size=[64, 64], hflip=False, schedule="cosine",
                clip_max_norm=1.0, amp="none", checkpoint_every_epochs=0, eval_every_epochs=1000)
    base.update(kw)
    return TrainConfig(**base)


class StepClock:
    """A clock that advances a fixed time per optimizer step (pass `tick` as the step_callback): the
    time budget and the schedule fitting see a steady speed, whatever the machine's load."""

    def __init__(self, seconds_per_step: float):
        self.now, self.per_step = 0.0, seconds_per_step

    def __call__(self) -> float:
        return self.now

    def tick(self, step, model) -> None:
        self.now += self.per_step
