"""Any weights detrkit can use -> (state dict, ModelConfig): the one loader behind `Detector`,
`detrkit eval`, fine-tuning and the main job. Never unpickles code."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from . import authors, huggingface, hub, native
from .errors import CheckpointError

RUN_CHECKPOINT = "last.pt"
RUN_WEIGHTS = ("best", "final")  # a run folder's weights, in the order --weights RUN_DIR prefers them
_KIND_TEXT = {"published": "the authors' published checkpoint", "native": "detrkit weights",
              "huggingface": "Hugging Face DETR folder", "checkpoint": "training checkpoint",
              "authors": "the authors' checkpoint format"}

log = logging.getLogger(__name__)


def resolve_weights(source: str | os.PathLike) -> tuple[str, str | Path]:
    """What `source` names -> (kind, the name or file to read). kind: "published", "native", "huggingface",
    "checkpoint" (a training checkpoint .pt) or "authors". A run folder means its best/ (the best
    validation AP), else final/, else last.pt."""
    if isinstance(source, str) and source in hub.PUBLISHED and not Path(source).exists():
        return "published", source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder, and not a published model name "
                                f"({', '.join(sorted(hub.PUBLISHED))})")
    if path.is_dir():
        if native.is_native(path):
            return "native", path
        if huggingface.is_huggingface_dir(path):
            return "huggingface", path
        for name in RUN_WEIGHTS:  # a run folder
            if native.is_native(path / name):
                return "native", path / name
        if (path / RUN_CHECKPOINT).exists():
            return "checkpoint", path / RUN_CHECKPOINT
        raise CheckpointError(f"{path}: neither a run folder (best/, final/ or last.pt), a detrkit weights folder "
                              "(model.safetensors + config.json) nor a Hugging Face DETR folder (config.json with "
                              "model_type 'detr')")
    if path.suffix == ".safetensors":
        # the weights file of a native folder: its config is the config.json beside it
        return "native", path.parent if native.is_native(path.parent) and path.name == native.WEIGHTS_NAME else path
    if path.suffix == ".pt":
        return "checkpoint", path
    return "authors", path


def load_weights(source: str | os.PathLike, dilation: bool | None = None) -> tuple[dict[str, Tensor], ModelConfig]:
    """source: a published name (downloaded once), a run folder (its best/, else final/, else last.pt), a
    native folder / .safetensors, a Hugging Face DETR folder, an authors' .pth, or a training checkpoint
    (.pt: its EMA weights when it has them). The log says which file was read. dilation: for authors'
    files, whether the backbone is DC5 (None: from the published name, else no)."""
    kind, what = resolve_weights(source)
    if kind == "published":
        if dilation is None:
            dilation = "dc5" in str(what)
        what = hub.published_path(str(what))
    log.info("weights: %s (%s)", what, _KIND_TEXT[kind])
    if kind in ("native",):
        return native.load_native(what)
    if kind == "huggingface":
        return huggingface.load_huggingface(what)
    if kind == "checkpoint":
        return _load_run_checkpoint(Path(what))
    return authors.load_authors(Path(what), dilation=dilation)


def _load_run_checkpoint(path: Path) -> tuple[dict[str, Tensor], ModelConfig]:
    from ..engine.checkpoint import load_checkpoint  # the training checkpoint's own format

    state = load_checkpoint(path)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    return weights, ModelConfig.from_dict(state["model_cfg"])


def model_from_weights(state_dict: dict[str, Tensor], cfg: ModelConfig, source: object = "weights"):
    """A DETR (eval mode) built from `cfg` holding `state_dict`; every key must fit."""
    from ..model import build_model

    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    return model.eval()


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", dilation: bool | None = None):
    """-> (DETR in eval mode on `device` holding the weights of `source`, its ModelConfig)."""
    state_dict, cfg = load_weights(source, dilation)
    return model_from_weights(state_dict, cfg, source).to(device), cfg
