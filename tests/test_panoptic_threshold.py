"""The panoptic keep threshold chosen on held-out images: PQ per threshold in one pass, the choice,
and the threshold travelling with the weights (native, Hugging Face) into eval and predict."""
import json
import math

import numpy as np
import pytest
import torch

from detrkit import Detector, get_preset
from detrkit.config import ModelConfig
from detrkit.data.panoptic import load_panoptic, read_segment_ids
from detrkit.data.synthetic_panoptic import make_synthetic_panoptic
from detrkit.engine import panoptic as panoptic_engine
from detrkit.engine.panoptic import ImageOutput, evaluate_panoptic, load_panoptic_model, train_mask_head
from detrkit.engine.panoptic_threshold import fit_panoptic_threshold, pq_per_threshold
from detrkit.model import build_model
from detrkit.weights.native import load_native, save_native


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("panthr")
    train_json = make_synthetic_panoptic(root / "train", num_images=4, seed=0, image_size=(64, 80))
    calib_json = make_synthetic_panoptic(root / "calib", num_images=3, seed=5, image_size=(64, 80))
    index = load_panoptic(train_json)
    cfg = get_preset("detr-tiny").model.with_classes([n for _, n, _ in index.categories],
                                                     [c for c, _, _ in index.categories])
    cfg.num_queries, cfg.image_size, cfg.max_image_size = 8, 64, 96
    cfg.stuff_category_ids = sorted(index.stuff_ids)
    torch.manual_seed(0)
    save_native(build_model(cfg).state_dict(), cfg, root / "detector")
    return root, train_json, calib_json


def _logits_for(label: int, score: float, num_classes: int) -> torch.Tensor:
    """[C+1] logits whose softmax gives `label` probability `score`, the rest shared equally."""
    logits = torch.zeros(num_classes + 1)
    logits[label] = math.log(score * num_classes / (1 - score))
    return logits


def _scripted_outputs(index, cfg, thing_score=0.6, stuff_score=0.95, stray_score=0.3):
    """Per image, outputs that name every ground-truth segment exactly (things at thing_score, stuff
    at stuff_score) plus one stray thing query at stray_score over a 6x6 patch of the first stuff
    segment. Masks are given at the image's size (proc_size 4x it), so they resize to themselves."""
    label_of = {cid: i for i, cid in enumerate(cfg.category_ids)}
    items = []
    for rec in index.records:
        gt = read_segment_ids(rec.png)
        H, W = gt.shape
        logits, masks = [], []
        for s in rec.segments:
            thing = s.category_id not in cfg.stuff_category_ids
            logits.append(_logits_for(label_of[s.category_id], thing_score if thing else stuff_score,
                                      cfg.num_classes))
            masks.append(torch.from_numpy(np.where(gt == s.id, 10.0, -10.0)).float())
        stuff = next(s for s in rec.segments if s.category_id in cfg.stuff_category_ids)
        ys, xs = np.nonzero(gt == stuff.id)
        stray = torch.full((H, W), -10.0)
        stray[ys[0]:ys[0] + 6, xs[0]:xs[0] + 6] = 20.0
        logits.append(_logits_for(label_of[sorted(index.thing_ids)[0]], stray_score,
                                  cfg.num_classes))
        masks.append(stray)
        out = {"pred_logits": torch.stack(logits)[None], "pred_masks": torch.stack(masks)[None]}
        items.append(ImageOutput(rec, out, (4 * H, 4 * W), (H, W), gt))
    return items


def test_pq_per_threshold_matches_evaluation_and_the_choice_is_the_best(data, monkeypatch):
    root, _, calib_json = data
    model, cfg = load_panoptic_model(root / "detector")
    cfg.stuff_category_ids = sorted(load_panoptic(calib_json).stuff_ids)
    index = load_panoptic(calib_json)
    items = _scripted_outputs(index, cfg)
    monkeypatch.setattr(panoptic_engine, "panoptic_outputs", lambda *a, **k: iter(items))
    thresholds = (0.25, 0.5, 0.85)
    pq = pq_per_threshold(model, cfg, index, thresholds, progress=False)
    for t in thresholds:  # one pass over the images gives what a whole evaluation at t gives
        assert pq[t] == pytest.approx(evaluate_panoptic(model, cfg, index, threshold=t, mask_ap=False,
                                                        progress=False)["PQ"])
    # at 0.5 every segment is kept and exact: PQ 1 by the definition; at 0.85 the things are lost to the
    # stuff around them; at 0.25 the stray query is one more false positive and takes stuff pixels
    assert pq[0.5] == pytest.approx(1.0)
    assert pq[0.85] < 0.9 and pq[0.25] < 1.0
    best, table = fit_panoptic_threshold(model, cfg, index, thresholds, progress=False)
    assert best == 0.5 and table == pq


def test_equal_pqs_choose_the_higher_threshold(data, monkeypatch):
    root, _, calib_json = data
    model, cfg = load_panoptic_model(root / "detector")
    index = load_panoptic(calib_json)
    cfg.stuff_category_ids = sorted(index.stuff_ids)
    items = _scripted_outputs(index, cfg, thing_score=0.9, stray_score=0.05)
    monkeypatch.setattr(panoptic_engine, "panoptic_outputs", lambda *a, **k: iter(items))
    best, table = fit_panoptic_threshold(model, cfg, index, (0.3, 0.5, 0.85), progress=False)
    assert table[0.3] == table[0.5] == table[0.85] == pytest.approx(1.0)
    assert best == 0.85  # nothing gained below the paper's threshold: keep the paper's


def test_the_fitted_threshold_travels_with_the_weights(data, tmp_path):
    from detrkit.weights.panoptic import load_hf_segmentation, save_hf_segmentation

    root, train_json, calib_json = data
    res = train_mask_head(root / "detector", train_json, calib_json, tmp_path / "run", max_steps=1, batch_size=2,
                          progress=False, calib_json=calib_json)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    table = {float(t): v for t, v in metrics["calibration_PQ"].items()}
    _, cfg = load_native(tmp_path / "run" / "final")
    assert cfg.panoptic_threshold == max(table, key=lambda t: (round(table[t], 6), t))
    assert res.metrics["panoptic_threshold"] == cfg.panoptic_threshold
    # a threshold that is not the paper's, through the Hugging Face layout and into Detector
    sd, cfg = load_native(tmp_path / "run" / "final")
    cfg.panoptic_threshold = 0.4
    save_native(sd, cfg, tmp_path / "native")
    assert Detector.from_pretrained(tmp_path / "native").config.panoptic_threshold == 0.4
    save_hf_segmentation(sd, cfg, tmp_path / "hf")
    assert load_hf_segmentation(tmp_path / "hf")[1].panoptic_threshold == 0.4


def test_a_threshold_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="panoptic_threshold"):
        ModelConfig(panoptic_threshold=1.5)
    assert ModelConfig().panoptic_threshold == 0.85  # the paper's, for every preset and published model
