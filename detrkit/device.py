"""The device every command and API defaults to."""
from __future__ import annotations

import torch


def default_device() -> str:
    """"cuda" when a CUDA GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser) -> None:
    """The --device option every command shares (argparse parser)."""
    parser.add_argument("--device", default=default_device(),
                        help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
