"""Run and evaluation plots (detrkit.viz.plots) on small hand-made data."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from detrkit.data.index import Annotation, DatasetIndex, ImageRecord
from detrkit.engine.evaluate import CocoEvaluator
from detrkit.viz.plots import (coco_to_arrays, confusion_matrix, label_statistics, plot_confusion_matrix,
                               plot_label_statistics, plot_pr_curves, pr_curves, prediction_mosaic,
                               write_eval_plots, write_results_csv)


def test_confusion_matrix_counts_hand_made():
    # 3 classes; image 0: a cat (0) found as cat, a dog (1) found as cat, a bird (2) missed, plus a
    # false bird far from everything; image 1: no objects, one confident false dog and one low-score box
    gt = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]), np.array([0, 1, 2])),
          (np.zeros((0, 4)), np.zeros(0, dtype=int))]
    pred = [(np.array([[0, 0, 10, 11], [20, 21, 30, 30], [80, 80, 90, 90]]), np.array([0.9, 0.8, 0.7]),
             np.array([0, 0, 2])),
            (np.array([[0, 0, 5, 5], [0, 0, 6, 6]]), np.array([0.9, 0.1]), np.array([1, 2]))]
    m = confusion_matrix(gt, pred, num_classes=3, iou_threshold=0.5, score_threshold=0.25)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = 1  # cat -> cat
    expected[1, 0] = 1  # dog -> cat
    expected[2, 3] = 1  # bird missed
    expected[3, 2] = 1  # false bird
    expected[3, 1] = 1  # false dog in the empty image (the 0.1 box is below the threshold)
    np.testing.assert_array_equal(m, expected)
    assert m[:3].sum() == 3  # every object counted once


def test_confusion_matrix_pairs_one_to_one_by_iou():
    # two predictions on one object: the better overlap is the match, the other a false detection
    gt = [(np.array([[0, 0, 10, 10]]), np.array([1]))]
    pred = [(np.array([[0, 0, 10, 12], [0, 0, 10, 10]]), np.array([0.9, 0.5]), np.array([0, 1]))]
    m = confusion_matrix(gt, pred, num_classes=2)
    assert m[1, 1] == 1 and m[2, 0] == 1 and m.sum() == 2


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix([(np.zeros((1, 4)), np.array([5]))], [(np.zeros((0, 4)), [], [])], num_classes=2)


def _coco_pair():
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"},
                     {"id": 2, "width": 100, "height": 100, "file_name": "b.jpg"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0},
                          {"id": 3, "image_id": 2, "category_id": 7, "bbox": [60, 60, 20, 20], "iscrowd": 1}],
          "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    results = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 2, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.8},
               {"image_id": 2, "category_id": 7, "bbox": [40, 40, 5, 5], "score": 0.3}]
    return gt, results


def test_coco_to_arrays_and_matrix():
    gt, results = _coco_pair()
    gts, dts = coco_to_arrays(gt, results, [3, 7], [1, 2])
    assert [len(g[0]) for g in gts] == [1, 1]  # the crowd region is not an object
    np.testing.assert_allclose(gts[1][0], [[10, 10, 30, 30]])
    m = confusion_matrix(gts, dts, 2)
    assert m[0, 0] == 1 and m[1, 0] == 1 and m[2, 1] == 1 and m.sum() == 3


def test_pr_curves_from_cocoeval():
    gt, results = _coco_pair()
    ev = CocoEvaluator(gt)
    ev.add(results)
    E = ev.run()
    recall, curves = pr_curves(E, 0.5)
    assert len(recall) == 101 and set(curves) == {3, 7}
    np.testing.assert_allclose(curves[3], 1.0)  # the cat was found first and exactly
    assert curves[7].max() == 0.0  # the dog was found only as a cat
    # the curves' mean is pycocotools' own per-class AP50
    summary = ev.summarize()
    assert np.isclose(np.mean([c.mean() for c in curves.values()]), summary["AP50"])
    fig = plot_pr_curves(E, {3: "cat", 7: "dog"})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "cat 1.000" in labels and "all classes 0.500" in labels


def test_plot_confusion_matrix_shape_check():
    fig = plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b"])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["a", "b", "background"]
    with pytest.raises(ValueError):
        plot_confusion_matrix(np.eye(3), ["a"])


def test_label_statistics(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "x.jpg")
    index = DatasetIndex(
        images=[ImageRecord(1, tmp_path / "x.jpg", None, None), ImageRecord(2, tmp_path / "y.jpg", 50, 50)],
        annotations=[Annotation(1, 1, 1, [0, 0, 100, 50]), Annotation(2, 2, 1, [0, 0, 25, 25]),
                     Annotation(3, 2, 1, [0, 0, 5, 5], iscrowd=1)],
        categories=[(1, "a"), (2, "b")], source=tmp_path)
    st = label_statistics(index)
    np.testing.assert_array_equal(st.counts, [2, 0])
    np.testing.assert_allclose(st.w, [0.5, 0.5])  # the first size read from the file header
    np.testing.assert_allclose(st.cx, [0.25, 0.25])
    fig = plot_label_statistics(st)
    assert "no boxes: b" in [t.get_text() for t in fig.axes[0].texts]


def test_results_csv_one_row_per_eval(tmp_path):
    recs = [{"type": "pretrain", "steps": 3},
            {"type": "train", "step": 10, "loss": 2.0, "lr": 1e-3},
            {"type": "eval", "step": 10, "epoch": 1, "AP": 0.1, "AP50": 0.2},
            {"type": "train", "step": 20, "loss": 1.5, "lr": 5e-4},
            {"type": "eval", "step": 20, "epoch": 2, "AP": 0.3, "AP50": 0.4}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    rows = list(csv.DictReader(open(write_results_csv(path, tmp_path / "results.csv"))))
    assert [r["step"] for r in rows] == ["10", "20"]
    assert [float(r["AP"]) for r in rows] == [0.1, 0.3]
    assert [float(r["train_loss"]) for r in rows] == [2.0, 1.5]


def test_mosaic_and_write_eval_plots(tmp_path):
    gt, results = _coco_pair()
    for im in gt["images"]:
        Image.new("RGB", (100, 100), (90, 90, 90)).save(tmp_path / im["file_name"])
        im["file_name"] = str(tmp_path / im["file_name"])
    mosaic = prediction_mosaic([{"image": Image.new("RGB", (100, 50)), "gt_boxes": [[0, 0, 10, 10]],
                                 "gt_labels": [0], "boxes": [], "scores": [], "labels": []}] * 3,
                               ["cat"], tile_height=60, columns=2)
    assert mosaic.height > 2 * 60 and mosaic.width > 4 * 120 - 20
    ev = CocoEvaluator(gt)
    ev.add(results)
    written = write_eval_plots(ev, tmp_path / "plots", ["cat", "dog"], [3, 7])
    assert {p.name for p in written} == {"pr_curves.png", "confusion_matrix.png", "val_predictions.jpg"}
    m = np.loadtxt(tmp_path / "plots" / "confusion_matrix.csv", delimiter=",", dtype=int)
    assert m[0, 0] == 1 and m[1, 0] == 1 and m[2, 1] == 1
