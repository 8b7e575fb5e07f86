"""The one place detrkit reads PyTorch pickles: `torch.load(weights_only=True)`, never anything else.

A file that needs more than tensors, containers, numbers and strings (plus any explicitly listed safe
types) is refused with one line naming the file and what it asked for; nothing in it runs.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable


class UnsafePickleError(ValueError):
    """A PyTorch file that cannot be read without running code, or cannot be read at all."""


def _reason(e: Exception) -> str:
    """torch's multi-paragraph message -> its one informative line."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1]
        for line in rest.splitlines():
            line = line.strip()
            if line:
                return line.split(" Please use ", 1)[0][:200]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0][:200] if lines else type(e).__name__)


def load_weights_only(source: str | os.PathLike | bytes, name: str | os.PathLike | None = None,
                      map_location: Any = "cpu", safe_globals: Iterable = ()) -> Any:
    """torch.load(source, weights_only=True); `name` is the file named in errors (default: source)."""
    import torch

    name = Path(name if name is not None else source if not isinstance(source, bytes) else "<bytes>")
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UnsafePickleError(f"{name}: no such file") from None
    except Exception as e:  # the restricted unpickler raises UnpicklingError, RuntimeError, ...
        reason = _reason(e)
        what = ("it asks to run code or build objects other than tensors, which detrkit never does"
                if "Unsupported" in reason or "GLOBAL" in reason else "damaged or not a PyTorch file")
        raise UnsafePickleError(f"{name}: cannot be read safely ({what}: {reason})") from None
