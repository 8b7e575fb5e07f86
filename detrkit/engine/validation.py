"""Evaluation during training: COCO AP on the validation set every few epochs, and best/ kept as the
weights of the best AP so far."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..weights.native import save_native
from . import distributed as dist_utils
from .evaluate import EvaluationInterrupted, FeatureMemo, evaluate
from .run_log import RunLog
from .state import RunState

log = logging.getLogger(__name__)

EVAL_SHARE = 0.1  # under a time budget, evaluations take at most about this share of the training time


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
        self.last_evaluator = None  # the CocoEvaluator of the last evaluation (for the plots)
        self.seconds = 0.0
        self.ended_at: float | None = None  # clock() at the end of the last evaluation
        # a backbone that cannot change (no lr, frozen batch norm, no EMA drifting its last bits): its
        # features of the validation images are computed once, and each evaluation runs the transformer
        frozen = ((train_cfg.lr_backbone <= 0 or not model_cfg.train_backbone)
                  and model_cfg.backbone_norm == "frozen" and train_cfg.ema_decay is None)
        self.memo = FeatureMemo() if frozen and val_set is not None else None

    def due(self, epoch: int) -> bool:
        """After epoch `epoch` (1-based count of epochs done): every eval_every_epochs epochs, and under
        --max-minutes no sooner than the last evaluation's time / EVAL_SHARE after it. A small set's
        epochs are a few steps: BCCD (205 images) evaluated every 8 epochs (56 steps) spent ~40% of its
        15 minutes evaluating."""
        if self.val_set is None or epoch % max(1, self.train_cfg.eval_every_epochs):
            return False
        if self.train_cfg.max_minutes is None or self.ended_at is None:
            return True
        late_enough = self.clock() - self.ended_at >= self.seconds / EVAL_SHARE
        return dist_utils.all_reduce_max([float(late_enough)], self.device)[0] > 0  # every rank decides alike

    def run(self, model: nn.Module, state: RunState, should_stop=None) -> dict[str, float]:
        """should_stop() -> bool: asked after each batch; yes ends the evaluation without a result."""
        t0 = self.clock()
        if dist_utils.rank() == 0 and self.val_set is not None:
            holder: list = []
            try:
                # float32, as `detrkit eval` scores by default: best_AP and a later eval of best/ agree
                metrics = evaluate(model, self.val_set, self.model_cfg.category_ids, self.coco_gt,
                                   batch_size=max(1, self.train_cfg.batch_size), device=self.device,
                                   amp="none", num_workers=self.train_cfg.num_workers,
                                   progress=self.progress, should_stop=should_stop, evaluator_out=holder,
                                   duplicate_iou=self.model_cfg.duplicate_iou,
                                   classes_per_query=self.model_cfg.classes_per_query, memo=self.memo)
            except EvaluationInterrupted:
                log.warning("evaluation interrupted by a signal; the run saves its training state")
                self.seconds = self.clock() - t0
                return state.metrics
            self.last_evaluator = holder[0] if holder else None
            metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.run_log.evaluation(metrics, state)
            ap = metrics.get("AP")
            if ap is not None and (state.best_ap is None or ap > state.best_ap):
                state.best_ap = ap
                save_native(model.state_dict(), self.model_cfg, self.run_dir / "best")
            state.metrics = metrics
        state.best_ap, state.metrics = dist_utils.all_gather_object((state.best_ap, state.metrics))[0]
        self.ended_at = self.clock()
        self.evaluated_at, self.seconds = state.step, self.ended_at - t0
        return state.metrics
