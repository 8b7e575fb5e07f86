"""Backbone pretraining on box crops and the frozen-backbone feature cache."""
from __future__ import annotations

import json

import pytest
import torch

from detrkit.config import TrainConfig
from detrkit.data.coco import load_coco
from detrkit.data.dataset import DetectionDataset
from detrkit.engine.pretrain import box_crops, pretrain_backbone
from detrkit.engine.train import train
from detrkit.model import build_model

from _train_helpers import tiny_data, tiny_model, tiny_train


def test_box_crops_follow_the_boxes(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 6))
    ds = DetectionDataset(index)
    crops, labels = box_crops(ds, 24, torch.Generator().manual_seed(0))
    per_box = [len(ds.boxes(i)[0]) for i in range(len(ds))]
    assert crops.shape == (3 * sum(per_box), 3, 24, 24) and crops.dtype == torch.uint8
    assert labels.shape == (len(crops),)
    assert sorted(labels[::3].tolist()) == sorted(torch.cat([ds.boxes(i)[1] for i in range(len(ds))]).tolist())
    assert (crops.amax(dim=(1, 2, 3)) > 180).all()  # the synthetic shapes are bright: each crop holds one
    capped, _ = box_crops(ds, 24, torch.Generator().manual_seed(0), max_crops=5)
    assert 5 <= len(capped) < len(crops)


def test_pretraining_learns_and_hands_its_batch_norm_to_the_frozen_backbone(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 40))
    ds = DetectionDataset(index)
    model = build_model(tiny_model().with_classes(index.class_names, index.category_ids)).eval()
    before = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    cfg = TrainConfig(pretrain_steps=60, pretrain_batch_size=32, pretrain_crop_size=32, amp="none")
    result = pretrain_backbone(model.backbone.body, "resnet18", ds, cfg, len(index.class_names), torch.device("cpu"),
                               progress=False)
    assert result.num_crops >= 100
    assert result.accuracy > 1.5 / len(index.class_names)  # well above chance on held-out crops
    after = model.backbone.body.state_dict()
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["bn1.running_var"], after["bn1.running_var"])
    # frozen batch norm with the classifier's statistics computes what the classifier computes in eval mode
    net = result.classifier
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        # float32 rounding: scale-and-shift vs normalise-then-affine, through 17 layers
        torch.testing.assert_close(model.backbone.body(x), expected, rtol=1e-4, atol=1e-4)


def test_cached_features_train_exactly_like_the_frozen_backbone(tmp_path):
    """With a frozen backbone, training on cached features (one view per epoch) gives the weights that
    running the backbone on every step gives: same samples, same flips, same arithmetic."""
    data = tiny_data(tmp_path / "data", 6)
    weights = {}
    for views in (0, 2):
        seen = {}
        cfg = tiny_train(lr_backbone=0.0, epochs=2, hflip=True, cache_views=views)
        train(tiny_model(), cfg, data, None, tmp_path / f"run{views}", progress=False, check_data=False,
              step_callback=lambda step, model: seen.__setitem__(step, model.state_dict()))
        weights[views] = {k: v.clone() for k, v in seen[max(seen)].items()}
        assert max(seen) == 6
    for k in weights[0]:
        torch.testing.assert_close(weights[2][k], weights[0][k], rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="frozen backbone"):
        train(tiny_model(), tiny_train(cache_views=1), data, None, tmp_path / "bad", progress=False, check_data=False)


def test_train_pretrains_then_caches(tmp_path):
    data = tiny_data(tmp_path / "data", 8)
    cfg = tiny_train(lr_backbone=0.0, epochs=1, pretrain_steps=3, pretrain_batch_size=8, pretrain_crop_size=32,
                     cache_views=1)
    result = train(tiny_model(), cfg, data, data, tmp_path / "run", progress=False, check_data=False)
    assert result.status == "completed" and result.step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "backbone_start" and rows[0]["kind"] == "pretrained-crops"
    assert rows[0]["details"]["pretrain_crops"] > 0
    assert "AP" in result.metrics


def test_packed_bf16_cache_features_match_the_backbone(tmp_path):
    """The CPU bf16 cache runs the ResNet as packed oneDNN convolutions with folded batch norm; its
    features are the backbone's to bf16 rounding, at every image size, and the mask is the backbone's."""
    from detrkit.engine.feature_cache import _PackedBackbone, _extractor
    from detrkit.model.fuse import mkldnn_fusion_available

    if not mkldnn_fusion_available():
        pytest.skip("no oneDNN fused convolutions in this torch build")
    torch.manual_seed(0)
    backbone = build_model(tiny_model().with_classes(["a", "b"], [1, 2])).backbone.eval()
    for p in backbone.body.modules():  # non-trivial frozen statistics, so folding is exercised
        if hasattr(p, "running_var"):
            p.running_var.uniform_(0.5, 2.0)
            p.running_mean.uniform_(-0.2, 0.2)
    extract = _extractor(backbone, torch.device("cpu"), amp=True)
    assert isinstance(extract, _PackedBackbone)
    for h, w in ((96, 128), (128, 96), (70, 90)):
        images, mask = torch.randn(2, 3, h, w), torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, :, w // 2:] = True
        with torch.no_grad():
            expected, emask = backbone(images, mask)
            got, gmask = extract(images, mask)
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert torch.equal(gmask, emask)
        err = (got.float() - expected).norm() / expected.norm()
        assert err < 0.02, (h, w, float(err))
    assert not isinstance(_extractor(backbone, torch.device("cpu"), amp=False), _PackedBackbone)
