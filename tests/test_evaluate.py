import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detrkit.config import ModelConfig
from detrkit.data.dataset import collate
from detrkit.engine.evaluate import STAT_NAMES, CocoEvaluator, evaluate, predictions_to_coco_results
from detrkit.model.detr import build_model

from conftest import SHARED

COCO128 = Path(SHARED, "coco128", "annotations", "instances_train2017.json").resolve()


def noisy_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """Deterministic detections from the ground truth: jittered boxes (some missed, some with a wrong
    class), random scores, and false positives on every image."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.1, 4)
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        out.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.uniform(0.05, 1)),
                    "bbox": [x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3])]})
    for image_id, (W, H) in sizes.items():
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(5, W / 2), rng.uniform(5, H / 2)
            out.append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                        "score": float(rng.uniform(0, 0.6)),
                        "bbox": [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), w, h]})
    return out


def pycocotools_stats(gt_file: Path, results: list[dict], cat_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        if cat_ids is not None:
            E.params.catIds = cat_ids
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


@pytest.mark.skipif(not COCO128.exists(), reason="coco128 not present")
def test_stats_equal_pycocotools_on_coco128(tmp_path):
    gt = json.loads(COCO128.read_text())
    assert any(a["iscrowd"] for a in gt["annotations"])  # crowd regions take part
    results = noisy_predictions(gt)
    expected = pycocotools_stats(COCO128, results)

    ev = CocoEvaluator(gt)
    ev.add(results[: len(results) // 2])
    ev.add(results[len(results) // 2:])
    summary = ev.summarize()
    assert list(summary)[:12] == list(STAT_NAMES)
    for name, value in zip(STAT_NAMES, expected):
        assert summary[name] == pytest.approx(float(value), abs=1e-9), name
    assert 0.15 < summary["AP"] < 0.9  # the noisy file is neither perfect nor hopeless

    # per-class AP equals pycocotools restricted to that one category
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert set(summary["per_class"]) == set(names.values())
    for cat in (1, 3, 62):
        assert summary["per_class"][names[cat]] == pytest.approx(
            float(pycocotools_stats(COCO128, results, [cat])[0]), abs=1e-9)

    table = ev.format_table()
    assert "person" in table and len(table.splitlines()) == 1 + len(names)

    # the written results file is what pycocotools reads back to the same numbers
    path = ev.write_results(tmp_path / "res.json")
    again = pycocotools_stats(COCO128, json.loads(path.read_text()))
    assert np.allclose(again, expected, atol=1e-12, rtol=0)


def small_gt() -> dict:
    return {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 50, "height": 50}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 9, "bbox": [0, 0, 25, 25], "area": 625, "iscrowd": 0},
        ],
    }


def test_perfect_empty_and_restricted_results():
    gt = small_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    ev = CocoEvaluator(gt)
    ev.add(perfect)
    s = ev.summarize()
    assert s["AP"] == pytest.approx(1.0) and s["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert s["APl"] == -1  # no large objects: pycocotools' -1

    # a pycocotools COCO is accepted as ground truth too
    as_coco = COCO()
    as_coco.dataset = small_gt()
    with contextlib.redirect_stdout(io.StringIO()):
        as_coco.createIndex()
    ev = CocoEvaluator(as_coco)
    ev.add(perfect[1:])
    assert ev.summarize()["per_class"] == {"cat": 0.0, "dog": pytest.approx(1.0)}

    empty = CocoEvaluator(gt).summarize()
    assert empty["AP"] == 0 and empty["AR100"] == 0

    # only image 1 was evaluated: image 2's dog is not a miss, and "dog" has no ground truth
    ev = CocoEvaluator(gt)
    ev.add(perfect[:1], image_ids=[1])
    s = ev.summarize()
    assert s["AP"] == pytest.approx(1.0) and s["per_class"]["dog"] == -1
    assert "n/a" in ev.format_table()


def test_bad_records_raise():
    ev = CocoEvaluator(small_gt())
    with pytest.raises(ValueError, match="category_id 1 is not"):
        ev.add([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="image_id 7"):
        ev.add([{"image_id": 7, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="lacks"):
        ev.add([{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="categories"):
        CocoEvaluator({"images": [], "annotations": []})


def test_predictions_to_coco_results():
    # 2 classes (+ no object), 2 queries, one image of original size h=200, w=400
    logits = torch.log(torch.tensor([[[0.1, 0.7, 0.2], [0.05, 0.05, 0.9]]]))
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.2], [0.25, 0.75, 0.1, 0.1]]])
    targets = [{"image_id": torch.tensor(42), "orig_size": torch.tensor([200, 400])}]
    recs = predictions_to_coco_results({"pred_logits": logits, "pred_boxes": boxes}, targets, [17, 3])
    recs = sorted(recs, key=lambda r: -r["score"])
    assert [(r["image_id"], r["category_id"]) for r in recs] == [(42, 3), (42, 17)]
    assert [r["score"] for r in recs] == pytest.approx([0.7, 0.05])  # no-object never wins; all Q kept
    assert recs[0]["bbox"] == pytest.approx([100, 80, 200, 40])
    assert recs[1]["bbox"] == pytest.approx([80, 140, 40, 20])
    with pytest.raises(ValueError, match="2 classes but 3"):
        predictions_to_coco_results({"pred_logits": logits, "pred_boxes": boxes}, targets, [1, 2, 3])


def tiny_model_and_images():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                      dim_feedforward=64, dropout=0.0, num_queries=10, class_names=["a", "b", "c"],
                      category_ids=[3, 7, 11])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    hw = [(64, 96), (96, 64), (80, 80), (64, 64), (128, 72), (72, 112), (96, 96), (64, 128)]
    dataset = [(torch.randn(3, h, w, generator=g),
                {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": i + 1,
                 "orig_size": torch.tensor([2 * h, 2 * w]), "size": torch.tensor([h, w])})
               for i, (h, w) in enumerate(hw)]
    return model, cfg, dataset


def gt_from_model(model, cfg, dataset) -> dict:
    """Ground truth = the model's own 3 best batch-of-one detections per image, so AP is high."""
    images, anns = [], []
    with torch.no_grad():
        for image, t in dataset:
            recs = predictions_to_coco_results(model([image]), [t], cfg.category_ids)
            h, w = t["orig_size"].tolist()
            images.append({"id": t["image_id"], "width": w, "height": h})
            for r in sorted(recs, key=lambda r: -r["score"])[:3]:
                anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "category_id": r["category_id"],
                             "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0})
    cats = [{"id": c, "name": n} for c, n in zip(cfg.category_ids, cfg.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_ap_does_not_depend_on_batch_size(tmp_path):
    model, cfg, dataset = tiny_model_and_images()
    model.eval()
    gt = gt_from_model(model, cfg, dataset)
    model.train()
    runs = {}
    for bs in (1, 8):
        runs[bs] = evaluate(model, dataset, cfg.category_ids, gt, batch_size=bs, collate_fn=collate,
                            results_path=tmp_path / f"bs{bs}.json", progress=False)
        assert model.training  # mode restored
    assert runs[1]["AP"] > 0.5
    for name in STAT_NAMES:
        assert runs[8][name] == pytest.approx(runs[1][name], abs=1e-9), name
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4))  # noqa: E731
    r1, r8 = (sorted(json.loads((tmp_path / f"bs{bs}.json").read_text()), key=key) for bs in (1, 8))
    assert len(r1) == len(r8) == 10 * len(dataset)
    assert np.allclose([r["bbox"] for r in r1], [r["bbox"] for r in r8], atol=1e-3)
    assert np.allclose([r["score"] for r in r1], [r["score"] for r in r8], atol=1e-5)


def test_evaluation_runs_the_inference_copy_with_the_same_numbers(tmp_path, monkeypatch):
    """Issue 15, problem 8: evaluation ran the training graph (unfolded batch norm, unpacked convolutions),
    the bulk of a 65 s coco128 evaluation. It now runs the inference copy; the numbers are the same."""
    import detrkit.engine.evaluate as ev

    model, cfg, dataset = tiny_model_and_images()
    model.eval()
    gt = gt_from_model(model, cfg, dataset)
    with monkeypatch.context() as m:
        m.setattr(ev, "_inference_runner", lambda model, amp: model)
        plain = evaluate(model, dataset, cfg.category_ids, gt, batch_size=4, collate_fn=collate, progress=False)

    def training_graph(*a, **k):
        raise AssertionError("evaluation ran the training graph")

    monkeypatch.setattr(model, "forward", training_graph)
    fast = evaluate(model, dataset, cfg.category_ids, gt, batch_size=4, collate_fn=collate, progress=False)
    for name in STAT_NAMES:
        assert fast[name] == pytest.approx(plain[name], abs=1e-6), name


def test_detrkit_bounds_how_long_openmp_threads_spin_while_they_wait():
    """Issue 15, problem 8: on a shared 2-core machine the spinning OpenMP threads made a coco128
    evaluation take 73 s instead of 20 s (and a training step 6x longer); sleeping at once made an idle
    machine's training steps 1.5x longer. Importing detrkit before torch bounds the spin; a wait policy or
    spin count the user set is kept."""
    import os
    import subprocess
    import sys

    code = ("import detrkit, os, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def imported_with(**extra) -> str:
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert imported_with() == "None 20000"
    assert imported_with(OMP_WAIT_POLICY="passive") == "passive None"
    assert imported_with(GOMP_SPINCOUNT="5") == "None 5"


def test_evaluation_stops_when_asked():
    """Issue 15, problem 7: a signal during the in-training evaluation must end it promptly (the run then
    saves its last training state)."""
    from detrkit.engine.evaluate import EvaluationInterrupted

    model, cfg, dataset = tiny_model_and_images()
    model.train()
    gt = gt_from_model(model.eval(), cfg, dataset)
    model.train()
    asked = []

    def stop_after_first():
        asked.append(1)
        return True

    with pytest.raises(EvaluationInterrupted):
        evaluate(model, dataset, cfg.category_ids, gt, batch_size=2, collate_fn=collate, progress=False,
                 should_stop=stop_after_first)
    assert len(asked) == 1 and model.training


def test_a_frozen_backbone_is_evaluated_from_the_features_its_first_pass_kept():
    """A frozen backbone's validation features never change: the first pass keeps them, later passes read
    no image and run the transformer with its current weights, with the outputs of a full pass bit for bit."""
    from detrkit.engine.evaluate import EvaluationInterrupted, FeatureMemo, model_outputs

    model, cfg, dataset = tiny_model_and_images()
    reads = []

    class Counted(list):
        def __getitem__(self, i):
            reads.append(i)
            return list.__getitem__(self, i)

    def outputs(data, memo=None):
        return [o for o, _ in model_outputs(model, data, batch_size=3, collate_fn=collate, progress=False, memo=memo)]

    memo = FeatureMemo()
    with pytest.raises(EvaluationInterrupted):  # a signal during the first pass: nothing half-kept is reused
        for _ in model_outputs(model, dataset, batch_size=3, collate_fn=collate, progress=False, memo=memo,
                               should_stop=lambda: True):
            pass
    assert not memo.complete and len(memo.batches) == 1
    first = outputs(Counted(dataset), memo)
    assert memo.complete and len(reads) == len(dataset) and len(memo.batches) == 3
    for a, b in zip(first, outputs(dataset)):
        assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    with torch.no_grad():  # training moves the transformer and heads, never the frozen backbone
        model.class_embed.bias.add_(0.5)
        model.transformer.decoder.layers[0].linear1.weight.mul_(1.1)
    later = outputs(Counted(dataset), memo)
    assert len(reads) == len(dataset)  # not one image read again
    for a, b in zip(later, outputs(dataset)):
        assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert not torch.equal(later[0]["pred_logits"], first[0]["pred_logits"])
    # a set whose features do not fit is read every time
    small = FeatureMemo(max_bytes=1000)
    outputs(Counted(dataset), small)
    outputs(Counted(dataset), small)
    assert small.overflow and not small.complete and small.batches == [] and len(reads) == 3 * len(dataset)
