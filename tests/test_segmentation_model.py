"""The panoptic model (mask head) against Hugging Face's DetrForSegmentation and the authors' layout."""
import pytest
import torch

from detrkit import ModelConfig, get_preset
from detrkit.model.detr import DETR, pad_images
from detrkit.model.segmentation import DETRSegmentation, MHAttentionMap
from detrkit.weights import authors, native, panoptic

transformers = pytest.importorskip("transformers")


def _randomise(model: torch.nn.Module) -> None:
    """Frozen BN buffers and GroupNorm affine start as identity; random values make the comparison
    meaningful."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("weight"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if "mask_head" in name and ("gn" in name or "norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.1)


def _hf_segmentation(backbone: str, **kw):
    from transformers import DetrConfig, DetrForSegmentation

    cfg = DetrConfig(use_timm_backbone=True, backbone=backbone, use_pretrained_backbone=False, **kw)
    torch.manual_seed(0)
    model = DetrForSegmentation(cfg).eval()
    _randomise(model)
    return model


def _two_images():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 160, 224, generator=g), torch.randn(3, 200, 128, generator=g)]


def _max_diffs(ours: dict, theirs) -> tuple[float, float, float]:
    return ((ours["pred_logits"] - theirs.logits).abs().max().item(),
            (ours["pred_boxes"] - theirs.pred_boxes).abs().max().item(),
            (ours["pred_masks"] - theirs.pred_masks).abs().max().item())


@pytest.mark.parametrize("backbone,kw", [
    ("resnet18", dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=256,
                      decoder_ffn_dim=256, num_queries=12, num_labels=5)),
    ("resnet50", dict(num_queries=10, num_labels=250)),
], ids=["r18-narrow", "r50"])
def test_equivalent_to_huggingface_segmentation(tmp_path, backbone, kw):
    from transformers import DetrForSegmentation

    hf = _hf_segmentation(backbone, **kw)
    hf.save_pretrained(tmp_path / "hf")
    assert panoptic.is_hf_segmentation_dir(tmp_path / "hf")
    sd, cfg = panoptic.load_hf_segmentation(tmp_path / "hf")
    ours = DETRSegmentation(cfg).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing and not unexpected

    images = _two_images()
    batch, mask = pad_images(images)
    with torch.no_grad():
        theirs = hf(pixel_values=batch, pixel_mask=(~mask).long())
        out = ours(images)
    q = kw["num_queries"]
    assert out["pred_masks"].shape == (2, q, 200 // 4, 224 // 4) == theirs.pred_masks.shape
    assert max(_max_diffs(out, theirs)) <= 1e-4
    assert out["pred_masks"].std() > 0.1  # not a degenerate comparison

    # our export -> transformers loads it -> same outputs; re-import -> bit-identical weights
    panoptic.save_hf_segmentation(ours.state_dict(), cfg, tmp_path / "out")
    hf2 = DetrForSegmentation.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = hf2(pixel_values=batch, pixel_mask=(~mask).long())
    assert max(_max_diffs(out, again)) <= 1e-4
    sd2, cfg2 = panoptic.load_hf_segmentation(tmp_path / "out")
    mine = ours.state_dict()
    assert sd2.keys() == mine.keys() and all(torch.equal(sd2[k], mine[k]) for k in mine)
    assert cfg2 == cfg


def test_detector_part_is_a_plain_detr():
    cfg = get_preset("detr-tiny").model.with_classes(["a", "b", "c"])
    seg = DETRSegmentation(cfg).eval()
    plain = DETR(cfg).eval()
    plain.load_state_dict(panoptic.detector_part(seg.state_dict()))
    images = _two_images()
    with torch.no_grad():
        a, b = seg(images), plain(images)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)


@pytest.mark.parametrize("preset", ["detr-tiny", "detr-small", "detr-r50-dc5"])
def test_mask_head_shapes_every_preset(preset):
    cfg = get_preset(preset).model.with_classes(["a", "b"])
    cfg.num_queries = 3
    seg = DETRSegmentation(cfg).eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 96)]
    with torch.no_grad():
        out = seg(images, return_attention=True, mask_queries=torch.tensor([[2, 0], [1, 1]]))
    assert out["pred_masks"].shape == (2, 2, 24, 32)
    att = out["mask_attention"]
    stride = 16 if cfg.dilation else 32
    assert att.shape == (2, 2, cfg.nheads, 96 // stride, 128 // stride)
    # one softmax over heads and cells; padding gets nothing
    assert torch.allclose(att.flatten(2).sum(-1), torch.ones(2, 2), atol=1e-5)
    fmask = out["attention"]["feature_mask"]
    assert fmask[1].any() and att[1][:, :, fmask[1]].abs().max() == 0
    # masks of selected queries equal those of the full forward
    with torch.no_grad():
        full = seg(images)["pred_masks"]
    assert torch.allclose(out["pred_masks"][0, 0], full[0, 2], atol=1e-4)
    assert torch.allclose(out["pred_masks"][1, 1], full[1, 1], atol=1e-4)


def test_attention_map_by_hand():
    """Two heads of one channel each, a 1x2 memory: the joint softmax over heads and cells."""
    m = MHAttentionMap(2, 2)
    with torch.no_grad():
        m.q_linear.weight.copy_(torch.eye(2))
        m.k_linear.weight.copy_(torch.eye(2))
    q = torch.tensor([[[1.0, 2.0]]])  # [B=1,Q=1,d=2]
    mem = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])  # [1,2,1,2]: channel 0 = (1,0), channel 1 = (0,3)
    w = m(q, mem)
    scores = torch.tensor([1.0 * 1, 0.0, 0.0, 2.0 * 3])  # head0 cells, head1 cells (scale 1)
    assert torch.allclose(w.flatten(), scores.softmax(0), atol=1e-6)


def _authors_panoptic_state_dict(cfg: ModelConfig) -> dict:
    model = DETRSegmentation(cfg)
    _randomise(model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return panoptic.to_authors_panoptic(model.state_dict())


def test_authors_panoptic_layout_loads(tmp_path):
    names, stuff = panoptic.panoptic_class_names()
    assert len(names) == 250 and names[1] == "person" and names[184] == "tree-merged" and len(stuff) == 53
    cfg = get_preset("detr-r50").model.with_classes(names)
    released = _authors_panoptic_state_dict(cfg)
    assert released["detr.class_embed.weight"].shape == (251, 256)
    assert "detr.backbone.0.body.layer1.0.conv1.weight" in released
    assert released["bbox_attention.q_linear.weight"].shape == (256, 256)
    assert released["mask_head.lay1.weight"].shape == (264, 264, 3, 3)
    assert released["mask_head.adapter1.weight"].shape == (128, 1024, 1, 1)
    assert released["mask_head.out_lay.weight"].shape == (1, 16, 3, 3)
    pth = tmp_path / "detr-r50-panoptic-00ce5173.pth"
    torch.save({"model": released}, pth)

    model = DETRSegmentation(cfg)
    missing, unexpected = model.load_state_dict(panoptic.from_authors_panoptic(released), strict=False)
    assert not missing and not unexpected

    sd, loaded_cfg = panoptic.load_authors_panoptic(pth)
    assert loaded_cfg.num_classes == 250 and loaded_cfg.class_names[187] == "sky-other-merged"
    assert loaded_cfg.backbone == "resnet50" and not loaded_cfg.dilation
    model.load_state_dict(sd)
    # the detector inside, through the ordinary authors' loader, is a plain box detector
    det_sd, det_cfg = authors.load_authors(pth)
    assert det_cfg.num_classes == 250 and not panoptic.is_panoptic(det_sd)
    DETR(det_cfg).load_state_dict(det_sd)

    # native save/load keeps the whole panoptic model
    native.save_native(model.state_dict(), loaded_cfg, tmp_path / "native")
    sd2, cfg2 = native.load_native(tmp_path / "native")
    assert cfg2 == loaded_cfg and panoptic.is_panoptic(sd2)
    assert all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())


def test_published_panoptic_name_downloads_hash_checked(tmp_path, monkeypatch):
    """`detr-r50-panoptic` through the hub (a local mirror stands in for the authors' server)."""
    import hashlib

    from detrkit import Detector
    from detrkit.weights import hub

    assert hub.PUBLISHED["detr-r50-panoptic"] == ("detr-r50-panoptic-00ce5173.pth", "00ce5173")
    assert {"detr-r50-dc5-panoptic", "detr-r101-panoptic"} <= set(hub.PUBLISHED)
    names, _ = panoptic.panoptic_class_names()
    cfg = get_preset("detr-r50").model.with_classes(names)
    cfg.enc_layers = cfg.dec_layers = 1  # a small file; the loader infers the layer counts
    cfg.num_queries = 5
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    src = mirror / "payload.pth"
    torch.save({"model": panoptic.to_authors_panoptic(DETRSegmentation(cfg).state_dict())}, src)
    prefix = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    name = f"detr-r50-panoptic-{prefix}.pth"
    src.rename(mirror / name)
    monkeypatch.setattr(hub, "_BASE", mirror.as_uri() + "/")
    monkeypatch.setitem(hub.PUBLISHED, "detr-r50-panoptic", (name, prefix))
    monkeypatch.setenv("DETRKIT_CACHE", str(tmp_path / "cache"))
    det = Detector.from_pretrained("detr-r50-panoptic")
    assert det.segmentation is not None and det.config.num_classes == 250
    assert 187 in det.config.stuff_category_ids and 1 not in det.config.stuff_category_ids
    det.config.image_size, det.config.max_image_size = 64, 80  # keep the test fast
    [res] = det.predict(torch.rand(3, 64, 80), task="panoptic", panoptic_threshold=0.0)
    assert res.ids.shape == (64, 80)
