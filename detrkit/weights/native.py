"""detrkit's own weight format: safetensors + the ModelConfig as JSON, with a checksum.

A directory holds `model.safetensors` and `config.json`; a single `.safetensors` file carries the
config in its metadata. Either way the SHA-256 of the tensors is recorded and verified on load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import write_atomic
from ..config import ModelConfig
from .errors import CheckpointError

FORMAT = "detrkit"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in sorted-key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): 0-dim tensors (batch norm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_native(path: str | Path) -> bool:
    path = Path(path)
    if path.is_dir():
        cfg = path / CONFIG_NAME
        if not (path / WEIGHTS_NAME).exists() or not cfg.exists():
            return False
        try:
            return json.loads(cfg.read_text()).get("format") == FORMAT
        except (OSError, json.JSONDecodeError):
            return False
    return path.suffix == ".safetensors"


def save_native(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: str | Path) -> Path:
    """Write weights + config. `path` is a directory, or a file ending in .safetensors. Atomic."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    digest = tensors_sha256(state_dict)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": digest, "model": cfg.to_dict()}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: save_file(state_dict, str(p), metadata={"detrkit": json.dumps(meta)}))
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_NAME, lambda p: save_file(state_dict, str(p), metadata={"format": "pt"}))
    write_atomic(path / CONFIG_NAME, json.dumps(meta, indent=2))
    return path


def load_native(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read weights + config written by `save_native`; verifies the checksum."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(f"{weights}: no such weights file")
    try:
        state_dict = load_file(str(weights))
        if path.is_dir():
            meta = json.loads((path / CONFIG_NAME).read_text())
        else:
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                raw = (f.metadata() or {}).get("detrkit")
            if raw is None:
                raise CheckpointError(f"{weights}: safetensors file without a detrkit config in its metadata")
            meta = json.loads(raw)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{weights}: unreadable or damaged weights ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a detrkit checkpoint (format={meta.get('format')!r})")
    expected = meta.get("sha256")
    if expected and tensors_sha256(state_dict) != expected:
        raise CheckpointError(f"{weights}: checksum mismatch, the file is damaged")
    return state_dict, ModelConfig.from_dict(meta["model"])
