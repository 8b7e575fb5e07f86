"""Duplicate removal: class-wise NMS in the post-processing, off by default (the paper's), chosen by a
run only when it raises the AP on training images, and saved with the weights."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from detrkit.config import ModelConfig, TrainConfig
from detrkit.data.coco import load_coco
from detrkit.engine.duplicates import DUPLICATE_IOUS, check_duplicates
from detrkit.postprocess import postprocess

from _train_helpers import tiny_model


def _logits(scores: list[tuple[int, float]], num_classes: int = 2) -> torch.Tensor:
    """[1,Q,C+1] logits whose softmax gives each query `score` on class `label`, the rest on no-object."""
    probs = torch.full((len(scores), num_classes + 1), 1e-6)
    for q, (label, score) in enumerate(scores):
        probs[q, label], probs[q, -1] = score, 1 - score
    return probs.log()[None]


def test_postprocess_drops_a_lower_scoring_box_of_the_same_class_only():
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    logits = _logits([(0, 0.9), (0, 0.8), (1, 0.7), (0, 0.6)])
    every = postprocess(logits, boxes, [(100, 100)])[0]
    assert every["queries"].tolist() == [0, 1, 2, 3]  # the paper's post-processing keeps all
    dedup = postprocess(logits, boxes, [(100, 100)], duplicate_iou=0.7)[0]
    # query 1 repeats query 0's class and box; query 2 is another class on the same box; query 3 elsewhere
    assert dedup["queries"].tolist() == [0, 2, 3]
    assert torch.allclose(dedup["scores"], torch.tensor([0.9, 0.7, 0.6]), atol=1e-4)
    assert postprocess(logits, boxes, [(100, 100)], threshold=0.65, top_k=1, duplicate_iou=0.7)[0]["queries"].tolist() == [0]


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "0.7"])
def test_duplicate_iou_is_validated(bad):
    with pytest.raises(ValueError, match="duplicate_iou"):
        ModelConfig(class_names=["a"], duplicate_iou=bad)


def _data(tmp_path, grays=(250, 180, 110, 40)) -> object:
    """Images of one gray level each, one box of class 'a' at the same place in every image."""
    images, anns = [], []
    for i, g in enumerate(grays, start=1):
        name = f"im{i}.png"
        Image.new("RGB", (64, 64), (g, g, g)).save(tmp_path / name)
        images.append({"id": i, "file_name": name, "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [16, 16, 32, 32], "area": 1024, "iscrowd": 0})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return load_coco(path)


class _Scripted(nn.Module):
    """Finds the box in every image; its score falls with the image's brightness, and with `repeat` a
    second query puts the same box just below that score, so the repeats of bright images outrank the
    true boxes of dark ones."""

    def __init__(self, repeat: bool, shift: float = 0.005):
        super().__init__()
        self.repeat, self.shift = repeat, shift

    def forward(self, images, batch_invariant=True):
        logits, boxes = [], []
        for im in images:
            score = 0.3 + 0.6 * float(im.mean().sigmoid())  # brighter images (higher mean) score higher
            second = (0, score - 0.01) if self.repeat else (1, 0.01)
            logits.append(_logits([(0, score), second])[0])
            boxes.append(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5 + self.shift, 0.5, 0.5, 0.5]]))
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}


@pytest.mark.parametrize("repeat", [True, False])
def test_the_check_turns_removal_on_only_for_a_model_that_repeats_itself(tmp_path, repeat):
    index = _data(tmp_path)
    cfg = tiny_model(class_names=["a", "b"], category_ids=[1, 2])
    train_cfg = TrainConfig(train_scales=[64], train_max_size=64)
    check = check_duplicates(_Scripted(repeat), index, cfg, train_cfg, torch.device("cpu"))
    assert check.images == 4
    assert set(check.ap_removed) == set(DUPLICATE_IOUS)
    if repeat:
        assert check.ap_kept < 0.9
        assert all(ap == pytest.approx(1.0, abs=1e-3) for ap in check.ap_removed.values())
        assert check.iou == max(DUPLICATE_IOUS)  # equal APs: the gentlest removal
    else:  # nothing to remove: the same AP, the paper's post-processing stays
        assert check.ap_kept == pytest.approx(1.0, abs=1e-3)
        assert all(ap == check.ap_kept for ap in check.ap_removed.values())
        assert check.iou is None


def test_the_check_picks_the_iou_that_removes_the_repeats(tmp_path):
    # the repeat is shifted by 28% of its width: IoU 0.56 with the first box, so only NMS at 0.5 removes it
    check = check_duplicates(_Scripted(True, shift=0.14), _data(tmp_path), tiny_model(class_names=["a", "b"],
                             category_ids=[1, 2]), TrainConfig(train_scales=[64], train_max_size=64), torch.device("cpu"))
    assert check.iou == 0.5
    assert check.ap_removed[0.5] > check.ap_removed[0.7] == pytest.approx(check.ap_kept)


def test_the_setting_survives_native_and_hugging_face_round_trips(tmp_path):
    from detrkit.model import build_model
    from detrkit.weights.huggingface import hf_config
    from detrkit.weights.native import load_native, save_native

    cfg = tiny_model(class_names=["a", "b"], duplicate_iou=0.7, classes_per_query=2)
    model = build_model(cfg)
    _, loaded = load_native(save_native(model.state_dict(), cfg, tmp_path / "w"))
    assert (loaded.duplicate_iou, loaded.classes_per_query) == (0.7, 2)
    assert hf_config(cfg)["detrkit_duplicate_iou"] == 0.7 and hf_config(cfg)["detrkit_classes_per_query"] == 2
    assert ModelConfig.from_dict({**cfg.to_dict(), "duplicate_iou": None}).duplicate_iou is None


def test_classes_per_query_gives_each_query_its_best_classes_with_their_probabilities():
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    probs = torch.tensor([[[0.5, 0.3, 0.05, 0.15], [0.1, 0.2, 0.6, 0.1]]])  # 3 classes + no object
    logits = probs.log()
    paper = postprocess(logits, boxes, [(100, 200)])[0]
    assert paper["labels"].tolist() == [2, 0] and paper["queries"].tolist() == [1, 0]
    two = postprocess(logits, boxes, [(100, 200)], classes_per_query=2)[0]
    assert two["queries"].tolist() == [1, 0, 0, 1]
    assert two["labels"].tolist() == [2, 0, 1, 1]
    assert torch.allclose(two["scores"], torch.tensor([0.6, 0.5, 0.3, 0.2]))
    assert torch.equal(two["boxes"][1], two["boxes"][2]) and torch.equal(two["boxes"][1], paper["boxes"][1])
    assert torch.allclose(two["boxes"][0], torch.tensor([30.0, 15.0, 50.0, 25.0]))  # xyxy pixels of a 200x100 image
    # never more classes than the model has; "no object" is never one of them
    every = postprocess(logits, boxes, [(100, 200)], classes_per_query=5)[0]
    assert len(every["scores"]) == 6 and int(every["labels"].max()) == 2
    # the duplicate removal is class-wise: a query's second class survives next to its first
    assert len(postprocess(logits, boxes, [(100, 200)], duplicate_iou=0.5, classes_per_query=2)[0]["scores"]) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_classes_per_query_is_validated(bad):
    with pytest.raises(ValueError, match="classes_per_query"):
        ModelConfig(class_names=["a"], classes_per_query=bad)


class _SecondGuess(nn.Module):
    """Finds the class-'a' box of every image; on the darker images (`confused`) it ranks class 'b' first."""

    def __init__(self, confused: bool):
        super().__init__()
        self.confused = confused

    def forward(self, images, batch_invariant=True):
        logits = []
        for im in images:
            score = 0.3 + 0.6 * float(im.mean().sigmoid())
            first = (1, 0.55) if self.confused and float(im.mean()) < 0 else (0, score)
            probs = torch.full((1, 3), 1e-6)
            probs[0, first[0]] = first[1]
            probs[0, 1 - first[0]] = 0.3 if first[0] == 1 else 0.01
            probs[0, 2] = 1 - probs[0, :2].sum()
            logits.append(probs.log())
        boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).expand(len(images), 1, 4)
        return {"pred_logits": torch.stack(logits), "pred_boxes": boxes}


@pytest.mark.parametrize("confused", [True, False])
def test_the_check_gives_queries_more_classes_only_where_the_class_comes_second(tmp_path, confused):
    check = check_duplicates(_SecondGuess(confused), _data(tmp_path), tiny_model(class_names=["a", "b"],
                             category_ids=[1, 2]), TrainConfig(train_scales=[64], train_max_size=64), torch.device("cpu"))
    assert set(check.ap_classes) == {1, 2}  # 3 is more than the model's classes
    if confused:  # the two dark images' boxes are found only as their second class
        assert check.ap_classes[1] < 0.6 and check.ap_classes[2] == pytest.approx(1.0, abs=1e-3)
        assert check.classes == 2
    else:
        assert check.ap_classes[1] == check.ap_classes[2] == pytest.approx(1.0, abs=1e-3)
        assert check.classes == 1
    assert check.iou is None
