"""PQ against values worked out by hand, and the panoptic post-processing's output format."""
import math

import numpy as np
import pytest
import torch

from detrkit.data.panoptic import read_segment_ids, segments_from_ids, write_segment_ids
from detrkit.panoptic_postprocess import instance_masks, panoptic_postprocess
from detrkit.panoptic_quality import PQStat, format_pq

A, B = 1, 2  # category A is a thing, B is stuff
CATS = {A: True, B: False}


def _seg(i, cat, crowd=0):
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def _pq(gt, gt_segs, pred, pred_segs):
    stat = PQStat()
    stat.add_image(np.array(gt), gt_segs, np.array(pred), pred_segs)
    return stat.summary(CATS)


def test_perfect_match_is_one():
    ids = [[1, 1, 2, 2], [1, 1, 2, 2]]
    s = _pq(ids, [_seg(1, A), _seg(2, B)], ids, [_seg(1, A), _seg(2, B)])
    for k in ("all", "things", "stuff"):
        assert (s[k]["pq"], s[k]["sq"], s[k]["rq"]) == (1.0, 1.0, 1.0)
    assert s["things"]["n"] == 1 and s["stuff"]["n"] == 1


def test_iou_exactly_half_is_not_a_match_and_stuff_things_separate():
    # A: ground truth 4 px, prediction the first 2 of them: IoU 2/4 = 0.5 exactly -> FN + FP, PQ_A = 0
    # B: ground truth 4 px, prediction 6 px containing them: IoU 4/6 -> TP, SQ 2/3, RQ 1
    gt = [[1, 1, 1, 1, 2, 2, 2, 2]]
    pred = [[1, 1, 2, 2, 2, 2, 2, 2]]
    s = _pq(gt, [_seg(1, A), _seg(2, B)], pred, [_seg(1, A), _seg(2, B)])
    a, b = s["per_class"][A], s["per_class"][B]
    assert (a["tp"], a["fp"], a["fn"], a["pq"]) == (0, 1, 1, 0.0)
    assert (b["tp"], b["fp"], b["fn"]) == (1, 0, 0)
    assert b["pq"] == pytest.approx(2 / 3) and b["sq"] == pytest.approx(2 / 3) and b["rq"] == 1.0
    assert s["things"]["pq"] == 0.0 and s["stuff"]["pq"] == pytest.approx(2 / 3)
    assert s["all"]["pq"] == pytest.approx(1 / 3)
    # one pixel more of A in the prediction: IoU 3/4 > 0.5 is a match
    s = _pq(gt, [_seg(1, A), _seg(2, B)], [[1, 1, 1, 2, 2, 2, 2, 2]], [_seg(1, A), _seg(2, B)])
    assert s["per_class"][A]["tp"] == 1 and s["per_class"][A]["sq"] == pytest.approx(0.75)
    assert s["per_class"][B]["sq"] == pytest.approx(4 / 5)


def test_crowd_overlap_and_void_are_ignored():
    # ground truth: crowd region of A (id 1, px 0-3), an A object (id 2, px 4-7), void (px 8-9)
    gt = [[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]]
    gt_segs = [_seg(1, A, crowd=1), _seg(2, A)]
    # prediction: a segment on the crowd region (not a FP), the object plus the void (IoU 4/4: void
    # is left out of the union)
    pred = [[5, 5, 5, 5, 6, 6, 6, 6, 6, 6]]
    s = _pq(gt, gt_segs, pred, [_seg(5, A), _seg(6, A)])
    a = s["per_class"][A]
    assert (a["tp"], a["fp"], a["fn"]) == (1, 0, 0) and a["pq"] == 1.0
    # the same prediction on a region of another category's crowd is a false positive
    s = _pq(gt, [_seg(1, B, crowd=1), _seg(2, A)], pred, [_seg(5, A), _seg(6, A)])
    assert s["per_class"][A]["fp"] == 1 and s["per_class"][A]["pq"] == pytest.approx(1 / 1.5)
    assert B not in s["per_class"]  # a crowd-only category is not counted (no FN)


def test_accumulates_over_images_and_formats():
    stat = PQStat()
    stat.add_image(np.array([[1, 1]]), [_seg(1, A)], np.array([[1, 1]]), [_seg(1, A)])
    stat.add_image(np.array([[1, 1]]), [_seg(1, A)], np.array([[0, 0]]), [])
    s = stat.summary(CATS)
    assert s["things"]["rq"] == pytest.approx(1 / 1.5) and s["things"]["sq"] == 1.0
    assert "things" in format_pq(s, {A: "a", B: "b"})
    with pytest.raises(ValueError, match="not in segments_info"):
        stat.add_image(np.array([[1]]), [_seg(1, A)], np.array([[7]]), [])


def _logit(p):
    return math.log(p / (1 - p))


def test_postprocess_threshold_stuff_merge_tiny_drop_and_png_round_trip(tmp_path):
    # classes: 0 thing, 1 stuff; 5 queries; masks 4x8 at stride 4 of a 16x32 image, output at 4x8
    # (one pixel per mask cell, so areas are counted exactly)
    is_thing, cat_ids = [True, False], [7, 42]
    logits = torch.full((5, 3), -10.0)
    logits[0, 0] = 10.0  # thing, kept
    logits[1, 1] = 10.0  # stuff, kept
    logits[2, 1] = 10.0  # stuff of the same class: merged with query 1
    logits[3] = torch.tensor([0.5, 0.0, 0.4])  # best score 0.40: dropped by the 0.85 threshold
    logits[4, 0] = 10.0  # thing that wins only a tiny area: dropped
    masks = torch.full((5, 4, 8), -5.0)
    masks[0, :, :3] = 5.0
    masks[1, :2, 3:] = 5.0
    masks[2, 2:, 3:] = 5.0
    masks[3] = 50.0  # would win everything if it were kept
    masks[4, 0, 7] = 5.1  # wins one pixel: dropped (<= 4), the pixel goes back to query 1
    masks[1, 0, 7] = 5.0
    r = panoptic_postprocess(logits, masks, proc_size=(16, 32), orig_size=(4, 8), is_thing=is_thing,
                             category_ids=cat_ids, class_names=["t", "s"])
    cats = sorted(s["category_id"] for s in r.segments)
    assert cats == [7, 42]  # one thing, one merged stuff segment; query 3 and the tiny one gone
    assert (r.ids > 0).all()  # every pixel belongs to a kept segment
    stuff = next(s for s in r.segments if s["category_id"] == 42)
    assert stuff["area"] == 4 * 8 - 4 * 3 and stuff["isthing"] is False and stuff["label"] == "s"

    # PNG round trip: the file gives back the ids, and the segments_info's ids, areas, bboxes
    png = write_segment_ids(r.ids, tmp_path / "p.png")
    back = read_segment_ids(png)
    assert np.array_equal(back, r.ids)
    measured = segments_from_ids(back, {s["id"]: s["category_id"] for s in r.segments})
    assert sorted((m["id"], m["area"], m["bbox"]) for m in measured) == \
        sorted((s["id"], s["area"], s["bbox"]) for s in r.segments)


def test_postprocess_nothing_kept_is_all_void_and_instance_masks():
    logits = torch.zeros(3, 3)
    logits[:, -1] = 10.0
    r = panoptic_postprocess(logits, torch.zeros(3, 2, 2), (8, 8), (8, 8), [True, True], [1, 2])
    assert r.segments == [] and not r.ids.any()
    logits[1] = torch.tensor([5.0, 0.0, 0.0])
    masks = torch.full((3, 2, 2), -5.0)
    masks[1, 0] = 5.0
    inst = instance_masks(logits, masks, (8, 8), (8, 8), top_k=1)
    assert inst["labels"].tolist() == [0] and inst["masks"].shape == (1, 8, 8)
    assert inst["masks"][0, :3].all() and not inst["masks"][0, 5:].any()
