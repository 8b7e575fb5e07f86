"""Does a trained model repeat itself, or name an object's class second? The post-processing a run keeps.

DETR's set loss gives each object to one query, and a trained DETR needs no duplicate removal: the
paper's post-processing has none, and the published checkpoints keep `duplicate_iou` None. A model
trained for minutes often has not learnt that yet. The main job's 15-minute model put two or three
boxes scoring above 0.5 on most objects (150 of its 264 validation objects had 2 or more), which costs AP
(every repeat is a false positive) and makes its pictures unreadable.

Such a model also often finds an object but ranks its class second: the paper's post-processing keeps
each query's best class only, and the object is lost. Giving each query its k best classes, each with its
own probability (`classes_per_query`, as the DETR variants that score every query-class pair), keeps it
at the lower score. On hard (4 shapes) a 15-minute model's validation AP50 went from 0.479 to 0.505 with 2
and 0.515 with 3; on the main job from 0.785 to 0.798 (both with the duplicate removal the run chose).

`check_duplicates` scores the run's model on a seeded sample of its *training* images (the validation
split stays the run's measure) from one pass: every box kept, and with class-wise NMS at each of
DUPLICATE_IOUS; then, with the removal chosen, each query's best 2 and 3 classes. The run keeps a
removal (`ModelConfig.duplicate_iou`) and then a class count (`ModelConfig.classes_per_query`), both
saved with the weights and used by eval, predict and the Detector, only when each raises that AP by
MIN_GAIN or more; of equal APs the higher IoU, which removes less, and the fewer classes.

On the main job's 15-minute model (validation AP 0.276 with every box): class-wise NMS at IoU 0.5 /
0.6 / 0.7 gave 0.296 / 0.295 / 0.296, AP50 0.650 / 0.642 / 0.630; class-agnostic NMS was lower at every
IoU (0.291 at 0.5), as it also removes different objects that overlap.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data.index import DatasetIndex

DUPLICATE_IOUS = (0.5, 0.6, 0.7)  # two boxes of one class overlapping more than this: one object
CLASSES_PER_QUERY = (2, 3)  # the class counts tried after the paper's 1 (at most the model's classes)
MIN_GAIN = 0.005  # absolute AP on the sample; below it the paper's post-processing stays
SAMPLE_IMAGES = 100


@dataclass
class DuplicateCheck:
    """AP (0.5:0.95) of the sample with every box kept, and with the duplicates removed at each IoU of
    DUPLICATE_IOUS (ap_removed: {iou: AP}); `iou`: the setting chosen (None: keep every box). ap_classes:
    {k: AP} with each query's k best classes under the chosen removal (k = 1 included); `classes`: the
    count chosen (1: the paper's)."""

    iou: float | None
    ap_kept: float
    ap_removed: dict[float, float]
    images: int
    classes: int = 1
    ap_classes: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = (f"duplicate boxes removed at IoU {self.iou:g} from now on" if self.iou is not None
                   else "no duplicate removal (the paper's post-processing)")
        removed = ", ".join(f"{ap:.3f} at IoU {iou:g}" for iou, ap in self.ap_removed.items())
        text = (f"duplicate check on {self.images} training images: AP {self.ap_kept:.3f} with every box, "
                f"with class-wise NMS {removed}: {verdict}")
        if len(self.ap_classes) > 1:
            tried = ", ".join(f"{k}: {ap:.3f}" for k, ap in self.ap_classes.items())
            text += (f"; classes per query {tried}: "
                     + (f"each query gives its {self.classes} best classes" if self.classes > 1
                        else "each query gives its best class (the paper's)"))
        return text


def sample_index(index: DatasetIndex, count: int = SAMPLE_IMAGES, seed: int = 0) -> DatasetIndex:
    """A seeded random `count` of the index's images (all when it has fewer)."""
    from ..data.split import subset

    ids = sorted(im.id for im in index.images)
    random.Random(seed).shuffle(ids)
    return subset(index, set(ids[:count]))


def check_duplicates(model: nn.Module, index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     device: torch.device) -> DuplicateCheck:
    """Score `model` (a DETR) on a sample of `index` (its training images, evaluation transforms) with
    and without duplicate removal, then with more classes per query, from one pass -> the check and the
    settings it calls for."""
    from ..data.dataset import DetectionDataset
    from ..data.transforms import make_transforms
    from .evaluate import CocoEvaluator, model_outputs, predictions_to_coco_results
    from .run_data import coco_ground_truth

    sample = sample_index(index, seed=train_cfg.seed)
    dataset = DetectionDataset(sample, make_transforms(train_cfg, model_cfg, False), skip_bad=True)
    gt = coco_ground_truth(sample)
    outputs = [({k: o[k] for k in ("pred_logits", "pred_boxes")}, t)
               for o, t in model_outputs(model, dataset, batch_size=8, device=device, progress=False)]

    def ap(iou: float | None, classes: int = 1) -> float:
        evaluator = CocoEvaluator(gt)
        for o, targets in outputs:
            evaluator.add(predictions_to_coco_results(o, targets, model_cfg.category_ids, iou, classes),
                          image_ids=[int(t["image_id"]) for t in targets])
        return round(float(evaluator.summarize().get("AP", 0.0)), 4)

    ap_kept = ap(None)
    ap_removed = {iou: ap(iou) for iou in DUPLICATE_IOUS}
    best = max(ap_removed, key=lambda iou: (ap_removed[iou], iou))  # equal APs: the higher IoU removes less
    iou = best if ap_removed[best] >= ap_kept + MIN_GAIN else None
    ap_classes = {1: ap_removed[iou] if iou is not None else ap_kept}
    ap_classes.update({k: ap(iou, k) for k in CLASSES_PER_QUERY if k <= model_cfg.num_classes})
    more = max(ap_classes, key=lambda k: (ap_classes[k], -k))  # equal APs: the fewer classes
    classes = more if ap_classes[more] >= ap_classes[1] + MIN_GAIN else 1
    return DuplicateCheck(iou, ap_kept, ap_removed, len(sample.images), classes, ap_classes)
