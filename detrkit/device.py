"""The device and the precision every command and API defaults to, and the options every command shares
(--device, --precision, --weights).

Nothing here imports torch until a value is resolved, so `detrkit --help` stays fast.
"""
from __future__ import annotations

PRECISIONS = ("auto", "float32", "bf16")
WEIGHTS_HELP = ("published name (detr-r50, ...), run folder (its best/, else final/, else last.pt), native folder or "
                ".safetensors, training checkpoint .pt, the authors' .pth, or a Hugging Face DETR folder")


def default_device() -> str:
    """"cuda" when a CUDA GPU is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(value: str) -> str:
    """"auto" -> `default_device()`; anything else as given (cpu, cuda, cuda:1, ...)."""
    return default_device() if value == "auto" else value


def add_device_argument(parser) -> None:
    """The --device option every command shares (argparse parser); "auto" is resolved when parsing."""
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="cpu, cuda, cuda:1, ... or auto: cuda when available, else cpu")


def add_precision_argument(parser, default: str, what: str) -> None:
    """The one --precision option (argparse parser). what: what it sets, for the help text."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help=f"{what}: float32, bf16 (bfloat16 autocast) or auto")


def amp_of(precision: str | None, device: str, preset_amp: str | None = None) -> str | None:
    """--precision -> the engine's amp setting ("none" / "bf16"). auto: `preset_amp` when given (training
    keeps its preset's choice), else bf16 where it is fast (see model.fuse.default_inference_dtype)."""
    if precision is None:
        return None
    if precision == "float32":
        return "none"
    if precision == "bf16":
        return "bf16"
    if preset_amp is not None:
        return preset_amp
    return resolve_amp("auto", device)


def resolve_amp(amp: str, device) -> str:
    """A TrainConfig.amp value -> "none" or "bf16" on this device ("auto": bf16 where it is native)."""
    if amp != "auto":
        return amp
    import torch

    from .model.fuse import default_inference_dtype

    return "bf16" if default_inference_dtype(device) == torch.bfloat16 else "none"
