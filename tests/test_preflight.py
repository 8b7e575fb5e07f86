"""Warnings that save a run (issue 15, problem 6 and the deliverable's list)."""
from pathlib import Path

from detrkit.config import get_preset
from detrkit.data.index import Annotation, DatasetIndex, ImageRecord
from detrkit.engine.preflight import feature_stride, preflight_warnings


def _index(boxes_per_image, box=(10, 10, 200, 200), size=(640, 480), categories=((1, "rbc"), (2, "wbc"))):
    images, anns = [], []
    for i, n in enumerate(boxes_per_image):
        images.append(ImageRecord(i + 1, Path(f"/nowhere/{i}.jpg"), *size))
        for _ in range(n):
            anns.append(Annotation(len(anns) + 1, i + 1, 1 + len(anns) % 2, list(box)))
    return DatasetIndex(images, anns, list(categories), Path("/nowhere"))


def test_more_objects_than_queries():
    m = get_preset("detr-tiny").model  # 20 queries
    assert not [w for w in preflight_warnings(_index([20, 3]), m) if "queries" in w]
    w = [w for w in preflight_warnings(_index([30, 3, 25]), m) if "queries" in w]
    assert len(w) == 1 and "2 of 3 images" in w[0] and "up to 30" in w[0] and "num_queries=40" in w[0]


def test_objects_smaller_than_a_feature_cell():
    m = get_preset("detr-tiny").model  # shorter side 144: a 640x480 image shrinks 3.33x; cell 32 px
    assert feature_stride(m) == 32
    big = preflight_warnings(_index([4], box=(0, 0, 200, 200)), m)
    assert not [w for w in big if "feature cell" in w]
    # 60 px boxes become 18 px at 144 px: smaller than a 32 px cell
    small = [w for w in preflight_warnings(_index([4], box=(0, 0, 60, 60)), m) if "feature cell" in w]
    assert len(small) == 1 and "4 of 4 boxes (100%)" in small[0]
    m.dilation = True  # DC5: 16 px cells, 18 px boxes are fine
    assert not [w for w in preflight_warnings(_index([4], box=(0, 0, 60, 60)), m) if "feature cell" in w]


def test_warmup_longer_than_the_run():
    p = get_preset("detr-tiny")  # warmup 100 steps
    assert [w for w in preflight_warnings(_index([1, 1]), p.model, p.train, total_steps=60) if "warmup" in w]
    assert not [w for w in preflight_warnings(_index([1, 1]), p.model, p.train, total_steps=1000) if "warmup" in w]


def test_class_without_boxes():
    idx = _index([1, 1], categories=((1, "rbc"), (2, "wbc"), (3, "platelets")))
    w = [w for w in preflight_warnings(idx, get_preset("detr-tiny").model) if "no box" in w]
    assert len(w) == 1 and "platelets" in w[0] and "rbc" not in w[0]
