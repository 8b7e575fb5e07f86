"""The backbone start: torchvision's ImageNet ResNet weights, a local file, or nothing.

`backbone_weights` (a TrainConfig field, `--backbone-weights`) is one of
  "imagenet"  torchvision's IMAGENET1K_V1 weights of the configured ResNet (what the authors' code
              starts from), fetched through torchvision's weight enum: its URL, its file name, its hash
              check, into torch hub's cache ($TORCH_HOME/hub/checkpoints). Offline with no cached file
              the error names the file and the folder to put it in;
  "none"      no weights (random init, or the self-pretraining fallback of engine/pretrain.py);
  a path      a torchvision ResNet state dict (.pth/.pt, loaded with weights_only) or .safetensors,
              optionally under a "model" / "state_dict" key and a "backbone.0.body." / "backbone.body."
              prefix (a detector checkpoint's backbone).
Batch norm statistics go into the frozen batch norm as they are (same buffer names); the
classifier (fc.*) and num_batches_tracked are dropped.
"""
from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

_PREFIXES = ("backbone.0.body.", "backbone.body.", "body.", "module.")


class BackboneWeightsError(RuntimeError):
    """The backbone weights cannot be had or do not fit; the message says what to do."""


def imagenet_weights(backbone: str):
    """torchvision's IMAGENET1K_V1 weight enum entry of a ResNet (the weights the authors started from)."""
    try:
        return torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
    except (ValueError, AttributeError, KeyError) as e:
        raise BackboneWeightsError(f"torchvision has no ImageNet weights for backbone {backbone!r}: {e}") from None


def imagenet_file(backbone: str) -> Path:
    """Where torch hub keeps (or will keep) the ImageNet weights file of `backbone`."""
    url = imagenet_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_state(backbone: str, progress: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The ImageNet state dict of `backbone` and its cached file: from the cache, else downloaded by
    torch hub with torchvision's hash check. Offline with no cached file: BackboneWeightsError."""
    weights = imagenet_weights(backbone)
    path = imagenet_file(backbone)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except (urllib.error.URLError, OSError, ConnectionError) as e:
        # one line: the command line shows errors as one
        raise BackboneWeightsError(
            f"the ImageNet weights of {backbone} are not in the cache and cannot be downloaded ({e}): put "
            f"{path.name} (from {weights.url}) at {path} ($TORCH_HOME/hub/checkpoints), or train with "
            f"--backbone-weights none or PATH") from None
    except RuntimeError as e:  # torch hub's hash mismatch on a fresh download
        raise BackboneWeightsError(f"{path}: the ImageNet weights of {backbone} failed torchvision's check: {e}") from None
    return state, path


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated or not a tensor file
        raise BackboneWeightsError(f"{path}: cannot read backbone weights ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneWeightsError(f"{path}: not a state dict of tensors")
    return state


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet state dict reduced to conv1..layer4 keys (prefix stripped, fc and num_batches_tracked dropped)."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def load_into_body(body: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a ResNet state dict into a `ResNetBody` (frozen or trainable batch norm); every key must fit."""
    state = backbone_state(state)
    own = body.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise BackboneWeightsError(
            f"{source}: does not fit the backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), shape mismatches {wrong[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_backbone_weights(body: nn.Module, backbone: str, spec: str, progress: bool = False) -> str:
    """Load `spec` ("imagenet" or a path) into `body`; returns what the backbone started from, in words."""
    if spec == "imagenet":
        state, path = load_imagenet_state(backbone, progress)
        load_into_body(body, state, str(path))
        return f"imagenet ({imagenet_weights(backbone)}, {path})"
    path = Path(spec)
    load_into_body(body, _read_file(path), str(path))
    return f"file ({path})"
