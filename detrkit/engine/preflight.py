"""Warnings that save a run: settings that cannot fit the data, found before the first step.

`preflight_warnings(index, model_cfg, train_cfg, total_steps)` returns one sentence per problem, each
naming what was found and the setting that fixes it:
  * an image with more objects than the model has queries (DETR predicts at most one object per query);
  * objects smaller than one backbone feature cell at the model's input size (the encoder sees less than
    one token of them);
  * a learning-rate warmup longer than the run (the run never reaches the full learning rate);
  * a class without any box (its head row only ever learns "not me").
"""
from __future__ import annotations

import logging
import math
from collections import Counter

from ..config import ModelConfig, TrainConfig
from ..data.index import DatasetIndex
from ..data.transforms import resized_shape

log = logging.getLogger(__name__)

# share of the boxes below one feature cell from which the warning is worth a user's time
SMALL_SHARE = 0.05


def feature_stride(model_cfg: ModelConfig) -> int:
    """Pixels of the input image per feature cell of the backbone output (ResNet: 32, DC5: 16)."""
    stride = getattr(model_cfg, "feature_stride", None)
    if stride:
        return int(stride)
    return 16 if model_cfg.dilation else 32


def _image_sizes(index: DatasetIndex) -> dict[int, tuple[int, int]]:
    """(w, h) of each image: declared, else read from the file header (no decoding)."""
    from PIL import Image

    sizes = {}
    for im in index.images:
        if im.width and im.height:
            sizes[im.id] = (int(im.width), int(im.height))
            continue
        try:
            with Image.open(im.file) as f:
                sizes[im.id] = f.size
        except Exception:  # unreadable images are the data checker's business
            continue
    return sizes


def preflight_warnings(index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
                       total_steps: int | None = None) -> list[str]:
    """The problems of training `model_cfg` on `index` (see the module docstring), as sentences."""
    out: list[str] = []
    objects = [a for a in index.annotations if not a.iscrowd]
    files = {im.id: im.file for im in index.images}

    # ---- more objects than queries
    per_image = Counter(a.image_id for a in objects)
    q = model_cfg.num_queries
    crowded = {i: n for i, n in per_image.items() if n > q}
    if crowded:
        worst = max(crowded, key=crowded.get)
        out.append(f"{len(crowded)} of {len(index.images)} images have more objects than the model's {q} queries "
                   f"(up to {crowded[worst]} in {files.get(worst, worst)}); DETR finds at most {q} objects per "
                   f"image. Raise the query count: --set model.num_queries={queries_for(max(crowded.values()))}")

    # ---- objects smaller than a feature cell at the input size
    stride = feature_stride(model_cfg)
    sides = object_sides(index, model_cfg)
    measured, small = len(sides), sum(side < stride for side in sides)
    if measured and small / measured >= SMALL_SHARE:
        out.append(f"{small} of {measured} boxes ({100 * small / measured:.0f}%) are smaller than one feature cell "
                   f"({stride}x{stride} px) once the image is resized to the model's input size (shorter side "
                   f"{model_cfg.image_size} px); the model can hardly see them. Use a larger input size "
                   f"(--set model.image_size=... and train_scales)"
                   + ("" if model_cfg.dilation else " or a stride-16 (DC5) preset"))

    # ---- warmup longer than the run
    if train_cfg is not None and total_steps is not None and train_cfg.warmup_steps >= total_steps > 0:
        out.append(f"the learning-rate warmup ({train_cfg.warmup_steps} steps) is not shorter than the run "
                   f"({total_steps} steps): the full learning rate is never reached. Lower it (--set "
                   f"warmup_steps={max(0, total_steps // 10)}) or train longer")

    # ---- classes without boxes
    counts = Counter(a.category_id for a in objects)
    empty = [name for cid, name in index.categories if counts.get(cid, 0) == 0]
    if empty:
        out.append(f"{len(empty)} of {len(index.categories)} classes have no box in {index.source}: "
                   f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; the model cannot learn them "
                   "(add examples, or remove them from the class list)")
    return out


def queries_for(n: int) -> int:
    """A comfortable query count above n objects: the next multiple of 10 with 20% room."""
    return int(math.ceil(n * 1.2 / 10) * 10)


def object_sides(index: DatasetIndex, model_cfg: ModelConfig) -> list[float]:
    """sqrt(w * h) in pixels of each non-crowd box once its image is resized to the model's input size
    (boxes of images whose size cannot be read are left out)."""
    sizes = _image_sizes(index)
    sides = []
    for a in index.annotations:
        size = sizes.get(a.image_id)
        if a.iscrowd or size is None:
            continue
        w, h = size
        rh, rw = resized_shape(h, w, model_cfg.image_size, model_cfg.max_image_size)
        sides.append(math.sqrt(max(float(a.bbox[2]), 0.0) * max(float(a.bbox[3]), 0.0)) * rw / w)
    return sides


def dataset_warnings(index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[str]:
    """`preflight_warnings` before any run (`detrkit data check`), for the settings training will use
    (fitted to `index` when train_cfg.fit_to_data, which is said first): the run's length is the one
    its epochs and --max-steps give on all of `index`'s images (a schedule fitted to --max-minutes may
    be shorter)."""
    from .input_fit import fit_to_data
    from .state import Plan, RunState

    model_cfg, train_cfg, fitted = fit_to_data(index, model_cfg.with_classes(index.class_names,
                                                                             index.category_ids), train_cfg)
    total = RunState.fresh(Plan.of(len(index.images), train_cfg), train_cfg).total_steps
    return ([fitted] if fitted else []) + preflight_warnings(index, model_cfg, train_cfg, total)


def log_preflight(index: DatasetIndex, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
                  total_steps: int | None = None) -> list[str]:
    """`preflight_warnings`, each logged as a warning; returns them."""
    warnings = preflight_warnings(index, model_cfg, train_cfg, total_steps)
    for w in warnings:
        log.warning("%s", w)
    return warnings
