"""Own data end to end: category ids of any kind, and short fine-tunes on real data sets."""
import json

import pytest
import torch

from detrkit import Detector
from detrkit.engine.train import train
from detrkit.weights.coco_names import COCO_CATEGORIES

from _train_helpers import tiny_data, tiny_model, tiny_train
from conftest import shared_data


def _renumbered(src_json, dst_json, mapping):
    """The same data set with its category ids replaced (images referenced by absolute path)."""
    coco = json.loads(src_json.read_text())
    for c in coco["categories"]:
        c["id"] = mapping[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = mapping[a["category_id"]]
    for im in coco["images"]:
        im["file_name"] = str(src_json.parent / "images" / im["file_name"].split("/")[-1])
    dst_json.parent.mkdir(parents=True, exist_ok=True)
    dst_json.write_text(json.dumps(coco))
    return dst_json


@pytest.mark.slow
def test_sparse_category_ids_train_and_predict_with_their_names(tmp_path):
    """Ids {3, 17, 90} and {0, 1, 2} give the same training and the same AP; names come back right."""
    sparse = tiny_data(tmp_path / "sparse", 2, seed=3, variant="other")
    dense = _renumbered(sparse, tmp_path / "dense" / "annotations.json", {3: 0, 17: 1, 90: 2})
    cfg = tiny_train(batch_size=2, epochs=150, lr=1e-3, lr_backbone=1e-4, warmup_steps=10)
    model = tiny_model(hidden_dim=64, dim_feedforward=128)
    a = train(model, cfg, sparse, sparse, tmp_path / "run_sparse", progress=False)
    b = train(model, cfg, dense, dense, tmp_path / "run_dense", progress=False)
    assert a.metrics["AP50"] > 0.5
    assert a.metrics["AP"] == pytest.approx(b.metrics["AP"], abs=1e-9)
    assert a.metrics["AP50"] == pytest.approx(b.metrics["AP50"], abs=1e-9)

    det = Detector.from_pretrained(tmp_path / "run_sparse" / "final")
    assert det.config.category_ids == [3, 17, 90]
    assert det.config.class_names == ["diamond", "ring", "hexagon"]
    truth = json.loads(sparse.read_text())
    names = {c["id"]: c["name"] for c in truth["categories"]}
    image = sparse.parent / "images" / truth["images"][0]["file_name"].split("/")[-1]
    found = det.predict(image, threshold=0.5)[0]
    assert len(found) > 0
    assert all(names[c] == n for c, n in zip(found.category_ids, found.label_names))
    expected = {a["category_id"] for a in truth["annotations"] if a["image_id"] == truth["images"][0]["id"]}
    assert set(found.category_ids) & expected


def _coco_source(tmp_path):
    """A tiny stand-in for the published COCO model (same class list, random weights)."""
    cfg = tiny_model().with_classes(list(COCO_CATEGORIES.values()), list(COCO_CATEGORIES))
    Detector.from_config(cfg).save_pretrained(tmp_path / "coco")
    return tmp_path / "coco"


def test_short_fine_tune_on_bccd(tmp_path):
    bccd = shared_data("bccd")
    result = train(tiny_model(), tiny_train(max_steps=3, num_workers=0), bccd, None, tmp_path / "run",
                   split="train", progress=False, init_weights=_coco_source(tmp_path))
    assert result.step == 3
    det = Detector.from_pretrained(tmp_path / "run" / "final")
    assert sorted(det.config.class_names) == ["Platelets", "RBC", "WBC"]


def test_short_fine_tune_on_coco128_keeps_matching_class_rows(tmp_path):
    coco128 = shared_data("coco128")
    src = _coco_source(tmp_path)
    result = train(tiny_model(), tiny_train(max_steps=3, num_workers=0),
                   f"{coco128}/annotations/instances_train2017.json", None, tmp_path / "run",
                   progress=False, init_weights=src, keep_class_names=True)
    assert result.step == 3
    det = Detector.from_pretrained(tmp_path / "run" / "final")
    assert det.config.category_ids[0] == 1 and det.config.class_names[0] == "person"
    assert det.config.num_classes == 80
