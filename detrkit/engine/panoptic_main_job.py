"""The panoptic main job: synthetic panoptic data -> the paper's two stages on the CPU -> PQ.

1. the box detector (detr-tiny, the ordinary training run) on every segment as a box, things and
   stuff alike, from the set's instances JSON;
2. the mask head on the frozen detector (`train_mask_head`);
3. PQ/SQ/RQ and mask AP on the validation split, colour overlays of a few validation images.

Leaves in the run folder: data/ (train + val + calib, COCO panoptic + instances; the keep threshold is
chosen on calib), detector/ (the first stage's run folder), mask_head/ (the second stage's), final/
(native panoptic weights), metrics.json
(PQ, SQ, RQ overall / things / stuff / per class, mask AP), overlays/*.png and panoptic_main_job.json.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 100
# held-out images (a third seed) on which the keep threshold is chosen: neither stage trains on them
# and the reported PQ is the validation split's (engine/panoptic_threshold.py)
DEFAULT_NUM_CALIB = 100  # a smaller --num-val makes the calibration split that size too
CALIB_SEED = 2_000_006  # the splits use seeds 0 (train) and 1_000_003 (val)
DEFAULT_IMAGE_SIZE = (128, 192)
# of the training time: the detector needs most of it. At 0.68 the head got ~600 uncached steps, its DICE
# loss still falling; cached steps cost ~0.45 of those (after caching a view: about half an uncached
# epoch), so at 0.6 it gets ~2x the steps for 12% less detector time
DETECTOR_SHARE = 0.6
MASK_HEAD_LR = 1e-3  # the paper's 1e-4 is for 25 epochs of COCO; a CPU budget of minutes needs more
EVAL_RESERVE_MINUTES = 2.0  # evaluations (detector; threshold fit, panoptic), weights and overlays
# the frozen detector is half of a mask-head step: its outputs on augmented views of each image are
# computed once (~0.8 MB an image), and the head's steps then cost 0.18 s instead of 0.64 s (idle 2-core
# AVX2 CPU). Two views of 2000 images took 1.8 min there, inside the caching share (panoptic.CACHE_SHARE);
# a slower machine keeps fewer
CACHE_VIEWS = 2


def run_panoptic_main_job(out_dir: str | os.PathLike, minutes: float = 20.0, preset: str = "detr-tiny",
                          num_train: int | None = None, num_val: int | None = None,
                          sets: list[str] | None = None, num_figures: int = 6) -> dict:
    """Run the whole job within `minutes` (wall clock, data generation included); returns a summary."""
    from ..data.synthetic_panoptic import make_synthetic_panoptic, make_synthetic_panoptic_splits
    from ..device import resolve_amp
    from .main_job import start_job
    from .panoptic import train_mask_head
    from .train import train

    def make_data(folder: Path) -> tuple[Path, Path]:
        options = {"image_size": DEFAULT_IMAGE_SIZE, "image_format": "jpg"}
        make_synthetic_panoptic(folder / "calib", num_val or DEFAULT_NUM_CALIB, CALIB_SEED, **options)
        return make_synthetic_panoptic_splits(folder, train=num_train or DEFAULT_NUM_TRAIN,
                                              val=num_val or DEFAULT_NUM_VAL, seed=0, **options)

    job = start_job(out_dir, minutes, preset, sets, make_data, EVAL_RESERVE_MINUTES, least_minutes=1.0)
    t0, out, train_json, val_json = job.t0, job.out, job.train_json, job.val_json
    model_cfg, train_cfg, budget = job.model_cfg, job.train_cfg, job.budget
    det_minutes = budget * DETECTOR_SHARE
    train_cfg.max_minutes = min(train_cfg.max_minutes or det_minutes, det_minutes)
    log.info("panoptic main job: %.1f min for the detector, then the mask head", train_cfg.max_minutes)
    det = train(model_cfg, train_cfg, train_json.parent / "annotations.json", val_json.parent / "annotations.json",
                out / "detector")
    left = minutes - (time.monotonic() - t0) / 60 - EVAL_RESERVE_MINUTES / 2
    head = train_mask_head(out / "detector" / "final", train_json, val_json, out / "mask_head",
                           lr=MASK_HEAD_LR, batch_size=8, max_minutes=max(0.5, left), warmup_steps=20,
                           scales=list(train_cfg.train_scales), max_size=train_cfg.train_max_size,
                           amp=resolve_amp(train_cfg.amp, "cpu") == "bf16", cache_views=CACHE_VIEWS,
                           calib_json=out / "data" / "calib" / "panoptic.json")
    if (out / "final").exists():
        shutil.rmtree(out / "final")
    shutil.copytree(out / "mask_head" / "final", out / "final")
    figures = draw_overlays(out / "final", val_json, out / "overlays", num_figures)
    total = (time.monotonic() - t0) / 60
    metrics = head.metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    summary = {"minutes": total, "detector": {"status": det.status, "steps": det.step, "AP": det.metrics.get("AP"),
                                              "AP50": det.metrics.get("AP50")},
               "mask_head": {"steps": head.steps, "seconds": head.seconds},
               "PQ": metrics.get("PQ"), "SQ": metrics.get("SQ"), "RQ": metrics.get("RQ"),
               "PQ_th": metrics.get("PQ_th"), "PQ_st": metrics.get("PQ_st"), "mask_AP": metrics.get("mask_AP"),
               "panoptic_threshold": metrics.get("panoptic_threshold"),
               "at_paper_threshold": metrics.get("at_paper_threshold"),
               "figures": [str(f) for f in figures], "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count()}
    (out / "panoptic_main_job.json").write_text(json.dumps(summary, indent=2))
    return summary


def draw_overlays(weights: str | os.PathLike, panoptic_json: str | os.PathLike, out_dir: str | os.PathLike,
                  count: int = 6) -> list[Path]:
    """Colour overlays of the predicted panoptic segmentation of the first `count` images."""
    from ..data.images import load_image
    from ..data.panoptic import load_panoptic
    from ..data.transforms import resize_for_inference
    from ..viz.panoptic import draw_panoptic
    from .panoptic import load_panoptic_model, predict_panoptic

    model, cfg = load_panoptic_model(weights)
    index = load_panoptic(panoptic_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in index.records[:count]:
        pil = load_image(rec.image.file)
        x = resize_for_inference(pil, cfg.image_size, cfg.max_image_size)
        res, _ = predict_panoptic(model, cfg, x, (pil.height, pil.width))
        path = out / f"{Path(rec.image.file).stem}.png"
        draw_panoptic(pil, res).save(path)
        paths.append(path)
    return paths
