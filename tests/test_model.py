"""The model against the paper's facts and Hugging Face transformers' DetrForObjectDetection."""
import math

import pytest
import torch

from detrkit import Detector, ModelConfig, build_model, get_preset
from detrkit.model.detr import pad_images
from detrkit.model.position import PositionEmbeddingSine
from detrkit.weights import authors, huggingface, native
from detrkit.weights.coco_names import authors_class_names

transformers = pytest.importorskip("transformers")


def _randomise_frozen_bn(model: torch.nn.Module) -> None:
    """Frozen BN buffers start as identity; random values make the backbone comparison meaningful."""
    g = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bias")) and "bn" in name or "downsample.1" in name:
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("weight"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def _hf_model(backbone: str, dilation: bool, num_labels: int = 91):
    from transformers import DetrConfig, DetrForObjectDetection

    cfg = DetrConfig(use_timm_backbone=True, backbone=backbone, use_pretrained_backbone=False,
                     dilation=dilation, num_labels=num_labels)
    torch.manual_seed(0)
    model = DetrForObjectDetection(cfg).eval()
    with torch.no_grad():
        _randomise_frozen_bn(model)
    return model


def _two_images():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 160, 224, generator=g), torch.randn(3, 200, 128, generator=g)]


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50-dc5"])
def test_equivalent_to_huggingface(tmp_path, dilation):
    hf = _hf_model("resnet50", dilation)
    hf.save_pretrained(tmp_path / "hf")
    det = Detector.from_pretrained(tmp_path / "hf")
    assert det.config.dilation == dilation and det.config.num_classes == 91
    images = _two_images()
    batch, mask = pad_images(images)
    with torch.no_grad():
        theirs = hf(pixel_values=batch, pixel_mask=(~mask).long())
        ours = det.model(images)
    assert ours["pred_logits"].shape == (2, 100, 92)
    assert (ours["pred_logits"] - theirs.logits).abs().max() <= 1e-4
    assert (ours["pred_boxes"] - theirs.pred_boxes).abs().max() <= 1e-4

    # export -> transformers loads it -> same outputs; re-import -> bit-identical weights
    det.export_huggingface(tmp_path / "out")
    from transformers import DetrForObjectDetection

    hf2 = DetrForObjectDetection.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = hf2(pixel_values=batch, pixel_mask=(~mask).long())
    assert (again.logits - theirs.logits).abs().max() <= 1e-5
    assert (again.pred_boxes - theirs.pred_boxes).abs().max() <= 1e-5
    det2 = Detector.from_pretrained(tmp_path / "out")
    sd1, sd2 = det.model.state_dict(), det2.model.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert det2.config == det.config


def test_huggingface_in_memory_layout_and_own_resnet(tmp_path):
    """transformers >= 5 names (backbone.model, o_proj, mlp.fc1), its own ResNet backbone, and a
    directory with pytorch_model.bin."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=3, d_model=64,
                     encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2, num_queries=7,
                     backbone_config=ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck",
                                                  hidden_sizes=[256, 512, 1024, 2048], out_features=["stage4"]))
    hf = DetrForObjectDetection(cfg).eval()
    with torch.no_grad():
        _randomise_frozen_bn(hf)
    sd = huggingface.from_hf_state_dict(hf.state_dict())
    ours = build_model(authors.infer_config(sd))
    ours.load_state_dict(sd)
    ours.eval()
    images = _two_images()
    batch, mask = pad_images(images)
    with torch.no_grad():
        theirs = hf(pixel_values=batch, pixel_mask=(~mask).long())
        out = ours(images)
    assert (out["pred_logits"] - theirs.logits).abs().max() <= 1e-4
    assert (out["pred_boxes"] - theirs.pred_boxes).abs().max() <= 1e-4

    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    det = Detector.from_pretrained(tmp_path)
    assert det.config.num_queries == 7 and det.config.class_names == [hf.config.id2label[i] for i in range(3)]
    with torch.no_grad():
        assert torch.equal(det.model(images)["pred_logits"], out["pred_logits"])


def _random_authors_state_dict(cfg: ModelConfig) -> dict:
    """A state dict with the released key names and random values."""
    model = build_model(cfg)
    with torch.no_grad():
        _randomise_frozen_bn(model)
        for p in model.parameters():
            p.normal_(0, 0.02)
    return authors.to_authors_keys(model.state_dict())


def test_authors_layout_loads_and_matches_other_paths(tmp_path):
    cfg = get_preset("detr-r50").model.with_classes(authors_class_names())
    released = _random_authors_state_dict(cfg)
    assert len(released) == 458 and "backbone.0.body.layer4.2.bn3.running_var" in released
    assert released["class_embed.weight"].shape == (92, 256)
    assert released["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (768, 256)
    pth = tmp_path / "detr-r50-e632da11.pth"
    torch.save({"model": released}, pth)

    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(authors.from_authors_keys(released), strict=False)
    assert not missing and not unexpected

    via_pth = Detector.from_pretrained(pth)
    assert via_pth.config.backbone == "resnet50" and not via_pth.config.dilation
    assert via_pth.config.class_names[1] == "person" and via_pth.config.class_names[12] == "N/A"
    via_pth.save_pretrained(tmp_path / "native")
    via_native = Detector.from_pretrained(tmp_path / "native")
    via_pth.export_huggingface(tmp_path / "hf")
    via_hf = Detector.from_pretrained(tmp_path / "hf")
    images = _two_images()
    with torch.no_grad():
        outs = [d.model(images) for d in (via_pth, via_native, via_hf)]
    for o in outs[1:]:
        assert torch.equal(o["pred_logits"], outs[0]["pred_logits"])
        assert torch.equal(o["pred_boxes"], outs[0]["pred_boxes"])


def test_parameter_counts_as_published():
    def counts(name):
        m = build_model(get_preset(name).model.with_classes(authors_class_names()))
        total = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        return total, trainable

    total, trainable = counts("detr-r50")
    assert round(total / 1e6, 1) == 41.5 and round(trainable / 1e6, 1) == 41.3
    assert round(counts("detr-r101")[0] / 1e6, 1) == 60.5


def test_sine_positions_span_the_valid_region_whatever_the_padding():
    pe = PositionEmbeddingSine(64)
    mask = torch.ones(3, 9, 12, dtype=torch.bool)
    for i, (h, w) in enumerate([(9, 12), (5, 12), (3, 4)]):
        mask[i, :h, :w] = False
    pos = pe(mask)
    assert pos.shape == (3, 128, 9, 12)
    # channel 0 = sin(y / 1), channel 64 = sin(x / 1): recover the normalised coordinates
    for i, (h, w) in enumerate([(9, 12), (5, 12), (3, 4)]):
        y = torch.asin(pos[i, 0, :h, 0]).tolist()  # valid only while y <= pi/2: use the cos channel too
        ycos = pos[i, 1, :h, 0]
        ycoord = torch.atan2(pos[i, 0, :h, 0], ycos) % (2 * math.pi)
        xcoord = torch.atan2(pos[i, 64, 0, :w], pos[i, 65, 0, :w]) % (2 * math.pi)
        assert ycoord[0] == pytest.approx(2 * math.pi / h, abs=1e-5)
        assert xcoord[0] == pytest.approx(2 * math.pi / w, abs=1e-5)
        # the last valid row/column is at 2pi (wraps to ~0 through atan2), evenly spaced before it
        assert torch.allclose(ycoord[:-1], torch.arange(1, h, dtype=torch.float32) * 2 * math.pi / h, atol=1e-4)
        assert min(ycoord[-1].item(), 2 * math.pi - ycoord[-1].item()) < 1e-4
        assert len(y) == h
    # an unpadded image gets the same positions as its padded copy
    small = torch.zeros(1, 3, 4, dtype=torch.bool)
    assert torch.allclose(pe(small)[0], pos[2, :, :3, :4], atol=1e-6)


def test_attention_is_exactly_zero_on_padding():
    cfg = get_preset("detr-tiny").model.with_classes(["a", "b"])
    model = build_model(cfg).eval()
    images = [torch.randn(3, 96, 160), torch.randn(3, 160, 96)]
    with torch.no_grad():
        out = model(images, return_attention=True)
    att = out["attention"]
    keys_pad = att["feature_mask"].flatten(1)  # [B,N]
    assert keys_pad.any(dim=1).all()  # both images have padding
    for name in ("encoder", "decoder_cross"):
        w = att[name]  # [L,B,heads,Lq,N]
        pad = keys_pad[None, :, None, None, :].expand_as(w)
        assert (w[pad] == 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)


def test_forward_contract_and_presets():
    for name in ("detr-r50", "detr-r50-dc5", "detr-r101", "detr-r101-dc5", "detr-tiny", "detr-small"):
        assert get_preset(name).model.hidden_dim > 0
    cfg = get_preset("detr-tiny").model.with_classes(["a", "b", "c"], [3, 17, 90])
    model = build_model(cfg).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        out = model(images)
        batch, mask = pad_images(images)
        same = model(batch, mask)
    q = cfg.num_queries
    assert out["pred_logits"].shape == (2, q, 4) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert torch.equal(out["pred_logits"], same["pred_logits"])


@pytest.mark.parametrize("variant", [dict(pre_norm=True), dict(position_embedding="learned"),
                                     dict(queries_at="input")])
def test_variants_round_trip_native(tmp_path, variant):
    cfg = get_preset("detr-tiny").model.with_classes(["a", "b"])
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **variant})
    model = build_model(cfg).eval()
    if cfg.pre_norm:
        assert model.transformer.encoder.norm is not None
    path = native.save_native(model.state_dict(), cfg, tmp_path / "w.safetensors")
    sd, cfg2 = native.load_native(path)
    assert cfg2 == cfg
    model2 = build_model(cfg2).eval()
    model2.load_state_dict(sd)
    x = [torch.randn(3, 64, 64)]
    with torch.no_grad():
        assert torch.equal(model(x)["pred_logits"], model2(x)["pred_logits"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_object_queries_at_the_decoder_input(pre_norm):
    """queries_at="input" feeds the queries as the decoder's first input and never adds them again."""
    base = get_preset("detr-tiny").model.with_classes(["a", "b"]).to_dict()
    at_attn = build_model(ModelConfig.from_dict({**base, "pre_norm": pre_norm, "queries_at": "attention"})).eval()
    at_input = build_model(ModelConfig.from_dict({**base, "pre_norm": pre_norm, "queries_at": "input"})).eval()
    at_input.load_state_dict(at_attn.state_dict())  # same parameters, same keys
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = (args[0].clone(), args[3])
        return hook

    hooks = [m.transformer.decoder.layers[0].register_forward_pre_hook(record(n))
             for n, m in (("attention", at_attn), ("input", at_input))]
    x = [torch.randn(3, 64, 80)]
    with torch.no_grad():
        a, b = at_attn(x), at_input(x)
    for h in hooks:
        h.remove()
    queries = at_attn.query_embed.weight[None]
    assert torch.equal(seen["attention"][0], torch.zeros_like(queries)) and torch.equal(seen["attention"][1], queries)
    assert torch.equal(seen["input"][0], queries) and seen["input"][1] is None
    assert not torch.allclose(a["pred_boxes"], b["pred_boxes"])
    with pytest.raises(ValueError, match="pre-norm" if pre_norm else "queries_at"):
        huggingface.hf_config(at_input.cfg)
    with pytest.raises(ValueError, match="queries_at"):
        ModelConfig.from_dict({**base, "queries_at": "output"})


def test_basic_block_dc5_and_trainable_batch_norm(tmp_path):
    """resnet18 DC5 halves the output stride with layer4's weights unchanged in shape; backbone_norm
    "batch" trains BN and every layer, keeps running statistics and survives the native round trip."""
    from detrkit.model.backbone import Backbone

    x, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    plain, dc5 = Backbone("resnet18"), Backbone("resnet18", dilation=True)
    assert plain(x, mask)[0].shape == (2, 512, 3, 4) and dc5(x, mask)[0].shape == (2, 512, 6, 8)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dc5.state_dict().items()}
    dilations = [m.dilation for n, m in dc5.body.layer4.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert dilations == [(1, 1), (1, 1), (1, 1), (2, 2), (2, 2)]  # block 0: conv1, conv2, downsample
    assert not any(p.requires_grad for n, p in plain.named_parameters() if ".layer1." in n or ".conv1." in n[:12])

    cfg = get_preset("detr-tiny").model.with_classes(["a", "b"])
    cfg.backbone_norm, cfg.dilation = "batch", True
    det = Detector.from_config(cfg)
    assert all(p.requires_grad for p in det.model.backbone.parameters())
    bns = [m for m in det.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20
    det.model.train()(torch.randn(2, 3, 64, 64) * 3 + 1, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert not torch.equal(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))  # statistics moved
    det.model.eval()
    loaded = Detector.from_pretrained(det.save_pretrained(tmp_path / "w"))
    assert loaded.config.backbone_norm == "batch" and loaded.config.dilation
    img = [torch.randn(3, 80, 64)]
    with torch.no_grad():
        assert torch.equal(det.model(img)["pred_boxes"], loaded.model.eval()(img)["pred_boxes"])
    with pytest.raises(ValueError, match="backbone_norm"):
        ModelConfig.from_dict({**cfg.to_dict(), "backbone_norm": "group"})


def test_cpu_training_attention_under_bf16_matches_float32_and_ignores_padding():
    """Training on a CPU under bf16 autocast runs the fused kernel in float32: it computes what float32
    attention computes (to the bf16 projections' rounding), padded keys change nothing, gradients flow."""
    from detrkit.model.transformer import MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4).train()
    q, kv = torch.randn(2, 7, 32), torch.randn(2, 30, 32)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    with torch.no_grad():
        reference, _ = attn(q, kv, kv, pad)  # float32, fused kernel
        _, weights = attn(q, kv, kv, pad, need_weights=True)
    assert torch.all(weights[1, :, :, 20:] == 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, none = attn(q, kv, kv, pad)
        noisy_pad = kv.clone()
        noisy_pad[1, 20:] = 100.0
        out_noisy, _ = attn(q, noisy_pad, noisy_pad, pad)
    assert none is None and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.03)
    assert torch.equal(out[1], out_noisy[1])  # the padded keys carry no weight
    out.float().sum().backward()
    assert attn.in_proj_weight.grad is not None and torch.isfinite(attn.in_proj_weight.grad).all()


def test_damaged_native_weights_are_refused(tmp_path):
    cfg = get_preset("detr-tiny").model.with_classes(["a"])
    det = Detector.from_config(cfg)
    path = det.save_pretrained(tmp_path / "w")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(native.CheckpointError, match="model.safetensors"):
        Detector.from_pretrained(path)
    # same size, one flipped byte in the tensor data: the checksum catches it
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(native.CheckpointError, match="checksum"):
        Detector.from_pretrained(path)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        Detector.from_pretrained(path)


@pytest.mark.parametrize("queries_at", ["attention", "input"])
def test_public_blocks_compose_to_forward_and_a_masked_extra_group_changes_nothing(queries_at):
    """features -> encode -> decode -> heads is forward; a second group of queries appended to the
    decoder behind a block-diagonal self-attention mask leaves the first group's output unchanged."""
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                      dropout=0.0, num_queries=5, class_names=["a", "b"], queries_at=queries_at)
    model = build_model(cfg).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        feats = model.features(images)
        enc = model.encode(feats)
        hs, _ = model.decode(enc)
        out = model.heads(hs)
        ref = model(images)
        for k in ("pred_logits", "pred_boxes"):
            assert torch.equal(out[k], ref[k])
        q = model.query_embed.weight[None].expand(2, -1, -1)
        extra = torch.randn(2, 3, 32)
        mask = torch.ones(8, 8, dtype=torch.bool)
        mask[:5, :5] = False
        mask[5:, 5:] = False
        hs2, _ = model.decode(enc, torch.cat([q, extra], 1), self_attn_mask=mask)
        torch.testing.assert_close(hs2[:, :, :5], hs, rtol=0, atol=1e-6)
        hs3, _ = model.decode(enc, torch.cat([q, extra], 1))  # unmasked, the groups see each other
        assert not torch.allclose(hs3[:, :, :5], hs, atol=1e-4)
        x = torch.randn(1, 3, 64, 64)
        stages = model.backbone.body.stages(x)
        assert [s.shape[-1] for s in stages] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
        assert torch.equal(stages[-1], model.backbone.body(x))
