"""Start training from published or trained weights on a dataset with other classes.

Everything but the class head loads; the head is re-initialised for the new classes. On request the
rows of classes whose names also exist in the checkpoint are kept (e.g. COCO "person" -> your "person"),
and so is the "no object" row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import build_model
from ..weights.load import load_weights

log = logging.getLogger(__name__)

_HEAD = ("class_embed.weight", "class_embed.bias")


@dataclass
class FinetuneInit:
    config: ModelConfig  # the checkpoint's architecture with the new classes
    state_dict: dict[str, torch.Tensor]  # loads into build_model(config) with no missing keys
    kept_classes: list[str] = field(default_factory=list)  # head rows carried over by name


def prepare_finetune(source: str | Path, class_names: list[str], category_ids: list[int] | None = None, *,
                     keep_class_names: bool = False, seed: int = 0) -> FinetuneInit:
    """Weights `source` (anything `weights.load.load_weights` takes) adapted to new classes."""
    sd, src_cfg = load_weights(source)
    cfg = src_cfg.with_classes(class_names, category_ids)
    return adapt_to_classes(sd, src_cfg, cfg, keep_class_names=keep_class_names, seed=seed)


def adapt_to_classes(sd: dict[str, torch.Tensor], src_cfg: ModelConfig, cfg: ModelConfig, *,
                     keep_class_names: bool = False, seed: int = 0) -> FinetuneInit:
    torch.manual_seed(seed)
    fresh = build_model(cfg).state_dict()
    out = {k: v for k, v in sd.items() if k not in _HEAD}
    w, b = fresh["class_embed.weight"].clone(), fresh["class_embed.bias"].clone()
    kept: list[str] = []
    if keep_class_names:
        src_rows = {name: i for i, name in enumerate(src_cfg.class_names) if name != "N/A"}
        for j, name in enumerate(cfg.class_names):
            if name in src_rows:
                w[j], b[j] = sd["class_embed.weight"][src_rows[name]], sd["class_embed.bias"][src_rows[name]]
                kept.append(name)
        w[-1], b[-1] = sd["class_embed.weight"][-1], sd["class_embed.bias"][-1]  # "no object"
    out["class_embed.weight"], out["class_embed.bias"] = w, b
    missing = set(fresh) - set(out)
    unexpected = set(out) - set(fresh)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {cfg.backbone}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    log.info("fine-tuning: class head re-initialised for %d classes%s", cfg.num_classes,
             f"; kept {len(kept)} by name: {kept}" if keep_class_names else "")
    return FinetuneInit(cfg, out, kept)
