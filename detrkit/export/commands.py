"""`detrkit export onnx | hf`: write trained weights in other runtimes' formats."""
from __future__ import annotations

import argparse

from ..argtypes import positive_int


def _cmd_onnx(args: argparse.Namespace) -> int:
    from ..detector import Detector
    from .onnx import export_onnx, verify_onnx

    model = Detector.from_pretrained(args.weights).model  # the box detector, also of panoptic weights
    path = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {path}: inputs images [B,3,H,W] float32, mask [B,H,W] bool (True = padding); "
          f"outputs pred_logits, pred_boxes")
    if args.verify:
        err = verify_onnx(model, str(path))
        ok = err <= 1e-4
        print(f"ONNX Runtime vs PyTorch float32, batch 1 and 3 (mixed sizes): max abs diff {err:.2e} "
              f"({'ok' if ok else 'ABOVE 1e-4'})")
        return 0 if ok else 1
    return 0


def _cmd_hf(args: argparse.Namespace) -> int:
    from ..detector import Detector

    out = Detector.from_pretrained(args.weights).export_huggingface(args.out)
    print(f"wrote {out} (transformers: DetrForObjectDetection.from_pretrained({str(out)!r}))")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export weights to ONNX or Hugging Face transformers")
    sub = p.add_subparsers(dest="export_format", required=True)

    o = sub.add_parser("onnx", help="ONNX graph with dynamic batch/height/width and the padding mask as input")
    o.add_argument("--weights", required=True, help="native dir/.safetensors, authors' .pth, HF dir or a published name")
    o.add_argument("--out", required=True, help="output .onnx file")
    o.add_argument("--opset", type=positive_int, default=17)
    o.add_argument("--verify", action="store_true",
                   help="compare ONNX Runtime with PyTorch float32 at batch 1 and 3 (mixed sizes)")
    o.set_defaults(func=_cmd_onnx)

    h = sub.add_parser("hf", help="config.json + model.safetensors for transformers' DetrForObjectDetection")
    h.add_argument("--weights", required=True)
    h.add_argument("--out", required=True, help="output directory")
    h.set_defaults(func=_cmd_hf)
