"""The training loop: AdamW, lr schedule, clipping, accumulation, bf16 autocast, EMA, DDP, checkpoints.

`train(model_cfg, train_cfg, train_data, val_data, out_dir)` runs (or resumes) one run and leaves in
`out_dir`: last.pt / last.prev.pt (resumable checkpoints), final/ and best/ (native weights that
`Detector.from_pretrained` loads), metrics.jsonl, metrics.json, bad_samples.jsonl, curves.png and
TensorBoard event files under tb/.

Exact resumption: the sample order of each epoch comes from DistributedSampler(seed, epoch) and is
stored in the checkpoint with the number of batches done; the augmentation of a sample is seeded by
(seed, epoch, sample index) so it does not depend on which worker or which run drew it; the python,
numpy and torch RNG states of every rank are stored and restored (dropout).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..config import ModelConfig, TrainConfig
from . import distributed as dist_utils
from .checkpoint import CheckpointError, load_latest, save_run_checkpoint
from .run_lock import RunLock
from .schedule import lr_factor

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 5
LOG_EVERY_STEPS = 10


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


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


# ---------------------------------------------------------------------------------------------- data
class SeededSamples(Dataset):
    """Wraps a dataset so that item i of epoch e is drawn with RNGs seeded by (seed, e, i).

    The caller's RNG states are restored afterwards, so reading samples in the main process does not
    disturb dropout or anything else.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2**31 - 1)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s)
                return self.dataset[i]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def as_index(data, images_dir: str | os.PathLike | None = None, split: str | None = None):
    """A DatasetIndex, or an annotation path loaded with detrkit.data.formats.load_annotations."""
    from ..data.index import DatasetIndex

    if isinstance(data, DatasetIndex):
        return data
    from ..data.formats import load_annotations

    return load_annotations(data, split=split, images_dir=images_dir)


def coco_ground_truth(index):
    """pycocotools COCO object of a DatasetIndex (the evaluator's ground truth)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = index.to_coco()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        coco.createIndex()
    return coco


def _bad_to_dict(bad: Any) -> dict:
    if dataclasses.is_dataclass(bad):
        d = dataclasses.asdict(bad)
    elif isinstance(bad, dict):
        d = dict(bad)
    else:
        d = {"problem": str(bad)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ helpers
class ModelEMA:
    """Exponential moving average of a model's weights (buffers are copied)."""

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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # RNG states are CPU byte tensors whatever map_location moved the checkpoint's tensors to
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: transformer + heads at lr, backbone at lr_backbone (absent if <= 0)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr, "initial_lr": cfg.lr, "name": "transformer"}]
    if backbone and cfg.lr_backbone > 0:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "initial_lr": cfg.lr_backbone,
                       "name": "backbone"})
    return groups


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, saves and returns. A second SIGINT aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


# ------------------------------------------------------------------------------------------- train
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
) -> TrainResult:
    """Train (or resume) a DETR run into `out_dir`.

    train_data / val_data: a DatasetIndex or an annotation path (COCO JSON, YOLO, VOC); val_data may be
    None (no evaluation). The class names and category ids of train_data are set into model_cfg.
    Budget: train_cfg.epochs, .max_steps (optimizer steps) and .max_minutes, whichever comes first.
    step_callback(step, model) runs on every rank after each optimizer step (tests, monitoring).
    init_weights: fine-tune from these weights (a published name or any file Detector.from_pretrained
    takes): the architecture comes from them, the class head is re-initialised for the dataset's classes
    (keep_class_names keeps the rows of classes with the same name).
    Under torchrun (WORLD_SIZE > 1) it joins the process group and trains with DDP.
    """
    t_start = time.monotonic()
    run_dir = Path(out_dir)
    distributed = dist_utils.init_distributed(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    dev = torch.device(device if not device.startswith("cuda") or not distributed
                       else f"cuda:{dist_utils.local_rank()}")
    lock = RunLock.acquire(run_dir) if main else None  # one training per folder
    dist_utils.barrier()

    # ---- data
    from ..data.index import DatasetIndex

    if check_data and main:  # an index in memory was built by the caller, who can check it
        if not isinstance(train_data, DatasetIndex):
            _check(train_data, split, images_dir, train_cfg.skip_bad)
        if val_data is not None and not isinstance(val_data, DatasetIndex):
            _check(val_data, val_split, val_images_dir, train_cfg.skip_bad)
    train_index = as_index(train_data, images_dir, split)
    val_index = as_index(val_data, val_images_dir, val_split) if val_data is not None else None
    if not train_index.images:
        raise ValueError(f"{train_index.source}: the training set has no images")
    train_index.require_boxes()
    model_cfg = model_cfg.with_classes(train_index.class_names, train_index.category_ids)
    if val_index is not None and val_index.category_ids != train_index.category_ids:
        log.warning("validation categories %s differ from training categories %s; evaluating on the "
                    "training ones", val_index.category_ids, train_index.category_ids)

    from ..data.dataset import DetectionDataset, collate
    from ..data.transforms import make_transforms

    train_set = SeededSamples(
        DetectionDataset(train_index, make_transforms(train_cfg, model_cfg, True), skip_bad=train_cfg.skip_bad),
        train_cfg.seed,
    )
    val_set = (DetectionDataset(val_index, make_transforms(train_cfg, model_cfg, False), skip_bad=True)
               if val_index is not None else None)

    # ---- model, optimizer, EMA
    from ..losses import SetCriterion
    from ..model import build_model

    torch.manual_seed(train_cfg.seed)  # same initial weights on every rank (DDP also broadcasts)
    init_state = None
    if init_weights is not None:
        from .finetune import prepare_finetune

        init = prepare_finetune(init_weights, model_cfg.class_names, model_cfg.category_ids,
                                keep_class_names=keep_class_names, seed=train_cfg.seed)
        model_cfg, init_state = init.config, init.state_dict
    model = build_model(model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(dev)
    if train_cfg.lr_backbone <= 0:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    criterion = SetCriterion.from_config(train_cfg, model_cfg.num_classes).to(dev)
    # the fused kernel is several times faster than the per-tensor loop on CPU as well as on CUDA
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg), lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay, fused=True)
    ema = ModelEMA(model, train_cfg.ema_decay) if train_cfg.ema_decay else None

    bs, accum = train_cfg.batch_size, max(1, train_cfg.accumulate)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / bs)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps is not None:
        total_steps = min(total_steps, train_cfg.max_steps)
    drop_step = train_cfg.lr_drop_epoch * steps_per_epoch

    # ---- state (fresh or resumed)
    step, epoch, batches_done, order = 0, 0, 0, None
    best_ap: float | None = None
    last_metrics: dict[str, float] = {}
    skipped_steps = 0
    resumed_from = None
    if resume and ((run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists()):
        state, resumed_from = load_latest(run_dir, map_location=dev)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        order = state.get("order")
        best_ap, last_metrics = state.get("best_ap"), state.get("metrics") or {}
        skipped_steps = state.get("skipped_steps", 0)
        if train_cfg.fit_schedule_to_time and state.get("scheduler"):  # the schedule it was on, as a ceiling
            total_steps, drop_step = state["scheduler"]["total_steps"], state["scheduler"]["drop_step"]
        rngs = state.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        else:
            log.warning("checkpoint was written by %d processes, now %d: RNG states not restored",
                        len(rngs), world)
        if state.get("world_size", 1) != world and batches_done:
            log.warning("world size changed (%s -> %d): restarting the interrupted epoch %d",
                        state.get("world_size"), world, epoch)
            batches_done, order = 0, None
        if main:
            log.info("resumed from %s at step %d (epoch %d, %d batches into it)", resumed_from, step, epoch,
                     batches_done)
    elif resume and main:
        log.info("--resume: no checkpoint in %s, starting fresh", run_dir)
    if resumed_from is not None and step >= total_steps:  # a finished run: say so, touch nothing
        if lock is not None:
            lock.release()
        return TrainResult(run_dir, "nothing_to_do", step, epoch, last_metrics, best_ap, 0, skipped_steps, 0.0)

    amp_dtype = torch.bfloat16 if train_cfg.amp == "bf16" else None
    if train_cfg.amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {train_cfg.amp!r}")
    def log_json(record: dict) -> None:
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    if resumed_from is None and init_weights is None and train_cfg.pretrain_steps > 0:
        if main:
            from .pretrain import pretrain_backbone

            pre = pretrain_backbone(model.backbone.body, model_cfg.backbone, train_set.dataset, train_cfg,
                                    model_cfg.num_classes, dev, progress)
            log_json({"type": "pretrain", **pre.to_dict()})
        dist_utils.broadcast_module(model.backbone)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
    cached = train_cfg.cache_views > 0
    if cached:
        from .feature_cache import FeatureCache

        if train_cfg.lr_backbone > 0:
            raise ValueError("cache_views needs a frozen backbone: set lr_backbone to 0")
        # on a CPU the backbone keeps every core busy: a loader worker would only compete with it
        cache_workers = train_cfg.num_workers if dev.type != "cpu" else 0
        train_set = FeatureCache(train_set, model.backbone, train_cfg.cache_views, dev,
                                 amp=amp_dtype is not None, num_workers=cache_workers,
                                 progress=main and progress)

    train_model: nn.Module = model
    if distributed:
        # trainable BN on GPUs: batch statistics over the global batch (SyncBatchNorm keeps BatchNorm2d's
        # parameters and buffers, so checkpoints are unchanged). It has no CPU kernel; on gloo each
        # process normalises by its own batch and DDP broadcasts rank 0's running statistics.
        if model.cfg.backbone_norm == "batch" and dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    writer = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"), purge_step=step if resumed_from else None)
        except Exception as e:  # TensorBoard is optional at run time
            log.warning("TensorBoard logging disabled: %s", e)
        (run_dir / "config.json").write_text(json.dumps(
            {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "world_size": world}, indent=2))

    bad_seen: set[str] = set()
    bad_file = run_dir / "bad_samples.jsonl"
    if bad_file.exists():
        for line in bad_file.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                bad_seen.add(json.loads(line).get("key", ""))

    def checkpoint_state() -> dict:
        rngs = dist_utils.all_gather_object(_rng_state())
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "scheduler": {"step": step, "total_steps": total_steps, "drop_step": drop_step},
            "step": step, "epoch": epoch, "batches_done": batches_done, "order": order,
            "rng": rngs, "world_size": world, "best_ap": best_ap, "metrics": last_metrics,
            "skipped_steps": skipped_steps, "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(),
        }

    def save_checkpoint() -> None:
        state = checkpoint_state()  # collective: every rank takes part
        if main:
            save_run_checkpoint(state, run_dir)
        dist_utils.barrier()

    def eval_weights() -> nn.Module:
        return ema.module if ema is not None else model

    def run_eval() -> dict[str, float]:
        nonlocal best_ap, last_metrics
        metrics: dict[str, float] = {}
        if main and val_set is not None:
            from .evaluate import evaluate

            metrics = evaluate(eval_weights(), val_set, model_cfg.category_ids, coco_ground_truth(val_index),
                               batch_size=max(1, bs), device=dev, amp=train_cfg.amp,
                               num_workers=train_cfg.num_workers, progress=progress)
            metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            log_json({"type": "eval", "step": step, "epoch": epoch, **metrics})
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"eval/{k}", v, step)
            ap = metrics.get("AP")
            log.info("epoch %d step %d: AP %.3f AP50 %.3f", epoch, step, ap or 0.0, metrics.get("AP50", 0.0))
            if ap is not None and (best_ap is None or ap > best_ap):
                best_ap = ap
                _save_weights(eval_weights(), model_cfg, run_dir / "best")
            last_metrics = metrics
        objs = dist_utils.all_gather_object((best_ap, last_metrics))
        best_ap, last_metrics = objs[0]
        return last_metrics

    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_seconds = train_cfg.max_minutes * 60 if train_cfg.max_minutes else None
    fit = train_cfg.fit_schedule_to_time and max_seconds is not None
    eval_seconds = 0.0
    status = "completed"
    nonfinite_streak = 0
    window: dict[str, float] = {}
    window_n, window_images, window_t = 0, 0, time.monotonic()
    evaluated_at = None
    done = False

    bar = tqdm(total=total_steps, initial=step, disable=not (main and progress), desc="train",
               dynamic_ncols=True, unit="step")
    # fitting may stretch the schedule back up to the epochs / max_steps budget, never past it; a resumed
    # run keeps its fitted schedule as the ceiling (a new time budget must not restart the cosine)
    schedule_ceiling = total_steps
    loop_t0, loop_step0 = time.monotonic(), step
    first_fit = max(step + 50, train_cfg.warmup_steps)  # a speed measured past start-up and warmup

    def fit_schedule() -> None:
        """Set total_steps to what fits in the time left at the speed so far (evaluations included)."""
        nonlocal total_steps, drop_step
        now = time.monotonic()
        per_step = (now - loop_t0) / max(1, step - loop_step0)
        left = max_seconds - (now - t_start) - eval_seconds  # keep room for the final evaluation
        fitted = step + max(1, int(left / per_step))
        fitted = int(-dist_utils.all_reduce_max([-float(min(fitted, schedule_ceiling))], dev)[0])  # same on every rank
        if fitted != total_steps:
            drop_step = round(drop_step * fitted / total_steps)
            log.info("schedule fitted to the time left: %d steps (was %d; %.3f s/step)", fitted, total_steps,
                     per_step)
            total_steps = bar.total = fitted
    with _StopFlag() as stop:
        while not done and epoch < train_cfg.epochs and step < total_steps:
            train_model.train()
            if order is None or batches_done == 0:
                sampler.set_epoch(epoch)
                order = list(sampler)
            train_set.epoch = epoch
            # its own generator: creating the iterator must not draw from the global RNG (dropout), or a
            # resumed run, which creates one more iterator, would diverge
            loader_rng = torch.Generator().manual_seed(train_cfg.seed * 7919 + epoch)
            workers = 0 if cached else train_cfg.num_workers  # cached features: nothing left to load
            loader = DataLoader(train_set, batch_size=bs, sampler=order[batches_done * bs:], generator=loader_rng,
                                collate_fn=collate, num_workers=workers,
                                worker_init_fn=_ignore_signals if workers else None)
            micro, group_bad, group_images = 0, False, 0
            group_losses: dict[str, float] = {}
            n_batches_left = batches_per_epoch - batches_done
            for bi, (images, targets, bad) in enumerate(loader):
                last_micro = (micro + 1 == accum) or (bi + 1 == n_batches_left)
                for b in bad or []:
                    rec = _bad_to_dict(b)
                    key = json.dumps(rec, sort_keys=True, default=str)
                    if key not in bad_seen:
                        bad_seen.add(key)
                        log.warning("skipping a bad sample: %s", rec)
                        with open(bad_file, "a") as f:
                            f.write(json.dumps({"key": key, "rank": rank, "epoch": epoch, **rec}, default=str) + "\n")
                # every rank must take the same path, or the DDP all-reduce in backward would hang
                empty = dist_utils.all_reduce_max([float(len(images) == 0)], dev)[0] > 0
                if not empty:
                    images = [im.to(dev, non_blocking=True) for im in images]
                    targets = _move_targets(targets, dev)
                    sync = (train_model.no_sync() if distributed and not last_micro else contextlib.nullcontext())
                    with sync:
                        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            outputs = train_model(images, features=cached)
                        losses = criterion(outputs, targets)
                        total = criterion.total(losses)
                        bad_loss = dist_utils.all_reduce_max([float(not torch.isfinite(total).item())], dev)[0]
                        if bad_loss > 0:
                            group_bad = True
                        else:
                            (total / accum).backward()
                            group_images += len(images)
                            for k, v in losses.items():
                                if "_" in k and k.rsplit("_", 1)[1].isdigit():
                                    continue  # aux-layer terms: logged in the total only
                                group_losses[k] = group_losses.get(k, 0.0) + float(v.detach()) / accum
                            group_losses["loss"] = group_losses.get("loss", 0.0) + float(total.detach()) / accum
                micro += 1
                batches_done += 1
                if not last_micro:
                    continue

                # ---- optimizer step
                factor = lr_factor(step, total_steps, train_cfg.schedule, drop_step, train_cfg.warmup_steps)
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                grad_norm = None
                if not group_bad and group_images > 0:
                    clip = train_cfg.clip_max_norm if train_cfg.clip_max_norm > 0 else float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                    if not math.isfinite(grad_norm):
                        group_bad = True
                if group_bad:
                    nonfinite_streak += 1
                    skipped_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step,
                                nonfinite_streak)
                    if nonfinite_streak >= MAX_NONFINITE_IN_A_ROW:
                        bar.close()
                        raise NonFiniteLossError(
                            f"{nonfinite_streak} steps in a row had a non-finite loss or gradient (step {step}); "
                            "lower the learning rate or check the data")
                elif group_images > 0:
                    nonfinite_streak = 0
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                    for k, v in group_losses.items():
                        window[k] = window.get(k, 0.0) + v
                    window_n += 1
                    window_images += group_images * world
                step += 1
                micro, group_bad, group_images, group_losses = 0, False, 0, {}
                bar.update(1)
                if step_callback is not None:
                    step_callback(step, model)
                if fit and step == first_fit:
                    fit_schedule()

                if window_n and (step % LOG_EVERY_STEPS == 0 or step == total_steps):
                    now = time.monotonic()
                    avg = {k: v / window_n for k, v in window.items()}
                    ips = window_images / max(now - window_t, 1e-9)
                    record = {"type": "train", "step": step, "epoch": epoch + batches_done / batches_per_epoch,
                              "lr": optimizer.param_groups[0]["lr"], "images_per_s": ips,
                              "grad_norm": grad_norm, **avg}
                    log_json(record)
                    if writer is not None:
                        for k, v in avg.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/lr", record["lr"], step)
                        writer.add_scalar("train/images_per_s", ips, step)
                    bar.set_postfix(loss=f"{avg.get('loss', 0):.3f}", ce=f"{avg.get('loss_ce', 0):.3f}",
                                    l1=f"{avg.get('loss_bbox', 0):.3f}", giou=f"{avg.get('loss_giou', 0):.3f}",
                                    ips=f"{ips:.1f}")
                    window, window_n, window_images, window_t = {}, 0, 0, now

                over_time = max_seconds is not None and time.monotonic() - t_start > max_seconds  # pretraining and caching count
                flags = dist_utils.all_reduce_max([float(stop.signum is not None), float(over_time)], dev)
                if flags[0] > 0:
                    status, done = "interrupted", True
                elif flags[1] > 0:
                    status, done = "max_minutes", True
                elif step >= total_steps:
                    done = True
                    if step < steps_per_epoch * train_cfg.epochs:
                        status = "max_steps" if not fit or step == train_cfg.max_steps else "max_minutes"
                if done:
                    break
                if train_cfg.checkpoint_every_steps and step % train_cfg.checkpoint_every_steps == 0 \
                        and batches_done < batches_per_epoch:
                    save_checkpoint()
            if batches_done >= batches_per_epoch:  # the epoch ran to its end
                epoch, batches_done, order = epoch + 1, 0, None
                if not done:
                    if val_set is not None and epoch % max(1, train_cfg.eval_every_epochs) == 0:
                        eval_t0 = time.monotonic()
                        run_eval()
                        evaluated_at = step
                        eval_seconds = time.monotonic() - eval_t0
                        if fit:
                            fit_schedule()
                    if train_cfg.checkpoint_every_epochs and epoch % train_cfg.checkpoint_every_epochs == 0:
                        save_checkpoint()
            if status == "interrupted":
                save_checkpoint()
    bar.close()

    if status != "interrupted":
        if val_set is not None and evaluated_at != step:
            run_eval()
        save_checkpoint()
        if main:
            _save_weights(eval_weights(), model_cfg, run_dir / "final")
            if best_ap is None:  # no evaluation: the final weights are the best we know
                _save_weights(eval_weights(), model_cfg, run_dir / "best")
    bad_total = len(set().union(*[set(s) for s in dist_utils.all_gather_object(sorted(bad_seen))]))
    seconds = time.monotonic() - t_start
    result = TrainResult(run_dir, status, step, epoch, last_metrics, best_ap, bad_total, skipped_steps, seconds)
    if main:
        summary = {"status": status, "step": step, "epoch": epoch, "best_AP": best_ap,
                   "bad_samples": bad_total, "skipped_steps": skipped_steps, "seconds": round(seconds, 1),
                   "world_size": world, **last_metrics}
        if status != "interrupted":
            (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
            try:
                save_curves(run_dir, run_dir / "curves.png")
            except Exception as e:  # a plot must never fail a finished run
                log.warning("could not draw %s: %s", run_dir / "curves.png", e)
        if writer is not None:
            writer.close()
        if status == "interrupted":
            log.info("stopped by signal at step %d; resume with --resume", step)
        if bad_total:
            log.warning("%d bad samples were skipped; see %s", bad_total, bad_file)
    if lock is not None:
        lock.release()
    dist_utils.barrier()
    return result


def _check(path, split, images_dir, skip_bad: bool) -> None:
    """Run the dataset checker on an annotation path; errors abort unless skip_bad (then warnings)."""
    from ..data.check import check_dataset

    report = check_dataset(path, split=split, images_dir=images_dir, decode_images=False)
    for p in report.warnings[:20]:
        log.warning("%s", p)
    if report.errors:
        text = "\n  ".join(str(p) for p in report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        if not skip_bad:
            raise ValueError(f"{path}: {len(report.errors)} dataset errors:\n  {text}{more}")
        log.warning("%s: %d dataset errors (skip_bad: the unreadable samples will be skipped):\n  %s%s", path,
                    len(report.errors), text, more)


def _save_weights(model: nn.Module, cfg: ModelConfig, path: Path) -> None:
    from ..weights.native import save_native

    save_native(model.state_dict(), cfg, path)


def save_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss terms and AP / AP50 over training (from RUN_DIR/metrics.jsonl) as a PNG."""
    from ..viz.curves import plot_training_curves  # builds a Figure without pyplot: no backend needed

    fig = plot_training_curves(run_dir)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png
