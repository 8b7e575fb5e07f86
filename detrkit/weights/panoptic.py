"""Weights of the panoptic model (`DETRSegmentation`): the authors' layout and Hugging Face's.

Our state dict: the detector under `detr.` (its own key names, see authors.py), the mask head under
`bbox_attention.` and `mask_head.` (the authors' names). So:
  * the authors' released panoptic files differ only inside `detr.` (`backbone.0.body` etc.);
  * Hugging Face `DetrForSegmentation` keeps the detector under `detr.` in its detection layout and
    the head under the authors' names when published (`mask_head.lay1`), or its in-memory names
    (`mask_head.conv1.conv`, `fpn_stages.0.fpn_adapter`, `q_proj`) in current transformers.
A state dict is panoptic when it has mask-head keys; `detector_part` gives the plain box detector.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from . import authors, huggingface
from .native import require_fit
from .coco_names import COCO_CATEGORIES

DETR_PREFIX = "detr."
HEAD_PREFIXES = ("bbox_attention.", "mask_head.")
AUTHORS_NUM_CLASSES = 250  # the released panoptic models: 250 logits + no-object, index = COCO panoptic id

# current transformers' head names -> the published (authors') ones
_HF_HEAD = [
    (r"bbox_attention\.q_proj\.", "bbox_attention.q_linear."),
    (r"bbox_attention\.k_proj\.", "bbox_attention.k_linear."),
    (r"mask_head\.conv1\.conv\.", "mask_head.lay1."), (r"mask_head\.conv1\.norm\.", "mask_head.gn1."),
    (r"mask_head\.conv2\.conv\.", "mask_head.lay2."), (r"mask_head\.conv2\.norm\.", "mask_head.gn2."),
    (r"mask_head\.fpn_stages\.(\d)\.fpn_adapter\.", lambda m: f"mask_head.adapter{int(m[1]) + 1}."),
    (r"mask_head\.fpn_stages\.(\d)\.refine\.conv\.", lambda m: f"mask_head.lay{int(m[1]) + 3}."),
    (r"mask_head\.fpn_stages\.(\d)\.refine\.norm\.", lambda m: f"mask_head.gn{int(m[1]) + 3}."),
    (r"mask_head\.output_conv\.", "mask_head.out_lay."),
]

# COCO panoptic stuff categories (ids 92..200, "merged" classes included): with the 80 things of
# COCO_CATEGORIES these are the 133 categories the released panoptic models predict
COCO_PANOPTIC_STUFF: dict[int, str] = {
    92: "banner", 93: "blanket", 95: "bridge", 100: "cardboard", 107: "counter", 109: "curtain",
    112: "door-stuff", 118: "floor-wood", 119: "flower", 122: "fruit", 125: "gravel", 128: "house",
    130: "light", 133: "mirror-stuff", 138: "net", 141: "pillow", 144: "platform", 145: "playingfield",
    147: "railroad", 148: "river", 149: "road", 151: "roof", 154: "sand", 155: "sea", 156: "shelf",
    159: "snow", 161: "stairs", 166: "tent", 168: "towel", 171: "wall-brick", 175: "wall-stone",
    176: "wall-tile", 177: "wall-wood", 178: "water-other", 180: "window-blind", 181: "window-other",
    184: "tree-merged", 185: "fence-merged", 186: "ceiling-merged", 187: "sky-other-merged",
    188: "cabinet-merged", 189: "table-merged", 190: "floor-other-merged", 191: "pavement-merged",
    192: "mountain-merged", 193: "grass-merged", 194: "dirt-merged", 195: "paper-merged",
    196: "food-other-merged", 197: "building-other-merged", 198: "rock-merged", 199: "wall-other-merged",
    200: "rug-merged",
}


def is_panoptic(sd: dict) -> bool:
    return any(k.startswith(HEAD_PREFIXES) for k in sd)


def detector_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The box detector's weights (our keys, `detr.` removed) from a panoptic state dict."""
    return {k[len(DETR_PREFIX):]: v for k, v in sd.items() if k.startswith(DETR_PREFIX)}


def _split(sd: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    detr, head = {}, {}
    for k, v in sd.items():
        if k.startswith(DETR_PREFIX):
            detr[k[len(DETR_PREFIX):]] = v
        elif k.startswith(HEAD_PREFIXES):
            head[k] = v
        else:
            raise KeyError(f"{where}: unexpected panoptic parameter {k!r} (neither detr.* nor a mask-head key)")
    return detr, head


def _with_prefix(detr: dict, head: dict) -> dict[str, torch.Tensor]:
    return {**{DETR_PREFIX + k: v for k, v in detr.items()}, **head}


# ---- the authors' layout ---------------------------------------------------------------------

def from_authors_panoptic(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    detr, head = _split(sd, "authors' panoptic checkpoint")
    return _with_prefix(authors.from_authors_keys(detr), head)


def to_authors_panoptic(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    detr, head = _split(sd, "panoptic state dict")
    return _with_prefix(authors.to_authors_keys(detr), head)


def panoptic_class_names() -> tuple[list[str], list[int]]:
    """Names of the released models' 250 classes (index = COCO panoptic id; "N/A" for unused ids),
    and the stuff category ids."""
    names = {**COCO_CATEGORIES, **COCO_PANOPTIC_STUFF}
    return [names.get(i, "N/A") for i in range(AUTHORS_NUM_CLASSES)], sorted(COCO_PANOPTIC_STUFF)


def infer_panoptic_config(sd: dict[str, torch.Tensor], dilation: bool = False) -> ModelConfig:
    """ModelConfig of a panoptic state dict (our keys); the released 250-class layout gets COCO names."""
    cfg = authors.infer_config(detector_part(sd), dilation)
    if cfg.num_classes == AUTHORS_NUM_CLASSES:
        names, stuff = panoptic_class_names()
        cfg = cfg.with_classes(names, list(range(AUTHORS_NUM_CLASSES)))
        cfg.stuff_category_ids = stuff
    return cfg


def load_authors_panoptic(path: str | Path, dilation: bool | None = None
                          ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An authors' panoptic `.pth` ({"model": state_dict}) without executing pickled code."""
    path = Path(path)
    _, sd = authors.read_pth(path)
    if not isinstance(sd, dict) or "detr.class_embed.weight" not in sd or not is_panoptic(sd):
        raise ValueError(f"{path}: not a DETR panoptic checkpoint (no detr.class_embed.weight and mask head)")
    if dilation is None:
        dilation = "dc5" in path.name.lower()
    sd = from_authors_panoptic(sd)
    cfg = infer_panoptic_config(sd, dilation)
    require_fit(path, sd, cfg)
    return sd, cfg


# ---- Hugging Face DetrForSegmentation ----------------------------------------------------------

def _canonical_hf_head_key(key: str) -> str:
    for pattern, repl in _HF_HEAD:
        key = re.sub("^" + pattern, repl, key)
    return key


def to_hf_segmentation_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the published DetrForSegmentation layout (detr.model.*, mask_head.lay1, ...)."""
    detr, head = _split(sd, "panoptic state dict")
    return _with_prefix(huggingface.to_hf_state_dict(detr), head)


def from_hf_segmentation_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any DetrForSegmentation state dict (published or in-memory names) -> ours."""
    hf_sd = {_canonical_hf_head_key(k): v for k, v in hf_sd.items()}
    detr, head = _split(hf_sd, "Hugging Face DetrForSegmentation state dict")
    return _with_prefix(huggingface.from_hf_state_dict(detr), head)


def is_hf_segmentation_dir(path: str | Path) -> bool:
    path = Path(path)
    if not huggingface.is_huggingface_dir(path):
        return False
    cfg = json.loads((path / "config.json").read_text())
    return "DetrForSegmentation" in (cfg.get("architectures") or [])


def load_hf_segmentation(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A Hugging Face DetrForSegmentation directory (safetensors preferred; .bin with weights_only)."""
    hf_cfg, hf_sd = huggingface.read_hf_dir(path)
    sd = from_hf_segmentation_state_dict(hf_sd)
    base = authors.infer_config(detector_part(sd), dilation=bool(hf_cfg.get("dilation", False)))
    n = base.num_classes
    id2label = {int(k): v for k, v in (hf_cfg.get("id2label") or {}).items()}
    cfg = ModelConfig.from_dict({
        **base.to_dict(),
        "nheads": hf_cfg.get("encoder_attention_heads", 8),
        "dropout": hf_cfg.get("dropout", 0.1),
        "class_names": [id2label.get(i, "N/A") for i in range(n)] if id2label else base.class_names,
        "category_ids": hf_cfg.get("detrkit_category_ids") or list(range(n)),
        "stuff_category_ids": hf_cfg.get("detrkit_stuff_category_ids")
        or (panoptic_class_names()[1] if n == AUTHORS_NUM_CLASSES else []),
        "panoptic_threshold": hf_cfg.get("detrkit_panoptic_threshold", ModelConfig.panoptic_threshold),
        **({"image_size": hf_cfg["detrkit_image_size"], "max_image_size": hf_cfg["detrkit_max_image_size"]}
           if "detrkit_image_size" in hf_cfg else {}),
    })
    return sd, cfg


def save_hf_segmentation(sd: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path) -> Path:
    """config.json + model.safetensors that DetrForSegmentation.from_pretrained loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: v.detach().cpu().contiguous() for k, v in to_hf_segmentation_state_dict(sd).items()}
    save_file(hf_sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {**huggingface.hf_config(cfg), "architectures": ["DetrForSegmentation"],
              "detrkit_stuff_category_ids": cfg.stuff_category_ids, "detrkit_panoptic_threshold": cfg.panoptic_threshold}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_panoptic_weights(source: str | Path, dilation: bool | None = None
                          ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Panoptic weights from a published name, an authors' .pth, a Hugging Face DetrForSegmentation
    directory or a native file/directory; a box detector's weights come back as they are (no mask-head
    keys: `is_panoptic` is False and the caller adds a fresh head)."""
    from . import hub, native

    if isinstance(source, str) and source in hub.PUBLISHED and not Path(source).exists():
        path = hub.published_path(source)
        dil = ("dc5" in source) if dilation is None else dilation
        if "panoptic" in source:
            return load_authors_panoptic(path, dilation=dil)
        return authors.load_authors(path, dilation=dil)
    path = Path(source)
    if path.is_dir() and is_hf_segmentation_dir(path):
        return load_hf_segmentation(path)
    if path.is_file() and path.suffix not in (".safetensors",) and not native.is_native(path):
        try:
            return load_authors_panoptic(path, dilation)
        except ValueError:
            pass  # a detector checkpoint: the generic loader below reads it
    from .load import load_weights

    sd, cfg = load_weights(source, dilation=dilation)
    if is_panoptic(sd) and cfg.num_classes == AUTHORS_NUM_CLASSES and not cfg.stuff_category_ids:
        cfg.stuff_category_ids = panoptic_class_names()[1]
    return sd, cfg
