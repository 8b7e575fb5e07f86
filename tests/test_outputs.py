"""What runs and evaluations write and log (issue 15, problem 10)."""
import json
import logging

import pytest

from detrkit.data.coco import load_coco
from detrkit.data.synthetic import make_synthetic
from detrkit.engine.evaluate import CocoEvaluator


def _gt():
    return {"images": [{"id": 1, "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 30, 20], "iscrowd": 0}],
            "categories": [{"id": 4, "name": "platelet"}, {"id": 9, "name": "wbc"}]}


def test_results_json_names_the_class(tmp_path):
    ev = CocoEvaluator(_gt())
    ev.add([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 30, 20], "score": 0.8}])
    records = json.loads(ev.write_results(tmp_path / "results.json").read_text())
    assert records[0]["category_name"] == "platelet"
    # pycocotools still reads the file
    ev2 = CocoEvaluator(_gt())
    ev2.add(records)
    assert ev2.summarize()["AP"] == pytest.approx(1.0)


def test_per_class_ap_printed_as_a_fraction():
    ev = CocoEvaluator(_gt())
    ev.add([{"image_id": 1, "category_id": 4, "bbox": [10, 10, 30, 20], "score": 0.8}])
    ev.summarize()
    row = next(line for line in ev.format_table().splitlines() if "platelet" in line)
    assert row.split()[-2:] == ["1.000", "1.000"]  # was "100.0" here and 1.000 in `detrkit eval`


def test_coco_input_logs_its_counts(tmp_path, caplog):
    path = make_synthetic(tmp_path / "s", num_images=3, seed=0, image_size=(32, 48), image_format="png")
    with caplog.at_level(logging.INFO, logger="detrkit.data.coco"):
        index = load_coco(path)
    expected = f"3 images, {len(index.annotations)} boxes, {len(index.categories)} classes"
    assert any(expected in r.getMessage() for r in caplog.records)
