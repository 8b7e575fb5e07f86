"""Does a trained model repeat itself? Several confident boxes on one object, and what to do about it.

DETR's set loss gives each object to one query, and a trained DETR needs no duplicate removal: the
paper's post-processing has none, and the published checkpoints keep `duplicate_iou` None. A model
trained for minutes often has not learnt that yet. The main job's 15-minute model put two or three
boxes scoring above 0.5 on most objects (of 264 validation objects, 155 had 2 or more), which costs AP
(every repeat is a false positive) and makes its pictures unreadable.

`check_duplicates` scores the run's model on a seeded sample of its *training* images (the validation
split stays the run's measure) twice in one pass: every box kept, and with class-wise NMS at
DUPLICATE_IOU. The run keeps the removal (`ModelConfig.duplicate_iou`, saved with the weights and
used by eval, predict and the Detector) only when it raises that AP by MIN_GAIN or more.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import ModelConfig, TrainConfig
from ..data.index import DatasetIndex

log = logging.getLogger(__name__)

DUPLICATE_IOU = 0.7  # two boxes of one class overlapping more than this are taken for one object
MIN_GAIN = 0.005  # absolute AP on the sample; below it the paper's post-processing stays
SAMPLE_IMAGES = 100


@dataclass
class DuplicateCheck:
    """AP (0.5:0.95) of the sample with every box kept and with the duplicates removed; `iou`: the
    setting chosen (DUPLICATE_IOU or None)."""

    iou: float | None
    ap_kept: float
    ap_removed: float
    images: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = (f"duplicate boxes removed at IoU {self.iou:g} from now on" if self.iou is not None
                   else "no duplicate removal (the paper's post-processing)")
        return (f"duplicate check on {self.images} training images: AP {self.ap_kept:.3f} with every box, "
                f"{self.ap_removed:.3f} with class-wise NMS at IoU {DUPLICATE_IOU:g}: {verdict}")


def sample_index(index: DatasetIndex, count: int = SAMPLE_IMAGES, seed: int = 0) -> DatasetIndex:
    """A seeded random `count` of the index's images (all when it has fewer)."""
    from ..data.split import subset

    ids = sorted(im.id for im in index.images)
    random.Random(seed).shuffle(ids)
    return subset(index, set(ids[:count]))


@torch.no_grad()
def check_duplicates(model: nn.Module, index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     device: torch.device) -> DuplicateCheck:
    """Score `model` (a DETR) on a sample of `index` (its training images, evaluation transforms) with
    and without duplicate removal, in one pass -> the check and the setting it calls for."""
    from ..data.dataset import DetectionDataset, collate
    from ..data.transforms import make_transforms
    from .evaluate import CocoEvaluator, predictions_to_coco_results
    from .run_data import coco_ground_truth

    sample = sample_index(index, seed=train_cfg.seed)
    dataset = DetectionDataset(sample, make_transforms(train_cfg, model_cfg, False), skip_bad=True)
    gt = coco_ground_truth(sample)
    kept, removed = CocoEvaluator(gt), CocoEvaluator(gt)
    was_training = model.training
    model.eval()
    try:
        for images, targets, _bad in DataLoader(dataset, batch_size=8, collate_fn=collate):
            if not images:
                continue
            outputs = model([im.to(device) for im in images], batch_invariant=True)
            ids = [int(t["image_id"]) for t in targets]
            kept.add(predictions_to_coco_results(outputs, targets, model_cfg.category_ids), image_ids=ids)
            removed.add(predictions_to_coco_results(outputs, targets, model_cfg.category_ids, DUPLICATE_IOU),
                        image_ids=ids)
    finally:
        model.train(was_training)
    ap_kept, ap_removed = (float(e.summarize().get("AP", 0.0)) for e in (kept, removed))
    iou = DUPLICATE_IOU if ap_removed >= ap_kept + MIN_GAIN else None
    return DuplicateCheck(iou, round(ap_kept, 4), round(ap_removed, 4), len(sample.images))
