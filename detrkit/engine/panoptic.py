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


def train_mask_head(weights: str | os.PathLike, train_json: str | os.PathLike, val_json: str | os.PathLike | None,
                    out_dir: str | os.PathLike, *, joint: bool = False, lr: float = 1e-4, batch_size: int = 8,
                    epochs: int = 25, max_steps: int | None = None, max_minutes: float | None = None,
                    warmup_steps: int = 0, weight_decay: float = 1e-4, clip_max_norm: float = 0.1,
                    scales: list[int] | None = None, max_size: int | None = None, hflip: bool = True,
                    seed: int = 42, device: str = "cpu", progress: bool = True,
                    eval_threshold: float = PANOPTIC_THRESHOLD, amp: bool = False) -> MaskHeadResult:
    """Train the mask head of `weights` (a box detector, or a panoptic model to continue) on a COCO
    panoptic set. Leaves out_dir/final (native panoptic weights), metrics.jsonl and metrics.json (PQ).
    amp: run the frozen detector under bf16 autocast (the head itself trains in float32)."""
    t0 = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)
    train_index = load_panoptic(train_json)
    model, cfg = load_panoptic_model(weights)
    cats = [cid for cid, _, _ in train_index.categories]
    if cfg.category_ids != cats:
        raise ValueError(f"{weights}: the detector's categories {cfg.category_ids} differ from {train_json}'s "
                         f"{cats}; train the detector on this set's boxes first")
    cfg.stuff_category_ids = sorted(train_index.stuff_ids)
    scales = scales or [cfg.image_size]
    max_size = max_size or cfg.max_image_size
    train_set = PanopticDataset(train_index, panoptic_transforms(True, scales, max_size, hflip=hflip))
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
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    log_path = out / "metrics.jsonl"
    step, window, wn = 0, {}, 0
    bad_count = 0
    bar = tqdm(total=total, disable=not progress, desc="mask head" if not joint else "joint", unit="step")
    fitted = max_minutes is None
    done = False
    gen = torch.Generator().manual_seed(seed)
    while not done:
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=gen)
        for images, targets, bad in loader:
            bad_count += len(bad)
            for b in bad:
                log.warning("skipping a bad sample: %s", b)
            if not images:
                continue
            model.train()
            if not joint:
                model.detr.eval()  # frozen: no dropout, as at inference
            loss, losses = _mask_loss(model, matcher, criterion if joint else None, images, targets, dev, amp)
            for g in optimizer.param_groups:
                g["lr"] = lr * lr_factor(step, total, "cosine", None, warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                log.warning("step %d: non-finite loss, skipped", step)
                continue
            loss.backward()
            if clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            wn += 1
            if step % 10 == 0:
                _log_window(log_path, bar, step, optimizer.param_groups[0]["lr"], window, wn)
                window, wn = {}, 0
            elapsed = time.monotonic() - t0
            if not fitted and step == 30:  # fit the cosine to the time budget, as the detector's run does
                per_step = elapsed / step
                total = min(total, step + max(1, int((max_minutes * 60 - elapsed) / per_step)))
                bar.total = total
                fitted = True
            if step >= total or (max_minutes is not None and elapsed > max_minutes * 60):
                done = True
                break
    bar.close()
    return _finish_mask_head(model, cfg, val_json, out, step, t0, joint, bad_count, device, eval_threshold, progress)


def _log_window(log_path: Path, bar, step: int, lr: float, window: dict, n: int) -> None:
    """The loss terms averaged over the last `n` steps: a metrics.jsonl line and the progress bar."""
    rec = {"type": "train", "step": step, "lr": lr, **{k: v / n for k, v in window.items()}}
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    bar.set_postfix(mask=f"{rec.get('loss_mask', 0):.3f}", dice=f"{rec.get('loss_dice', 0):.3f}")


def _mask_loss(model, matcher, criterion, images: list, targets: list[dict], dev: torch.device, amp: bool = False):
    """One batch through the detector (with gradients only when `criterion`, i.e. joint training) and
    the mask head on the matched queries -> (weighted total, the loss terms). amp: the frozen detector
    under bf16 autocast (the head and the matcher stay float32)."""
    images = [im.to(dev) for im in images]
    targets = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    frozen_amp = amp and criterion is None
    with torch.set_grad_enabled(criterion is not None), torch.autocast(dev.type, torch.bfloat16, enabled=frozen_amp):
        outputs, state = model.detect(images)
    if frozen_amp:
        outputs = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
        state = {k: ([t.float() for t in v] if isinstance(v, list) else v.float() if v.is_floating_point() else v)
                 for k, v in state.items()}
    indices = matcher(outputs, targets)
    queries, tgt_idx = _matched_queries(indices, dev)
    pred_masks = model.predict_masks(state, queries)
    n = max(1.0, float(sum(len(t["labels"]) for t in targets)))
    padded = tuple(state["fpns"][2].shape[-2:])
    losses = mask_losses(pred_masks, targets, tgt_idx, n, (padded[0] * 4, padded[1] * 4))
    loss = sum(losses[k] * MASK_WEIGHTS[k] for k in losses)
    if criterion is not None:
        box = criterion(outputs, targets)
        losses.update({k: v for k, v in box.items() if not k[-1].isdigit()})
        loss = loss + criterion.total(box)
    return loss, losses


def _finish_mask_head(model, cfg, val_json, out: Path, step: int, t0: float, joint: bool, bad_count: int,
                      device: str, eval_threshold: float, progress: bool) -> MaskHeadResult:
    """final/ (native panoptic weights), the PQ evaluation on `val_json` and metrics.json."""
    model.eval()
    from ..weights.native import save_native

    save_native(model.state_dict(), cfg, out / "final")
    metrics: dict = {}
    if val_json is not None:
        metrics = evaluate_panoptic(model, cfg, val_json, device=device, threshold=eval_threshold, progress=progress)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "eval", "step": step, **_flat(metrics)}) + "\n")
    seconds = time.monotonic() - t0
    summary = {"steps": step, "seconds": round(seconds, 1), "joint": joint, "bad_samples": bad_count, **metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return MaskHeadResult(out, step, seconds, metrics)


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# -------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_panoptic(model: DETRSegmentation, cfg: ModelConfig, image_tensor: torch.Tensor,
                     orig_size: tuple[int, int], threshold: float = PANOPTIC_THRESHOLD) -> tuple:
    """One normalised image [3,h,w] -> (PanopticResult at orig_size, raw outputs)."""
    out = model([image_tensor])
    res = panoptic_postprocess(out["pred_logits"][0], out["pred_masks"][0], tuple(image_tensor.shape[-2:]),
                               orig_size, is_thing_per_class(cfg), cfg.category_ids, cfg.class_names, threshold)
    return res, out


def _gt_instances(index: PanopticIndex, things_only: bool = True) -> tuple[dict, dict]:
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
                      device: str = "cpu", threshold: float = PANOPTIC_THRESHOLD, mask_ap: bool = True,
                      progress: bool = True, out_dir: str | os.PathLike | None = None) -> dict:
    """PQ/SQ/RQ (all, things, stuff, per class) and mask AP on a COCO panoptic set. With out_dir the
    predicted PNGs and a predictions JSON (COCO panoptic format) are written there."""
    from PIL import Image

    from ..data.images import load_image
    from ..data.transforms import resize_for_inference
    from .evaluate import CocoEvaluator

    index = data if isinstance(data, PanopticIndex) else load_panoptic(data)
    model = model.to(device).eval()
    gt_inst, gt_maps = _gt_instances(index)
    stat = PQStat()
    results = []
    pred_anns = []
    skipped = 0
    for rec in tqdm(index.records, disable=not progress, desc="panoptic eval", unit="img"):
        try:
            pil = load_image(rec.image.file)
        except ValueError as e:
            log.warning("skipping %s", e)
            skipped += 1
            continue
        x = resize_for_inference(pil, cfg.image_size, cfg.max_image_size).to(device)
        res, out = predict_panoptic(model, cfg, x, (pil.height, pil.width), threshold)
        gt_ids = gt_maps[rec.image.id]
        if gt_ids.shape != res.ids.shape:
            log.warning("%s: PNG size %s differs from the image's %s; skipped", rec.png, gt_ids.shape, res.ids.shape)
            skipped += 1
            continue
        stat.add_image(gt_ids, [{"id": s.id, "category_id": s.category_id, "iscrowd": s.iscrowd}
                                for s in rec.segments], res.ids, res.segments)
        if out_dir is not None:
            name = Path(rec.png).name
            Path(out_dir, "panoptic").mkdir(parents=True, exist_ok=True)
            Image.fromarray(res.to_rgb()).save(Path(out_dir, "panoptic", name))
            pred_anns.append({"image_id": rec.image.id, "file_name": name, "segments_info": res.segments})
        if mask_ap:
            inst = instance_masks(out["pred_logits"][0], out["pred_masks"][0], tuple(x.shape[-2:]),
                                  (pil.height, pil.width))
            for s, lab, m in zip(inst["scores"].tolist(), inst["labels"].tolist(), inst["masks"].numpy()):
                cid = cfg.category_ids[lab]
                if cid in cfg.stuff_category_ids or not m.any():
                    continue
                ys, xs = np.nonzero(m)
                results.append({"image_id": rec.image.id, "category_id": cid, "score": s,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)], "segmentation": encode_mask(m)})
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
