"""Where a training run is: the counters a checkpoint stores and a resumed run continues from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """The run's fixed shape: batches per epoch (on this process), optimizer steps per epoch
    (batches / accumulate) and the step budget of all the epochs."""

    batches_per_epoch: int
    steps_per_epoch: int
    epoch_steps: int

    @classmethod
    def of(cls, samples_per_process: int, cfg: TrainConfig) -> "Plan":
        batches = math.ceil(samples_per_process / cfg.batch_size)
        steps = math.ceil(batches / max(1, cfg.accumulate))
        return cls(batches, steps, steps * cfg.epochs)


@dataclass
class RunState:
    """step: optimizer steps done; epoch: epochs fully done; batches_done: batches of the current
    epoch done; order: the current epoch's sample order (None: draw it at the epoch's start);
    total_steps / drop_step: the learning-rate schedule's length and its step drop (fitted to the
    time under fit_schedule_to_time); best_ap / metrics: the best and the last evaluation."""

    total_steps: int
    drop_step: int
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    order: list[int] | None = None
    best_ap: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0

    @classmethod
    def fresh(cls, plan: Plan, cfg: TrainConfig) -> "RunState":
        total = plan.epoch_steps if cfg.max_steps is None else min(plan.epoch_steps, cfg.max_steps)
        return cls(total_steps=total, drop_step=cfg.lr_drop_epoch * plan.steps_per_epoch)

    def end_epoch(self) -> None:
        self.epoch, self.batches_done, self.order = self.epoch + 1, 0, None
