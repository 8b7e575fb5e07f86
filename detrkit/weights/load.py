"""Any weights detrkit can use -> (state dict, ModelConfig): the one loader behind `Detector`,
`detrkit eval`, fine-tuning and the main job. Never unpickles code."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from . import authors, huggingface, hub, native
from .errors import CheckpointError

RUN_CHECKPOINT = "last.pt"


def load_weights(source: str | os.PathLike, dilation: bool | None = None) -> tuple[dict[str, Tensor], ModelConfig]:
    """source: a published name (downloaded once), a native folder / .safetensors, a Hugging Face DETR
    folder, an authors' .pth, a training checkpoint (.pt: its EMA weights when it has them), or a run
    folder holding only last.pt. dilation: for authors' files, whether the backbone is DC5 (None: from
    the published name, else no)."""
    if isinstance(source, str) and source in hub.PUBLISHED and not Path(source).exists():
        if dilation is None:
            dilation = "dc5" in source
        return authors.load_authors(hub.published_path(source), dilation=dilation)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory, and not a published model name "
                                f"({', '.join(sorted(hub.PUBLISHED))})")
    if path.is_dir():
        if native.is_native(path):
            return native.load_native(path)
        if huggingface.is_huggingface_dir(path):
            return huggingface.load_huggingface(path)
        if (path / RUN_CHECKPOINT).exists():
            return _load_run_checkpoint(path / RUN_CHECKPOINT)
        raise CheckpointError(f"{path}: neither a detrkit directory (model.safetensors + config.json), a run "
                              "folder (last.pt) nor a Hugging Face DETR directory (config.json with model_type 'detr')")
    if path.suffix == ".safetensors":
        return native.load_native(path)
    if path.suffix == ".pt":
        return _load_run_checkpoint(path)
    return authors.load_authors(path, dilation=dilation)


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
