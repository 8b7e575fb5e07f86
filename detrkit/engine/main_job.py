"""The main job: synthetic data -> train the detr-tiny preset on the CPU -> evaluate -> figures.

`detrkit main-job --out runs/main` leaves in the run folder: data/ (train + val splits), final/ and
best/ (native weights), last.pt, metrics.json (COCO numbers), metrics.jsonl, curves.png and
predictions/*.png (validation images with the predicted boxes drawn).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_atomic
from ..config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

# synthetic images small enough that the CPU trains many epochs in the budget; objects at least a
# fifth of the image, so each covers more than one cell of detr-tiny's stride-32 feature map
DEFAULT_NUM_TRAIN = 4000
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = (128, 192)
DEFAULT_MAX_OBJECTS = 4
DEFAULT_OBJECT_SIZE = (0.2, 0.6)
EVAL_RESERVE_MINUTES = 1.0  # final evaluation, checkpoint and figures


@dataclass
class JobStart:
    """A main job after its data: started at t0 (time.monotonic), the run folder, the splits, the
    preset's configs (settings applied) and the minutes left for training."""

    t0: float
    out: Path
    train_json: Path
    val_json: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    budget: float


def start_job(out_dir: str | os.PathLike, minutes: float, preset: str, sets: list[str] | None,
              make_splits: Callable[[Path], tuple[Path, Path]], reserve_minutes: float,
              least_minutes: float = 0.0) -> JobStart:
    """Make the synthetic splits in OUT/data (make_splits(folder) -> the two annotation files) and the
    configs; the minutes left after the data and `reserve_minutes` must exceed `least_minutes`."""
    from ..config import build_configs

    t0 = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_json, val_json = make_splits(out / "data")
    model_cfg, train_cfg = build_configs(preset, None, sets)
    spent = (time.monotonic() - t0) / 60
    budget = minutes - spent - reserve_minutes
    if budget <= least_minutes:
        raise RuntimeError(f"making the data took {spent:.1f} of the {minutes} minutes; nothing left to train")
    return JobStart(t0, out, train_json, val_json, model_cfg, train_cfg, budget)


def run_main_job(out_dir: str | os.PathLike, minutes: float = 15.0, preset: str = "detr-tiny",
                 variant: str | None = None, num_train: int | None = None, num_val: int | None = None,
                 sets: list[str] | None = None, num_figures: int = 6) -> dict:
    """Run the whole job within `minutes` (wall clock, data generation included); returns a summary."""
    from ..data.synthetic import make_synthetic_splits
    from .train import train

    job = start_job(out_dir, minutes, preset, sets, lambda folder: make_synthetic_splits(
        folder, train=num_train or DEFAULT_NUM_TRAIN, val=num_val or DEFAULT_NUM_VAL, seed=0,
        variant=variant or "shapes", image_size=DEFAULT_IMAGE_SIZE, max_objects=DEFAULT_MAX_OBJECTS,
        object_size=DEFAULT_OBJECT_SIZE), EVAL_RESERVE_MINUTES)
    t0, out, train_json, val_json = job.t0, job.out, job.train_json, job.val_json
    model_cfg, train_cfg, budget = job.model_cfg, job.train_cfg, job.budget
    train_cfg.max_minutes = min(train_cfg.max_minutes or budget, budget)
    log.info("main job: %.1f min for training (%s, %d epochs at most)", train_cfg.max_minutes, preset,
             train_cfg.epochs)
    result = train(model_cfg, train_cfg, train_json, val_json, out)
    figures = draw_predictions(out / "final", val_json, out / "predictions", num_figures)
    total = (time.monotonic() - t0) / 60
    summary = {"minutes": total, "status": result.status, "steps": result.step, "epochs": result.epoch,
               "metrics": result.metrics, "best_AP": result.best_ap, "figures": [str(f) for f in figures],
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    write_atomic(out / "main_job.json", json.dumps(summary, indent=2))
    return summary


def draw_predictions(weights: str | os.PathLike, annotations: str | os.PathLike, out_dir: str | os.PathLike,
                     count: int = 6, threshold: float = 0.5) -> list[Path]:
    """Draw the detections (score > threshold) of the first `count` images of a dataset, as `predict`
    finds and draws them; the ground-truth boxes are drawn first, in thin grey."""
    from PIL import ImageDraw

    from ..data.coco import load_coco
    from ..data.images import load_image
    from ..detector import Detector
    from ..viz.draw import draw_detections

    detector = Detector.from_pretrained(weights, precision="float32")
    index = load_coco(annotations)
    by_image = index.annotations_by_image()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = index.images[:count]
    images = [load_image(rec.file) for rec in records]
    paths = []
    for rec, image, det in zip(records, images, detector.predict(images, threshold=threshold)):
        truth = image.copy()
        pen = ImageDraw.Draw(truth)
        for a in by_image.get(rec.id, []):
            x, y, w, h = a.bbox
            pen.rectangle([x, y, x + w, y + h], outline=(160, 160, 160), width=1)
        drawn = draw_detections(truth, det.boxes.numpy(), det.labels.numpy(), det.scores.numpy(),
                                list(detector.config.class_names))
        path = out / f"{Path(rec.file).stem}.png"
        drawn.save(path)
        paths.append(path)
    return paths
