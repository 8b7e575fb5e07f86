"""detrkit: DETR (DEtection TRansformer), faithful to the paper, fast, and pleasant on your own data.

The names below load on first use (PEP 562), so `import detrkit` and `detrkit --help` stay fast: torch
is imported only by what needs it.
"""
from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    # OpenMP threads that wait by spinning (libgomp's default) turn every barrier into lost time as soon
    # as the cores are shared -- a DataLoader worker, a second job, a busy laptop: on a 2-core machine with
    # other work, an evaluation took 10x longer (65 s instead of 6 s for coco128) and a training step 6x.
    # Sleeping waits cost a few microseconds per parallel region on an idle machine. It must be set before
    # torch loads OpenMP; OMP_WAIT_POLICY=active in the environment keeps spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from .lazy import lazy_names
from .config import PRESETS, ModelConfig, TrainConfig, get_preset

_LAZY = {"Detector": ".detector", "DETR": ".model", "build_model": ".model", "Detections": ".postprocess"}

__all__ = ["DETR", "Detector", "Detections", "ModelConfig", "PRESETS", "TrainConfig", "build_model", "get_preset"]
__version__ = "0.1.0"


__getattr__ = lazy_names(__name__, _LAZY, globals())


def __dir__():
    return sorted(set(globals()) | set(__all__))
