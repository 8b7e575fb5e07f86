"""Evaluation during training: COCO AP on the validation set every few epochs, and best/ kept as the
weights of the best AP so far."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..weights.native import save_native
from . import distributed as dist_utils
from .evaluate import evaluate
from .run_log import RunLog
from .state import RunState


class Validator:
    """`run` evaluates (rank 0), logs, saves RUN_DIR/best when the AP improves, and shares best_ap and the
    metrics with every rank through `state`. With no validation set it only keeps the ranks in step.
    clock() -> seconds: `seconds` is how long the last evaluation took."""

    def __init__(self, val_set, coco_gt, model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device,
                 run_dir: Path, run_log: RunLog, progress: bool, clock: Callable[[], float]):
        self.val_set, self.coco_gt = val_set, coco_gt
        self.model_cfg, self.train_cfg, self.device = model_cfg, train_cfg, device
        self.run_dir, self.run_log, self.progress, self.clock = run_dir, run_log, progress, clock
        self.evaluated_at: int | None = None
        self.seconds = 0.0

    def due(self, epoch: int) -> bool:
        """After epoch `epoch` (1-based count of epochs done)."""
        return self.val_set is not None and epoch % max(1, self.train_cfg.eval_every_epochs) == 0

    def run(self, model: nn.Module, state: RunState) -> dict[str, float]:
        t0 = self.clock()
        if dist_utils.rank() == 0 and self.val_set is not None:
            metrics = evaluate(model, self.val_set, self.model_cfg.category_ids, self.coco_gt,
                               batch_size=max(1, self.train_cfg.batch_size), device=self.device,
                               amp=self.train_cfg.amp, num_workers=self.train_cfg.num_workers,
                               progress=self.progress)
            metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.run_log.evaluation(metrics, state)
            ap = metrics.get("AP")
            if ap is not None and (state.best_ap is None or ap > state.best_ap):
                state.best_ap = ap
                save_native(model.state_dict(), self.model_cfg, self.run_dir / "best")
            state.metrics = metrics
        state.best_ap, state.metrics = dist_utils.all_gather_object((state.best_ap, state.metrics))[0]
        self.evaluated_at, self.seconds = state.step, self.clock() - t0
        return state.metrics
