"""Typed configuration shared by the Python API and the command line.

`ModelConfig` fully describes a network and travels with its weights (JSON beside the safetensors).
`TrainConfig` describes a training run. A named preset gives both. `build_configs` merges, in this
order: a preset, a config file (JSON or YAML with optional "model" / "train" sections, or flat keys),
`key=value` settings (key: a field of either config, optionally prefixed `model.` or `train.`;
value parsed as YAML), then explicit values (the command line's dedicated flags).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

DEFAULT_PRESET = "detr-tiny"


def _check(cls: str, name: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name} must be {expected}, got {value!r}")


def _check_numbers(cfg: Any, rules: dict[str, tuple[float, bool]]) -> None:
    """rules: field -> (lowest allowed value, None allowed). Numbers only (bool is not a number here)."""
    cls = type(cfg).__name__
    for name, (low, optional) in rules.items():
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        _check(cls, name, number and v >= low, f"a number >= {low:g}" + (" or null" if optional else ""), v)


def _check_choice(cfg: Any, name: str, choices: tuple) -> None:
    v = getattr(cfg, name)
    _check(type(cfg).__name__, name, v in choices, "one of " + ", ".join(repr(c) for c in choices), v)


def _check_sizes(cfg: Any, name: str, count: int | None = None) -> None:
    v = getattr(cfg, name)
    ok = (isinstance(v, (list, tuple)) and len(v) > 0 and (count is None or len(v) == count)
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))
    _check(type(cfg).__name__, name, ok, f"a list of {count or 'one or more'} positive integers", v)


class _DictIO:
    """to_dict / from_dict for a config dataclass; unknown keys are an error, not silently dropped.
    Retired keys (`_retired`: fields that no longer change anything) are dropped so older config.json
    files and checkpoints still load."""

    _retired: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = {k: v for k, v in d.items() if k not in cls._retired}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class ModelConfig(_DictIO):
    """Everything needed to rebuild a DETR network, including what its class indices mean.

    Class index ``i`` (0-based, contiguous) means dataset category ``category_ids[i]`` named
    ``class_names[i]``; the head has ``num_classes + 1`` logits, the last one being "no object".
    """

    backbone: str = "resnet50"  # any torchvision ResNet: resnet18/34/50/101/152
    dilation: bool = False  # DC5: layer4 stride replaced by dilation 2
    train_backbone: bool = True  # False freezes the whole backbone (lr_backbone <= 0)
    backbone_norm: str = "frozen"  # "frozen" (paper, pretrained) or "batch" (trainable BN, every layer: from scratch)
    # the transformer: width d and attention heads, encoder and decoder layers, feed-forward width
    hidden_dim: int = 256; nheads: int = 8  # noqa: E702
    enc_layers: int = 6; dec_layers: int = 6  # noqa: E702
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    pre_norm: bool = False
    position_embedding: str = "sine"  # "sine" or "learned"
    queries_at: str = "attention"
    """object queries added in every decoder attention, or "input" (paper Table 3)"""
    aux_loss: bool = True
    # inference resize: shorter side image_size, longer side at most max_image_size
    image_size: int = 800; max_image_size: int = 1333  # noqa: E702
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    # panoptic: the category ids that are stuff (merged per class by the post-processing); others are things
    stuff_category_ids: list[int] = field(default_factory=list)
    # panoptic: queries whose best class scores above this are kept (the paper: 0.85; a model trained for
    # minutes may carry one chosen on held-out images, engine/panoptic_threshold.py)
    panoptic_threshold: float = 0.85
    # detection post-processing: a box overlapping a higher-scoring box of its class by more than this IoU
    # is dropped (class-wise NMS). None: the paper's post-processing, which has none (a trained DETR does
    # not repeat itself). A model trained for minutes can; train sets it when removing them raises the AP
    # on training images (engine/duplicates.py)
    duplicate_iou: float | None = None
    # detection post-processing: each query's this many best classes, each a detection with its own
    # probability. 1: the paper's (each query's best class). A model trained for minutes often ranks an
    # object's class second; train raises it when that raises the AP on training images (engine/duplicates.py)
    classes_per_query: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __post_init__(self) -> None:
        if not self.category_ids:
            self.category_ids = list(range(len(self.class_names)))
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(
                f"ModelConfig: {len(self.class_names)} class names but {len(self.category_ids)} category ids"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError("ModelConfig: category ids must be unique")
        _check_choice(self, "backbone", ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
        _check_choice(self, "position_embedding", ("sine", "learned"))
        _check_choice(self, "backbone_norm", ("frozen", "batch"))
        _check_choice(self, "queries_at", ("attention", "input"))
        _check_numbers(self, {"hidden_dim": (1, False), "nheads": (1, False), "enc_layers": (0, False),
                              "dec_layers": (1, False), "dim_feedforward": (1, False), "dropout": (0, False),
                              "num_queries": (1, False), "image_size": (1, False), "max_image_size": (1, False)})
        _check(type(self).__name__, "dropout", self.dropout < 1, "below 1", self.dropout)
        t = self.panoptic_threshold
        _check(type(self).__name__, "panoptic_threshold", isinstance(t, (int, float)) and not isinstance(t, bool)
               and 0 <= t < 1, "a number in [0, 1)", t)
        d = self.duplicate_iou
        _check(type(self).__name__, "duplicate_iou", d is None or (isinstance(d, (int, float))
               and not isinstance(d, bool) and 0 < d <= 1), "a number in (0, 1] or null", d)
        k = self.classes_per_query
        _check(type(self).__name__, "classes_per_query", isinstance(k, int) and not isinstance(k, bool) and k >= 1,
               "a whole number >= 1", k)
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")

    def with_classes(self, class_names: list[str], category_ids: list[int] | None = None) -> "ModelConfig":
        return dataclasses.replace(self, class_names=list(class_names), category_ids=list(category_ids or []))


    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class TrainConfig(_DictIO):
    """A training run. Defaults are the paper's recipe (lr 1e-4, backbone 1e-5, batch 2 per GPU, AdamW)."""

    # fit_switches (2026-12-06): the fit no longer changes switches, so the field went
    _retired: ClassVar[frozenset[str]] = frozenset({"fit_switches"})

    # AdamW learning rates of the transformer and heads, and of the backbone (<= 0: frozen)
    lr: float = 1e-4; lr_backbone: float = 1e-5  # noqa: E702
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 300
    max_steps: int | None = None
    max_minutes: float | None = None
    """the budget: epochs, optimizer steps and minutes, whichever ends first"""
    # with max_minutes: end the lr schedule when the time does, not when the epochs would. The step count
    # that fits is measured after warmup and re-measured after each evaluation (never above the epoch
    # budget), so a slower machine gets a shorter but complete schedule instead of being cut mid-way
    fit_schedule_to_time: bool = False
    schedule: str = "step"  # "step" or "cosine"
    lr_drop_epoch: int = 200
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    accumulate: int = 1
    """micro-batches of batch_size per optimizer step"""
    # "none", "bf16" (autocast) or "auto": bf16 where the hardware multiplies it natively (CUDA with bf16,
    # CPUs with AMX or AVX-512 bf16), else float32 -- on an AVX2-only CPU bf16 is emulated and ~15x slower than float32
    amp: str = "none"
    ema_decay: float | None = None
    # losses (paper defaults): the Hungarian matcher's costs, the loss weights, "no object"'s class weight
    set_cost_class: float = 1.0; set_cost_bbox: float = 5.0; set_cost_giou: float = 2.0  # noqa: E702
    ce_loss_coef: float = 1.0; bbox_loss_coef: float = 5.0; giou_loss_coef: float = 2.0  # noqa: E702
    eos_coef: float = 0.1
    # convergence switches, training-only (engine/convergence.py): the trained model has the paper's
    # state-dict keys and inference graph. Off in the paper presets.
    dn_groups: int = 0  # denoising query groups (DN-DETR): noised ground truth as extra decoder queries
    dn_box_noise: float = 0.4  # box noise: centre moved by up to this x half the size, size scaled by 1 +- this
    dn_label_noise: float = 0.2  # share of denoising queries given a random class
    dn_negatives: bool = False  # contrastive denoising (DINO): a more noised copy of each box answers "no object"
    dn_loss_coef: float = 1.0  # weight of the denoising losses (ce, L1, GIoU with the usual weights) in the total
    # the denoising part's size, at most this x num_queries queries: crowded images get fewer groups (as
    # DINO's fixed denoising budget), so the decoder's cost stays bounded; one group at least
    dn_query_budget: float = 2.0
    query_groups: int = 1  # Group DETR: this many query sets at training time, one-to-one matching in each
    iou_aware: bool = False  # class target of a matched query = IoU of its box (the rest to "no object")
    # hybrid layers (H-DETR): the decoder layers before the last match each target this many times (1 = off)
    one_to_many: int = 1
    # guided cross-attention: each matched query's cross-attention (mean over heads, every decoder layer) is
    # taught to put its mass on the feature cells inside its target box; weight in the total (0 = off)
    attn_guide_coef: float = 0.0
    # dense head on the encoder memory (Co-DETR's auxiliary head, training-only): each feature cell near
    # an object's centre predicts its class and box; weight of its losses in the total (0 = off)
    enc_aux_coef: float = 0.0
    # grow the input sizes and the query count to the training set when its objects are smaller than a
    # feature cell or more than the queries allow (engine/input_fit.py; only ever grows, never shrinks)
    fit_to_data: bool = False
    # data
    # each batch of one orientation (landscape or portrait) where the order allows: a batch is padded to its
    # widest and tallest member (engine/run_data.aspect_grouped); off: the sampler's order as it is
    aspect_batches: bool = True
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    hflip: bool = True
    num_workers: int = 2
    # backbone start (weights/imagenet.py): "imagenet" (torchvision's ImageNet weights, the paper's
    # start), "none", or a path to a ResNet state dict
    backbone_weights: str = "none"
    # backbone start when no pretrained weights can be had (engine/pretrain.py): classify the training
    # set's box crops for this many steps first (0: off, the backbone starts from random weights)
    pretrain_steps: int = 0
    pretrain_background: bool = True  # crops of background as one more class (one-class data still teaches)
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 64
    pretrain_crop_size: int = 64
    # > 0: each box crop is cut with its own margin on every side and the crop classifier also says
    # where the box lies in it (L1 on xyxy in [0,1], this weight): the features learn where the edges
    # are, not only what the object is (engine/pretrain.py); 0: class only
    pretrain_box_coef: float = 0.0
    # then (engine/dense_pretrain.py) this many steps on windows of the training images at the detector's
    # scale, each feature cell naming the object centred near it: features that carry the class where
    # the detector reads them (0: off). Also runs alone, from random weights, with pretrain_steps 0
    pretrain_dense_steps: int = 0
    pretrain_dense_lr: float = 3e-4
    # "always", or "weak": after the crop phase, only when a linear probe of its features finds they do
    # not name the objects at the cells (engine/feature_probe.py): the phase's minutes go where they pay
    pretrain_dense_when: str = "always"
    # frozen backbone only (lr_backbone <= 0): compute its features once for this many augmented views
    # of each training image instead of on every step (engine/feature_cache.py); 0: off
    cache_views: int = 0
    # a small training set gets more views (more augmentation where an epoch is a few steps): as many as
    # make at least this many cached images in all, up to MAX_VIEWS, within caching's share of the time
    cache_images: int = 0
    # bookkeeping
    # at the end of the run: remove duplicate boxes, then give each query more than its best class, where
    # each raises the AP on training images (engine/duplicates.py; the choices are saved in
    # ModelConfig.duplicate_iou and classes_per_query)
    check_duplicates: bool = True
    seed: int = 42
    checkpoint_every_steps: int | None = None
    checkpoint_every_epochs: int = 1  # 0: only at the end of the run and on SIGINT/SIGTERM
    eval_every_epochs: int = 1
    skip_bad: bool = True

    def __post_init__(self) -> None:
        """Reject bad values now, naming the field, rather than after the data is loaded."""
        _check_choice(self, "schedule", ("step", "cosine"))
        _check_choice(self, "amp", ("none", "bf16", "auto"))
        _check_numbers(self, {
            "lr": (0, False), "lr_backbone": (0, False), "weight_decay": (0, False), "batch_size": (1, False),
            "epochs": (1, False), "max_steps": (1, True), "max_minutes": (0, True), "lr_drop_epoch": (0, False),
            "warmup_steps": (0, False), "clip_max_norm": (0, False), "accumulate": (1, False),
            "ema_decay": (0, True), "set_cost_class": (0, False), "set_cost_bbox": (0, False),
            "set_cost_giou": (0, False), "ce_loss_coef": (0, False), "bbox_loss_coef": (0, False),
            "giou_loss_coef": (0, False), "eos_coef": (0, False), "train_max_size": (1, False),
            "num_workers": (0, False), "pretrain_steps": (0, False), "pretrain_lr": (0, False),
            "pretrain_dense_steps": (0, False), "pretrain_dense_lr": (0, False),
            "pretrain_batch_size": (1, False), "pretrain_crop_size": (1, False), "pretrain_box_coef": (0, False),
            "cache_views": (0, False), "cache_images": (0, False),
            "seed": (0, False), "checkpoint_every_steps": (0, True), "checkpoint_every_epochs": (0, False),
            "eval_every_epochs": (0, False), "dn_groups": (0, False), "dn_box_noise": (0, False),
            "dn_label_noise": (0, False), "dn_loss_coef": (0, False), "dn_query_budget": (0, False), "query_groups": (1, False),
            "one_to_many": (1, False), "attn_guide_coef": (0, False),
            "enc_aux_coef": (0, False)})
        _check("TrainConfig", "dn_label_noise", self.dn_label_noise <= 1, "at most 1", self.dn_label_noise)
        if not isinstance(self.backbone_weights, str) or not self.backbone_weights.strip():
            raise ValueError(f"TrainConfig.backbone_weights must be 'imagenet', 'none' or a path, got "
                             f"{self.backbone_weights!r}")
        if self.ema_decay is not None:
            _check("TrainConfig", "ema_decay", self.ema_decay < 1, "below 1 (or null: no EMA)", self.ema_decay)
        _check_sizes(self, "train_scales")
        _check_choice(self, "pretrain_dense_when", ("always", "weak"))
        _check_sizes(self, "crop_resize")
        _check_sizes(self, "crop_size", 2)
        if self.cache_views > 0 and self.lr_backbone > 0:
            raise ValueError("TrainConfig.cache_views needs a frozen backbone: set lr_backbone to 0 "
                             f"(got cache_views={self.cache_views}, lr_backbone={self.lr_backbone})")



@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig
    description: str


def _paper(backbone: str, dilation: bool) -> Preset:
    # the authors' start: torchvision's ImageNet weights
    return Preset(ModelConfig(backbone=backbone, dilation=dilation), TrainConfig(backbone_weights="imagenet"),
                  "as published")


PRESETS: dict[str, Preset] = {
    "detr-r50": _paper("resnet50", False),
    "detr-r50-dc5": _paper("resnet50", True),
    "detr-r101": _paper("resnet101", False),
    "detr-r101-dc5": _paper("resnet101", True),
    # Small presets that train on a 2-core CPU in minutes. Same architecture, narrower and shallower.
    "detr-tiny": Preset(
        ModelConfig(
            # 3 decoder layers: with the queries added at every layer and tgt starting at zero, the first
            # layer's self-attention sees positions only, so a 2-layer decoder has one layer to suppress
            # duplicates. Main job, 15 idle minutes on a 2-core Zen 4: AP 0.293 (AP50 0.594, 4126 steps)
            # against 0.242 (AP50 0.506, 3313 steps) with 2; AP 0.280 against 0.242 at step ~3000-3300
            backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=3,
            dim_feedforward=512, dropout=0.0, num_queries=20, image_size=144, max_image_size=224,
            queries_at="attention",  # the released DETR's decoder (exports to Hugging Face)
        ),
        TrainConfig(
            # the paper's two stages at CPU scale: a classification-pretrained backbone (here from the
            # training set's own box crops, no ImageNet offline), then DETR on top of it. The backbone
            # stays frozen (lr_backbone 0), so its features are computed once per view and each step
            # only runs the transformer: ~10x more steps per minute, which is what DETR needs.
            # epochs is the ceiling: under --max-minutes the cosine is fitted to the steps the time allows
            lr=1e-3, lr_backbone=0.0, weight_decay=1e-4, batch_size=32, epochs=60, schedule="cosine",
            warmup_steps=100, clip_max_norm=0.1, amp="auto", num_workers=1, eval_every_epochs=8,
            train_scales=[128, 144, 160], train_max_size=224, crop_resize=[112, 128], crop_size=[96, 128],
            pretrain_steps=300, cache_views=3, cache_images=3000, fit_schedule_to_time=True, fit_to_data=True,
            # the crop classifier also says where the box lies in its crop: BCCD, 15 idle float32 minutes,
            # AP50 0.524 against 0.461 the same hour without (red cells 0.598 against 0.424); main job AP
            # 0.381 and 0.361 against 0.368 (within the spread between runs)
            pretrain_box_coef=5.0,
            # cache_images 3000 (was 12000): a small set's views cost DETR steps; BCCD-RBC, 15 float32 minutes:
            # AP50 0.555 with 15 views (2419 steps) against 0.459 with 41 (1766 steps)
            # dense pretraining (engine/dense_pretrain.py) only where the crop features name little at the cells
            # (a linear probe decides, engine/feature_probe.py): in 15 float32 minutes its time costs DETR more
            # steps than it saves on the main job (AP 0.253 / 0.275 with 175 / 267 dense steps, 0.306 without)
            # and BCCD (0.049 at 447 steps), whose crop features the probe finds good; on hard they name
            # nothing (AP50 0.003) and 400 dense steps gave 0.21. Where it runs it gets 1000 steps at 1e-3 (its
            # 3.8-min share): on hard (AMX Xeon, 15 min) the probe's class accuracy 58% against 47% after 400
            # steps at 3e-4, and AP50 0.441 against 0.322 from fewer DETR steps (1577 against 1862)
            pretrain_dense_steps=1000, pretrain_dense_lr=1e-3, pretrain_dense_when="weak",
            # training-only convergence switch (engine/convergence.py): the decoder also learns from noised
            # ground truth; inference and the weights stay plain DETR. Group queries (query_groups=3) doubled
            # the step time for no gain per minute: main job, 15 idle float32 minutes, AP50 0.267 with them
            # (1458 steps) against 0.303 without (2317 steps)
            dn_groups=4, query_groups=1,
            # the encoder head (Co-DETR's auxiliary head): main job, 15 min on one 2-core Xeon, AP 0.306 (AP50
            # 0.627) against 0.246 (0.529) without it; AP50 0.365 / 0.559 at steps 1000 / 2000 against 0.289 / 0.540
            enc_aux_coef=1.0,
            # guided cross-attention (attn_guide_coef) stays off: it bought nothing where the queries fit (main
            # job, a held-out one-class set), and on crowded images denoising without it did as well
            # (engine/input_fit.py)
        ),
        "ResNet-18 (pretrained to name and place boxes in crops of the training set, frozen), width 128, 2+3 layers, 20 queries, "
        "128-160 px, denoising queries and an encoder head in training: the CPU default of the main job",
    ),
    # detr-tiny for small objects: stride-16 features (DC5) at 224-288 px, so a 10 px object covers most
    # of a feature cell; 40 queries (BCCD has up to 28 cells per image). Each step and the feature
    # cache cost ~3-4x detr-tiny's.
    "detr-tiny-s16": Preset(
        ModelConfig(
            backbone="resnet18", dilation=True, hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2,
            dim_feedforward=512, dropout=0.0, num_queries=40, image_size=256, max_image_size=320,
        ),
        TrainConfig(
            lr=1e-3, lr_backbone=0.0, weight_decay=1e-4, batch_size=16, epochs=60, schedule="cosine",
            warmup_steps=100, clip_max_norm=0.1, amp="auto", num_workers=1, eval_every_epochs=8,
            train_scales=[224, 256, 288], train_max_size=352, crop_resize=[224, 256], crop_size=[192, 256],
            pretrain_steps=300, cache_views=2, cache_images=6000, fit_schedule_to_time=True, dn_groups=4, query_groups=1,
        ),
        "detr-tiny with stride-16 (DC5) features at 224-288 px and 40 queries: objects down to ~10 px",
    ),
    "detr-small": Preset(
        ModelConfig(
            backbone="resnet34", hidden_dim=192, nheads=8, enc_layers=3, dec_layers=3,
            dim_feedforward=768, dropout=0.1, num_queries=50, image_size=480, max_image_size=640,
        ),
        TrainConfig(
            lr=2e-4, lr_backbone=2e-5, batch_size=4, epochs=100, schedule="cosine", warmup_steps=100,
            amp="auto", train_scales=[384, 416, 448, 480, 512], train_max_size=640,
            crop_resize=[300, 400], crop_size=[256, 400],
        ),
        "ResNet-34, width 192, 3+3 layers, 50 queries",
    ),
}


def get_preset(name: str) -> Preset:
    """A deep copy of a named preset (so callers may mutate it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return Preset(
        ModelConfig.from_dict(p.model.to_dict()), TrainConfig.from_dict(p.train.to_dict()), p.description
    )


# ---- merging settings -------------------------------------------------------------------------------
def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _coerce(cls, name: str, value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it as the number it means."""
    kind = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(value, str) and "float" in str(kind):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, values: dict[str, Any],
                    source: str) -> tuple[ModelConfig, TrainConfig]:
    """Set fields by name ("lr", "model.hidden_dim", "train.epochs"); unknown names are an error."""
    m, t = model_cfg.to_dict(), train_cfg.to_dict()
    mf, tf = _fields(ModelConfig), _fields(TrainConfig)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ValueError(f"{source}: unknown section {section!r} in {key!r} (use model.* or train.*)")
        in_model, in_train = name in mf and section != "train", name in tf and section != "model"
        if in_model and in_train:
            raise ValueError(f"{source}: {name!r} is ambiguous; write model.{name} or train.{name}")
        if not (in_model or in_train):
            raise ValueError(f"{source}: unknown setting {key!r}; ModelConfig fields: {sorted(mf)}; "
                             f"TrainConfig fields: {sorted(tf)}")
        cls = ModelConfig if in_model else TrainConfig
        value = _coerce(cls, name, value)
        _check_type(cls, name, value, source)
        (m if in_model else t)[name] = value
    try:
        return ModelConfig.from_dict(m), TrainConfig.from_dict(t)
    except (TypeError, ValueError) as e:  # a value that contradicts another (hidden_dim vs nheads, ...)
        raise ValueError(f"{source}: {e}") from None


def _check_type(cls, name: str, value: Any, source: str) -> None:
    """A setting's value must have its field's type (an int for an int, a list for a list, ...)."""
    ftype = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if value is None:
        ok = "None" in ftype
    else:
        kinds = {"bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
                 "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                 "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                 "list": lambda v: isinstance(v, list)}
        bases = [o.strip().split("[")[0] for o in ftype.split("|")]
        ok = any(kinds.get(b, lambda v: True)(value) for b in bases if b != "None")
    if not ok:
        raise ValueError(f"{source}: {name} must be {ftype.replace('|', 'or')}, got {value!r}")


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """A JSON or YAML file -> (flat {key: value} with sections "model"/"train" as prefixes, its
    `preset:` or None). An unknown preset name is an error naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of settings, got {type(data).__name__}")
    preset = data.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "preset":
            flat[key] = value
    return flat, preset


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """["lr=1e-4", "train_scales=[224,256]"] -> {"lr": 1e-4, "train_scales": [224, 256]}."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: cannot parse the value ({e})") from None
    return out


def build_configs(preset: str | None = None, config_file: str | os.PathLike | None = None,
                  sets: list[str] | None = None, **flags: Any) -> tuple[ModelConfig, TrainConfig]:
    """preset -> config file -> `sets` -> explicit flags (None flags are ignored). The preset is the one
    given, else the config file's `preset:`, else DEFAULT_PRESET."""
    file_values, file_preset = load_config_file(config_file) if config_file else ({}, None)
    p = get_preset(preset or file_preset or DEFAULT_PRESET)
    m, t = apply_overrides(p.model, p.train, file_values, str(config_file))
    m, t = apply_overrides(m, t, parse_sets(sets), "--set")
    return apply_overrides(m, t, {k: v for k, v in flags.items() if v is not None}, "command line")
