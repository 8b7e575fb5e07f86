"""Backbone pretraining on box crops and the frozen-backbone feature cache."""
from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

from detrkit.config import TrainConfig
from detrkit.data.coco import load_coco
from detrkit.data.dataset import DetectionDataset
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.pretrain import box_crops, pretrain_backbone
from detrkit.engine.train import train
from detrkit.model import build_model

from _train_helpers import StepClock, tiny_data, tiny_model, tiny_train


def test_box_crops_follow_the_boxes(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 6))
    ds = DetectionDataset(index)
    crops, labels, _ = box_crops(ds, 24, torch.Generator().manual_seed(0))
    per_box = [len(ds.boxes(i)[0]) for i in range(len(ds))]
    assert crops.shape == (3 * sum(per_box), 3, 24, 24) and crops.dtype == torch.uint8
    assert labels.shape == (len(crops),)
    assert sorted(labels[::3].tolist()) == sorted(torch.cat([ds.boxes(i)[1] for i in range(len(ds))]).tolist())
    assert (crops.amax(dim=(1, 2, 3)) > 180).all()  # the synthetic shapes are bright: each crop holds one
    capped = box_crops(ds, 24, torch.Generator().manual_seed(0), max_crops=5).images
    assert 5 <= len(capped) < len(crops)


def test_box_crops_say_where_their_box_lies(tmp_path):
    ds = DetectionDataset(load_coco(tiny_data(tmp_path / "data", 12)))
    crops, labels, where = box_crops(ds, 32, torch.Generator().manual_seed(0), background=True, each_side=True)
    is_box = labels < len(ds.index.class_names)
    assert where[~is_box].isnan().all() and not where[is_box].isnan().any()
    boxes = where[is_box]
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres.std(0).min() > 0.03  # each side its own margin: the box is not always centred
    # the bright shape is where the box says: brighter inside the box than in the rest of the crop
    brighter = 0
    for crop, (x0, y0, x1, y1) in zip(crops[is_box].float().mean(1), (boxes * 32).tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[int(y0):max(int(y1), int(y0) + 1), int(x0):max(int(x1), int(x0) + 1)] = True
        brighter += int(crop[inside].mean() > crop[~inside].mean()) if (~inside).any() else 1
    assert brighter >= 0.9 * len(boxes)
    # one margin for all four sides (the default): the box sits at the centre unless the image cut it
    _, labels, where = box_crops(ds, 32, torch.Generator().manual_seed(0), background=True)
    boxes = where[labels < len(ds.index.class_names)]
    centred = ((boxes[:, :2] + boxes[:, 2:]) / 2 - 0.5).abs().amax(1) < 0.02
    centred_each_side = centres.sub(0.5).abs().amax(1).lt(0.02)  # each-side crops that happen to be centred
    assert centred.float().mean() > 0.3
    assert centred_each_side.float().mean() < centred.float().mean()


def test_pretraining_with_the_box_target_learns_where_the_box_is(tmp_path):
    index = load_coco(tiny_data(tmp_path / "data", 40))
    ds = DetectionDataset(index)
    model = build_model(tiny_model().with_classes(index.class_names, index.category_ids)).eval()
    cfg = TrainConfig(pretrain_steps=160, pretrain_batch_size=32, pretrain_crop_size=32, amp="none", pretrain_box_coef=5.0)
    result = pretrain_backbone(model.backbone.body, "resnet18", ds, cfg, len(index.class_names), torch.device("cpu"),
                               progress=False)
    _, labels, where = box_crops(ds, 32, torch.Generator().manual_seed(1), background=True, each_side=True)
    boxes = where[labels < len(index.class_names)]
    constant = (boxes - boxes.mean(0)).abs().mean()  # the L1 of always answering the mean box
    assert result.box_error < 0.8 * float(constant), (result.box_error, float(constant))
    assert result.to_dict()["pretrain_box_l1"] == result.box_error
    assert result.accuracy > 1.5 / len(index.class_names)


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
    running the backbone on every step gives: same samples, same flips, same arithmetic (to float
    rounding: oneDNN's channels-last convolutions split a batch of 32 differently from one of 4, and
    Adam's normalised steps carry a 1e-7 difference in a feature to ~1e-5 in a weight)."""
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
        torch.testing.assert_close(weights[2][k], weights[0][k], rtol=1e-4, atol=5e-5, msg=k)
    with pytest.raises(ValueError, match="frozen backbone"):
        train(tiny_model(), tiny_train(cache_views=1), data, None, tmp_path / "bad", progress=False, check_data=False)


def test_a_resumed_run_serves_the_views_it_cached_before(tmp_path, caplog):
    """The views a run cached (a time budget may cut them short of the plan) are recorded in its
    checkpoint; the resumed run caches exactly as many, so epoch e still meets view e mod views and the
    run ends where an uninterrupted one does. Here the resumed run's settings ask for 3 views, as a
    longer budget would, and get the 1 view the first part had."""
    data = tiny_data(tmp_path / "data", 6)  # 3 steps per epoch
    cfg = dict(lr_backbone=0.0, epochs=2, hflip=True, train_scales=[48, 56, 64])
    full = train(tiny_model(), tiny_train(cache_views=1, **cfg), data, None, tmp_path / "full", progress=False,
                 check_data=False)
    assert full.status == "completed" and full.step == 6

    def stop_at_4(step, model):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    part = train(tiny_model(), tiny_train(cache_views=1, **cfg), data, None, tmp_path / "part", progress=False,
                 check_data=False, step_callback=stop_at_4)
    assert part.status == "interrupted" and load_checkpoint(tmp_path / "part" / "last.pt")["cached_views"] == 1
    with caplog.at_level(logging.INFO):
        resumed = train(tiny_model(), tiny_train(cache_views=3, **cfg), data, None, tmp_path / "part",
                        progress=False, check_data=False, resume=True)
    assert resumed.step == 6 and "cached backbone features of 1 view(s)" in caplog.text
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)


def test_train_pretrains_then_caches(tmp_path):
    data = tiny_data(tmp_path / "data", 24)  # enough objects for the feature probe
    cfg = tiny_train(lr_backbone=0.0, epochs=1, pretrain_steps=3, pretrain_batch_size=8, pretrain_crop_size=32,
                     cache_views=1)
    result = train(tiny_model(), cfg, data, data, tmp_path / "run", progress=False, check_data=False)
    assert result.status == "completed" and result.step == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "backbone_start" and rows[0]["kind"] == "pretrained-crops"
    assert rows[0]["details"]["pretrain_crops"] > 0
    probe = next(r for r in rows if r["type"] == "feature_probe")  # the cached features were probed
    assert 0 <= probe["objectness_auc"] <= 1 and probe["images"] == 24
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["backbone_start"]["details"]
    assert recorded["feature_probe"] == {k: v for k, v in probe.items() if k != "type"}
    assert "AP" in result.metrics


def test_packed_bf16_cache_features_match_the_backbone(tmp_path):
    """The CPU bf16 cache runs the ResNet as packed oneDNN convolutions with folded batch norm; its
    features are the backbone's to bf16 rounding, at every image size, and the mask is the backbone's."""
    from detrkit.engine.feature_cache import _PackedBackbone, _extractor
    from detrkit.model.fuse import mkldnn_fusion_available

    if not mkldnn_fusion_available(torch.bfloat16):
        pytest.skip("no oneDNN fused bf16 convolutions on this CPU / torch build")
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


class _SlowSamples(Dataset):
    """SeededSamples-like images whose every read advances a fake clock: a cache that takes `seconds`
    an image, whatever the machine's load."""

    def __init__(self, n: int, clock: StepClock, seconds: float):
        self.n, self.clock, self.seconds, self.epoch = n, clock, seconds, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.clock.now += self.seconds
        image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(100 * self.epoch + i))
        return image, {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}


def _cache(views: int, limit_of=None, images: int = 4):
    from detrkit.engine.feature_cache import FeatureCache

    clock = StepClock(0.0)
    backbone = build_model(tiny_model().with_classes(["a"], [1])).backbone
    limit = limit_of(clock) if limit_of else None
    return FeatureCache(_SlowSamples(images, clock, 1.0), backbone, views, torch.device("cpu"), amp=False,
                        progress=False, limit=limit)


def test_cache_stops_at_the_views_that_fit_its_share(caplog):
    """4 s a view, 9 s of share: a second view ends at 8 s, a third would end at 12 s -> 2 of 3 views,
    said in words, and epoch e serves view e mod 2."""
    from detrkit.engine.feature_cache import CacheLimit

    with caplog.at_level(logging.INFO, logger="detrkit.engine.feature_cache"):
        cache = _cache(3, lambda clock: CacheLimit(9.0, 30.0, clock))
    assert cache.views == 2 and len(cache.items) == 2
    assert "cached 2 of 3 views: view 3 would pass the caching share of --max-minutes" in caplog.text
    assert "more than the whole" not in caplog.text
    cache.epoch = 1
    second = cache[0][0]
    cache.epoch = 2  # back to the first view
    assert torch.equal(cache[0][0], cache.items[0][0][0]) and not torch.equal(second, cache[0][0])


def test_cache_without_a_budget_caches_every_view():
    cache = _cache(3)  # just as slow, no limit: deterministic
    assert cache.views == 3 and len(cache.items) == 3


def test_cache_longer_than_the_whole_budget_warns_and_keeps_one_view(caplog):
    from detrkit.engine.feature_cache import CacheLimit

    with caplog.at_level(logging.INFO, logger="detrkit.engine.feature_cache"):
        cache = _cache(3, lambda clock: CacheLimit(1.0, 3.0, clock))
    assert cache.views == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "more than the whole --max-minutes budget" in warnings[0].getMessage()
    assert "cached 1 of 3 views" in caplog.text


def test_train_with_a_cache_shortened_by_the_time_budget(tmp_path, monkeypatch, caplog):
    """Under --max-minutes 0.5 (30 s; the cache's share 9 s) a cache that takes 0.5 s an image (4 s a view
    of 8 images) keeps 2 of 3 views, and the training runs its epochs to the end on them."""
    from detrkit.engine import feature_cache

    clock = StepClock(0.05)
    features = feature_cache._features

    def slow_features(batch, *args):
        clock.now += 0.5 * len(batch)
        return features(batch, *args)

    monkeypatch.setattr(feature_cache, "_features", slow_features)
    data = tiny_data(tmp_path / "data", 8)
    cfg = tiny_train(lr_backbone=0.0, epochs=3, cache_views=3, max_minutes=0.5)
    with caplog.at_level(logging.INFO):
        result = train(tiny_model(), cfg, data, None, tmp_path / "run", progress=False, check_data=False,
                       clock=clock, step_callback=clock.tick)
    assert "cached 2 of 3 views" in caplog.text
    assert "backbone features cached: 3 view(s) x 8 images, at most" in caplog.text  # the plan names the share
    assert result.status == "completed" and result.step == 12


def test_a_small_set_caches_more_views_up_to_the_ceiling():
    from detrkit.engine.feature_cache import MAX_VIEWS, planned_views

    cfg = TrainConfig(cache_views=3, cache_images=12000, lr_backbone=0)
    assert planned_views(cfg, 4000) == 3  # 12000 images already
    assert planned_views(cfg, 205) == 59  # BCCD's train split: ceil(12000 / 205)
    assert planned_views(cfg, 10) == MAX_VIEWS
    assert planned_views(cfg, 100000) == 3  # never fewer than cache_views
    assert planned_views(TrainConfig(cache_views=3, lr_backbone=0), 10) == 3  # cache_images 0: exactly cache_views
    assert planned_views(TrainConfig(cache_views=0, cache_images=12000), 10) == 0  # caching off stays off


def test_stuff_gives_patches_of_its_region_and_no_background_class(tmp_path):
    """Panoptic-style data (categories with isthing 0): a stuff crop is a patch inside its region, not the
    whole region box squashed with a margin of its neighbours, and with every pixel labelled no crop is
    "background". Stuff is easy to name, so a stuff box gives one patch where a thing's box gives three
    crops."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    pixels = torch.zeros(64, 96, 3, dtype=torch.uint8)
    pixels[:32, :, 2] = 255  # sky: blue, rows 0-31
    pixels[32:, :, 1] = 255  # ground: green, rows 32-63
    pixels[40:56, 10:26] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # a red square thing
    Image.fromarray(pixels.numpy()).save(tmp_path / "images" / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 10, "bbox": [0, 0, 96, 32], "area": 3072, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 11, "bbox": [0, 32, 96, 32], "area": 2816, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 40, 16, 16], "area": 256, "iscrowd": 0}]
    cats = [{"id": 1, "name": "square", "isthing": 1}, {"id": 10, "name": "sky", "isthing": 0},
            {"id": 11, "name": "ground", "isthing": 0}]
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "images/a.png", "width": 96,
                                                              "height": 64}], "annotations": anns, "categories": cats}))
    index = load_coco(tmp_path / "a.json")
    assert index.stuff_ids == frozenset({10, 11})
    crops, labels, _ = box_crops(DetectionDataset(index), 16, torch.Generator().manual_seed(0), background=True)
    # square (3 crops), sky and ground (one patch each); no background (3)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 2]
    sky, ground = crops[labels == 1].float(), crops[labels == 2].float()
    assert (sky[:, 2] > 250).all() and (sky[:, :2] < 5).all()  # all blue: nothing of the ground below
    assert (ground[:, 2] < 5).all()  # no sky in a ground patch (the red thing may be in it)
