"""Does a trained model repeat itself? Several confident boxes on one object, and what to do about it.

DETR's set loss gives each object to one query, and a trained DETR needs no duplicate removal: the
paper's post-processing has none, and the published checkpoints keep `duplicate_iou` None. A model
trained for minutes often has not learnt that yet. The main job's 15-minute model put two or three
boxes scoring above 0.5 on most objects (150 of its 264 validation objects had 2 or more), which costs AP
(every repeat is a false positive) and makes its pictures unreadable.

`check_duplicates` scores the run's model on a seeded sample of its *training* images (the validation
split stays the run's measure) in one pass: every box kept, and with class-wise NMS at each of
DUPLICATE_IOUS. The run keeps the best removal (`ModelConfig.duplicate_iou`, saved with the weights
and used by eval, predict and the Detector) only when it raises that AP by MIN_GAIN or more; of equal
APs the higher IoU, which removes less.

On the main job's 15-minute model (validation AP 0.276 with every box): class-wise NMS at IoU 0.5 /
0.6 / 0.7 gave 0.296 / 0.295 / 0.296, AP50 0.650 / 0.642 / 0.630; class-agnostic NMS was lower at every
IoU (0.291 at 0.5), as it also removes different objects that overlap.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data.index import DatasetIndex

DUPLICATE_IOUS = (0.5, 0.6, 0.7)  # two boxes of one class overlapping more than this: one object
MIN_GAIN = 0.005  # absolute AP on the sample; below it the paper's post-processing stays
SAMPLE_IMAGES = 100


@dataclass
class DuplicateCheck:
    """AP (0.5:0.95) of the sample with every box kept, and with the duplicates removed at each IoU of
    DUPLICATE_IOUS (ap_removed: {iou: AP}); `iou`: the setting chosen (None: keep every box)."""

    iou: float | None
    ap_kept: float
    ap_removed: dict[float, float]
    images: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = (f"duplicate boxes removed at IoU {self.iou:g} from now on" if self.iou is not None
                   else "no duplicate removal (the paper's post-processing)")
        removed = ", ".join(f"{ap:.3f} at IoU {iou:g}" for iou, ap in self.ap_removed.items())
        return (f"duplicate check on {self.images} training images: AP {self.ap_kept:.3f} with every box, "
                f"with class-wise NMS {removed}: {verdict}")


def sample_index(index: DatasetIndex, count: int = SAMPLE_IMAGES, seed: int = 0) -> DatasetIndex:
    """A seeded random `count` of the index's images (all when it has fewer)."""
    from ..data.split import subset

    ids = sorted(im.id for im in index.images)
    random.Random(seed).shuffle(ids)
    return subset(index, set(ids[:count]))


def check_duplicates(model: nn.Module, index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     device: torch.device) -> DuplicateCheck:
    """Score `model` (a DETR) on a sample of `index` (its training images, evaluation transforms) with
    and without duplicate removal, in one pass -> the check and the setting it calls for."""
    from ..data.dataset import DetectionDataset
    from ..data.transforms import make_transforms
    from .evaluate import CocoEvaluator, model_outputs, predictions_to_coco_results
    from .run_data import coco_ground_truth

    sample = sample_index(index, seed=train_cfg.seed)
    dataset = DetectionDataset(sample, make_transforms(train_cfg, model_cfg, False), skip_bad=True)
    gt = coco_ground_truth(sample)
    kept, removed = CocoEvaluator(gt), {iou: CocoEvaluator(gt) for iou in DUPLICATE_IOUS}
    for outputs, targets in model_outputs(model, dataset, batch_size=8, device=device, progress=False):
        ids = [int(t["image_id"]) for t in targets]
        kept.add(predictions_to_coco_results(outputs, targets, model_cfg.category_ids), image_ids=ids)
        for iou, evaluator in removed.items():
            evaluator.add(predictions_to_coco_results(outputs, targets, model_cfg.category_ids, iou), image_ids=ids)
    ap_kept = round(float(kept.summarize().get("AP", 0.0)), 4)
    ap_removed = {iou: round(float(e.summarize().get("AP", 0.0)), 4) for iou, e in removed.items()}
    best = max(ap_removed, key=lambda iou: (ap_removed[iou], iou))  # equal APs: the higher IoU removes less
    iou = best if ap_removed[best] >= ap_kept + MIN_GAIN else None
    return DuplicateCheck(iou, ap_kept, ap_removed, len(sample.images))
