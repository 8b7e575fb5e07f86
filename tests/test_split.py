"""Automatic validation split (issue 15, problem 5)."""
import json

import pytest
from PIL import Image

from detrkit.data.formats import load_annotations
from detrkit.data.split import (automatic_split, dataset_splits, hold_out, load_split, named_splits)


def _voc_folder(root, n=20, with_sets=False):
    """A folder of images with Pascal VOC XML beside them (no split files) -- or the devkit layout."""
    ann = root / "Annotations"
    img = root / "JPEGImages"
    ann.mkdir(parents=True)
    img.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48)).save(img / f"im{i:03d}.jpg")
        (ann / f"im{i:03d}.xml").write_text(
            f"<annotation><filename>im{i:03d}.jpg</filename><size><width>64</width><height>48</height>"
            "<depth>3</depth></size><object><name>cell</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
            "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
    if with_sets:
        sets = root / "ImageSets" / "Main"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("\n".join(f"im{i:03d}" for i in range(n - 4)))
        (sets / "val.txt").write_text("\n".join(f"im{i:03d}" for i in range(n - 4, n)))
    return root


def test_hold_out_is_seeded_disjoint_and_complete(tmp_path):
    index = load_annotations(_voc_folder(tmp_path / "voc"))
    tr, va = hold_out(index, 0.1, seed=3)
    assert len(va.images) == 2 and len(tr.images) == 18
    assert not {i.id for i in tr.images} & {i.id for i in va.images}
    assert {a.image_id for a in va.annotations} == {i.id for i in va.images}
    assert va.categories == index.categories
    tr2, va2 = hold_out(index, 0.1, seed=3)
    assert [i.id for i in va2.images] == [i.id for i in va.images]
    with pytest.raises(ValueError, match="between 0 and 1"):
        hold_out(index, 1.0)


def test_automatic_split_written_and_reused(tmp_path):
    index = load_annotations(_voc_folder(tmp_path / "voc"))
    run = tmp_path / "run"
    tr, va = automatic_split(index, run, 0.25, seed=0)
    assert len(va.images) == 5
    record = json.loads((run / "split.json").read_text())
    assert len(record["val"]) == 5 and len(record["train"]) == 15
    # val.json is a COCO file of exactly the held-out images, readable by every command
    val_coco = load_annotations(run / "val.json")
    assert sorted(str(i.file) for i in val_coco.images) == sorted(str(i.file) for i in va.images)
    # a second call (a resume) reads the written split even with another seed
    tr2, va2 = automatic_split(index, run, 0.5, seed=99)
    assert {i.id for i in va2.images} == {i.id for i in va.images}
    assert {i.id for i in load_split(run, index)[1].images} == {i.id for i in va.images}


def test_named_validation_split_is_preferred(tmp_path):
    plain = _voc_folder(tmp_path / "plain")
    devkit = _voc_folder(tmp_path / "devkit", with_sets=True)
    assert dataset_splits(plain) is None
    assert named_splits(devkit) == ["train", "val"]
    assert dataset_splits(devkit) == ("train", "val")
    assert dataset_splits(devkit, split="val") is None


def test_yolo_yaml_splits(tmp_path):
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")
    assert dataset_splits(tmp_path) == ("train", "val")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a]\n")
    assert dataset_splits(tmp_path) is None
