"""The authors' released `.pth` layout: `{"model": state_dict}`."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig
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


def read_state_dict(path: Path) -> dict | None:
    """The state dict of an authors' `.pth` ({"model": state_dict}, or the bare dict), read with
    weights_only (no code executed); None when the file holds something else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign pickles
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from e
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None


def load_authors(path: str | Path, dilation: bool | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Load an authors' checkpoint without executing pickled code. DC5 is read from the file name
    (e.g. detr-r50-dc5-f0fb7ef5.pth) unless `dilation` says otherwise."""
    path = Path(path)
    sd = read_state_dict(path)
    panoptic = isinstance(sd, dict) and "detr.class_embed.weight" in sd
    if panoptic:  # a panoptic checkpoint: the box detector inside it (weights/panoptic.py has the rest)
        sd = {k[len("detr."):]: v for k, v in sd.items() if k.startswith("detr.")}
    if not isinstance(sd, dict) or "class_embed.weight" not in sd:
        raise ValueError(f"{path}: not a DETR checkpoint (no class_embed.weight in its state dict)")
    if dilation is None:
        dilation = "dc5" in path.name.lower()
    sd = from_authors_keys(sd)
    cfg = infer_config(sd, dilation)
    if panoptic:
        from .panoptic import infer_panoptic_config

        cfg = infer_panoptic_config({"detr." + k: v for k, v in sd.items()}, dilation)
    return sd, cfg
