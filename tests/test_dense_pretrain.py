"""Dense backbone pretraining on windows of the training images (engine/dense_pretrain.py)."""
from __future__ import annotations

import torch

from detrkit.config import get_preset
from detrkit.data.coco import load_coco
from detrkit.data.dataset import DetectionDataset
from detrkit.engine.backbone_start import start_backbone
from detrkit.engine.dense_pretrain import _features, dense_pretrain, window
from detrkit.model import build_model
from detrkit.model.backbone import Backbone

from _train_helpers import tiny_data, tiny_model, tiny_train


def test_window_moves_clips_and_drops_boxes():
    # 64 x 128 image, window 64: y0 is 0, x0 is read back from the pixels (each column holds its x)
    image = torch.arange(128.0).expand(3, 64, 128).clone()
    w, h = 128, 64
    xyxy = torch.tensor([[70.0, 10, 90, 30], [40, 20, 80, 40], [10, 0, 30, 64]])  # pixels
    boxes = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                         (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], dim=-1)
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "image_id": 7}
    for seed in range(20):
        crop, out = window(image, target, 64, torch.Generator().manual_seed(seed))
        x0 = int(crop[0, 0, 0])
        assert crop.shape == (3, 64, 64) and torch.equal(crop[0, 0], torch.arange(x0, x0 + 64.0))
        expected, labels = [], []
        for (a, b, c, d), label in zip(xyxy.tolist(), [0, 1, 2]):
            lo, hi = min(max(a - x0, 0), 64), min(max(c - x0, 0), 64)
            if (hi - lo) * (d - b) >= 0.25 * (c - a) * (d - b):  # at least a quarter of the area inside
                expected.append([(lo + hi) / 2 / 64, (b + d) / 2 / 64, (hi - lo) / 64, (d - b) / 64])
                labels.append(label)
        assert out["labels"].tolist() == labels and out["image_id"] == 7
        torch.testing.assert_close(out["boxes"], torch.tensor(expected).reshape(-1, 4))


def test_dense_pretraining_learns_and_hands_its_net_to_the_frozen_backbone(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 24))
    model_cfg = tiny_model().with_classes(index.class_names, index.category_ids)
    body = build_model(model_cfg).backbone.body
    cfg = tiny_train(pretrain_dense_steps=30, pretrain_dense_lr=1e-3)
    net_before = __import__("torchvision").models.resnet18()
    stem = {k: v.clone() for k, v in net_before.state_dict().items() if k.startswith(("conv1.", "layer1.")) and "weight" in k}
    last = net_before.layer4[1].conv2.weight.detach().clone()
    result = dense_pretrain(net_before, body, DetectionDataset(index), model_cfg, cfg, torch.device("cpu"),
                            progress=False)
    assert result.steps == 30 and 0.0 <= result.accuracy <= 1.0
    # the frozen body now computes what the trained net computes in eval mode (its batch statistics too)
    net_before.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(body(x), _features(net_before, x), rtol=1e-4, atol=1e-4)
    assert not torch.equal(body.bn1.running_var, torch.ones_like(body.bn1.running_var))
    # after a crop phase the stem keeps its weights (FROZEN); the deeper layers learn
    assert all(torch.equal(body.state_dict()[k], v) for k, v in stem.items())
    assert not torch.equal(body.layer4[1].conv2.weight, last)


def test_dense_pretraining_alone_is_a_recorded_backbone_start(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 12))
    model = build_model(tiny_model().with_classes(index.class_names, index.category_ids))
    cfg = get_preset("detr-tiny").train
    cfg.pretrain_steps, cfg.pretrain_dense_steps, cfg.amp = 0, 4, "none"
    cfg.train_scales, cfg.train_max_size, cfg.crop_resize, cfg.crop_size = [64], 64, [64], [48, 64]
    start = start_backbone(model, model.cfg, cfg, DetectionDataset(index), torch.device("cpu"), progress=False)
    assert start.kind == "pretrained-dense" and "windows" in start.description
    assert start.details["dense_steps"] == 4


def test_dense_pretraining_when_weak_runs_only_on_weak_crop_features(tmp_path, monkeypatch):
    """pretrain_dense_when "weak": a probe of the crop phase's features decides; it is recorded either way."""
    from detrkit.engine import feature_probe

    index = load_coco(tiny_data(tmp_path / "data", 40))
    cfg = get_preset("detr-tiny").train
    cfg.pretrain_steps, cfg.pretrain_batch_size, cfg.pretrain_crop_size = 2, 8, 32
    cfg.pretrain_dense_steps, cfg.pretrain_dense_when, cfg.amp = 3, "weak", "none"
    cfg.train_scales, cfg.train_max_size, cfg.crop_resize, cfg.crop_size = [64], 64, [64], [48, 64]

    def start():
        model = build_model(tiny_model().with_classes(index.class_names, index.category_ids))
        return start_backbone(model, model.cfg, cfg, DetectionDataset(index), torch.device("cpu"), progress=False)

    weak = start()  # two crop steps name nothing: the probe finds the features weak, the dense phase runs
    assert weak.details["crop_feature_probe"]["weak"] and weak.details["dense_steps"] == 3
    assert "windows" in weak.description
    monkeypatch.setattr(feature_probe, "WEAK_AUC", 0.0)  # any features pass
    monkeypatch.setattr(feature_probe, "WEAK_CLASSES", -1.0)
    strong = start()
    assert not strong.details["crop_feature_probe"]["weak"] and "dense_steps" not in strong.details
    assert "windows" not in strong.description and strong.kind == "pretrained-crops"


def test_dc5_dilation_matches_torchvision_for_bottlenecks():
    """One dilation helper serves both block types; for bottlenecks it equals torchvision's own DC5."""
    import torchvision

    torch.manual_seed(0)
    ours = Backbone("resnet50", dilation=True, norm="batch").body.eval()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        # channels-last against NCHW convolutions: float32 rounding only (a wrong stride or dilation is O(1))
        torch.testing.assert_close(ours(x), _features(ref, x), rtol=1e-3, atol=1e-3)
    assert ours(x).shape[-1] == 6  # stride 16


def test_dense_pretraining_on_unreadable_images_stops_with_a_clear_error(tmp_path):
    import pytest

    path = tiny_data(tmp_path / "data", 4)
    for image in (tmp_path / "data").rglob("*.png"):
        image.write_bytes(b"not a png")
    index = load_coco(path)
    model_cfg = tiny_model().with_classes(index.class_names, index.category_ids)
    body = build_model(model_cfg).backbone.body
    with pytest.raises(ValueError, match="dense backbone pretraining read no image"):
        dense_pretrain(None, body, DetectionDataset(index), model_cfg, tiny_train(pretrain_dense_steps=5),
                       torch.device("cpu"), progress=False)
