"""The backbone start: ImageNet weights through torchvision's enum and torch hub's cache (a local file
stands in for the download; no network), the clear offline error, and self-pretraining on one class."""
from __future__ import annotations

import json
import urllib.error

import pytest
import torch
import torchvision

from detrkit.config import get_preset
from detrkit.data.coco import load_coco
from detrkit.data.dataset import DetectionDataset
from detrkit.engine.backbone_start import self_pretrains, start_backbone
from detrkit.model import build_model
from detrkit.weights.imagenet import BackboneWeightsError, imagenet_file

from _train_helpers import tiny_data, tiny_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """TORCH_HOME in a temporary folder and every download refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(url, *a, **k):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch_home"


def _fake_imagenet_file(backbone: str) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (random weights and batch-norm statistics, fc and
    num_batches_tracked included as in the real file) written where torch hub keeps the ImageNet file."""
    torch.manual_seed(5)
    net = getattr(torchvision.models, backbone)()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
        for name, p in net.named_parameters():
            if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                p.uniform_(0.5, 1.5)
    state = net.state_dict()
    path = imagenet_file(backbone)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_paper_preset_starts_from_the_imagenet_file(offline):
    preset = get_preset("detr-r50")
    assert preset.train.backbone_weights == "imagenet"
    assert get_preset("detr-r101-dc5").train.backbone_weights == "imagenet"
    path = imagenet_file("resnet50")
    assert path.parent == offline / "hub" / "checkpoints" and path.name == "resnet50-0676ba61.pth"
    file_state = _fake_imagenet_file("resnet50")
    model = build_model(preset.model.with_classes(["a", "b"]))
    start = start_backbone(model, model.cfg, preset.train, None, torch.device("cpu"), progress=False)
    assert start.kind == "imagenet" and str(path) in start.description
    body = model.backbone.body.state_dict()
    compared = 0
    for k, v in file_state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            assert k not in body
            continue
        assert torch.equal(body[k], v), k
        compared += 1
    assert compared == len(body) == 265  # every conv weight and frozen batch-norm buffer of ResNet-50
    # the frozen batch norm computes torchvision's batch norm in eval mode with those statistics
    net = torchvision.models.resnet50()
    net.load_state_dict(file_state)
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x.clone())))))
        ours = model.backbone.body
        got = ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(x)))))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_offline_without_the_file_says_which_file_and_where(offline):
    preset = get_preset("detr-r50")
    model = build_model(preset.model.with_classes(["a"]))
    with pytest.raises(BackboneWeightsError) as err:
        start_backbone(model, model.cfg, preset.train, None, torch.device("cpu"), progress=False)
    message = str(err.value)
    assert "resnet50-0676ba61.pth" in message and str(offline / "hub" / "checkpoints") in message
    assert "--backbone-weights none" in message


def test_backbone_weights_from_a_path(tmp_path):
    torch.manual_seed(2)
    net = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"model": {f"backbone.0.body.{k}": v for k, v in net.state_dict().items()}}, path)
    model = build_model(tiny_model().with_classes(["a"]))
    cfg = get_preset("detr-tiny").train
    cfg.backbone_weights = str(path)
    start = start_backbone(model, model.cfg, cfg, None, torch.device("cpu"), progress=False)
    assert start.kind == "file"
    assert torch.equal(model.backbone.body.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    cfg.backbone_weights = str(tmp_path / "missing.pth")
    with pytest.raises(BackboneWeightsError, match="missing.pth: backbone weights file not found"):
        start_backbone(model, model.cfg, cfg, None, torch.device("cpu"), progress=False)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    cfg.backbone_weights = str(tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="bad.pth: does not fit the backbone"):
        start_backbone(model, model.cfg, cfg, None, torch.device("cpu"), progress=False)


def test_given_weights_replace_self_pretraining_in_the_plan_too():
    cfg = get_preset("detr-tiny").train
    assert self_pretrains(cfg)  # the preset's fallback: no weights, crops to pretrain on
    for given in ("imagenet", "/some/backbone.pth"):  # the plan must not list a phase that will not run
        cfg.backbone_weights = given
        assert not self_pretrains(cfg)
    cfg.backbone_weights, cfg.pretrain_steps, cfg.pretrain_dense_steps = "none", 0, 0
    assert not self_pretrains(cfg)


def test_self_pretraining_learns_on_a_one_class_dataset(tmp_path):
    """One class: box crops alone teach nothing; with background crops (object vs background) the
    held-out accuracy is far above the majority share, and the start says what it was."""
    path = tiny_data(tmp_path / "data", 30)
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 1, "name": "thing"}]
    for a in coco["annotations"]:
        a["category_id"] = 1
    path.write_text(json.dumps(coco))
    index = load_coco(path)
    model = build_model(tiny_model().with_classes(index.class_names, index.category_ids))
    cfg = get_preset("detr-tiny").train
    cfg.pretrain_steps, cfg.pretrain_batch_size, cfg.pretrain_crop_size, cfg.amp = 60, 32, 32, "none"
    cfg.pretrain_dense_steps = 0  # the crop phase alone (the dense one has its own tests)
    start = start_backbone(model, model.cfg, cfg, DetectionDataset(index), torch.device("cpu"), progress=False)
    assert start.kind == "pretrained-crops" and "background" in start.description
    assert start.details["pretrain_accuracy"] > 0.75
