"""`detrkit bench`: one table of inference, training, matcher and COCO-evaluation speed.

Every timed row of a section is measured in the same process on the same inputs, interleaved
(round r runs every variant once before round r+1), so load from other processes hits all variants
alike; the table shows medians after warm-up. Inference compares detrkit float32, bf16 autocast,
ONNX Runtime and Hugging Face transformers' DETR loaded with the same weights (our exporter).
The share of the machine's matrix-multiply peak is the model's counted FLOPs per second divided by
the throughput of a large square matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .argtypes import non_negative_int, positive_int
from .device import add_device_argument

logger = logging.getLogger(__name__)

# coco128 (the photos of the inference and decode rows, the ground truth of the COCO row): --coco128,
# else $DETRKIT_COCO128, else ../shared/data/coco128 beside the checkout; rows that need it are
# skipped (noise images for inference) when it is absent
COCO128 = Path(os.environ.get("DETRKIT_COCO128", Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"))
INFER_SIZE = (800, 1066)


# ---- measurement primitives ------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, runs: int,
                     device: torch.device = torch.device("cpu"), desc: str = "") -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed rounds, then `runs` timed rounds, each
    round calling every function once in turn."""
    from tqdm import tqdm

    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in tqdm(range(warmup + runs), desc=desc or "timing", leave=False, disable=None):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=(1024, 2048, 3072), runs: int = 5) -> float:
    """Measured FLOP/s of square matrix multiplies (best size, median of runs)."""
    best = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        (a @ b)  # warm-up (library dispatch, packing)
        ts = []
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(ts))
    return best


class PeakProbe:
    """Square matmuls timed inside the same interleaved rounds as the model, so the peak and the model
    see the same machine load. `fns()` adds them to a round; `update(times)` keeps the best median."""

    def __init__(self, device: torch.device, n: int, peaks: dict):
        gen = torch.Generator(device=device).manual_seed(0)
        self.n, self.peaks = n, peaks
        self.mats = {k: [torch.randn(n, n, device=device, generator=gen).to(dt) for _ in range(2)]
                     for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    def fns(self) -> dict[str, Callable]:
        return {f"_peak_{k}": (lambda a=a, b=b: a @ b) for k, (a, b) in self.mats.items()}

    def update(self, times: dict[str, list[float]]) -> None:
        for k in self.mats:
            t = times.pop(f"_peak_{k}", None)
            if t:
                self.peaks[k] = max(self.peaks.get(k, 0.0), 2 * self.n ** 3 / statistics.median(t))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention `fn` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    # grad mode on: the counter's module tracker hooks into autograd
    with torch.inference_mode(False), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# ---- rows and the table ----------------------------------------------------------------------

@dataclass
class Row:
    section: str
    variant: str
    batch: int | str = ""
    seconds: float | None = None  # median seconds per call
    per_image: float | None = None  # seconds per image
    mem_mb: float | None = None
    peak_share: float | None = None  # fraction of the matmul peak
    check: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return None if not self.per_image else 1.0 / self.per_image


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    head = ("| benchmark | variant | batch | s / image | images / s | peak MB | % of matmul peak | check |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        share = None if r.peak_share is None else 100 * r.peak_share
        lines.append(f"| {r.section} | {r.variant} | {r.batch} | {_fmt(r.per_image, '.4f')} | "
                     f"{_fmt(r.images_per_s, '.2f')} | {_fmt(r.mem_mb, '.0f')} | {_fmt(share, '.1f')} | {r.check} |")
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .model.fuse import native_bf16_cpu

    parts = [f"CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
             f"hardware bf16 {native_bf16_cpu() or 'no'}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)}")
    try:
        import onnxruntime
        import transformers

        parts.append(f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


# ---- inputs and models -----------------------------------------------------------------------

def _inference_images(batch: int, size: tuple[int, int], device: torch.device, coco128: Path = COCO128) -> Tensor:
    """[batch,3,H,W] ImageNet-normalised: coco128 photos resized to `size` when present, else noise."""
    from torchvision.transforms.v2 import functional as TF

    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    files = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[:batch] if coco128.is_dir() else []
    ims = []
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        if i < len(files):
            from torchvision.io import decode_image, read_file

            im = decode_image(read_file(str(files[i])), mode=torchvision_rgb()).float() / 255
            im = TF.resize(im, list(size), antialias=True)
        else:
            im = torch.rand(3, *size, generator=gen)
        ims.append(TF.normalize(im, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(ims).to(device)


def torchvision_rgb():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


def _build_model(preset: str, weights: str | None, num_classes: int, seed: int = 0):
    from .config import get_preset
    from .detector import Detector
    from .model import build_model

    if weights:
        return Detector.from_pretrained(weights).model.eval()
    torch.manual_seed(seed)
    cfg = get_preset(preset).model.with_classes([f"class{i}" for i in range(num_classes)])
    return build_model(cfg).eval()


def _hf_model(model, out_dir: Path):
    """transformers' DetrForObjectDetection holding `model`'s weights (written by our exporter)."""
    import transformers
    from transformers import DetrForObjectDetection

    from .weights.huggingface import save_huggingface

    save_huggingface(model.state_dict(), model.cfg, out_dir)
    transformers.logging.set_verbosity_error()
    return DetrForObjectDetection.from_pretrained(str(out_dir)).eval()


def _hf_outputs(out) -> dict[str, Tensor]:
    return {"pred_logits": out.logits.float(), "pred_boxes": out.pred_boxes.float()}


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in ("pred_logits", "pred_boxes"))


def compare_detections(ref: dict, got: dict, threshold: float = 0.5, top_k: int = 10) -> dict:
    """Do two outputs give the same top detections? For every query scoring > threshold in either
    output: same class and boxes within 0.01 (normalised). When no query passes the threshold
    (random weights), the `top_k` highest-scoring queries of `ref` are compared instead."""
    from .postprocess import class_scores

    (s_ref, l_ref), (s_got, l_got) = class_scores(ref["pred_logits"].cpu()), class_scores(got["pred_logits"].cpu())
    sel = (s_ref > threshold) | (s_got > threshold)
    how = f"score>{threshold}"
    if not sel.any():
        idx = s_ref.topk(min(top_k, s_ref.shape[-1]), dim=-1).indices
        sel = torch.zeros_like(sel).scatter_(-1, idx, True)
        how = f"top-{top_k} (none > {threshold})"
    box_err = (ref["pred_boxes"].float().cpu() - got["pred_boxes"].float().cpu()).abs().amax(-1)[sel]
    same_class = bool((l_ref[sel] == l_got[sel]).all())
    max_box = box_err.max().item() if box_err.numel() else 0.0
    return {"n": int(sel.sum()), "how": how, "same_classes": same_class, "max_box_diff": max_box,
            "ok": same_class and max_box <= 0.01}


# ---- inference -------------------------------------------------------------------------------

_PROBE_FLAG = "--_memory-probe"


def _probe_main(spec: dict) -> None:
    """Subprocess: load one variant, reset the peak RSS, run inference twice, print the peak above the
    RSS after imports (weights + activations + runtime buffers), in MiB, as JSON."""
    import transformers  # noqa: F401  (import every library first, so the baseline includes them)
    import onnxruntime  # noqa: F401

    from .config import ModelConfig
    from .model import build_model
    from .model.fuse import optimize_for_inference

    torch.set_num_threads(spec["threads"])
    base = _rss_kib("VmRSS")
    b, (h, w) = spec["batch"], spec["size"]
    images = torch.randn(b, 3, h, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    kind = spec["variant"]
    if kind == "hf":
        from transformers import DetrForObjectDetection

        transformers.logging.set_verbosity_error()
        model = DetrForObjectDetection.from_pretrained(spec["hf_dir"]).eval()
        pixel_mask = (~mask).long()
        run = lambda: model(pixel_values=images, pixel_mask=pixel_mask)  # noqa: E731
    elif kind == "onnx":
        from .export.onnx import OnnxDETR

        session = OnnxDETR(spec["onnx"], threads=spec["threads"])
        run = lambda: session(images, mask)  # noqa: E731
    else:
        cfg = ModelConfig.from_dict(spec["cfg"])
        model = build_model(cfg).eval()
        if kind != "eager":
            model = optimize_for_inference(model, torch.bfloat16 if kind == "bf16" else torch.float32)
        run = lambda: model(images, mask)  # noqa: E731
    gc.collect()
    ok = _reset_peak_rss()
    with torch.inference_mode():
        run()
        run()
    peak = _rss_kib("VmHWM") if ok else _rss_kib("VmRSS")
    print(json.dumps({"mem_mb": (peak - base) / 1024, "exact": ok}))


def _memory_probe(spec: dict) -> float | None:
    """Peak MiB of one variant in a fresh process (None when it fails)."""
    cmd = [sys.executable, "-m", "detrkit.bench", _PROBE_FLAG, json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return float(json.loads(res.stdout.strip().splitlines()[-1])["mem_mb"])
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as e:
        logger.warning("memory probe %s batch %s failed: %s", spec["variant"], spec["batch"], e)
        return None


def bench_inference(args, device: torch.device, peaks: dict, tmp: Path) -> list[Row]:
    from .export.onnx import OnnxDETR, export_onnx
    from .model.fuse import optimize_for_inference

    model = _build_model(args.preset, args.weights, num_classes=91).to(device)
    cfg = model.cfg
    logger.info("inference: %s %dx%d, %s", args.preset, *args.size, "weights " + args.weights if args.weights
                else "random init (seed 0)")
    variants: dict[str, Callable] = {}
    fp32 = optimize_for_inference(model, torch.float32)
    bf16 = optimize_for_inference(model, torch.bfloat16)
    variants["detrkit float32"] = lambda x, m: fp32(x, m)
    variants["detrkit bf16 autocast"] = lambda x, m: bf16(x, m)
    if args.compile:
        fp32c = optimize_for_inference(model, torch.float32, compile=True)
        bf16c = optimize_for_inference(model, torch.bfloat16, compile=True)
        variants["detrkit float32 + compile"] = lambda x, m: fp32c(x, m)
        variants["detrkit bf16 + compile"] = lambda x, m: bf16c(x, m)
    if not args.quick:
        variants["detrkit float32, unoptimised"] = lambda x, m: model(x, m)
    onnx_path = None
    if device.type == "cpu" and not args.no_onnx:
        onnx_path = export_onnx(model.cpu(), tmp / "detr.onnx")
        session = OnnxDETR(onnx_path, threads=torch.get_num_threads())
        variants["ONNX Runtime float32"] = lambda x, m: session(x, m)
    hf = None
    hf_dir = tmp / "hf"
    if not args.no_hf:
        hf = _hf_model(model.cpu(), hf_dir).to(device)
        variants["transformers float32"] = lambda x, m: _hf_outputs(hf(pixel_values=x, pixel_mask=(~m).long()))
    model.to(device)
    weight_bytes = {"detrkit float32": _module_bytes(fp32), "detrkit bf16 autocast": _module_bytes(bf16),
                    "detrkit float32, unoptimised": _module_bytes(model)}
    if hf is not None:
        weight_bytes["transformers float32"] = _module_bytes(hf)

    rows: list[Row] = []
    probe = PeakProbe(device, args.peak_size, peaks)
    flops_per_image = None
    for batch in args.batches:
        images = _inference_images(batch, args.size, device, args.coco128)
        mask = torch.zeros(batch, *args.size, dtype=torch.bool, device=device)
        if flops_per_image is None:
            # explicit attention matmuls: the counter does not see the CPU flash-attention kernel
            flops_per_image = count_flops(lambda: model(images[:1], mask[:1], return_attention=True))
            logger.info("detr inference: %.1f GFLOPs per %dx%d image", flops_per_image / 1e9, *args.size)
        with torch.inference_mode():
            outs = {name: fn(images, mask) for name, fn in variants.items()}
            fns = {n: (lambda fn=fn: fn(images, mask)) for n, fn in variants.items()}
            times = time_interleaved({**fns, **probe.fns()}, args.warmup, args.runs, device,
                                     desc=f"inference batch {batch}")
            probe.update(times)
        ref = outs["detrkit float32"]
        for name in variants:
            sec = statistics.median(times[name])
            per_image = sec / batch
            low = "bf16" in name
            share_of = (flops_per_image / per_image, "bf16" if low else "fp32")
            if "ONNX" in name or "transformers" in name or "unoptimised" in name or "compile" in name and not low:
                check = f"max diff vs detrkit fp32 {max_abs_diff(outs[name], ref):.1e}"
            elif low:
                c = compare_detections(ref, outs[name])
                check = (f"{'same' if c['ok'] else 'DIFFERENT'} top detections vs fp32 ({c['n']} boxes, {c['how']}, "
                         f"max box diff {c['max_box_diff']:.4f})")
            else:
                check = ""
            rows.append(Row("inference", name, batch, sec, per_image, check=check, extra={"flops": share_of}))
        if "transformers float32" in times:
            t_hf = statistics.median(times["transformers float32"])
            for r in rows[-len(variants):]:
                if r.variant != "transformers float32":
                    r.check = (f"{r.seconds / t_hf:.2f}x HF time" + ("; " + r.check if r.check else ""))
        # memory: each variant alone in a fresh process (CPU), or the allocator's peak (CUDA)
        for r in rows[-len(variants):]:
            r.mem_mb = _variant_memory(r.variant, batch, cfg, args, device, hf_dir, onnx_path, variants, images,
                                       mask, weight_bytes)
    del fp32, bf16, hf
    gc.collect()
    return rows


def _module_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def _variant_memory(name, batch, cfg, args, device, hf_dir, onnx_path, variants, images, mask,
                    weight_bytes: dict) -> float | None:
    if args.no_memory or "compile" in name:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            variants[name](images, mask)
        torch.cuda.synchronize()
        # every variant's weights share the GPU: count this variant's own weights plus its peak above base
        return (torch.cuda.max_memory_allocated(device) - base + weight_bytes.get(name, 0)) / 2 ** 20
    kind = {"detrkit float32": "fp32", "detrkit bf16 autocast": "bf16", "detrkit float32, unoptimised": "eager",
            "ONNX Runtime float32": "onnx", "transformers float32": "hf"}.get(name)
    if kind is None:
        return None
    spec = {"variant": kind, "batch": batch, "size": list(args.size), "cfg": cfg.to_dict(),
            "hf_dir": str(hf_dir), "onnx": str(onnx_path) if onnx_path else None,
            "threads": torch.get_num_threads()}
    return _memory_probe(spec)


# ---- training --------------------------------------------------------------------------------

def _train_batch(cfg, train_cfg, batch: int, device: torch.device, seed: int = 0):
    """Mixed-size images (the preset's training scales) with 1-6 random boxes each."""
    gen = torch.Generator().manual_seed(seed)
    scales = train_cfg.train_scales
    images, targets = [], []
    for i in range(batch):
        short = scales[i % len(scales)]
        long = min(int(short * 4 / 3), train_cfg.train_max_size)
        h, w = (short, long) if i % 2 == 0 else (long, short)
        images.append(torch.randn(3, h, w, generator=gen).to(device))
        n = 1 + i % 6
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, cfg.num_classes, (n,), generator=gen).to(device)})
    return images, targets


def bench_training(args, device: torch.device, peaks: dict, tmp: Path) -> list[Row]:
    """The engine's own training step (`TrainStep`, what `detrkit train` runs: fused AdamW, clipping,
    bf16 autocast as configured) against transformers' DETR with the same weights and batch."""
    import dataclasses

    from .config import get_preset
    from .engine.step import TrainStep
    from .model import build_model, pad_images

    preset = get_preset(args.train_preset)
    cfg = preset.model.with_classes([f"class{i}" for i in range(20)])
    tcfg = preset.train
    batch = args.train_batch or tcfg.batch_size
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    images, targets = _train_batch(cfg, tcfg, batch, device)
    padded, mask = pad_images(images)

    steps: dict[str, Callable] = {}

    def ours(amp: bool):
        m = build_model(cfg).to(device)
        m.load_state_dict(model.state_dict())
        m.train()
        trainer = TrainStep.build(m, dataclasses.replace(tcfg, amp="bf16" if amp else "none", ema_decay=None),
                                  device)
        return lambda: trainer(images, targets)

    steps["detrkit float32"] = ours(False)
    steps["detrkit bf16 autocast"] = ours(True)

    hf_step = None
    if not args.no_hf:
        from transformers import DetrForObjectDetection

        hf = DetrForObjectDetection.from_pretrained(str(_save_hf(model, tmp / "hf-train"))).to(device).train()
        hf_opt = torch.optim.AdamW(_hf_param_groups(hf, tcfg), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        hf_params = [p for g in hf_opt.param_groups for p in g["params"]]
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = (~mask).long()

        def hf_step_fn(amp: bool):
            ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

            def step():
                with ctx():
                    loss = hf(pixel_values=padded, pixel_mask=pixel_mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf_params, tcfg.clip_max_norm)
                hf_opt.step()
                hf_opt.zero_grad(set_to_none=True)
                return loss.detach()
            return step
        hf_step = hf_step_fn
        steps["transformers float32"] = hf_step(False)
        if not args.quick:
            steps["transformers bf16 autocast"] = hf_step(True)

    flops = count_flops(lambda: steps["detrkit float32"]()) / batch
    probe = PeakProbe(device, args.peak_size, peaks)
    times = time_interleaved({**steps, **probe.fns()}, args.warmup, args.runs, device, desc="training step")
    probe.update(times)
    rows = []
    t_hf = statistics.median(times["transformers float32"]) if "transformers float32" in times else None
    for name in steps:
        sec = statistics.median(times[name])
        low = "bf16" in name
        check = f"{t_hf / sec:.2f}x HF float32 images/s" if t_hf and "transformers float32" != name else ""
        rows.append(Row(f"train step {args.train_preset}", name, batch, sec, sec / batch,
                        check=check, extra={"flops": (flops / (sec / batch), "bf16" if low else "fp32")}))
    return rows


def _save_hf(model, out_dir: Path) -> Path:
    from .weights.huggingface import save_huggingface

    import transformers

    transformers.logging.set_verbosity_error()
    return save_huggingface(model.state_dict(), model.cfg, out_dir)


def _hf_param_groups(hf, tcfg) -> list[dict]:
    """Same two learning rates as ours: backbone at lr_backbone, the rest at lr."""
    backbone, rest = [], []
    for name, p in hf.named_parameters():
        if p.requires_grad:
            (backbone if "backbone" in name else rest).append(p)
    return [{"params": rest, "lr": tcfg.lr}, {"params": backbone, "lr": tcfg.lr_backbone}]


# ---- matcher and COCO evaluation -------------------------------------------------------------

def bench_matcher(args, device: torch.device) -> list[Row]:
    from .matching import HungarianMatcher

    gen = torch.Generator().manual_seed(0)
    b, q, c = 8, 100, 92
    outputs = {"pred_logits": torch.randn(b, q, c, generator=gen).to(device),
               "pred_boxes": (0.1 + 0.8 * torch.rand(b, q, 4, generator=gen)).to(device)}
    targets = []
    for i in range(b):
        n = 5 + 5 * i
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, c - 1, (n,), generator=gen).to(device)})
    fns = {"detrkit HungarianMatcher": lambda: HungarianMatcher()(outputs, targets)}
    check = ""
    if not args.no_hf:
        from transformers.loss.loss_for_object_detection import HungarianMatcher as HFMatcher

        hf = HFMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
        hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        fns["transformers HungarianMatcher"] = lambda: hf({"logits": outputs["pred_logits"],
                                                            "pred_boxes": outputs["pred_boxes"]}, hf_targets)
        ours, theirs = fns["detrkit HungarianMatcher"](), fns["transformers HungarianMatcher"]()
        same = all(torch.equal(a[0].cpu(), x[0].cpu()) and torch.equal(a[1].cpu(), x[1].cpu())
                   for a, x in zip(ours, theirs))
        check = f"{'same' if same else 'different'} assignment as transformers"
    times = time_interleaved(fns, args.warmup, max(args.runs, 5) * 2, device, desc="matcher")
    rows = []
    t_hf = statistics.median(times["transformers HungarianMatcher"]) if len(fns) > 1 else None
    for name in fns:
        sec = statistics.median(times[name])
        note = check if name.startswith("detrkit") else ""
        if t_hf and name.startswith("detrkit"):
            note = f"{sec / t_hf:.2f}x HF time; " + note
        rows.append(Row(f"matcher B={b} Q={q} 5-40 targets", name, b, sec, sec / b, check=note))
    return rows


def bench_coco_eval(args) -> list[Row]:
    """CocoEvaluator over coco128's ground truth with 100 detections per image (jittered boxes)."""
    ann = args.coco128 / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        logger.info("no %s: skipping the COCO evaluation row", ann)
        return []
    from .engine.evaluate import CocoEvaluator

    gt = json.loads(ann.read_text())
    gen = torch.Generator().manual_seed(0)
    cats = [c["id"] for c in gt["categories"]]
    by_image: dict[int, list] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    results = []
    for image_id, anns in by_image.items():
        dets = []
        for a in anns[:100]:
            x, y, w, h = a["bbox"]
            j = (torch.rand(4, generator=gen) - 0.5) * 0.2
            dets.append({"image_id": image_id, "category_id": a["category_id"],
                         "bbox": [x + j[0].item() * w, y + j[1].item() * h, w * (1 + j[2].item()), h * (1 + j[3].item())],
                         "score": 0.5 + 0.5 * torch.rand(1, generator=gen).item()})
        while len(dets) < 100:
            dets.append({"image_id": image_id, "category_id": cats[len(dets) % len(cats)],
                         "bbox": [10.0 * (len(dets) % 9), 7.0 * (len(dets) % 11), 40.0, 30.0],
                         "score": 0.3 * torch.rand(1, generator=gen).item()})
        results.extend(dets)
    n_images = len(by_image)

    def run():
        ev = CocoEvaluator(gt)
        ev.add(results)
        return ev.summarize()

    times = time_interleaved({"eval": run}, 1, max(3, args.runs // 2), desc="coco eval")
    sec = statistics.median(times["eval"])
    stats = run()
    ap = stats.get("AP") if isinstance(stats, dict) else None
    note = f"AP {ap:.3f}" if isinstance(ap, float) else ""
    return [Row(f"COCO eval, {n_images} images x 100 dets", "detrkit CocoEvaluator (pycocotools)", n_images,
                sec, sec / n_images, check=note)]


def bench_decode(args) -> list[Row]:
    """JPEG decoding to a float [3,H,W] tensor: PIL (what most loaders use) against torchvision.io."""
    files = sorted((args.coco128 / "images" / "train2017").glob("*.jpg"))[:32] if args.coco128.is_dir() else []
    if not files:
        return []
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF

    def pil():
        for f in files:
            with Image.open(f) as im:
                TF.to_dtype(TF.pil_to_tensor(im.convert("RGB")), torch.float32, scale=True)

    def tvio():
        for f in files:
            decode_jpeg(read_file(str(f)), mode=torchvision_rgb()).float().div_(255)

    times = time_interleaved({"PIL": pil, "torchvision.io": tvio}, 1, max(3, args.runs), desc="decode")
    t_pil = statistics.median(times["PIL"])
    rows = []
    for name, label in (("PIL", "PIL open + convert + to tensor"), ("torchvision.io", "torchvision.io decode_jpeg")):
        sec = statistics.median(times[name])
        rows.append(Row(f"JPEG decode, {len(files)} coco128 images", label, 1, sec, sec / len(files),
                        check=f"{sec / t_pil:.2f}x PIL time" if name != "PIL" else ""))
    return rows


# ---- the command -----------------------------------------------------------------------------

def run_bench(args) -> tuple[str, list[Row]]:
    """-> (markdown report, rows)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    # the peak: best of a standalone measurement and the matmuls timed inside each section's rounds
    args.peak_size = 8192 if device.type == "cuda" else 2048
    sizes = (args.peak_size,)
    peaks = {"fp32": matmul_peak(torch.float32, device, sizes), "bf16": matmul_peak(torch.bfloat16, device, sizes)}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="detrkit-bench-") as tmp:
        tmp = Path(tmp)
        if "inference" in args.only:
            rows += bench_inference(args, device, peaks, tmp)
        if "train" in args.only:
            rows += bench_training(args, device, peaks, tmp)
    for r in rows:  # shares of the final (highest) measured peak
        if "flops" in r.extra:
            flops_per_s, kind = r.extra["flops"]
            r.peak_share = flops_per_s / peaks[kind]
    logger.info("matmul peak: float32 %.0f GFLOP/s, bf16 %.0f GFLOP/s", peaks["fp32"] / 1e9, peaks["bf16"] / 1e9)
    if "matcher" in args.only:
        rows += bench_matcher(args, device)
    if "coco" in args.only:
        rows += bench_coco_eval(args)
    if "decode" in args.only:
        rows += bench_decode(args)
    command = "detrkit " + " ".join(args.argv or sys.argv[1:])
    report = "\n".join([
        f"Machine: {machine_description(device)}",
        f"Measured matmul peak: float32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
        f"({sizes[0]}x{sizes[0]} matmuls, best median of a standalone run and those timed inside each "
        f"section's rounds; the % column uses the final peak)",
        f"Command: `{command.strip()}` ({args.warmup} warm-up + {args.runs} timed rounds, medians; "
        f"took {time.time() - t0:.0f} s)",
        "",
        format_table(rows),
    ])
    return report, rows


def _cmd(args: argparse.Namespace) -> int:
    if args.quick:
        args.warmup = 1 if args.warmup is None else args.warmup
        args.runs = 3 if args.runs is None else args.runs
        args.batches = args.batches or [1]
    args.warmup = 1 if args.warmup is None else args.warmup
    args.runs = 5 if args.runs is None else args.runs
    args.batches = args.batches or [1, 4]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("detrkit bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    report, _ = run_bench(args)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
        print(f"\nwrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed table: inference, training step, matcher, COCO eval")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 1 warm-up + 3 timed rounds, fewer rows")
    add_device_argument(p)
    p.add_argument("--preset", default="detr-r50", help="inference model (default detr-r50)")
    p.add_argument("--weights", default=None, help="weights for the inference model (default: random init)")
    p.add_argument("--size", type=positive_int, nargs=2, default=list(INFER_SIZE), metavar=("H", "W"))
    p.add_argument("--batches", type=positive_int, nargs="+", default=None, help="inference batch sizes (default 1 4)")
    p.add_argument("--train-preset", default="detr-tiny")
    p.add_argument("--train-batch", type=positive_int, default=None, help="default: the preset's batch size")
    p.add_argument("--warmup", type=non_negative_int, default=None)
    p.add_argument("--runs", type=positive_int, default=None)
    p.add_argument("--threads", type=positive_int, default=None, help="torch / ONNX Runtime threads")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime row")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory probes")
    p.add_argument("--only", nargs="+", default=["inference", "train", "matcher", "coco", "decode"],
                   choices=["inference", "train", "matcher", "coco", "decode"])
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    p.add_argument("--coco128", default=COCO128, type=Path,
                   help=f"coco128 folder (photos and COCO ground truth; default $DETRKIT_COCO128 or {COCO128})")
    p.set_defaults(func=_cmd, argv=None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _PROBE_FLAG:
        _probe_main(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="detrkit bench")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["bench", *argv])
    args.argv = ["bench", *argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _cmd(args)


if __name__ == "__main__":
    sys.exit(main())
