"""Panoptic training and evaluation (paper section 4.4).

The paper trains in two stages: the box detector on every segment (things and stuff as boxes; the
ordinary `train` on the set's instances JSON), then, with the detector frozen, only the mask head
(`train_mask_head`, the authors' `--frozen_weights`). `joint=True` trains detector and head together
(box losses + mask losses), which the paper reports gives similar results.

Each step matches the final decoder layer's predictions to the targets (the box matcher) and computes
masks only for the matched queries: the head's cost is per query, and unmatched queries get no mask
loss anyway. Evaluation: PQ/SQ/RQ (overall, things, stuff, per class) through the paper's panoptic
post-processing, and COCO mask AP (pycocotools segm) of every query's sigmoid > 0.5 mask.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ModelConfig
from ..data.dataset import collate
from ..data.panoptic import PanopticIndex, encode_mask, load_panoptic, read_segment_ids
from ..data.panoptic_dataset import PanopticDataset, panoptic_transforms
from ..mask_losses import MASK_WEIGHTS, mask_losses
from ..matching import HungarianMatcher
from ..model.segmentation import DETRSegmentation
from ..panoptic_postprocess import PANOPTIC_THRESHOLD, instance_masks, panoptic_postprocess
from ..panoptic_quality import PQStat
from .budget import StepsInTime
from .feature_cache import CacheLimit
from .mask_cache import MaskHeadCache, cached_batch
from .run_data import SeededSamples
from .schedule import lr_factor

log = logging.getLogger(__name__)


def load_panoptic_model(weights: str | os.PathLike, dilation: bool | None = None
                        ) -> tuple[DETRSegmentation, ModelConfig]:
    """A panoptic model from any weights; a box detector's weights get a fresh (random) mask head."""
    from ..weights.panoptic import is_panoptic, load_panoptic_weights

    path = Path(weights)
    if path.is_dir() and (path / "last.pt").exists() and not (path / "model.safetensors").exists():
        path = path / "last.pt"
    if path.suffix == ".pt":  # a training checkpoint (EMA weights when it has them)
        from .checkpoint import load_checkpoint

        state = load_checkpoint(path)
        cfg = ModelConfig.from_dict(state["model_cfg"])
        sd = state["ema"] if state.get("ema") is not None else state["model"]
    else:
        sd, cfg = load_panoptic_weights(str(weights) if not path.exists() else path, dilation)
    if is_panoptic(sd):
        model = DETRSegmentation(cfg)
        model.load_state_dict(sd)
    else:
        from ..model import build_model

        detr = build_model(cfg)
        detr.load_state_dict(sd)
        model = DETRSegmentation(cfg, detr=detr)
    return model.eval(), cfg


def is_thing_per_class(cfg: ModelConfig) -> list[bool]:
    stuff = set(cfg.stuff_category_ids)
    return [cid not in stuff for cid in cfg.category_ids]


# ---------------------------------------------------------------------------------------- training
@dataclass
class MaskHeadResult:
    run_dir: Path
    steps: int
    seconds: float
    metrics: dict


def _matched_queries(indices: list[tuple[torch.Tensor, torch.Tensor]], device) -> tuple[torch.Tensor, list]:
    """Hungarian pairs -> query indices [B,K_max] (padded with 0) and the target index of each row."""
    k = max((len(p) for p, _ in indices), default=0)
    rows = torch.zeros(len(indices), max(k, 1), dtype=torch.int64)
    for b, (p, _) in enumerate(indices):
        rows[b, : len(p)] = p
    return rows.to(device), [j for _, j in indices]


CACHE_SHARE = 0.35  # of max_minutes at most for caching the frozen detector: most of the time trains the head


@dataclass
class _HeadRun:
    """What every step of a mask-head run needs. clock: seconds (time.monotonic unless a test's)."""
    model: DETRSegmentation
    cfg: ModelConfig
    matcher: HungarianMatcher
    criterion: object | None  # SetCriterion when joint
    params: list
    optimizer: torch.optim.Optimizer
    dev: torch.device
    joint: bool
    amp: bool
    lr: float
    warmup_steps: int
    clip_max_norm: float
    clock: Callable[[], float]
    t0: float
    max_seconds: float | None

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.clock() - self.t0 > self.max_seconds


def train_mask_head(weights: str | os.PathLike, train_json: str | os.PathLike, val_json: str | os.PathLike | None,
                    out_dir: str | os.PathLike, *, joint: bool = False, lr: float = 1e-4, batch_size: int = 8,
                    epochs: int = 25, max_steps: int | None = None, max_minutes: float | None = None,
                    warmup_steps: int = 0, weight_decay: float = 1e-4, clip_max_norm: float = 0.1,
                    scales: list[int] | None = None, max_size: int | None = None, hflip: bool = True,
                    seed: int = 42, device: str = "cpu", progress: bool = True,
                    calib_json: str | os.PathLike | None = None, eval_threshold: float | None = None,
                    amp: bool = False, cache_views: int = 0,
                    clock: Callable[[], float] | None = None) -> MaskHeadResult:
    """Train the mask head of `weights` (a box detector, or a panoptic model to continue) on a COCO
    panoptic set. Leaves out_dir/final (native panoptic weights), metrics.jsonl and metrics.json (PQ).
    calib_json: a held-out panoptic set (neither train_json nor val_json) on which the keep threshold
    is chosen (`panoptic_threshold`) and stored with the weights; without it, the paper's 0.85.
    eval_threshold: evaluate val_json at this threshold instead of the model's.
    amp: run the frozen detector under bf16 autocast (the head itself trains in float32).
    cache_views > 0 (frozen detector only): run the detector once on that many augmented views of each
    image and train the head on its stored outputs (`mask_cache`), within CACHE_SHARE of max_minutes."""
    clock = clock or time.monotonic
    t0 = clock()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the fresh head's initialisation
    train_index = load_panoptic(train_json)
    run = _start_run(weights, train_json, train_index, joint=joint, lr=lr, weight_decay=weight_decay,
                     device=device, amp=amp, warmup_steps=warmup_steps, clip_max_norm=clip_max_norm, clock=clock,
                     t0=t0, max_minutes=max_minutes)
    cfg = run.cfg
    train_set = PanopticDataset(train_index, panoptic_transforms(True, scales or [cfg.image_size],
                                                                 max_size or cfg.max_image_size, hflip=hflip))
    dataset, loss_fn = _training_data(run, train_set, cache_views, batch_size, seed, progress)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    step, bad_count = _train_loop(run, dataset, loss_fn, out / "metrics.jsonl", batch_size, total, seed, progress)
    return _finish_mask_head(run.model, cfg, val_json, out, step, t0, joint, bad_count, device, calib_json,
                             eval_threshold, progress, clock)


def _start_run(weights, train_json, train_index: PanopticIndex, *, joint: bool, lr: float, weight_decay: float,
               device: str, amp: bool, warmup_steps: int, clip_max_norm: float, clock, t0: float,
               max_minutes: float | None) -> _HeadRun:
    """The model (detector frozen unless joint) with the set's stuff classes, its matcher and optimizer."""
    model, cfg = load_panoptic_model(weights)
    cats = [cid for cid, _, _ in train_index.categories]
    if cfg.category_ids != cats:
        raise ValueError(f"{weights}: the detector's categories {cfg.category_ids} differ from {train_json}'s "
                         f"{cats}; train the detector on this set's boxes first")
    cfg.stuff_category_ids = sorted(train_index.stuff_ids)
    dev = torch.device(device)
    model.to(dev)
    criterion = None
    if joint:
        from ..losses import SetCriterion

        criterion = SetCriterion(cfg.num_classes)
        matcher = criterion.matcher
    else:
        model.freeze_detector()
        matcher = HungarianMatcher()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return _HeadRun(model, cfg, matcher, criterion, params, optimizer, dev, joint, amp, lr, warmup_steps,
                    clip_max_norm, clock, t0, max_minutes * 60 if max_minutes is not None else None)


def _training_data(run: _HeadRun, train_set: PanopticDataset, cache_views: int, batch_size: int, seed: int,
                   progress: bool) -> tuple:
    """(the dataset the loop reads, loss_fn(inputs, targets) -> (loss, terms) of one of its batches):
    images through the detector every step, or the frozen detector's cached outputs."""
    if cache_views > 0 and run.joint:
        log.warning("joint training changes the detector, so its outputs cannot be cached: cache_views ignored")
    if cache_views <= 0 or run.joint:
        return train_set, lambda images, targets: _mask_loss(run.model, run.matcher, run.criterion, images,
                                                             targets, run.dev, run.amp)
    cache = _detector_cache(run, train_set, cache_views, batch_size, seed, progress)

    def cached_loss(entries: list[dict], targets: list[dict]):
        outputs, state = cached_batch(entries, run.dev)
        return _masks_and_losses(run.model, run.matcher, outputs, state, _to_device(targets, run.dev))

    return cache, cached_loss


def _detector_cache(run: _HeadRun, train_set: PanopticDataset, views: int, batch_size: int, seed: int,
                    progress: bool) -> MaskHeadCache:
    """The frozen detector's outputs on `views` seeded augmented views of the set, within CACHE_SHARE
    of the time budget (fewer views when another would not fit)."""
    limit = None
    if run.max_seconds is not None:
        limit = CacheLimit(run.max_seconds * CACHE_SHARE, run.max_seconds, run.clock,
                           name="the frozen detector's cache", advice="lower the image sizes or cache_views")
        log.info("caching the frozen detector's outputs: %d view(s) x %d images, at most %.0f s (%.0f%% of the "
                 "time budget; fewer views if more would take longer)", views, len(train_set), limit.seconds,
                 100 * CACHE_SHARE)
    run.model.eval()

    def detect(images: list):
        return _frozen_detect(run.model, [im.to(run.dev) for im in images], run.dev, run.amp)

    stride = 16 if run.cfg.dilation else 32
    dtype = torch.bfloat16 if run.amp else torch.float32  # bf16 only where the detector runs in it anyway
    return MaskHeadCache(SeededSamples(train_set, seed), detect, views, stride=stride, dtype=dtype,
                         batch_size=batch_size, progress=progress, limit=limit)


def _train_loop(run: _HeadRun, dataset, loss_fn, log_path: Path, batch_size: int, total: int, seed: int,
                progress: bool) -> tuple[int, int]:
    """Shuffled epochs (a cache serves view e mod views in epoch e) until `total` steps or the time is up;
    with a time budget the cosine is fitted to the time left (StepsInTime). -> (steps, bad samples)."""
    step, bad_count, window, wn, epoch = 0, 0, {}, 0, 0
    bar = tqdm(total=total, disable=not progress, desc="mask head" if not run.joint else "joint", unit="step")
    # re-measured as it goes: one early estimate (first steps are slower) left minutes of the budget unused
    fit = StepsInTime(total, run.max_seconds, run.t0, run.clock, "mask head")
    gen = torch.Generator().manual_seed(seed)
    while True:
        if isinstance(dataset, MaskHeadCache):
            dataset.epoch = epoch
        stepped = False
        for inputs, targets, bad in DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                               generator=gen):
            bad_count += len(bad)
            for b in bad:
                log.warning("skipping a bad sample: %s", b)
            total = bar.total = fit.update(step)
            losses = _step(run, loss_fn, inputs, targets, step, total) if inputs else None
            if losses is None:
                continue
            step, stepped = step + 1, True
            bar.update(1)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            wn += 1
            if step % 10 == 0:
                _log_window(log_path, bar, step, run.optimizer.param_groups[0]["lr"], window, wn)
                window, wn = {}, 0
            if step >= total or run.out_of_time():
                bar.close()
                return step, bad_count
        if not stepped:  # every sample bad (or every loss non-finite): another epoch would change nothing
            log.warning("an epoch without a single training step: stopping at step %d", step)
            bar.close()
            return step, bad_count
        epoch += 1


def _step(run: _HeadRun, loss_fn, inputs: list, targets: list[dict], step: int, total: int) -> dict | None:
    """One optimizer step on a batch -> its loss terms (None: a non-finite loss, the step skipped)."""
    run.model.train()
    if not run.joint:
        run.model.detr.eval()  # frozen: no dropout, as at inference
    loss, losses = loss_fn(inputs, targets)
    for g in run.optimizer.param_groups:
        g["lr"] = run.lr * lr_factor(step, total, "cosine", None, run.warmup_steps)
    run.optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        log.warning("step %d: non-finite loss, skipped", step)
        return None
    loss.backward()
    if run.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, run.clip_max_norm)
    run.optimizer.step()
    return losses


def _log_window(log_path: Path, bar, step: int, lr: float, window: dict, n: int) -> None:
    """The loss terms averaged over the last `n` steps: a metrics.jsonl line and the progress bar."""
    rec = {"type": "train", "step": step, "lr": lr, **{k: v / n for k, v in window.items()}}
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    bar.set_postfix(mask=f"{rec.get('loss_mask', 0):.3f}", dice=f"{rec.get('loss_dice', 0):.3f}")


def _to_device(targets: list[dict], dev: torch.device) -> list[dict]:
    return [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def _frozen_detect(model, images: list, dev: torch.device, amp: bool) -> tuple[dict, dict]:
    """The frozen detector without gradients (under bf16 autocast with amp) -> (outputs, state) in float32."""
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
        outputs, state = model.detect(images)
    if amp:
        outputs = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
        state = {k: ([t.float() for t in v] if isinstance(v, list) else v.float() if v.is_floating_point() else v)
                 for k, v in state.items()}
    return outputs, state


def _mask_loss(model, matcher, criterion, images: list, targets: list[dict], dev: torch.device, amp: bool = False):
    """One batch through the detector (with gradients only when `criterion`, i.e. joint training) and
    the mask head on the matched queries -> (weighted total, the loss terms). amp: the frozen detector
    under bf16 autocast (the head and the matcher stay float32)."""
    images = [im.to(dev) for im in images]
    targets = _to_device(targets, dev)
    if criterion is None:
        outputs, state = _frozen_detect(model, images, dev, amp)
    else:
        outputs, state = model.detect(images)
    return _masks_and_losses(model, matcher, outputs, state, targets, criterion)


def _masks_and_losses(model, matcher, outputs: dict, state: dict, targets: list[dict], criterion=None):
    """The detector's outputs matched to the targets, the head's masks of the matched queries and their
    losses (+ the box losses when joint) -> (weighted total, the loss terms)."""
    indices = matcher(outputs, targets)
    queries, tgt_idx = _matched_queries(indices, outputs["pred_logits"].device)
    pred_masks = model.predict_masks(state, queries)
    n = max(1.0, float(sum(len(t["labels"]) for t in targets)))
    padded = tuple(state["fpns"][2].shape[-2:])  # stride 4 of the padded batch
    losses = mask_losses(pred_masks, targets, tgt_idx, n, (padded[0] * 4, padded[1] * 4))
    loss = sum(losses[k] * MASK_WEIGHTS[k] for k in losses)
    if criterion is not None:
        box = criterion(outputs, targets)
        losses.update({k: v for k, v in box.items() if not k[-1].isdigit()})
        loss = loss + criterion.total(box)
    return loss, losses


def _finish_mask_head(model, cfg, val_json, out: Path, step: int, t0: float, joint: bool, bad_count: int,
                      device: str, calib_json, eval_threshold: float | None, progress: bool,
                      clock=time.monotonic) -> MaskHeadResult:
    """The keep threshold fitted on `calib_json` (if given), final/ (native panoptic weights), the PQ
    evaluation on `val_json` (also at the paper's threshold when the fitted one differs) and metrics.json."""
    model.eval()
    from ..weights.native import save_native
    from .panoptic_threshold import fit_panoptic_threshold

    calibration: dict = {}
    if calib_json is not None:
        cfg.panoptic_threshold, pq = fit_panoptic_threshold(model, cfg, calib_json, device=device, progress=progress)
        calibration = {"calibration_PQ": {f"{t:g}": v for t, v in pq.items()}}
    save_native(model.state_dict(), cfg, out / "final")
    metrics: dict = {}
    if val_json is not None:
        metrics = evaluate_panoptic(model, cfg, val_json, device=device, threshold=eval_threshold, progress=progress)
        if calibration and metrics["panoptic_threshold"] != PANOPTIC_THRESHOLD:
            paper = evaluate_panoptic(model, cfg, val_json, device=device, threshold=PANOPTIC_THRESHOLD,
                                      mask_ap=False, progress=progress)
            metrics["at_paper_threshold"] = {k: paper[k] for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "eval", "step": step, **_flat(metrics)}) + "\n")
    metrics.update(calibration)
    seconds = clock() - t0
    summary = {"steps": step, "seconds": round(seconds, 1), "joint": joint, "bad_samples": bad_count, **metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return MaskHeadResult(out, step, seconds, metrics)


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# -------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_panoptic(model: DETRSegmentation, cfg: ModelConfig, image_tensor: torch.Tensor,
                     orig_size: tuple[int, int], threshold: float | None = None) -> tuple:
    """One normalised image [3,h,w] -> (PanopticResult at orig_size, raw outputs). threshold: the
    queries kept (default: the model's own, cfg.panoptic_threshold)."""
    out = model([image_tensor])
    return postprocess_one(out, cfg, tuple(image_tensor.shape[-2:]), orig_size, threshold), out


def postprocess_one(out: dict, cfg: ModelConfig, proc_size: tuple[int, int], orig_size: tuple[int, int],
                    threshold: float | None = None):
    """The panoptic PanopticResult of the first image of a model output."""
    threshold = cfg.panoptic_threshold if threshold is None else threshold
    return panoptic_postprocess(out["pred_logits"][0], out["pred_masks"][0], proc_size, orig_size,
                                is_thing_per_class(cfg), cfg.category_ids, cfg.class_names, threshold)


@dataclass
class ImageOutput:
    """One evaluated image: its record, the model's raw outputs, the size the model saw (h, w), the
    original size (H, W) and the ground-truth segment ids [H,W]."""

    rec: object
    out: dict
    proc_size: tuple[int, int]
    orig_size: tuple[int, int]
    gt_ids: np.ndarray


def panoptic_outputs(model: DETRSegmentation, cfg: ModelConfig, index: PanopticIndex, gt_maps: dict, *,
                     device: str = "cpu", progress: bool = True, skipped: list | None = None):
    """The model's outputs on every readable image of `index` whose PNG has the image's size (one
    ImageOutput each); the others are logged and appended to `skipped`."""
    from ..data.images import load_image
    from ..data.transforms import resize_for_inference

    model = model.to(device).eval()
    for rec in tqdm(index.records, disable=not progress, desc="panoptic eval", unit="img"):
        try:
            pil = load_image(rec.image.file)
        except ValueError as e:
            log.warning("skipping %s", e)
            if skipped is not None:
                skipped.append(rec)
            continue
        gt_ids = gt_maps[rec.image.id]
        if gt_ids.shape != (pil.height, pil.width):
            log.warning("%s: PNG size %s differs from the image's %s; skipped", rec.png, gt_ids.shape,
                        (pil.height, pil.width))
            if skipped is not None:
                skipped.append(rec)
            continue
        x = resize_for_inference(pil, cfg.image_size, cfg.max_image_size).to(device)
        with torch.no_grad():
            out = model([x])
        yield ImageOutput(rec, out, tuple(x.shape[-2:]), (pil.height, pil.width), gt_ids)


def gt_segments(rec) -> list[dict]:
    """A record's ground-truth segments as PQStat reads them."""
    return [{"id": s.id, "category_id": s.category_id, "iscrowd": s.iscrowd} for s in rec.segments]


def gt_maps(index: PanopticIndex) -> dict:
    """{image id: ground-truth segment ids [H,W]} of every record."""
    return {rec.image.id: read_segment_ids(rec.png) for rec in index.records}


def gt_instances(index: PanopticIndex, things_only: bool = True) -> tuple[dict, dict]:
    """COCO instances ground truth (RLE masks) of the panoptic set's things, and {image id: ids}."""
    images, anns, maps = [], [], {}
    for rec in index.records:
        ids = read_segment_ids(rec.png)
        maps[rec.image.id] = ids
        h, w = ids.shape
        images.append({"id": rec.image.id, "width": w, "height": h})
        for s in rec.segments:
            if things_only and s.category_id not in index.thing_ids:
                continue
            anns.append({"id": len(anns) + 1, "image_id": rec.image.id, "category_id": s.category_id,
                         "bbox": list(s.bbox), "area": float(s.area), "iscrowd": s.iscrowd,
                         "segmentation": encode_mask(ids == s.id)})
    cats = [{"id": c, "name": n} for c, n, t in index.categories if t or not things_only]
    return {"images": images, "annotations": anns, "categories": cats}, maps


def evaluate_panoptic(model: DETRSegmentation, cfg: ModelConfig, data: str | os.PathLike | PanopticIndex, *,
                      device: str = "cpu", threshold: float | None = None, mask_ap: bool = True,
                      progress: bool = True, out_dir: str | os.PathLike | None = None) -> dict:
    """PQ/SQ/RQ (all, things, stuff, per class) and mask AP on a COCO panoptic set, queries kept above
    `threshold` (default: the model's cfg.panoptic_threshold). With out_dir the predicted PNGs and a
    predictions JSON (COCO panoptic format) are written there."""
    from PIL import Image

    from .evaluate import CocoEvaluator

    threshold = cfg.panoptic_threshold if threshold is None else threshold
    index = data if isinstance(data, PanopticIndex) else load_panoptic(data)
    gt_inst, maps = gt_instances(index)
    stat = PQStat()
    results = []
    pred_anns = []
    skipped_records: list = []
    for item in panoptic_outputs(model, cfg, index, maps, device=device, progress=progress,
                                 skipped=skipped_records):
        rec, out = item.rec, item.out
        res = postprocess_one(out, cfg, item.proc_size, item.orig_size, threshold)
        stat.add_image(item.gt_ids, gt_segments(rec), res.ids, res.segments)
        if out_dir is not None:
            name = Path(rec.png).name
            Path(out_dir, "panoptic").mkdir(parents=True, exist_ok=True)
            Image.fromarray(res.to_rgb()).save(Path(out_dir, "panoptic", name))
            pred_anns.append({"image_id": rec.image.id, "file_name": name, "segments_info": res.segments})
        if mask_ap:
            inst = instance_masks(out["pred_logits"][0], out["pred_masks"][0], item.proc_size, item.orig_size)
            for s, lab, m in zip(inst["scores"].tolist(), inst["labels"].tolist(), inst["masks"].numpy()):
                cid = cfg.category_ids[lab]
                if cid in cfg.stuff_category_ids or not m.any():
                    continue
                ys, xs = np.nonzero(m)
                results.append({"image_id": rec.image.id, "category_id": cid, "score": s,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)], "segmentation": encode_mask(m)})
    skipped = len(skipped_records)
    categories = {cid: thing for cid, _, thing in index.categories}
    summary = stat.summary(categories)
    names = {cid: n for cid, n, _ in index.categories}
    metrics = {"PQ": summary["all"]["pq"], "SQ": summary["all"]["sq"], "RQ": summary["all"]["rq"],
               "PQ_th": summary["things"]["pq"], "SQ_th": summary["things"]["sq"], "RQ_th": summary["things"]["rq"],
               "PQ_st": summary["stuff"]["pq"], "SQ_st": summary["stuff"]["sq"], "RQ_st": summary["stuff"]["rq"],
               "per_class_PQ": {names[c]: v for c, v in summary["per_class"].items()},
               "panoptic_threshold": threshold, "images": len(index.records) - skipped, "skipped": skipped}
    if mask_ap and gt_inst["annotations"]:
        ev = CocoEvaluator(gt_inst, iou_type="segm")
        ev.add(results, image_ids=[im["id"] for im in gt_inst["images"]])
        seg = ev.summarize()
        metrics.update({"mask_AP": seg["AP"], "mask_AP50": seg["AP50"], "mask_AP75": seg["AP75"],
                        "per_class_mask_AP": seg["per_class"]})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "predictions.json").write_text(json.dumps({"annotations": pred_anns}))
    log.info("PQ %.3f (things %.3f, stuff %.3f)", metrics["PQ"], metrics["PQ_th"], metrics["PQ_st"])
    return metrics
