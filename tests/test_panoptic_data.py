"""COCO panoptic and instance-mask reading, the synthetic panoptic set, and `data check` on both."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from detrkit.data.check import check_dataset
from detrkit.data.coco import load_coco
from detrkit.data.panoptic import (PanopticFormatError, encode_mask, id2rgb, instance_mask, load_instance_masks,
                                   load_panoptic, read_segment_ids, rgb2id)
from detrkit.data.synthetic_panoptic import make_synthetic_panoptic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_panoptic(tmp_path_factory.mktemp("pan") / "set", num_images=6, seed=3)


def _copy(synth, tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(synth.parent, dst)
    return dst / "panoptic.json"


def test_id_encoding_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, 256 ** 3 - 1]])
    rgb = id2rgb(ids)
    assert rgb[0, 2].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 1].tolist() == [0, 0, 1]
    assert np.array_equal(rgb2id(rgb), ids)


def test_synthetic_panoptic_is_consistent(synth):
    idx = load_panoptic(synth)
    assert not idx.problems and len(idx.records) == 6
    assert idx.thing_ids == {1, 2, 3} and idx.stuff_ids == {10, 11, 12}
    for rec in idx.records:
        ids = read_segment_ids(rec.png)
        assert (ids > 0).all()  # every pixel is a thing or stuff
        assert sorted(np.unique(ids).tolist()) == sorted(s.id for s in rec.segments)
        for s in rec.segments:
            assert (ids == s.id).sum() == s.area
        assert any(s.category_id in idx.thing_ids for s in rec.segments)
        assert any(s.category_id in idx.stuff_ids for s in rec.segments)
    # the detection view (every segment a box) and the instances JSON agree
    det = idx.to_detection_index()
    inst = load_coco(synth.parent / "annotations.json")
    assert len(det.annotations) == len(inst.annotations) and not inst.problems
    masks, problems = load_instance_masks(synth.parent / "annotations.json")
    assert not problems and sum(len(v) for v in masks.values()) == len(inst.annotations)
    # same bytes for the same seed
    again = make_synthetic_panoptic(synth.parent.parent / "again", num_images=6, seed=3, workers=2)  # in parallel
    assert again.read_bytes() == synth.read_bytes()
    report = check_dataset(synth)
    assert report.ok and report.dataset_format == "coco-panoptic" and report.num_images == 6, report.format()


def test_check_finds_png_json_disagreements(synth, tmp_path):
    path = _copy(synth, tmp_path)
    data = json.loads(path.read_text())
    a0, a1, a2, a3 = data["annotations"][:4]
    removed = a0["segments_info"].pop(0)  # an id in the PNG that the JSON does not list
    a1["segments_info"][0]["area"] += 7  # wrong area
    a1["segments_info"].append({"id": 123, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2], "area": 4})  # no pixels
    path.write_text(json.dumps(data))
    png2 = path.parent / "panoptic" / a2["file_name"]
    Image.open(png2).resize((20, 20), Image.NEAREST).save(png2)  # size differs from the image
    png3 = path.parent / "panoptic" / a3["file_name"]
    png3.write_bytes(png3.read_bytes()[: len(png3.read_bytes()) // 2])  # truncated
    report = check_dataset(path)
    text = report.format(max_problems=50)
    assert not report.ok
    assert f"[{removed['id']}]" in text and "missing from the JSON" in text
    assert "in the JSON but" in text and "px in the PNG" in text
    assert "segment 123" in text and "no pixels" in text
    assert "PNG is 20x20 but the image is" in text
    assert str(png3) in text and "cannot decode" in text


def test_unreadable_panoptic_json(tmp_path):
    bad = tmp_path / "panoptic.json"
    bad.write_text('{"images": [], "annotations": [{"segments_info": []}], "categories": 3}')
    report = check_dataset(bad)
    assert not report.readable and "needs lists" in report.format()
    with pytest.raises(PanopticFormatError, match=str(bad)):
        load_panoptic(bad)


def test_instance_masks_polygon_and_rle_agree(tmp_path):
    h, w = 10, 12
    poly = [[2, 2, 8, 2, 8, 6, 2, 6]]
    m_poly = instance_mask(poly, h, w)
    assert m_poly.shape == (h, w) and m_poly[3, 4] and not m_poly[8, 10]
    rle = encode_mask(m_poly)
    assert np.array_equal(instance_mask(rle, h, w), m_poly)
    # uncompressed RLE (column-major run lengths, starting with zeros)
    flat = m_poly.T.ravel().astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(instance_mask({"counts": runs, "size": [h, w]}, h, w), m_poly)
    assert instance_mask([], h, w) is None and instance_mask(None, h, w) is None

    # a mask-less annotation is a counted skip when loading and a warning in data check
    data = {"images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 4], "segmentation": poly},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 4]},
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 4],
                             "segmentation": {"counts": "!!bad", "size": [h, w]}}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    Image.new("RGB", (w, h)).save(tmp_path / "a.png")
    masks, problems = load_instance_masks(path)
    assert [i for i, _ in masks[1]] == [1] and len(problems) == 2
    report = check_dataset(path)
    text = report.format()
    assert "annotation id 2: annotation has no mask" in text and "annotation id 3" in text
