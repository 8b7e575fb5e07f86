"""Training checkpoints that cannot carry code: atomic writes, SHA-256 verified loads, fallback.

File layout: a one-line header ``DETRKIT-CKPT 2 <sha256 of payload>\\n`` followed by a safetensors
payload. The state's tensors are the safetensors entries; everything else (config, step counters,
sampler order, metrics, RNG states) is JSON in the safetensors metadata, with each tensor replaced by
``{"__tensor__": name}``. Tuples, non-string dict keys and numpy arrays (the RNG states) are spelled
out in JSON so they round-trip exactly. Reading never unpickles anything.

Format 1 (a ``torch.save`` pickle) is read only through ``torch.load(weights_only=True)`` with numpy
arrays allowed; a file that needs anything else is refused, never unpickled.

A write goes to a temporary file that is fsynced, the current ``last.pt`` becomes ``last.prev.pt``,
then the temporary file is renamed into place; a crash at any moment leaves at least one complete,
verifiable checkpoint, and a failed write (a full disk) leaves no temporary file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from ..atomic import DiskFullError, write_atomic  # noqa: F401  (DiskFullError: raised from here too)
from ..weights.errors import CheckpointError
from ..weights.safe_load import UnsafePickleError, load_weights_only

log = logging.getLogger(__name__)

MAGIC_PREFIX = b"DETRKIT-CKPT "
VERSION = 2
MAGIC = MAGIC_PREFIX + f"{VERSION} ".encode()
LAST = "last.pt"
PREV = "last.prev.pt"
_META_KEY = "detrkit-checkpoint"


# ------------------------------------------------------------------------------ state <-> tensors + JSON
def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() == 0:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("numpy object arrays cannot be saved in a checkpoint")
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"cannot save a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, "
                    "lists, tuples, dicts and numpy arrays only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def encode_state(state: dict[str, Any]) -> bytes:
    """A state dict of tensors, numbers, strings, lists, tuples, dicts and numpy arrays -> safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, set())
    return st_save(tensors, metadata={_META_KEY: json.dumps(tree)})


def decode_state(payload: bytes, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Inverse of `encode_state`. Raises ValueError if the bytes are not such a payload."""
    if len(payload) < 8:
        raise ValueError("payload too short")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > len(payload) - 8:
        raise ValueError("payload header length exceeds the file")
    try:
        header = json.loads(payload[8:8 + n])
        tree = json.loads(header["__metadata__"][_META_KEY])
        tensors = st_load(payload)
    except (ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"not a detrkit safetensors payload ({type(e).__name__}: {e})") from None
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"inconsistent payload ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------ files
def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: str | Path | None = None) -> None:
    """Write `state` into `path` (safetensors + JSON, checksum header), atomically."""
    body = encode_state(state)
    header = MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
    write_atomic(path, header + body, keep_previous)


def _load_format1(path: Path, body: bytes, map_location) -> dict[str, Any]:
    """A format-1 (pickle) checkpoint through the restricted unpickler only: tensors, containers,
    numbers, strings and numpy arrays (the RNG states); anything else is refused."""
    safe = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    safe.append(np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct)
    try:
        state = load_weights_only(body, path, map_location, safe)
    except UnsafePickleError as e:
        raise CheckpointError(
            f"{e}. It is an old-format (format 1, pickle) checkpoint and was not loaded: re-save it with "
            "this version of detrkit (resume it with the version that wrote it only if you trust the "
            "file), or start a new run from the run's exported weights (final/ or best/)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: old-format checkpoint does not hold a state dict")
    log.warning("%s: old checkpoint format 1, read through the safe loader; the next save writes format %d",
                path, VERSION)
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by `save_checkpoint`. Raises CheckpointError if damaged,
    of an unknown format, or not readable without running code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not data.startswith(MAGIC_PREFIX):
        raise CheckpointError(f"{path}: not a detrkit checkpoint (bad header; empty or overwritten file?)")
    end = data.find(b"\n", len(MAGIC_PREFIX))
    if end < 0 or end > 200:
        raise CheckpointError(f"{path}: truncated checkpoint (header incomplete)")
    version, _, expected = data[len(MAGIC_PREFIX):end].decode("ascii", "replace").partition(" ")
    if version not in ("1", str(VERSION)):
        raise CheckpointError(f"{path}: checkpoint format {version!r} is not known to this detrkit "
                              f"(it reads formats 1 and {VERSION}); re-save it with this version")
    body = data[end + 1:]
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch (file truncated or corrupted: {len(body)} payload bytes, "
            f"sha256 {actual[:12]}... expected {expected[:12]}...)"
        )
    if version == "1":
        return _load_format1(path, body, map_location)
    try:
        return decode_state(body, map_location)
    except (ValueError, KeyError, TypeError) as e:  # a payload whose structure and tensors disagree
        raise CheckpointError(f"{path}: damaged or foreign checkpoint payload ({e})") from None


def save_run_checkpoint(state: dict[str, Any], run_dir: str | Path) -> Path:
    """Save RUN_DIR/last.pt, keeping the one it replaces as RUN_DIR/last.prev.pt."""
    run_dir = Path(run_dir)
    path = run_dir / LAST
    save_checkpoint(state, path, keep_previous=run_dir / PREV)
    return path


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest good checkpoint of a run: last.pt, or last.prev.pt (with a warning) if last.pt is damaged."""
    run_dir = Path(run_dir)
    errors = []
    for name in (LAST, PREV):
        path = run_dir / name
        if not path.exists():
            errors.append(f"{path}: not found")
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
            errors.append(str(e))
            continue
        if name == PREV:
            log.warning("resuming from the previous checkpoint %s (the last one is damaged or missing)", path)
        return state, path
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(errors))
