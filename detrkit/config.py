"""Typed configuration shared by the Python API and the command line.

`ModelConfig` fully describes a network and travels with its weights (JSON beside the safetensors).
`TrainConfig` describes a training run. A named preset gives both.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class _DictIO:
    """to_dict / from_dict for a config dataclass; unknown keys are an error, not silently dropped."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
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
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    pre_norm: bool = False
    position_embedding: str = "sine"  # "sine" or "learned"
    queries_at: str = "attention"  # object queries added in every decoder attention, or "input" (paper Table 3)
    aux_loss: bool = True
    image_size: int = 800  # inference resize: shorter side
    max_image_size: int = 1333  # inference resize: longer side at most
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)

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
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}")
        if self.queries_at not in ("attention", "input"):
            raise ValueError(f"queries_at must be 'attention' or 'input', got {self.queries_at!r}")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")

    def with_classes(self, class_names: list[str], category_ids: list[int] | None = None) -> "ModelConfig":
        return dataclasses.replace(self, class_names=list(class_names), category_ids=list(category_ids or []))


    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class TrainConfig(_DictIO):
    """A training run. Defaults are the paper's recipe (reference section 8)."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 300
    max_steps: int | None = None
    max_minutes: float | None = None
    # with max_minutes: end the lr schedule when the time does, not when the epochs would. The step count
    # that fits is measured after warmup and re-measured after each evaluation (never above the epoch
    # budget), so a slower machine gets a shorter but complete schedule instead of being cut mid-way
    fit_schedule_to_time: bool = False
    schedule: str = "step"  # "step" or "cosine"
    lr_drop_epoch: int = 200
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    accumulate: int = 1
    amp: str = "none"  # "none" or "bf16"
    ema_decay: float | None = None
    # losses (paper defaults)
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1
    # convergence switches, training-only (engine/convergence.py): the trained model has the paper's
    # state-dict keys and inference graph. Off in the paper presets.
    dn_groups: int = 0  # denoising query groups (DN-DETR): noised ground truth as extra decoder queries
    dn_box_noise: float = 0.4  # box noise: centre moved by up to this x half the size, size scaled by 1 +- this
    dn_label_noise: float = 0.2  # share of denoising queries given a random class
    dn_loss_coef: float = 1.0  # weight of the denoising losses (ce, L1, GIoU with the usual weights) in the total
    query_groups: int = 1  # Group DETR: this many query sets at training time, one-to-one matching in each
    iou_aware: bool = False  # class target of a matched query = IoU of its box (the rest to "no object")
    # data
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
    # frozen backbone only (lr_backbone <= 0): compute its features once for this many augmented views
    # of each training image instead of on every step (engine/feature_cache.py); 0: off
    cache_views: int = 0
    # bookkeeping
    seed: int = 42
    checkpoint_every_steps: int | None = None
    checkpoint_every_epochs: int = 1  # 0: only at the end of the run and on SIGINT/SIGTERM
    eval_every_epochs: int = 1
    skip_bad: bool = True



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
            backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2,
            dim_feedforward=512, dropout=0.0, num_queries=20, image_size=144, max_image_size=224,
            queries_at="input",  # paper Table 3 variant: slots differ from the first step (lower loss at equal steps)
        ),
        TrainConfig(
            # the paper's two stages at CPU scale: a classification-pretrained backbone (here from the
            # training set's own box crops, no ImageNet offline), then DETR on top of it. The backbone
            # stays frozen (lr_backbone 0), so its features are computed once per view and each step
            # only runs the transformer: ~10x more steps per minute, which is what DETR needs.
            # epochs is the ceiling: under --max-minutes the cosine is fitted to the steps the time allows
            lr=1e-3, lr_backbone=0.0, weight_decay=1e-4, batch_size=32, epochs=60, schedule="cosine",
            warmup_steps=100, clip_max_norm=0.1, amp="bf16", num_workers=1, eval_every_epochs=8,
            train_scales=[128, 144, 160], train_max_size=224, crop_resize=[112, 128], crop_size=[96, 128],
            pretrain_steps=300, cache_views=3, fit_schedule_to_time=True,
        ),
        "ResNet-18 (pretrained on box crops, frozen), width 128, 2+2 layers, 20 queries, 128-160 px: "
        "the CPU default of the main job",
    ),
    "detr-small": Preset(
        ModelConfig(
            backbone="resnet34", hidden_dim=192, nheads=8, enc_layers=3, dec_layers=3,
            dim_feedforward=768, dropout=0.1, num_queries=50, image_size=480, max_image_size=640,
        ),
        TrainConfig(
            lr=2e-4, lr_backbone=2e-5, batch_size=4, epochs=100, schedule="cosine", warmup_steps=100,
            amp="bf16", train_scales=[384, 416, 448, 480, 512], train_max_size=640,
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
