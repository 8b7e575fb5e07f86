"""The authors' released `.pth` layout: `{"model": state_dict}`."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig
from .native import require_fit
from .safe_load import load_weights_only
from .coco_names import authors_class_names

# layer3 block count -> ResNet depth (bottleneck blocks have conv3, basic blocks do not)
_BOTTLENECK_DEPTH = {6: "resnet50", 23: "resnet101", 36: "resnet152"}
_BASIC_DEPTH = {2: "resnet18", 6: "resnet34"}


def from_authors_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' key names -> ours (only the backbone wrapper differs)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^backbone\.0\.body\.", "backbone.body.", k)
        k = re.sub(r"^backbone\.1\.", "position.", k)
        if k.endswith("num_batches_tracked"):
            continue
        out[k] = v
    return out


def to_authors_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^backbone\.body\.", "backbone.0.body.", k)
        k = re.sub(r"^position\.", "backbone.1.", k)
        out[k] = v
    return out


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: dict[str, torch.Tensor], dilation: bool = False) -> ModelConfig:
    """Rebuild the ModelConfig from an (our-key) state dict. DC5 is invisible in the weights: pass it."""
    n_layer3 = _count(sd, r"backbone\.body\.layer3\.(\d+)\.")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in sd
    depth = (_BOTTLENECK_DEPTH if bottleneck else _BASIC_DEPTH).get(n_layer3)
    if depth is None:
        raise ValueError(f"cannot tell the ResNet depth: layer3 has {n_layer3} blocks")
    num_logits, hidden = sd["class_embed.weight"].shape
    num_classes = num_logits - 1
    names = authors_class_names() if num_classes == 91 else [f"class_{i}" for i in range(num_classes)]
    return ModelConfig(
        backbone=depth,
        dilation=dilation,
        hidden_dim=hidden,
        nheads=8 if hidden % 8 == 0 else 1,
        enc_layers=_count(sd, r"transformer\.encoder\.layers\.(\d+)\."),
        dec_layers=_count(sd, r"transformer\.decoder\.layers\.(\d+)\."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0]
        if "transformer.encoder.layers.0.linear1.weight" in sd
        else sd["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_queries=sd["query_embed.weight"].shape[0],
        pre_norm="transformer.encoder.norm.weight" in sd,
        position_embedding="learned" if "position.row_embed.weight" in sd else "sine",
        class_names=names,
        category_ids=list(range(num_classes)),
    )


def read_pth(path: Path) -> tuple[dict, dict]:
    """(the whole file, its state dict of tensors) of an authors' `.pth` ({"model": state_dict}, or the
    bare dict), read without executing code; ValueError for a detrkit training checkpoint or anything else."""
    with open(path, "rb") as f:
        if f.read(13) == b"DETRKIT-CKPT ":
            raise ValueError(f"{path}: a detrkit training checkpoint, not model weights: use the run's "
                             "final/ or best/ folder (or `detrkit eval --weights` on the checkpoint)")
    ckpt = load_weights_only(path)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a DETR checkpoint (no state dict of tensors under 'model')")
    return ckpt, sd


def load_authors(path: str | Path, dilation: bool | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Load an authors' checkpoint without executing pickled code. DC5 is read from the file name
    (e.g. detr-r50-dc5-f0fb7ef5.pth) unless `dilation` says otherwise."""
    path = Path(path)
    ckpt, sd = read_pth(path)
    panoptic = "detr.class_embed.weight" in sd
    if panoptic:  # a panoptic checkpoint: the box detector inside it (weights/panoptic.py has the rest)
        sd = {k[len("detr."):]: v for k, v in sd.items() if k.startswith("detr.")}
    elif _is_native_layout(sd):
        return _native_in_pth(path, ckpt, sd)
    if "class_embed.weight" not in sd or not any(k.startswith("backbone.0.body.") for k in sd):
        raise ValueError(f"{path}: not a DETR checkpoint in the authors' layout (expected keys "
                         f"'backbone.0.body.*' and 'class_embed.weight'; found e.g. {sorted(sd)[:3]})")
    if dilation is None:
        dilation = "dc5" in path.name.lower()
    sd = from_authors_keys(sd)
    try:
        cfg = infer_config(sd, dilation)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: the authors' layout is incomplete, cannot rebuild the model ({e})") from None
    require_fit(path, sd, cfg)
    if panoptic:
        from .panoptic import infer_panoptic_config

        cfg = infer_panoptic_config({"detr." + k: v for k, v in sd.items()}, dilation)
    return sd, cfg


def _is_native_layout(sd: dict) -> bool:
    """detrkit's own key names: the backbone is 'backbone.body.*', not the authors' 'backbone.0.body.*'."""
    return any(k.startswith("backbone.body.") for k in sd) and not any(k.startswith("backbone.0.") for k in sd)


def _native_in_pth(path: Path, ckpt: dict, sd: dict) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """detrkit's state dict saved by hand. Its architecture is in the keys, but the input size, query
    mode and category ids are not: only a config saved beside it says them."""
    raw = next((ckpt[k] for k in ("model_cfg", "config") if isinstance(ckpt.get(k), dict)), None)
    if raw is None:
        raise ValueError(
            f"{path}: holds detrkit's own state dict (keys 'backbone.body.*'), not the authors' layout, and "
            "no config: its input size, query mode and category ids cannot be known, so it is not loaded. "
            "Save weights with Detector.save_pretrained(...) (or use a run's final/ or best/ folder), or "
            "store the config beside the weights: torch.save({'model': sd, 'model_cfg': cfg.to_dict()}, ...)")
    try:
        cfg = ModelConfig.from_dict(dict(raw))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the config stored with the state dict is not valid: {e}") from None
    require_fit(path, sd, cfg)
    return sd, cfg
