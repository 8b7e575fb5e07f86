"""Training checkpoints: atomic writes, SHA-256 verified loads, fallback to the previous one.

File layout: a one-line header ``DETRKIT-CKPT 1 <sha256 of payload>\\n`` followed by the
``torch.save`` payload. A write goes to a temporary file that is fsynced, the current ``last.pt``
becomes ``last.prev.pt``, then the temporary file is renamed into place; a crash at any moment
leaves at least one complete, verifiable checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic
from ..weights.errors import CheckpointError

log = logging.getLogger(__name__)

MAGIC = b"DETRKIT-CKPT 1 "
LAST = "last.pt"
PREV = "last.prev.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: str | Path | None = None) -> None:
    """torch.save `state` into `path` with a checksum header, atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    header = MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
    write_atomic(path, header + body, keep_previous)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by `save_checkpoint`. Raises CheckpointError if damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a detrkit checkpoint (bad header; empty or overwritten file?)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CheckpointError(f"{path}: truncated checkpoint (header incomplete)")
    expected = data[len(MAGIC):end].decode("ascii", "replace")
    body = data[end + 1:]
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch (file truncated or corrupted: {len(body)} payload bytes, "
            f"sha256 {actual[:12]}... expected {expected[:12]}...)"
        )
    return torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)


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
        except Exception as e:  # unpickling a payload whose checksum matched should not fail, but say so
            log.warning("%s: cannot be loaded (%s); trying the previous checkpoint", path, e)
            errors.append(f"{path}: {e}")
            continue
        if name == PREV:
            log.warning("resuming from the previous checkpoint %s (the last one is damaged or missing)", path)
        return state, path
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(errors))
