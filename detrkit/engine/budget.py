"""The time budget of a run, and fitting the learning-rate schedule to it (fit_schedule_to_time)."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from . import distributed as dist_utils
from .state import RunState

log = logging.getLogger(__name__)

FIT_AFTER_STEPS = 50  # the speed is measured past start-up (and past warmup)
# a phase's steps (StepsInTime) timed before its step count is fitted to its time, and how often re-fitted
PHASE_FIT_AFTER = 3
PHASE_REFIT_EVERY = 10


class TimeBudget:
    """Seconds since the run started against max_seconds (None: no limit). clock() -> seconds; time.monotonic
    unless a caller (a test) brings its own."""

    def __init__(self, max_seconds: float | None, clock: Callable[[], float] | None = None):
        self.clock = clock or time.monotonic
        self.max_seconds = max_seconds
        self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def exceeded(self) -> bool:
        return self.max_seconds is not None and self.elapsed() > self.max_seconds


class ScheduleFitter:
    """Sets state.total_steps to the steps that fit in the time left at the speed measured so far, once
    `FIT_AFTER_STEPS` steps past the start (and past warmup) and again after each evaluation. The schedule
    never grows past `ceiling` (the epochs / max_steps budget, or a resumed run's fitted schedule, so a
    new time budget does not restart the cosine); the step drop moves in proportion."""

    def __init__(self, budget: TimeBudget, state: RunState, warmup_steps: int, device: torch.device):
        self.budget, self.device = budget, device
        self.ceiling = state.total_steps
        self.t0, self.step0 = budget.clock(), state.step
        self.first_fit = max(state.step + FIT_AFTER_STEPS, warmup_steps)

    def fit(self, state: RunState, reserve_seconds: float) -> None:
        """reserve_seconds: kept for the final evaluation (the last one's duration)."""
        now = self.budget.clock()
        per_step = (now - self.t0) / max(1, state.step - self.step0)
        left = self.budget.max_seconds - (now - self.budget.start) - reserve_seconds
        fitted = state.step + max(1, int(left / per_step))
        # the same on every rank
        fitted = int(-dist_utils.all_reduce_max([-float(min(fitted, self.ceiling))], self.device)[0])
        if fitted != state.total_steps:
            state.drop_step = round(state.drop_step * fitted / state.total_steps)
            log.info("schedule fitted to the time left: %d steps (was %d; %.3f s/step)", fitted,
                     state.total_steps, per_step)
            state.total_steps = fitted


class StepsInTime:
    """A phase's step count (backbone pretraining, the mask head), fitted to its time: the first step is
    not timed (it pays for kernel selection and memory); the count is fitted after PHASE_FIT_AFTER steps,
    re-measured every PHASE_REFIT_EVERY (a busy machine's speed drifts) and at the last step (a too-short
    first estimate can still grow back). Never more than `planned`; max_seconds None: exactly `planned`."""

    def __init__(self, planned: int, max_seconds: float | None, t0: float, clock, what: str):
        self.planned = self.total = planned
        self.max_seconds, self.t0, self.clock, self.what = max_seconds, t0, clock, what
        self.t_steps = None

    def update(self, step: int) -> int:
        """Call before step `step` (0-based); -> the steps the phase now runs."""
        if step == 1:
            self.t_steps = self.clock()
        timed = step - 1
        if self.max_seconds is not None and timed >= PHASE_FIT_AFTER and (
                timed == PHASE_FIT_AFTER or step % PHASE_REFIT_EVERY == 0 or step == self.total - 1):
            now = self.clock()
            per_step = (now - self.t_steps) / timed
            fitted = min(self.planned, max(step + 1, step + int((self.max_seconds - (now - self.t0)) / per_step)))
            if fitted != self.total:
                # said once, and again only when the estimate moves by a tenth or more
                moved = self.total == self.planned or abs(fitted - self.total) >= 0.1 * self.total
                (log.info if moved else log.debug)("%s fitted to its time (%.1f min): %d steps of %d", self.what,
                                                   self.max_seconds / 60, fitted, self.planned)
                self.total = fitted
        return self.total
