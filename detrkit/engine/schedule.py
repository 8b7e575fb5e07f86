"""Learning-rate schedule as a pure function of the optimizer step (so resuming needs only the step)."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, schedule: str = "step", drop_step: int | None = None,
              warmup_steps: int = 0, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rates before optimizer step number `step` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then either
    "step": x1 until `drop_step`, x0.1 after (the paper's StepLR), or
    "cosine": half cosine from 1 to `min_factor` at `total_steps`.
    """
    if schedule not in ("step", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'step' or 'cosine'")
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        warm = (step + 1) / (warmup_steps + 1)
    if schedule == "step":
        return warm * (0.1 if drop_step is not None and step >= drop_step else 1.0)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    return warm * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
