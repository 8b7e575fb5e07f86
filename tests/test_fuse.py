"""The inference-optimised copy computes what the model computes."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detrkit.config import ModelConfig
from detrkit.model import build_model, pad_images
from detrkit.model.fuse import (InferenceDETR, PackedResNetBody, fold_batchnorms, fold_conv_bn,
                               mkldnn_fusion_available, optimize_for_inference)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                      dim_feedforward=64, num_queries=8, class_names=["a", "b", "c"], **kw)
    model = build_model(cfg).eval()
    # Non-trivial frozen statistics, so a wrong fold cannot hide behind mean 0 / var 1.
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny()


def _images(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 160, 224, generator=gen), torch.randn(3, 128, 96, generator=gen)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


def test_fold_conv_bn_matches_conv_then_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = FrozenBatchNorm2d(6)
    bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 9, 7)
    fused = fold_conv_bn(conv, bn)
    assert fused.bias is not None
    torch.testing.assert_close(fused(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_every_backbone_norm_is_folded(model):
    keys = list(model.state_dict())
    opt = optimize_for_inference(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in opt.model.backbone.modules())
    # resnet18: stem + 8 blocks x 2 + 3 downsamples
    assert fold_batchnorms(copy.deepcopy(model.backbone)) == 1 + 16 + 3
    # the original keeps its modules and state-dict keys
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("channels_last,packed", [(False, False), (True, False), (False, None), (False, True)])
def test_fused_float32_equals_unfused_with_padding(model, channels_last, packed):
    if packed and not mkldnn_fusion_available():
        pytest.skip("no oneDNN fused convolutions in this torch build")
    opt = optimize_for_inference(model, torch.float32, channels_last=channels_last, packed=packed)
    assert isinstance(opt, InferenceDETR)
    # float32's default is the plain folded ResNet (packing pays only for bf16); packed on request
    assert isinstance(opt.model.backbone.body, PackedResNetBody) == bool(packed)
    images = _images()
    with torch.no_grad():
        ref = model(images)
        got = opt(images)
        batch, mask = pad_images(images)
        got_batch = opt(batch, mask)
        ref_inv = model(images, batch_invariant=True)
        got_inv = opt(images, batch_invariant=True)
    assert mask.any()  # the padded path (no position cache) is exercised
    assert _max_diff(got, ref) <= 1e-4
    assert _max_diff(got_batch, ref) <= 1e-4
    assert _max_diff(got_inv, ref_inv) <= 1e-4
    for a, b in zip(got["aux_outputs"], ref["aux_outputs"]):
        assert _max_diff(a, b) <= 1e-4


@pytest.mark.parametrize("packed", [False, None])
def test_bf16_copy_is_close_and_returns_float32(model, packed):
    opt = optimize_for_inference(model, "bf16", packed=packed)
    images = _images()
    with torch.no_grad():
        ref = model(images)
        got = opt(images)
    assert got["pred_logits"].dtype == torch.float32 and got["pred_boxes"].dtype == torch.float32
    assert got["pred_logits"].shape == ref["pred_logits"].shape
    # bf16 keeps ~3 significant digits; boxes are in [0,1]
    assert (got["pred_boxes"] - ref["pred_boxes"]).abs().max().item() < 0.02
    # and the original is untouched (still float32 weights)
    assert model.class_embed.weight.dtype == torch.float32


def test_attention_maps_survive_optimisation(model):
    opt = optimize_for_inference(model)
    images = _images()
    with torch.no_grad():
        ref = model(images, return_attention=True)["attention"]
        got = opt(images, return_attention=True)["attention"]
    torch.testing.assert_close(got["encoder"], ref["encoder"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["decoder_cross"], ref["decoder_cross"], atol=1e-4, rtol=0)


def test_original_is_untouched_and_unchanged_weights_are_shared(model):
    before = {k: (v.clone(), v.dtype, v.stride()) for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    fp32 = optimize_for_inference(model, torch.float32, channels_last=True)
    optimize_for_inference(model, torch.bfloat16)
    for k, v in model.state_dict().items():
        ref, dtype, stride = before[k]
        assert v.dtype == dtype and v.stride() == stride and torch.equal(v, ref), k
    assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
    # the float32 copy reuses the transformer's tensors instead of duplicating them
    assert fp32.model.transformer.encoder.layers[0].linear1.weight is model.transformer.encoder.layers[0].linear1.weight
    with pytest.raises(ValueError, match="already optimised"):
        optimize_for_inference(fp32)


def test_bad_dtype_is_rejected(model):
    with pytest.raises(ValueError, match="unsupported dtype"):
        optimize_for_inference(model, torch.int8)
