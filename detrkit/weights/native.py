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
    where = path / CONFIG_NAME if path.is_dir() else weights
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config: {e}") from None
    require_fit(where, state_dict, cfg)
    return state_dict, cfg


def require_fit(path: str | Path, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The tensors must be exactly those of the model `cfg` describes (names and shapes), else
    CheckpointError naming `path` and the first differences."""
    from ..model import build_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        if any(k.startswith("detr.") for k in sd):  # a panoptic model: the detector inside plus the mask head
            from ..model.segmentation import build_segmentation_model

            net = build_segmentation_model(cfg)
        else:
            net = build_model(cfg)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (config says {expected[k]})" for k in sorted(set(expected) & set(got))
             if expected[k] != got[k]]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise CheckpointError(f"{path}: the tensors do not fit the model its config describes ("
                              + "; ".join(parts) + ")")
