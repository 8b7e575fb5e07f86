"""detrkit: DETR (DEtection TRansformer), faithful to the paper, fast, and pleasant on your own data.

The names below load on first use (PEP 562), so `import detrkit` and `detrkit --help` stay fast: torch
is imported only by what needs it.
"""
from __future__ import annotations

import os
import sys

if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    # How long an idle OpenMP thread spins before it sleeps (libgomp; read when torch loads OpenMP). Spinning
    # without end (the default) turns every barrier into lost time once the cores are shared: with a
    # DataLoader worker or a second job on a 2-core machine an evaluation took 3-10x longer. Sleeping at once
    # (OMP_WAIT_POLICY=passive, this module's choice until 2026-12) costs DETR's many small parallel regions
    # a wake-up each: on an idle 2-core Xeon a training step took 0.29 s against 0.19. A short spin keeps
    # both: 0.19 s idle; with both cores busy elsewhere 0.44 s a step (passive 0.57, unbounded 0.51) and a
    # 96-image evaluation 10 s (8.5, 14). A policy or spin count the user set is kept.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from .lazy import lazy_names
from .config import PRESETS, ModelConfig, TrainConfig, get_preset

_LAZY = {"Detector": ".detector", "DETR": ".model", "build_model": ".model", "Detections": ".postprocess"}

__all__ = ["DETR", "Detector", "Detections", "ModelConfig", "PRESETS", "TrainConfig", "build_model", "get_preset"]
__version__ = "0.1.0"


__getattr__ = lazy_names(__name__, _LAZY, globals())


def __dir__():
    return sorted(set(globals()) | set(__all__))
