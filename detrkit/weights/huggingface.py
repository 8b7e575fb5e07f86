"""Hugging Face `DetrForObjectDetection` layout: `config.json` + `model.safetensors` / `pytorch_model.bin`.

Reads both the layout published on the Hub (timm ResNet names under `backbone.conv_encoder.model`,
`out_proj`, `fc1`) and what current transformers holds in memory (`backbone.model`, `o_proj`,
`mlp.fc1`, or its own ResNet's `embedder`/`stages` names). Writes the published layout, which every
transformers version loads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from .authors import infer_config

_HF_RESNET = [  # transformers' own ResNet -> torchvision names
    (r"embedder\.embedder\.convolution\.", "conv1."),
    (r"embedder\.embedder\.normalization\.", "bn1."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]

# (our prefix, published HF prefix); {s} is encoder|decoder, {i} a layer index
_PAIRS = [
    ("position.row_embed.", "model.backbone.position_embedding.row_embeddings."),
    ("position.col_embed.", "model.backbone.position_embedding.column_embeddings."),
    ("input_proj.", "model.input_projection."),
    ("query_embed.", "model.query_position_embeddings."),
    ("transformer.decoder.norm.", "model.decoder.layernorm."),
    ("class_embed.", "class_labels_classifier."),
    ("bbox_embed.", "bbox_predictor."),
    ("backbone.body.", "model.backbone.conv_encoder.model."),
    ("transformer.{s}.layers.{i}.self_attn.out_proj.", "model.{s}.layers.{i}.self_attn.out_proj."),
    ("transformer.decoder.layers.{i}.multihead_attn.out_proj.", "model.decoder.layers.{i}.encoder_attn.out_proj."),
    ("transformer.{s}.layers.{i}.linear1.", "model.{s}.layers.{i}.fc1."),
    ("transformer.{s}.layers.{i}.linear2.", "model.{s}.layers.{i}.fc2."),
    ("transformer.encoder.layers.{i}.norm1.", "model.encoder.layers.{i}.self_attn_layer_norm."),
    ("transformer.encoder.layers.{i}.norm2.", "model.encoder.layers.{i}.final_layer_norm."),
    ("transformer.decoder.layers.{i}.norm1.", "model.decoder.layers.{i}.self_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.norm2.", "model.decoder.layers.{i}.encoder_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.norm3.", "model.decoder.layers.{i}.final_layer_norm."),
    # packed q/k/v (ours) <-> three projections (theirs); {p} is q|k|v, handled in the converters
    ("transformer.{s}.layers.{i}.self_attn.in_proj_", "model.{s}.layers.{i}.self_attn.{p}_proj."),
    ("transformer.decoder.layers.{i}.multihead_attn.in_proj_", "model.decoder.layers.{i}.encoder_attn.{p}_proj."),
]
_BODY_HF = "model.backbone.conv_encoder.model."
_FIELDS = {"s": r"(?P<s>encoder|decoder)", "i": r"(?P<i>\d+)", "p": r"(?P<p>[qkv])"}


def _regex(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{(\w)\\\}", lambda m: _FIELDS[m[1]], re.escape(template)))


_OURS_TO_HF = [(_regex(a), b) for a, b in _PAIRS]
_HF_TO_OURS = [(_regex(b), a) for a, b in _PAIRS]


def _rename(key: str, table: list) -> tuple[str, dict] | None:
    for rx, template in table:
        m = rx.match(key)
        if m:
            fields = m.groupdict()
            return template.format(**{**fields, "p": "{p}"}) + key[m.end():], fields
    return None


def _canonical_hf_key(key: str) -> str:
    """Any transformers DETR key -> the published layout's name."""
    key = key.replace("model.backbone.model.", _BODY_HF)  # transformers >= 5 in memory
    if key.startswith(_BODY_HF):
        body = key[len(_BODY_HF):]
        for pattern, repl in _HF_RESNET:
            body = re.sub("^" + pattern, repl, body)
        key = _BODY_HF + body
    key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")
    return re.sub(r"^model\.position_embedding\.", "model.backbone.position_embedding.", key)


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the published Hugging Face layout (q/k/v split)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        renamed = _rename(key, _OURS_TO_HF)
        if renamed is None:
            raise KeyError(f"no Hugging Face name for parameter {key!r}")
        name, _ = renamed
        if "{p}" in name:  # in_proj_weight / in_proj_bias -> q, k, v
            for p, part in zip("qkv", value.chunk(3)):
                out[name.format(p=p)] = part.clone()
        else:
            out[name] = value
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face DETR state dict (any layout above) -> ours."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        renamed = _rename(_canonical_hf_key(key), _HF_TO_OURS)
        if renamed is None:
            raise KeyError(f"unrecognised Hugging Face DETR parameter {key!r}")
        name, fields = renamed
        if "p" in fields:
            qkv.setdefault(name, {})[fields["p"]] = value
        else:
            out[name] = value
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"incomplete q/k/v projections for {name}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def is_huggingface_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "config.json").exists():
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "detr"
    except (OSError, json.JSONDecodeError):
        return False


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face model directory -> (its config.json, its raw state dict); safetensors preferred,
    a .bin read with weights_only."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").exists():
        return hf_cfg, load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return hf_cfg, torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def load_huggingface(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a Hugging Face DETR directory (safetensors preferred; .bin read with weights_only)."""
    hf_cfg, hf_sd = read_hf_dir(path)
    sd = from_hf_state_dict(hf_sd)
    base = infer_config(sd, dilation=bool(hf_cfg.get("dilation", False)))
    num_classes = base.num_classes
    id2label = {int(k): v for k, v in (hf_cfg.get("id2label") or {}).items()}
    names = [id2label.get(i, "N/A") for i in range(num_classes)] if id2label else base.class_names
    cfg = ModelConfig.from_dict({
        **base.to_dict(),
        "nheads": hf_cfg.get("encoder_attention_heads", 8),
        "dropout": hf_cfg.get("dropout", 0.1),
        "aux_loss": True,
        "class_names": names,
        "category_ids": hf_cfg.get("detrkit_category_ids") or list(range(num_classes)),
        **({"image_size": hf_cfg["detrkit_image_size"], "max_image_size": hf_cfg["detrkit_max_image_size"]}
           if "detrkit_image_size" in hf_cfg else {}),
        "duplicate_iou": hf_cfg.get("detrkit_duplicate_iou"),
        "classes_per_query": hf_cfg.get("detrkit_classes_per_query", 1),
    })
    if hf_cfg.get("position_embedding_type", "sine") != cfg.position_embedding:
        raise ValueError(f"{path}: position_embedding_type {hf_cfg.get('position_embedding_type')!r} "
                         "does not match the weights")
    return sd, cfg


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' DetrForObjectDetection (timm ResNet backbone)."""
    if cfg.pre_norm:
        raise ValueError("transformers' DETR has no pre-norm variant; this model cannot be exported to it")
    if cfg.queries_at != "attention":
        raise ValueError("transformers' DETR adds the object queries in every attention (queries_at='attention'); "
                         f"this model has queries_at={cfg.queries_at!r} and cannot be exported to it")
    id2label = {str(i): n for i, n in enumerate(cfg.class_names)}
    return {
        "architectures": ["DetrForObjectDetection"], "model_type": "detr", "is_encoder_decoder": True,
        "use_timm_backbone": True, "backbone": cfg.backbone, "use_pretrained_backbone": False,
        "dilation": cfg.dilation, "num_channels": 3, "d_model": cfg.hidden_dim,
        "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.dec_layers,
        "encoder_attention_heads": cfg.nheads, "decoder_attention_heads": cfg.nheads,
        "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
        "num_queries": cfg.num_queries, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
        "activation_dropout": cfg.dropout, "activation_function": "relu",
        "position_embedding_type": cfg.position_embedding, "auxiliary_loss": cfg.aux_loss,
        "id2label": id2label, "label2id": {n: int(i) for i, n in id2label.items()},
        "detrkit_category_ids": cfg.category_ids, "detrkit_image_size": cfg.image_size,
        "detrkit_max_image_size": cfg.max_image_size, "detrkit_duplicate_iou": cfg.duplicate_iou,
        "detrkit_classes_per_query": cfg.classes_per_query,
    }


def save_huggingface(sd: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors that DetrForObjectDetection.from_pretrained loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(sd).items()}
    save_file(hf_sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    return out_dir
