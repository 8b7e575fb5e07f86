"""The input size and query count a run fits to its training set (`TrainConfig.fit_to_data`).

A small preset is sized for objects that cover a few feature cells and images with a few objects. A
user's data may have neither: BCCD's red cells are ~30 px at the CPU preset's 144 px input, under
one 32-px feature cell, and up to 28 of them share an image the preset gives 20 queries. The rules,
applied to the annotations before anything is built:

  * when the median object is smaller than one feature cell at the input size, every input size (the
    inference size, the training scales, the crop sizes) grows so that it covers TARGET_CELLS cells,
    by at most MAX_UPSCALE (the step and the feature cache cost grow with the square);
  * when an image has more objects than `num_queries` leaves room for (20% spare), the queries become
    the next multiple of 10 above that, up to MAX_QUERIES;
  * when the objects fill many of the queries, the "no object" class weight (eos_coef) grows to keep
    the paper's balance: on COCO, 100 queries and 7.3 objects per image, the 92.7 empty slots at weight
    0.1 weigh 1.27x the matched ones. At 0.1 with 12 cells in 30 queries they weigh 0.15x, and a slot
    that predicts "cell" at a fixed place on every image scores 0.87 -- the constant answer BCCD's red
    cells got stuck in (every query the same box on every image, each at 0.85-0.9). The weight is
    raised only when the balance is off by more than EOS_TOLERANCE;
  * the convergence switches stay as the preset sets them, crowded images too. Until the twenty-fifth
    session crowded images turned the denoising queries off (two groups had more than doubled BCCD's
    decoder queries: float32, AP50 0.223 with them, 0.321 without) and guided cross-attention on
    (BCCD-RBC AP50 0.520 guided against 0.296 without denoising or guidance). Since the denoising part
    has a query budget (dn_query_budget), denoising without guidance does about as well, 15 min
    each on a 2-core AMX Xeon (AP / AP50): BCCD 0.297 / 0.582 against 0.283 / 0.559, BCCD-RBC
    0.217 / 0.582 against 0.239 / 0.579, and two crowded sets no setting was chosen on, `other-crowd`
    0.186 / 0.522 against 0.177 / 0.515 and `hard-crowd` 0.147 / 0.399 against 0.163 / 0.414: a wash
    in 15 minutes (a denoising step costs ~30% more). Guidance starts faster (AP50 at step 504: 0.084
    against 0.006 on hard-crowd), denoising is ahead from ~1500-2500 steps (at 2016: 0.319 against
    0.236; BCCD-RBC at 2520: 0.482 against 0.445), so the fit no longer changes them (docs/convergence.md);
  * with one class, the crop phase does not place boxes (pretrain_box_coef 0): its only class task is
    object-vs-background, and the box target then shapes the features so that DETR's class head stays
    at chance for longer. BCCD-RBC, 15 float32 minutes: AP50 0.069 with it (2 runs stuck, the head at
    chance for 2000 steps), 0.335 without (out of the plateau by step ~900); centred crops with
    the box target left it by ~1300. Three-class BCCD gains from it (0.524 against 0.461).

Sizes and queries only ever grow, and data the preset fits (several classes, a few objects, none
under a cell) is trained exactly as the preset says. The result is
deterministic in the annotations, so a resumed run fits the same values; config.json, the checkpoints
and the run log record what was chosen.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from dataclasses import dataclass

from ..config import ModelConfig, TrainConfig
from ..data.index import DatasetIndex
from .preflight import feature_stride, object_sides, queries_for

TARGET_CELLS = 1.5  # the median object's side, in feature cells, that the input is grown to
MAX_UPSCALE = 2.0
MAX_QUERIES = 100
SIZE_STEP = 16  # input sizes stay multiples of this
NO_OBJECT_BALANCE = 0.1 * (100 - 7.3) / 7.3  # the paper's weighted empty slots per matched one (COCO)
EOS_TOLERANCE = 2.0


@dataclass(frozen=True)
class InputFit:
    """scale: factor on every input size (1: as the preset); num_queries: the fitted count;
    median_side: the median object's side in px at the preset's input size; max_objects: per image;
    eos_coef: the fitted "no object" weight; mean_objects: per image."""

    scale: float
    num_queries: int
    median_side: float
    max_objects: int
    stride: int
    eos_coef: float = 0.1
    mean_objects: float = 0.0
    one_class: bool = False  # the crop phase places no boxes

    def apply(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
        box_coef = 0.0 if self.one_class else train_cfg.pretrain_box_coef
        if (self.scale == 1.0 and self.num_queries == model_cfg.num_queries and self.eos_coef == train_cfg.eos_coef
                and box_coef == train_cfg.pretrain_box_coef):
            return model_cfg, train_cfg
        size = self._size
        model_cfg = dataclasses.replace(model_cfg, image_size=size(model_cfg.image_size),
                                        max_image_size=size(model_cfg.max_image_size), num_queries=self.num_queries)
        train_cfg = dataclasses.replace(
            train_cfg, train_scales=sorted({size(s) for s in train_cfg.train_scales}),
            train_max_size=size(train_cfg.train_max_size),
            crop_resize=sorted({size(s) for s in train_cfg.crop_resize}),
            crop_size=[size(s) for s in train_cfg.crop_size], eos_coef=self.eos_coef,
            pretrain_box_coef=box_coef)
        return model_cfg, train_cfg

    def _size(self, px: int) -> int:
        return px if self.scale == 1.0 else max(SIZE_STEP, int(round(px * self.scale / SIZE_STEP)) * SIZE_STEP)

    def describe(self, before: ModelConfig, after: ModelConfig, eos_before: float = 0.1,
                 box_coef_before: float = 0.0) -> str:
        """One sentence on what changed and why ('' when nothing did)."""
        parts = []
        if after.image_size != before.image_size:
            parts.append(f"input {before.image_size} -> {after.image_size} px (shorter side; the median object is "
                         f"{self.median_side:.0f} px at {before.image_size} px, under one {self.stride}-px feature "
                         f"cell; now ~{self.median_side * after.image_size / before.image_size:.0f} px)")
        if after.num_queries != before.num_queries:
            parts.append(f"queries {before.num_queries} -> {after.num_queries} (up to {self.max_objects} objects "
                         "in an image)")
        if self.eos_coef != eos_before:
            parts.append(f"no-object weight {eos_before:g} -> {self.eos_coef:g} ({self.mean_objects:.1f} objects per "
                         f"image in {after.num_queries} queries)")
        if self.one_class and box_coef_before:
            parts.append("the crop phase places no boxes (one class: the box target kept DETR's class head at "
                         "chance for longer)")
        return "fitted to the training set: " + "; ".join(parts) if parts else ""


def fit_input(index: DatasetIndex, model_cfg: ModelConfig, eos_coef: float = 0.1) -> InputFit:
    """The scale, query count and no-object weight (the preset's: eos_coef) that `model_cfg` needs for
    `index` (see the module docstring)."""
    stride = feature_stride(model_cfg)
    sides = object_sides(index, model_cfg)
    median = statistics.median(sides) if sides else float("inf")
    scale = 1.0
    if median < stride:
        scale = min(MAX_UPSCALE, TARGET_CELLS * stride / max(median, 1e-6))
    per_image = Counter(a.image_id for a in index.annotations if not a.iscrowd)
    most = max(per_image.values(), default=0)
    queries = model_cfg.num_queries
    if most * 1.2 > queries:  # crowded
        queries = max(queries, min(MAX_QUERIES, queries_for(most)))  # never fewer than the preset's
    mean = sum(per_image.values()) / max(1, len(index.images))
    balanced = min(1.0, NO_OBJECT_BALANCE * mean / (queries - mean)) if queries > mean else 1.0
    if balanced > EOS_TOLERANCE * eos_coef:
        eos_coef = round(balanced, 2)
    return InputFit(scale, queries, median if math.isfinite(median) else 0.0, most, stride, eos_coef, mean,
                    one_class=len(index.class_names) == 1)


def fit_to_data(index: DatasetIndex, model_cfg: ModelConfig,
                train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig, str]:
    """(model_cfg, train_cfg) fitted to `index` when train_cfg.fit_to_data, and the sentence that says
    what changed ('' when nothing did or the switch is off)."""
    if not train_cfg.fit_to_data:
        return model_cfg, train_cfg, ""
    fit = fit_input(index, model_cfg, train_cfg.eos_coef)
    new_model, new_train = fit.apply(model_cfg, train_cfg)
    return new_model, new_train, fit.describe(model_cfg, new_model, train_cfg.eos_coef, train_cfg.pretrain_box_coef)
