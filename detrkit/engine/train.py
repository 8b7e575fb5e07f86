"""The training loop. `train(model_cfg, train_cfg, train_data, val_data, out_dir)` runs (or resumes) one
run and leaves in `out_dir`: last.pt / last.prev.pt (resumable checkpoints), final/ and best/ (native
weights that `Detector.from_pretrained` loads), metrics.jsonl, metrics.json, bad_samples.jsonl,
curves.png and TensorBoard event files under tb/.

The parts, each in its own module: the data (run_data), one optimizer step (step), where the run is
(state), checkpointing (resume), evaluation with best/ (validation), the time budget and schedule
fitting (budget), the records (run_log); backbone pretraining (pretrain) and the feature cache
(feature_cache) are stages before the loop.

Exact resumption: the sample order of each epoch comes from DistributedSampler(seed, epoch) and is
stored in the checkpoint with the number of batches done; the augmentation of a sample is seeded by
(seed, epoch, sample index) so it does not depend on which worker or which run drew it; the python,
numpy and torch RNG states of every rank are stored and restored (dropout).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ..config import ModelConfig, TrainConfig
from ..model import build_model
from ..weights.native import load_native, save_native
from . import distributed as dist_utils
from .budget import ScheduleFitter, TimeBudget
from .feature_cache import cache_part
from .feature_probe import check_cached_features
from .backbone_start import BackboneStart, backbone_start_part, self_pretrains
from .resume import Checkpointer
from .run_data import aspect_grouped, coco_ground_truth, epoch_loader, load_run_data
from .preflight import log_preflight
from .run_folder import claim_run_dir, trim_metrics
from .run_lock import RunLock
from .run_log import RunLog
from .run_plan import log_plan
from .schedule import lr_factor
from .state import Plan, RunState
from .step import NonFiniteLossError, TrainStep  # noqa: F401  (NonFiniteLossError: part of train's API)
from .stop import StopFlag
from .validation import Validator

log = logging.getLogger(__name__)

MAX_EPOCHS_UNDER_TIME = 100_000  # under --max-minutes with validation: the time and the plateau end the run
PLATEAU_EVALS = 3  # the epoch ceiling ends a timed run when the best AP has not improved in this many evaluations
PLATEAU_DELTA = 0.005  # ... by more than this (absolute AP) or PLATEAU_GAIN of the best, whichever is larger
PLATEAU_GAIN = 0.1
PLATEAU_SPAN = 1 / 3  # ... and those evaluations cover at least this share of the steps so far
PLATEAU_FLOOR = 0.05  # below this best AP the run has not started to detect yet: a flat AP there is no plateau
# a plateau ends a timed run only after its learning rate has decayed, over this share of the steps so far (at
# least an epoch): a flat AP at a high rate is not the end (BCCD, AMX Xeon: AP50 0.480 when it stopped at once,
# step 1456 of the 3390 its time allowed)
ANNEAL_SHARE = 0.25
CHECKPOINT_SECONDS = 60.0  # under --max-minutes: epoch-end checkpoints at most this often
DIAGNOSE_IMAGES = 20  # validation images whose predicted boxes the end-of-run diagnosis looks at


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed", "max_steps", "max_minutes", "interrupted" or "nothing_to_do" (resumed, finished)
    step: int
    epoch: int  # epochs fully done
    metrics: dict[str, float] = field(default_factory=dict)  # last COCO evaluation (empty if none)
    best_ap: float | None = None
    bad_samples: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    diagnosis: dict | None = None  # engine/diagnose.py: failure signs and likely causes ("ok": True if none)
    stop_reason: str = ""  # why the run ended, in words (e.g. the epoch ceiling after a plateau)


@dataclass
class _Run:
    """The parts the loop drives."""

    cfg: TrainConfig
    plan: Plan
    sampler: DistributedSampler
    train_set: Dataset  # SeededSamples, or the FeatureCache built from them
    trainer: TrainStep
    validator: Validator
    checkpointer: Checkpointer
    run_log: RunLog
    budget: TimeBudget
    fitter: ScheduleFitter | None
    step_callback: Callable[[int, nn.Module], None] | None
    device: torch.device
    train_index: object = None  # the training DatasetIndex (object sizes for the diagnosis)
    backbone_start: BackboneStart | None = None
    ap_history: list = field(default_factory=list)  # (step, AP) of this session's evaluations
    annealing: bool = False  # the schedule was shortened after a plateau: it runs to its (new) end
    last_checkpoint: float | None = None  # budget.clock() at the last epoch-end checkpoint
    stop_reason: str = ""

    @property
    def eval_model(self) -> nn.Module:
        ema = self.trainer.ema
        return ema.module if ema is not None else self.trainer.model


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_data,
    val_data,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    resume: bool = False,
    images_dir: str | os.PathLike | None = None,
    val_images_dir: str | os.PathLike | None = None,
    split: str | None = None,
    val_split: str | None = None,
    progress: bool = True,
    step_callback: Callable[[int, nn.Module], None] | None = None,
    check_data: bool = True,
    init_weights: str | os.PathLike | None = None,
    keep_class_names: bool = False,
    clock: Callable[[], float] | None = None,
    val_fraction: float = 0.0,
    plots: bool = True,
) -> TrainResult:
    """Train (or resume) a DETR run into `out_dir`.

    train_data / val_data: a DatasetIndex or an annotation path (COCO JSON, YOLO, VOC); val_data may be
    None (no evaluation). The class names and category ids of train_data are set into model_cfg.
    Budget: train_cfg.epochs, .max_steps (optimizer steps) and .max_minutes, whichever comes first.
    step_callback(step, model) runs on every rank after each optimizer step (tests, monitoring).
    init_weights: fine-tune from these weights (a published name or any file Detector.from_pretrained
    takes): the architecture comes from them, the class head is re-initialised for the dataset's classes
    (keep_class_names keeps the rows of classes with the same name).
    clock() -> seconds measures the time budget (default time.monotonic; tests pass their own).
    val_fraction: with no val_data, use the dataset's own validation split, else hold out this seeded
    fraction of the training images (written to RUN/split.json and RUN/val.json; 0: no validation).
    The run folder: `out_dir`, or its first free numbered sibling when `out_dir` holds another run and
    this is not a resume (engine/run_folder.py). plots: PR curves, confusion matrix, prediction mosaic,
    label statistics and results.csv in the run folder at the end.
    Under torchrun (WORLD_SIZE > 1) it joins the process group and trains with DDP.
    """
    budget = TimeBudget(train_cfg.max_minutes * 60 if train_cfg.max_minutes else None, clock)
    train_cfg = _resolved_precision(train_cfg, device)
    distributed = dist_utils.init_distributed(device)
    main = dist_utils.rank() == 0
    dev = torch.device(device if not device.startswith("cuda") or not distributed
                       else f"cuda:{dist_utils.local_rank()}")
    # a new run never writes into another run's folder: rank 0 picks it, every rank uses it
    run_dir = Path(dist_utils.all_gather_object(str(claim_run_dir(out_dir, resume)) if main else None)[0])
    lock = RunLock.acquire(run_dir) if main else None  # one training per folder
    try:
        dist_utils.barrier()
        return _run(run_dir, dev, distributed, budget, model_cfg, train_cfg, train_data, val_data, resume=resume,
                    images_dir=images_dir, val_images_dir=val_images_dir, split=split, val_split=val_split,
                    progress=progress, step_callback=step_callback, check_data=check_data,
                    init_weights=init_weights, keep_class_names=keep_class_names, val_fraction=val_fraction,
                    plots=plots)
    finally:
        if lock is not None:
            lock.release()


def _resolved_precision(cfg: TrainConfig, device: str) -> TrainConfig:
    """amp "auto" -> what this device runs fast (config.json and checkpoints record the choice made)."""
    from ..device import resolve_amp

    if cfg.amp != "auto":
        return cfg
    amp = resolve_amp(cfg.amp, device)
    log.info("precision auto: %s on %s", "bf16 autocast" if amp == "bf16" else
             "float32 (no native bfloat16 here, where bf16 would be emulated and slow)", device)
    return dataclasses.replace(cfg, amp=amp)


def _run(run_dir: Path, dev: torch.device, distributed: bool, budget: TimeBudget, model_cfg: ModelConfig,
         train_cfg: TrainConfig, train_data, val_data, *, resume: bool, images_dir, val_images_dir, split,
         val_split, progress: bool, step_callback, check_data: bool, init_weights, keep_class_names: bool,
         val_fraction: float, plots: bool) -> TrainResult:
    """`train` inside the run folder's lock: assemble the parts, run the loop, finish."""
    main = dist_utils.rank() == 0
    data = load_run_data(train_data, val_data, model_cfg, train_cfg, images_dir=images_dir,
                         val_images_dir=val_images_dir, split=split, val_split=val_split, check=check_data and main,
                         val_fraction=val_fraction, run_dir=run_dir, fit=init_weights is None)
    train_cfg = data.train_cfg
    model, model_cfg = _initial_model(data.model_cfg, train_cfg, dev, init_weights, keep_class_names)
    trainer = TrainStep.build(model, train_cfg, dev)
    sampler = DistributedSampler(data.train_set, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(),
                                 shuffle=True, seed=train_cfg.seed)
    plan = Plan.of(len(sampler), train_cfg)
    state = RunState.fresh(plan, train_cfg)
    checkpointer = Checkpointer(run_dir, model, trainer.optimizer, trainer.ema, model_cfg, train_cfg, dev,
                                extra=trainer.extra)
    checkpointer.elapsed = budget.elapsed
    resumed = resume and checkpointer.exists()
    if resumed:
        checkpointer.restore(state)
        if state.step >= state.total_steps:  # a finished run: say so, touch nothing
            return TrainResult(run_dir, "nothing_to_do", state.step, state.epoch, state.metrics, state.best_ap, 0,
                               state.skipped_steps, 0.0)
        if main:  # the steps after the checkpoint are about to be logged again
            trim_metrics(run_dir / "metrics.jsonl", state.step)
    elif resume and main:
        log.info("--resume: no checkpoint in %s, starting fresh", run_dir)
    run_log = RunLog(run_dir, progress, budget.clock)
    train_set = data.train_set
    pretraining = not resumed and init_weights is None and self_pretrains(train_cfg)
    if main:
        if not resumed:
            log_preflight(data.train_index, model_cfg, train_cfg, state.total_steps)
        log_plan(train_cfg, plan, state, train_images=len(data.train_index.images),
                 val_images=len(data.val_index.images) if data.val_index is not None else None,
                 pretraining=pretraining, resumed=resumed)
    if resumed:
        start = checkpointer.backbone_start or BackboneStart("checkpoint", "resumed run (start not recorded)")
    elif init_weights is not None:
        start = BackboneStart("checkpoint", f"fine-tuning from {init_weights}")
    else:
        start = backbone_start_part(model, train_set, train_cfg, dev, progress, run_log.write, trainer.ema)
    checkpointer.backbone_start = start
    if train_cfg.cache_views > 0:
        # a resumed run serves the views the interrupted one had (epoch e -> view e mod views), even when
        # the time cut that count short of the plan
        views = checkpointer.cached_views if resumed else None
        train_set = cache_part(train_set, model.backbone, train_cfg, dev, main and progress, budget, views=views)
        checkpointer.cached_views = train_set.views
        if main and not resumed:  # do the frozen features locate and name the objects? (a second's probe)
            probe = check_cached_features(train_set, model_cfg.num_classes, "dense_steps" in start.details)
            if probe is not None:
                start.details["feature_probe"] = probe  # config.json, the checkpoints and the diagnosis
                run_log.write({"type": "feature_probe", **probe})
    trainer.cached_features = train_cfg.cache_views > 0
    if distributed:
        trainer.runner = dist_utils.wrap_ddp(trainer.module, dev)
    coco_gt = coco_ground_truth(data.val_index) if data.val_index is not None else None
    validator = Validator(data.val_set, coco_gt, model_cfg, train_cfg, dev, run_dir, run_log, progress, budget.clock)
    run_log.start(model_cfg, train_cfg, state, resumed, {"backbone_start": start.to_dict()})
    fit = train_cfg.fit_schedule_to_time and budget.max_seconds is not None
    run = _Run(train_cfg, plan, sampler, train_set, trainer, validator, checkpointer, run_log, budget,
               ScheduleFitter(budget, state, train_cfg.warmup_steps, dev) if fit else None, step_callback, dev,
               data.train_index, start)
    if run.fitter is not None and not resumed and data.val_set is not None and train_cfg.max_steps is None:
        # under a time budget the epochs are no ceiling: a small dataset uses its time, unless the
        # validation AP stops improving (checked at each evaluation past the epoch count)
        run.fitter.ceiling = max(run.fitter.ceiling, plan.steps_per_epoch * MAX_EPOCHS_UNDER_TIME)
    status = _train_loop(run, state)
    result = _finish(run, state, status, model_cfg)
    if main and plots and status != "interrupted":
        from ..viz.plots import write_run_plots

        write_run_plots(run_dir, validator.last_evaluator, model_cfg, data.train_index)
    return result


def _initial_model(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, init_weights,
                   keep_class_names: bool) -> tuple[nn.Module, ModelConfig]:
    """The model a run starts from: seeded initial weights (the same on every rank), or fine-tuning
    weights with a class head for the dataset."""
    torch.manual_seed(cfg.seed)
    init_state = None
    if init_weights is not None:
        from .finetune import prepare_finetune

        init = prepare_finetune(init_weights, model_cfg.class_names, model_cfg.category_ids,
                                keep_class_names=keep_class_names, seed=cfg.seed)
        model_cfg, init_state = init.config, init.state_dict
    model = build_model(model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    return model.to(device), model_cfg


def _train_loop(run: _Run, state: RunState) -> str:
    """Epochs until the schedule, the epochs, the time or a signal ends the run -> the run's status."""
    status = None
    try:
        with StopFlag() as stop:
            while status is None and _epochs_left(run, state) and state.step < state.total_steps:
                status = _train_epoch(run, state, stop)
                if state.batches_done >= run.plan.batches_per_epoch:  # the epoch ran to its end
                    state.end_epoch()
                    if status is None:
                        _end_of_epoch(run, state, stop)
                        # a signal during the evaluation: save the training state now, not a step later
                        if dist_utils.all_reduce_max([float(stop.signum is not None)], run.device)[0] > 0:
                            status = "interrupted"
                if status == "interrupted":
                    run.checkpointer.save(state)
    finally:
        run.run_log.bar.close()
    return status or "completed"


def plateaued(history: list[tuple[int, float]], evals: int = PLATEAU_EVALS, delta: float = PLATEAU_DELTA,
              floor: float = PLATEAU_FLOOR) -> bool:
    """True when the last `evals` evaluations' AP (history: (step, AP) in order) did not beat the best
    before them by more than `delta` or PLATEAU_GAIN of it, over at least PLATEAU_SPAN of the steps so
    far. Never while the best AP is below `floor`: DETR's AP stays near zero for its first hundreds of
    steps (the queries have not specialised yet), and stopping there would leave the budget unused
    exactly where the run needs it; nor after a short flat stretch of a long run (frequent evaluations
    of a small dataset)."""
    if len(history) <= evals or max(ap for _, ap in history) < floor:
        return False
    last_step = history[-1][0]
    if last_step - history[-evals - 1][0] < PLATEAU_SPAN * last_step:
        return False
    before = max(ap for _, ap in history[:-evals])
    return max(ap for _, ap in history[-evals:]) <= before + max(delta, PLATEAU_GAIN * before)


def _epochs_left(run: _Run, state: RunState) -> bool:
    """Whether another epoch may start. Without a time budget (or without validation) the epochs are
    the budget. Under one, past the epoch count the run goes on while the time lasts, unless the
    validation AP has plateaued -- and then its learning rate decays over a short last stretch
    (`_anneal`), it ends there and says so."""
    if state.epoch < run.cfg.epochs or run.annealing:
        return True
    if run.fitter is None or run.fitter.ceiling <= run.plan.epoch_steps or run.validator.val_set is None:
        return False
    if plateaued(run.ap_history, floor=PLATEAU_FLOOR):
        _anneal(run, state)
    return True


def _anneal(run: _Run, state: RunState) -> None:
    """Shorten the schedule to end ANNEAL_SHARE of the steps so far from now (at least an epoch; never
    later than the time allows): the learning rate drops at once and decays to the end of that stretch."""
    best_step, best = max(run.ap_history, key=lambda h: h[1])
    steps = max(run.plan.steps_per_epoch, round(ANNEAL_SHARE * state.step))
    allowed = state.total_steps
    run.fitter.ceiling = state.total_steps = min(allowed, state.step + steps)
    state.drop_step = min(state.drop_step, state.step)  # the step schedule: its drop now
    run.annealing = True
    run.stop_reason = (f"the validation AP has plateaued past the {run.cfg.epochs}-epoch ceiling (epoch {state.epoch}; "
                       f"best {best:.3f} at step {best_step}, no gain above {max(PLATEAU_DELTA, PLATEAU_GAIN * best):.3f} "
                       f"in the last {PLATEAU_EVALS} evaluations): the learning rate decays over a last "
                       f"{state.total_steps - state.step} steps, ending the run at step {state.total_steps} of the "
                       f"{allowed} its time allowed")
    if dist_utils.rank() == 0:
        log.info("%s", run.stop_reason)


def _train_epoch(run: _Run, state: RunState, stop: StopFlag) -> str | None:
    """The (rest of the) current epoch's steps; -> a status when the run must end now."""
    run.trainer.runner.train()
    run.train_set.epoch = state.epoch  # first: the cached view of this epoch decides the orientations
    if state.order is None or state.batches_done == 0:
        run.sampler.set_epoch(state.epoch)
        state.order = list(run.sampler)
        if run.cfg.aspect_batches:
            state.order = aspect_grouped(state.order, run.train_set.landscape, run.cfg.batch_size)
    workers = 0 if run.trainer.cached_features else run.cfg.num_workers  # cached: nothing left to load
    loader = epoch_loader(run.train_set, state.order, state.batches_done, run.cfg, state.epoch, workers)
    batches_left, micro = run.plan.batches_per_epoch - state.batches_done, 0
    for i, (images, targets, bad) in enumerate(loader):
        last_micro = micro + 1 == run.trainer.accum or i + 1 == batches_left
        run.run_log.bad_samples(bad, state.epoch)
        run.trainer.accumulate(images, targets, sync=last_micro)
        micro, state.batches_done = micro + 1, state.batches_done + 1
        if not last_micro:
            continue
        micro = 0
        status = _optimizer_step(run, state, stop)
        if status is not None:
            return status
        every = run.cfg.checkpoint_every_steps
        if every and state.step % every == 0 and state.batches_done < run.plan.batches_per_epoch:
            run.checkpointer.save(state)
    return None


def _optimizer_step(run: _Run, state: RunState, stop: StopFlag) -> str | None:
    """One step at the scheduled learning rate, then its callback, schedule fit and log; -> a status
    when the run must end after it."""
    cfg = run.cfg
    outcome = run.trainer.apply(lr_factor(state.step, state.total_steps, cfg.schedule, state.drop_step,
                                          cfg.warmup_steps), state.step)
    state.skipped_steps += int(outcome.skipped)
    state.step += 1
    if run.step_callback is not None:
        run.step_callback(state.step, run.trainer.model)
    if run.fitter is not None and state.step == run.fitter.first_fit:
        _fit_schedule(run, state)
    run.run_log.step(outcome, state, run.plan, run.trainer.optimizer.param_groups[0]["lr"])
    interrupted, over_time = dist_utils.all_reduce_max(
        [float(stop.signum is not None), float(run.budget.exceeded())], run.device)  # pretraining and caching count
    if interrupted > 0:
        return "interrupted"
    if over_time > 0:
        return "max_minutes"
    if state.step < state.total_steps:
        return None
    if state.step >= run.plan.epoch_steps or run.annealing:  # annealing: the shortened schedule is done
        return "completed"
    return "max_steps" if run.fitter is None or state.step == cfg.max_steps else "max_minutes"


def _end_of_epoch(run: _Run, state: RunState, stop: StopFlag) -> None:
    if run.validator.due(state.epoch) or (state.epoch == run.cfg.epochs and run.validator.val_set is not None):
        # at the epoch count: one evaluation to judge the plateau by; past it, the usual cadence
        run.validator.run(run.eval_model, state, should_stop=lambda: stop.signum is not None)
        run.ap_history.append((state.step, state.metrics.get("AP", 0.0)))
        if run.fitter is not None:
            _fit_schedule(run, state)
    if run.cfg.checkpoint_every_epochs and state.epoch % run.cfg.checkpoint_every_epochs == 0 and _checkpoint_due(run):
        run.checkpointer.save(state)
        run.last_checkpoint = run.budget.clock()


def _checkpoint_due(run: _Run) -> bool:
    """Under --max-minutes a checkpoint waits CHECKPOINT_SECONDS after the last: a small set's epoch is
    a few steps (BCCD: 7), and saving after each took ~4% of the run. A signal still saves at once."""
    if run.budget.max_seconds is None or run.last_checkpoint is None:
        return True
    late_enough = run.budget.clock() - run.last_checkpoint >= CHECKPOINT_SECONDS
    return dist_utils.all_reduce_max([float(late_enough)], run.device)[0] > 0  # save is collective


def _fit_schedule(run: _Run, state: RunState) -> None:
    run.fitter.fit(state, reserve_seconds=run.validator.seconds)
    run.run_log.bar.total = state.total_steps


def _finish(run: _Run, state: RunState, status: str, model_cfg: ModelConfig) -> TrainResult:
    """A finished (not interrupted) run: final evaluation, checkpoint, final/ (and best/ when never
    evaluated), metrics.json and curves. -> the result, the same on every rank."""
    main = dist_utils.rank() == 0
    duplicates = None
    if status != "interrupted":
        duplicates = _check_duplicates(run, model_cfg)
        changed = duplicates is not None and (duplicates.iou is not None or duplicates.classes > 1)
        if run.validator.val_set is not None and (run.validator.evaluated_at != state.step or changed):
            with StopFlag() as stop:  # a signal during the last evaluation: keep the trained state
                run.validator.run(run.eval_model, state, should_stop=lambda: stop.signum is not None)
                if dist_utils.all_reduce_max([float(stop.signum is not None)], run.device)[0] > 0:
                    status = "interrupted"
        run.checkpointer.save(state)
        if main and status != "interrupted":
            # best/ is written by a validation only: without one, final/ is what there is
            save_native(run.eval_model.state_dict(), model_cfg, run.checkpointer.run_dir / "final")
            best = run.checkpointer.run_dir / "best"
            if changed and best.exists():  # the same run's post-processing, for its best weights too
                save_native(load_native(best)[0], model_cfg, best)
    bad_total = run.run_log.bad_total()
    diagnosis = _diagnose(run, state, model_cfg) if status != "interrupted" else None
    seconds = state.seconds + run.budget.elapsed()  # the earlier parts of a resumed run included
    result = TrainResult(run.checkpointer.run_dir, status, state.step, state.epoch, state.metrics, state.best_ap,
                         bad_total, state.skipped_steps, seconds, diagnosis, run.stop_reason)
    summary = {"status": status, "step": state.step, "epoch": state.epoch, "best_AP": state.best_ap,
               "bad_samples": bad_total, "skipped_steps": state.skipped_steps, "seconds": round(seconds, 1),
               "world_size": dist_utils.world_size(), **state.metrics,
               "backbone_start": run.backbone_start.to_dict() if run.backbone_start else None,
               "stop_reason": run.stop_reason or None, "diagnosis": diagnosis,
               "duplicates": duplicates.to_dict() if duplicates is not None else None}
    run.run_log.finish(summary if status != "interrupted" else None)
    if main and status == "interrupted":
        log.info("stopped by signal at step %d; resume with --resume", state.step)
    if main and bad_total:
        log.warning("%d bad samples were skipped; see %s", bad_total, run.run_log.bad_file)
    dist_utils.barrier()
    return result


def _check_duplicates(run: _Run, model_cfg: ModelConfig):
    """Rank 0 measures whether the model repeats itself or ranks classes second on training images
    (engine/duplicates.py) and sets model_cfg.duplicate_iou and classes_per_query (in place: the validator
    and the checkpoints share it) when that raises the AP. -> the DuplicateCheck (the same on every rank),
    None when not checked (off, or the model came with a post-processing of its own)."""
    from .duplicates import check_duplicates

    own = model_cfg.duplicate_iou is not None or model_cfg.classes_per_query > 1
    if not run.cfg.check_duplicates or run.train_index is None or own:
        return None
    check = None
    if dist_utils.rank() == 0:
        check = check_duplicates(run.eval_model, run.train_index, model_cfg, run.cfg, run.device)
        log.info("%s", check.text())
    check = dist_utils.all_gather_object(check)[0]
    model_cfg.duplicate_iou, model_cfg.classes_per_query = check.iou, check.classes
    return check


def _diagnose(run: _Run, state: RunState, model_cfg: ModelConfig) -> dict | None:
    """Rank 0: the failure signs of the finished run and their likely causes (engine/diagnose.py),
    logged in plain words when there are any. -> Diagnosis.to_dict() (the same on every rank)."""
    from .diagnose import diagnose, object_sizes, predicted_boxes

    result = None
    if dist_utils.rank() == 0:
        try:
            boxes = None
            if run.validator.val_set is not None:
                boxes = predicted_boxes(run.eval_model, run.validator.val_set, DIAGNOSE_IMAGES, run.device)
            sizes = object_sizes(run.train_index) if run.train_index is not None else (None, None)
            frozen = run.cfg.lr_backbone <= 0 or not model_cfg.train_backbone
            start = run.backbone_start
            d = diagnose(state.metrics, state.step, start.kind if start else None, model_cfg, boxes, *sizes,
                         frozen_backbone=frozen, feature_probe=start.details.get("feature_probe") if start else None,
                         class_error=run.run_log.last_train.get("class_error"))
            if not d.ok:
                log.warning("%s", d.text())
            result = {**d.to_dict(), "text": d.text()}
        except Exception as e:  # a diagnosis must never fail a finished run
            log.warning("could not diagnose the run: %s", e)
    return dist_utils.all_gather_object(result)[0]
