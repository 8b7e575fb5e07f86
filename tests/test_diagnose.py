"""Say what happened: a collapsed, unlearned run is named as such, with the causes that apply."""
import torch

from detrkit.config import ModelConfig
from detrkit.engine.diagnose import diagnose, duplicate_share, small_object_share, still_slots


def test_collapse_measures():
    g = torch.Generator().manual_seed(0)
    constant = torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(10, 20, 1)  # every slot, every image: one box
    assert still_slots(constant) == 1.0 and duplicate_share(constant) == 1.0
    varied = torch.rand(10, 20, 4, generator=g) * 0.5 + 0.25
    assert still_slots(varied) == 0.0 and duplicate_share(varied) <= 0.1
    per_slot = torch.rand(1, 20, 4, generator=g).mul(0.5).add(0.25).repeat(10, 1, 1)  # slot-specific, fixed
    assert still_slots(per_slot) == 1.0 and duplicate_share(per_slot) <= 0.1


def test_small_objects_against_the_feature_stride():
    cfg = ModelConfig(image_size=128, max_image_size=200)
    boxes = torch.tensor([[20.0, 40.0], [80.0, 80.0]])  # in 256x256 images: halved to 10 and 40 px
    images = torch.tensor([[256.0, 256.0], [256.0, 256.0]])
    assert small_object_share(boxes, images, cfg) == 0.5
    cfg.dilation = True
    assert small_object_share(boxes, images, cfg) == 0.5  # 10 < 16 <= 40
    cfg.image_size = cfg.max_image_size = 512
    assert small_object_share(boxes, images, cfg) == 0.0


def test_a_failed_run_names_its_causes_and_a_good_one_is_quiet():
    cfg = ModelConfig(image_size=128, max_image_size=200)
    collapsed = torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(5, 20, 1)
    d = diagnose({"AP50": 0.01}, 400, "random", cfg, collapsed, torch.tensor([[12.0, 12.0]]),
                 torch.tensor([[256.0, 256.0]]))
    text = d.text()
    assert not d.ok and "AP50 is 0.010" in text and "same box on every image" in text
    assert "too few steps: 400" in text and "a random backbone" in text and "smaller than a feature cell" in text
    good = diagnose({"AP50": 0.6}, 5000, "pretrained-crops", cfg, torch.rand(5, 20, 4) * 0.5 + 0.25)
    assert good.ok and good.causes == []
    # low AP with none of the checked causes: says so, names no cause
    d = diagnose({"AP50": 0.02}, 8000, "imagenet", cfg)
    assert not d.ok and d.causes == [] and "No known cause" in d.text()


def test_a_class_head_at_chance_is_a_failure_sign():
    """BCCD-RBC's stuck runs: boxes learned, AP50 0.07 (above the AP sign), 90% of the matched queries
    called "no object" in the last steps. A run out of that plateau (40%) is quiet."""
    cfg = ModelConfig(image_size=224, max_image_size=352)
    stuck = diagnose({"AP50": 0.07}, 1956, "pretrained-crops", cfg, class_error=92.0)
    assert not stuck.ok and "class head is still at chance" in stuck.text() and "92%" in stuck.text()
    assert "too few steps: 1956" in stuck.text() and stuck.facts["class_error"] == 92.0
    learning = diagnose({"AP50": 0.35}, 2094, "pretrained-crops", cfg, class_error=40.0)
    assert learning.ok and learning.facts["class_error"] == 40.0
