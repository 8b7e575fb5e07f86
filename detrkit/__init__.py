"""detrkit: DETR (DEtection TRansformer), faithful to the paper, fast, and pleasant on your own data.

The names below load on first use (PEP 562), so `import detrkit` and `detrkit --help` stay fast: torch
is imported only by what needs it.
"""
from __future__ import annotations

import importlib

from .config import PRESETS, ModelConfig, TrainConfig, get_preset

_LAZY = {"Detector": ".detector", "DETR": ".model", "build_model": ".model", "Detections": ".postprocess"}

__all__ = ["DETR", "Detector", "Detections", "ModelConfig", "PRESETS", "TrainConfig", "build_model", "get_preset"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'detrkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
