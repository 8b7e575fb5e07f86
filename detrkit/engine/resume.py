"""Checkpointing a run: what last.pt holds (weights, optimizer, EMA, `RunState`, RNG states of every
rank) and putting a resumed run back exactly where it was. The file format is engine/checkpoint.py's."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from . import distributed as dist_utils
from .checkpoint import LAST, PREV, load_latest, save_run_checkpoint
from .ema import ModelEMA
from .state import RunState

log = logging.getLogger(__name__)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # RNG states are CPU byte tensors whatever map_location moved the checkpoint's tensors to
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Checkpointer:
    """Saves and restores RUN_DIR/last.pt for one run. `save` is collective: every rank calls it."""

    def __init__(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEMA | None,
                 model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device,
                 extra: nn.Module | None = None):
        self.run_dir, self.model, self.optimizer, self.ema = run_dir, model, optimizer, ema
        self.extra = extra  # training-only queries of the convergence switches (not in "model")
        self.backbone_start = None  # a BackboneStart: what the backbone started from
        self.cached_views = None  # views of the feature cache (a time-cut count must be the same on resume)
        self.model_cfg, self.train_cfg, self.device = model_cfg, train_cfg, device
        self.world, self.rank = dist_utils.world_size(), dist_utils.rank()
        self.elapsed = lambda: 0.0  # seconds of this part of the run (train() sets its time budget's)

    def payload(self, s: RunState) -> dict:
        rngs = dist_utils.all_gather_object(rng_state())
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scheduler": {"step": s.step, "total_steps": s.total_steps, "drop_step": s.drop_step},
            "step": s.step, "epoch": s.epoch, "batches_done": s.batches_done, "order": s.order,
            "rng": rngs, "world_size": self.world, "best_ap": s.best_ap, "metrics": s.metrics,
            "skipped_steps": s.skipped_steps, "model_cfg": self.model_cfg.to_dict(),
            "train_cfg": self.train_cfg.to_dict(), "seconds": s.seconds + self.elapsed(),
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "backbone_start": self.backbone_start.to_dict() if self.backbone_start is not None else None,
            "cached_views": self.cached_views,
        }

    def save(self, s: RunState) -> None:
        state = self.payload(s)  # collective: every rank takes part
        if self.rank == 0:
            save_run_checkpoint(state, self.run_dir)
        dist_utils.barrier()

    def exists(self) -> bool:
        return (self.run_dir / LAST).exists() or (self.run_dir / PREV).exists()

    def restore(self, s: RunState) -> Path:
        """Load the newest good checkpoint into the model, optimizer, EMA, RNGs and `s`. -> its path."""
        state, path = load_latest(self.run_dir, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        if state.get("backbone_start"):
            from .backbone_start import BackboneStart

            self.backbone_start = BackboneStart(**state["backbone_start"])
        self.cached_views = state.get("cached_views")
        s.step, s.epoch, s.batches_done = state["step"], state["epoch"], state["batches_done"]
        s.order = state.get("order")
        s.best_ap, s.metrics = state.get("best_ap"), state.get("metrics") or {}
        s.skipped_steps = state.get("skipped_steps", 0)
        s.seconds = float(state.get("seconds", 0.0))
        if self.train_cfg.fit_schedule_to_time and state.get("scheduler"):  # the schedule it was on, as a ceiling
            s.total_steps, s.drop_step = state["scheduler"]["total_steps"], state["scheduler"]["drop_step"]
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            log.warning("checkpoint was written by %d processes, now %d: RNG states not restored",
                        len(rngs), self.world)
        if state.get("world_size", 1) != self.world and s.batches_done:
            log.warning("world size changed (%s -> %d): restarting the interrupted epoch %d",
                        state.get("world_size"), self.world, s.epoch)
            s.batches_done, s.order = 0, None
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, %d batches into it)", path, s.step, s.epoch,
                     s.batches_done)
        return path
