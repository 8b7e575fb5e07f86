"""What a run will do, said before it starts: its phases, their steps and their share of the time.

The time budget (--max-minutes) counts from the start of `train` and covers every phase: the data
check, the backbone pretraining (at most `PRETRAIN_SHARE` of the budget, its step count fitted to that),
the feature cache (at most `CACHE_SHARE` of the budget from its start, and never into the last
`DETR_SHARE`: fewer views when more would not fit),
the DETR steps (their schedule fitted to what is left when fit_schedule_to_time is
on, else cut when the time is up) and the evaluations (the last one's duration is kept in reserve).
`--max-steps` counts DETR optimizer steps and also caps the pretraining steps.
"""
from __future__ import annotations

import logging

from ..config import TrainConfig
from .state import Plan, RunState

log = logging.getLogger(__name__)

# the most of --max-minutes each phase may take. Dense pretraining (off in detr-tiny) needs its steps:
# on hard, 161 steps in 15% of 15 min gave DETR AP50 0.040, 400 steps 0.21 (docs/convergence.md)
PRETRAIN_SHARE = 0.2
DENSE_SHARE = 0.25  # the dense pretraining's, after the crops'
CACHE_SHARE = 0.3  # with the crops' share, at least half of the budget is left to DETR itself
# after a dense phase the cache takes only what leaves DETR this much of the budget (its first view always
# runs): coco128, 15 min, cached 27 views in 4.4 min after 7 min of crops and dense pretraining, and DETR
# got 3 minutes (224 steps)
DETR_SHARE = 0.4


def pretrain_seconds(cfg: TrainConfig) -> float | None:
    """The most the backbone pretraining may take under --max-minutes (None: no limit)."""
    return cfg.max_minutes * 60 * PRETRAIN_SHARE if cfg.max_minutes else None


def dense_pretrain_seconds(cfg: TrainConfig) -> float | None:
    """The most the dense backbone pretraining may take under --max-minutes (None: no limit)."""
    return cfg.max_minutes * 60 * DENSE_SHARE if cfg.max_minutes else None


def cache_seconds(cfg: TrainConfig, elapsed: float) -> float | None:
    """The most the feature cache may take under --max-minutes, counted from its start after `elapsed`
    seconds of the run (None: no limit): its share, or less when more would eat into DETR's share."""
    if not cfg.max_minutes:
        return None
    budget = cfg.max_minutes * 60
    return max(0.0, min(budget * CACHE_SHARE, budget * (1 - DETR_SHARE) - elapsed))


def plan_lines(cfg: TrainConfig, plan: Plan, state: RunState, *, train_images: int, val_images: int | None,
               pretraining: bool, resumed: bool) -> list[str]:
    """The run's plan as lines of text (logged by `train` before the first phase)."""
    from .pretrain import pretrain_steps_for

    budget = cfg.max_minutes
    lines = [f"plan: {train_images} training images, {val_images or 0} validation images; time budget "
             + (f"{budget:g} min for everything below" if budget else "none (epochs / --max-steps end the run)")]
    n = 1
    if pretraining and cfg.pretrain_steps > 0:
        share = f", at most {budget * PRETRAIN_SHARE:.1f} min" if budget else ""
        lines.append(f"  {n}. backbone pretraining on box crops: {pretrain_steps_for(cfg)} steps{share}")
        n += 1
    if pretraining and cfg.pretrain_dense_steps > 0:
        share = f", at most {budget * DENSE_SHARE:.1f} min" if budget else ""
        steps = min(cfg.pretrain_dense_steps, cfg.max_steps or cfg.pretrain_dense_steps)
        probed = cfg.pretrain_dense_when == "weak" and cfg.pretrain_steps > 0
        when = " if a probe finds the crop features weak" if probed else ""
        lines.append(f"  {n}. dense backbone pretraining on windows at the detector's scale: {steps} steps"
                     f"{when}{share}")
        n += 1
    if cfg.cache_views > 0:
        share = (f", at most {budget * CACHE_SHARE:.1f} min and leaving DETR at least {budget * DETR_SHARE:.1f} min "
                 "(fewer views if more would take longer)" if budget else "")
        from .feature_cache import planned_views

        views = planned_views(cfg, train_images)
        lines.append(f"  {n}. backbone features cached: {views} view(s) x {train_images} images{share}")
        n += 1
    left = state.total_steps - state.step
    epochs = f"{cfg.epochs} epochs of {plan.steps_per_epoch} steps"
    cap = f", --max-steps {cfg.max_steps}" if cfg.max_steps is not None else ""
    fit = (" (the schedule is fitted to the time left after the steps above)"
           if budget and cfg.fit_schedule_to_time else " (cut when the time is up)" if budget else "")
    lines.append(f"  {n}. DETR training: {left} steps{' more' if resumed else ''}, batch {cfg.batch_size} "
                 f"({epochs}{cap}){fit}")
    n += 1
    if val_images:
        every = max(1, cfg.eval_every_epochs)
        lines.append(f"  {n}. COCO evaluation on {val_images} images every {every} epoch(s) and at the end; "
                     "best/ keeps the best AP")
    return lines


def log_plan(*args, **kwargs) -> None:
    for line in plan_lines(*args, **kwargs):
        log.info("%s", line)
