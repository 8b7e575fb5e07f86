"""Inference-only optimisations that leave what DETR computes unchanged.

`optimize_for_inference(model)` returns an eval-only copy (`InferenceDETR`) with the same forward
contract as `DETR`:
- every frozen batch norm folded into the convolution before it (one conv instead of conv + scale
  + shift; float32 results agree to rounding),
- on CPU, the ResNet run as `PackedResNetBody`: oneDNN convolutions with weights pre-packed in its
  blocked layout and the ReLU / residual add + ReLU fused into the convolution kernel (what
  torch.compile's CPU backend does, without the compile time),
- otherwise channels-last convolution weights (cuDNN's and oneDNN's fastest layout),
- optionally bfloat16: convolution and linear weights cast once, the forward run under autocast so
  norms, softmax and the box sigmoid stay float32; outputs come back float32,
- optionally `torch.compile`.
The original model is not touched and its state-dict keys are unchanged. The copy is for running
only: packed oneDNN weights cannot be moved to another device, saved or deep-copied.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .detr import BackboneFeatures, as_batch
from .transformer import MultiheadAttention

logger = logging.getLogger(__name__)

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


def _bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """y = x * scale + shift of a frozen (or eval-mode) batch norm, computed in float64."""
    eps = bn.eps
    var, mean = bn.running_var.double(), bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight * (var + eps).rsqrt()
    return scale, bias - mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d (with bias) computing bn(conv(x)) for a frozen / eval-mode batch norm."""
    if isinstance(bn, nn.BatchNorm2d) and bn.training:
        raise ValueError("fold_conv_bn: the batch norm is in training mode; call .eval() first")
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    with torch.no_grad():
        fused.weight.copy_(w.to(conv.weight.dtype))
        fused.bias.copy_(b.to(conv.weight.dtype))
    fused.requires_grad_(False)
    return fused


def fold_batchnorms(module: nn.Module) -> int:
    """Fold, in place, each batch norm that directly follows a conv: sibling pairs named
    ``convK``/``bnK`` (torchvision ResNet blocks and stem) and consecutive (Conv2d, norm) entries of
    an nn.Sequential (ResNet downsample). The norm becomes nn.Identity. Returns the count folded."""
    count = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], _NORMS):
                    parent[i] = fold_conv_bn(parent[i], parent[i + 1])
                    parent[i + 1] = nn.Identity()
                    count += 1
        for name, child in list(parent.named_children()):
            if not (name.startswith("bn") and isinstance(child, _NORMS)):
                continue
            conv = getattr(parent, "conv" + name[2:], None)
            if isinstance(conv, nn.Conv2d):
                setattr(parent, "conv" + name[2:], fold_conv_bn(conv, child))
                setattr(parent, name, nn.Identity())
                count += 1
    return count


def mkldnn_fusion_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN convolutions with fused post-ops (what torch.compile's CPU backend uses) exist here, for
    `dtype` (bf16 needs a CPU oneDNN has a bf16 path for: AVX-512 or AVX-NE-CONVERT; AVX2 has none)."""
    ok = (torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
          and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    if ok and dtype == torch.bfloat16:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return ok


class PackedConv2d(nn.Module):
    """A Conv2d (batch norm already folded in) run by oneDNN with its weight pre-packed in oneDNN's
    blocked layout and the following ReLU, or residual add + ReLU, fused into the same kernel.
    CPU only; the weight is packed for one input size but correct for every size.

    forward(x [B,Cin,H,W], residual [B,Cout,h,w] | None) -> relu?(conv(x) (+ residual)).
    """

    def __init__(self, conv: nn.Conv2d, relu: bool, dtype: torch.dtype):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("PackedConv2d: only explicit zero padding is supported")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.relu = relu
        self.dtype = dtype
        self.weight = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = bias.to(dtype)

    def pack(self, input_size: list[int]) -> None:
        """Reorder the weight to the layout oneDNN picks for this input size."""
        pad, stride, dil, groups = self.geometry
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.contiguous().to_mkldnn(), pad, stride, dil, groups, input_size)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.to(self.dtype)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, *self.geometry, "relu" if self.relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.to(self.dtype), self.weight, self.bias, *self.geometry, "add", 1.0,
            "relu" if self.relu else None, [], "")


class _PackedBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck as 2-3 fused convolutions (+ a packed downsample)."""

    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        convs = [getattr(block, f"conv{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
        self.convs = nn.ModuleList(PackedConv2d(c, relu=True, dtype=dtype) for c in convs)
        self.downsample = None
        if block.downsample is not None:
            self.downsample = PackedConv2d(block.downsample[0], relu=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, identity)  # conv + residual + ReLU in one kernel


class PackedResNetBody(nn.Module):
    """conv1 .. layer4 of a batch-norm-folded ResNet body as packed, fused oneDNN convolutions.

    forward(images [B,3,H,W]) -> C5 features [B,C,H/32,W/32] channels-last, in `dtype`.
    """

    def __init__(self, body: nn.Module, dtype: torch.dtype, pack_size: tuple[int, int] | None = (800, 1066)):
        super().__init__()
        if not all(isinstance(getattr(body, n), nn.Identity) for n in ("bn1",)):
            raise ValueError("PackedResNetBody: fold the batch norms first (fold_batchnorms)")
        self.stem = PackedConv2d(body.conv1, relu=True, dtype=dtype)
        self.maxpool = body.maxpool
        self.blocks = nn.Sequential(*[_PackedBlock(b, dtype) for layer in
                                      (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer])
        self.dtype = dtype
        if pack_size is not None:
            self.pack(pack_size)

    def pack(self, size: tuple[int, int]) -> None:
        """Pack every convolution's weight for images of `size` (H, W)."""
        sizes: dict[nn.Module, list[int]] = {}
        convs = [m for m in self.modules() if isinstance(m, PackedConv2d)]
        hooks = [c.register_forward_pre_hook(lambda mod, a: sizes.__setitem__(mod, list(a[0].shape))) for c in convs]
        with torch.no_grad():
            self(torch.zeros(1, 3, *size))
        for h in hooks:
            h.remove()
        for c in convs:
            c.pack(sizes[c])

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.blocks(self.maxpool(self.stem(x)))


# CPU flags of a hardware bfloat16 matrix multiply: Intel AMX tiles, or the AVX-512 dot product
# (Cooper Lake, Sapphire Rapids, AMD Zen 4+); measured on a 2-core Zen 4, a bf16 matmul ran 2.5-3x
# faster than float32. Without them oneDNN emulates bf16, ~15x slower than float32 on an AVX2 EPYC.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The flag by which this CPU multiplies bfloat16 matrices in hardware, None when it does not."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)
    except OSError:
        pass
    return None


def default_inference_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where it is fast (CUDA with bf16 support, CPUs with AMX or AVX-512 bf16), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if native_bf16_cpu() else torch.float32
    return torch.float32


def _replace_param(module: nn.Module, name: str, value: Tensor) -> None:
    """A new frozen Parameter: never write into `.data`, the tensor may be shared with the original."""
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def _cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights autocast would cast on every call (conv, linear, packed attention
    projections) once, ahead of time; norms and embeddings stay float32."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(m, MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias")
        else:
            continue
        for name in names:
            if getattr(m, name, None) is not None:
                _replace_param(m, name, getattr(m, name).detach().to(dtype))


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors (no second
    copy of the weights in memory); the optimisations below replace tensors, never modify them."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating the RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class InferenceDETR(nn.Module):
    """An eval-only, optimised copy of a `DETR`. Same forward contract and output dict; every output
    tensor is float32 whatever the compute dtype.

    forward(images: list of [3,H,W] | [B,3,H,W], mask [B,H,W] | None = None, return_attention=False,
    batch_invariant=False) -> dict (see `DETR`).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool, compiled: bool):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.dtype = dtype
        self.channels_last = channels_last
        self.compiled = compiled
        self._from_features = model.from_features
        if compiled:
            # Compile the parts with static structure; list padding stays eager.
            self._from_features = torch.compile(model.from_features, dynamic=True)
            model.backbone = torch.compile(model.backbone, dynamic=True)

    def _autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                return_attention: bool = False, batch_invariant: bool = False) -> dict:
        if isinstance(images, (list, tuple)) and batch_invariant:
            return self.from_features(self.features(images, mask), return_attention)
        images, mask = as_batch(images, mask)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device):
            feats = self.model.features(images, mask)
        return self.from_features(feats, return_attention)

    @torch.no_grad()
    def features(self, images: Sequence[Tensor], mask: Tensor | None = None) -> BackboneFeatures:
        """The backbone part of `forward(images, batch_invariant=True)`: [3,H_i,W_i] images -> BackboneFeatures."""
        with self._autocast(images[0].device):
            return self.model.features(images, mask, per_image=True)

    @torch.no_grad()
    def from_features(self, feats: BackboneFeatures, return_attention: bool = False) -> dict:
        """The rest of `forward`: backbone features -> the output dict (float32)."""
        with self._autocast(feats.features.device):
            out = self._from_features(feats, return_attention)
        return _to_float32(out) if self.dtype != torch.float32 else out


def _to_float32(x):
    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_float32(v) for v in x]
    return x


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | str | None = torch.float32,
                           channels_last: bool | None = None, compile: bool = False,
                           packed: bool | None = None) -> InferenceDETR:
    """An optimised eval-only copy of `model` (a `DETR`); the original is not modified. Unchanged
    float32 tensors (transformer, heads) are shared with the original rather than copied, so keeping
    both costs only the rewritten backbone (and the bf16 casts).

    dtype: torch.float32 (outputs within 1e-4 of the original), torch.bfloat16 / "bf16" (autocast,
      weights pre-cast), or None / "auto" for `default_inference_dtype` of the model's device.
    channels_last: NHWC convolution weights; None = on for bfloat16 and CUDA, where oneDNN/cuDNN
      are fastest with it.
    compile: wrap the backbone and the transformer in torch.compile (first call is slow); sets
      torch._inductor.config.freezing so the compiled convolutions get packed weights.
    packed: on CPU, run the ResNet as `PackedResNetBody` (oneDNN convolutions with pre-packed weights
      and fused ReLU / residual); None = for bfloat16 when available and not compiling. Not for float32
      by default: an input size other than the packed one costs a weight reorder on every call (on an
      AVX2 CPU, images of mixed shapes ran 2-5x slower than the plain folded convolutions).
    """
    device = next(model.parameters()).device
    if dtype in (None, "auto"):
        dtype = default_inference_dtype(device)
    elif isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"optimize_for_inference: unsupported dtype {dtype!r}")
    if isinstance(model, InferenceDETR):
        raise ValueError("optimize_for_inference: the model is already optimised; pass the original DETR")
    opt = _shared_copy(model).eval()
    n = fold_batchnorms(opt.backbone)
    logger.debug("folded %d batch norms into convolutions", n)
    if channels_last is None:
        channels_last = dtype != torch.float32 or device.type == "cuda"
    if channels_last:
        for m in opt.modules():
            if isinstance(m, nn.Conv2d):
                _replace_param(m, "weight", m.weight.detach().contiguous(memory_format=torch.channels_last))
    if packed is None:
        packed = device.type == "cpu" and not compile and dtype == torch.bfloat16 and mkldnn_fusion_available(dtype)
    if packed:
        if device.type != "cpu":
            raise ValueError("optimize_for_inference: packed oneDNN convolutions run on the CPU only")
        cfg = opt.cfg
        long = min(int(round(cfg.image_size * 4 / 3)), cfg.max_image_size)
        opt.backbone.body = PackedResNetBody(opt.backbone.body, dtype, (cfg.image_size, long))
    if dtype != torch.float32:
        _cast_matmul_weights(opt, dtype)
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    _release_freed_memory()
    return InferenceDETR(opt, dtype, channels_last, compile)
