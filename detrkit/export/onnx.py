"""ONNX export of DETR with dynamic batch, height and width and the padding mask as an input.

The graph takes ``images [B,3,H,W]`` float32 (ImageNet-normalised, zero-padded bottom/right) and
``mask [B,H,W]`` bool (True on padding) and returns ``pred_logits [B,Q,C+1]`` and
``pred_boxes [B,Q,4]`` (cxcywh in [0,1] of each unpadded image), exactly what `DETR` returns for
the same padded batch. Frozen batch norms are folded into the convolutions before export.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..model.detr import as_batch, pad_images
from ..model.fuse import optimize_for_inference

logger = logging.getLogger(__name__)

INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
DEFAULT_OPSET = 17


class _ExportWrapper(nn.Module):
    """(images, mask) -> (pred_logits, pred_boxes): the tuple-returning face the exporter needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.from_features(self.model.features(images, mask))
        return out["pred_logits"], out["pred_boxes"]


def export_onnx(model: nn.Module, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                sample_size: tuple[int, int] = (320, 416), check: bool = True) -> Path:
    """Write `model` (a `DETR`) as an ONNX file with dynamic batch/height/width. -> the path.

    sample_size is the (H, W) of the tracing example; any size works at run time. check=True runs
    onnx's checker on the result.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fused = optimize_for_inference(model, dtype=torch.float32, channels_last=False, packed=False).model.cpu()
    wrapper = _ExportWrapper(fused).eval()
    h, w = sample_size
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, :, w - w // 4:] = True  # a padded example, so no branch specialises on "no padding"
    dynamic = {
        "images": {0: "batch", 2: "height", 3: "width"},
        "mask": {0: "batch", 1: "height", 2: "width"},
        "pred_logits": {0: "batch"},
        "pred_boxes": {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer notes
        torch.onnx.export(wrapper, (images, mask), str(out), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    if check:
        import onnx

        onnx.checker.check_model(str(out))
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


class OnnxDETR:
    """Run an exported DETR with ONNX Runtime.

    __call__(images: list of [3,H,W] tensors | padded [B,3,H,W], mask [B,H,W] | None)
    -> {"pred_logits": [B,Q,C+1], "pred_boxes": [B,Q,4]} float32 torch tensors.
    spin=False stops idle worker threads from busy-waiting (ONNX Runtime's default is to spin).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None, spin: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle threads sleep instead of busy-waiting: fairer to other work on shared cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: ONNX Runtime cannot load this file: {e}") from e
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ValueError(f"{path}: expected inputs {list(INPUT_NAMES)}, the file has {names}")

    def __call__(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        images, mask = as_batch(images, mask)
        feeds = {"images": np.ascontiguousarray(images.detach().cpu().float().numpy()),
                 "mask": np.ascontiguousarray(mask.detach().cpu().numpy().astype(bool))}
        logits, boxes = self.session.run(list(OUTPUT_NAMES), feeds)
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}


def verify_onnx(model: torch.nn.Module, path: str, sizes=((3, 480, 640), (3, 400, 520), (3, 352, 600))) -> float:
    """Largest |ONNX Runtime - PyTorch float32| over the outputs at batch 1 and a mixed-size batch of 3."""
    session = OnnxDETR(path)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in ([sizes[0]], list(sizes)):
        images, mask = pad_images([torch.randn(*s, generator=gen) for s in batch])
        with torch.no_grad():
            ref = model(images, mask)
        got = session(images, mask)
        for key in ("pred_logits", "pred_boxes"):
            worst = max(worst, (got[key] - ref[key]).abs().max().item())
    return worst
