"""YOLO and Pascal VOC readers, format detection, conversion to COCO (round trips), real data sets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from detrkit.cli import main as cli_main
from detrkit.data.coco import load_coco
from detrkit.data.formats import convert, detect_format, load_annotations
from detrkit.data.voc import load_voc
from detrkit.data.yolo import load_yolo

from conftest import shared_data as shared


def write_image(path: Path, size=(100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def write_voc_xml(path: Path, filename: str, size, objects) -> Path:
    """objects: (name, xmin, ymin, xmax, ymax, difficult)"""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>" for n, a, b, c, e, d in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")
    return path


def boxes_by_file(index) -> dict[str, list[tuple[str, list[float]]]]:
    names = dict(index.categories)
    out: dict[str, list] = {Path(im.file).name: [] for im in index.images}
    files = {im.id: Path(im.file).name for im in index.images}
    for a in index.annotations:
        out[files[a.image_id]].append((names[a.category_id], [float(v) for v in a.bbox], a.iscrowd))
    return {k: sorted(v, key=lambda t: (t[0], t[1])) for k, v in out.items()}


def assert_same_boxes(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k]), k
        for (na, ba, ca), (nb, bb, cb) in zip(a[k], b[k]):
            assert na == nb and ca == cb
            assert ba == pytest.approx(bb, abs=tol)


# ---- YOLO ---------------------------------------------------------------------------------------

@pytest.fixture
def yolo_dataset(tmp_path):
    """images/{train,val} + labels/{train,val} + data.yaml with a {index: name} map."""
    root = tmp_path / "yolo"
    write_image(root / "images/train/a.jpg", (100, 50))
    write_image(root / "images/train/b.png", (64, 64))
    write_image(root / "images/val/c.jpg", (80, 40))
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/val").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.5 0.5\n")
    (root / "labels/train/b.txt").write_text("")  # background image
    (root / "labels/val/c.txt").write_text("2 0.5 0.5 1.0 1.0\n\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                    "names:\n  0: cat\n  1: dog\n  2: bird\n")
    return root


def test_yolo_pixels_and_names(yolo_dataset):
    ix = load_yolo(yolo_dataset / "data.yaml", split="train")
    assert ix.categories == [(0, "cat"), (1, "dog"), (2, "bird")]
    assert [(Path(im.file).name, im.width, im.height) for im in ix.images] == [("a.jpg", 100, 50), ("b.png", 64, 64)]
    boxes = boxes_by_file(ix)
    # cx=50 cy=25 w=20 h=20 -> x=40 y=15; cx=25 cy=37.5 w=50 h=25 -> x=0 y=25
    assert boxes["a.jpg"] == [("cat", pytest.approx([40, 15, 20, 20]), 0),
                              ("dog", pytest.approx([0, 25, 50, 25]), 0)]
    assert boxes["b.png"] == []
    assert ix.problems == []


def test_yolo_splits_list_names_and_folder_layout(yolo_dataset):
    all_ix = load_yolo(yolo_dataset)  # folder holding data.yaml, every split
    assert sorted(Path(im.file).name for im in all_ix.images) == ["a.jpg", "b.png", "c.jpg"]
    assert len({im.id for im in all_ix.images}) == 3
    assert boxes_by_file(all_ix)["c.jpg"] == [("bird", pytest.approx([0, 0, 80, 40]), 0)]

    (yolo_dataset / "data.yaml").write_text("train: images/train\nnames: [cat, dog, bird]\nnc: 3\n")
    assert load_yolo(yolo_dataset / "data.yaml").categories == [(0, "cat"), (1, "dog"), (2, "bird")]

    (yolo_dataset / "data.yaml").unlink()  # plain images/ + labels/ folder: names class_<i>
    val = load_yolo(yolo_dataset, split="val")
    # categories come from every split's labels, so train and val agree
    assert val.categories == [(0, "class_0"), (1, "class_1"), (2, "class_2")]
    assert [Path(im.file).name for im in val.images] == ["c.jpg"]
    (yolo_dataset / "classes.txt").write_text("cat\ndog\nbird\n")
    assert load_yolo(yolo_dataset, split="val").class_names == ["cat", "dog", "bird"]
    with pytest.raises(ValueError, match="images/test"):
        load_yolo(yolo_dataset, split="test")


def test_yolo_missing_and_orphan_labels(yolo_dataset):
    (yolo_dataset / "labels/train/b.txt").unlink()
    (yolo_dataset / "labels/train/ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    ix = load_yolo(yolo_dataset / "data.yaml", split="train")
    msgs = [(p.severity, Path(p.where).name, p.message) for p in ix.problems]
    assert ("warning", "b.png", "no label file b.txt; treated as an image without objects") in msgs
    assert ("warning", "ghost.txt", "label file without a matching image") in msgs
    assert len(ix.images) == 2  # the unlabelled image stays, as a background image


def test_yolo_yaml_errors(tmp_path):
    bad = tmp_path / "data.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match=r"data\.yaml.*not valid YAML"):
        load_yolo(bad)
    bad.write_text("names: [a]\n")
    with pytest.raises(ValueError, match=r"data\.yaml.*none of the keys"):
        load_yolo(bad)
    bad.write_text("train: images\nnames: [a]\n")
    with pytest.raises(ValueError, match=r"data\.yaml.*no split 'val'"):
        load_yolo(bad, split="val")


# ---- Pascal VOC ---------------------------------------------------------------------------------

@pytest.fixture
def voc_dataset(tmp_path):
    root = tmp_path / "voc"
    write_image(root / "JPEGImages/x1.jpg", (100, 50))
    write_image(root / "JPEGImages/x2.jpg", (60, 60))
    write_voc_xml(root / "Annotations/x1.xml", "x1.jpg", (100, 50),
                  [("dog", 10, 20, 30, 50, 0), ("cat", 1, 1, 100, 50, 1)])
    write_voc_xml(root / "Annotations/x2.xml", "x2.png", (60, 60),  # wrong extension in <filename>
                  [("bird", 5, 5, 15, 25, 0)])
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "ImageSets/Main/train.txt").write_text("x1\n")
    (root / "ImageSets/Main/val.txt").write_text("x2\n")
    return root


def test_voc_boxes_ids_and_difficult(voc_dataset):
    ix = load_voc(voc_dataset)
    assert ix.categories == [(1, "bird"), (2, "cat"), (3, "dog")]  # sorted names -> 1..K
    boxes = boxes_by_file(ix)
    # xywh = (xmin, ymin, xmax - xmin, ymax - ymin); difficult -> iscrowd=1
    assert boxes["x1.jpg"] == [("cat", pytest.approx([1, 1, 99, 49]), 1), ("dog", pytest.approx([10, 20, 20, 30]), 0)]
    assert boxes["x2.jpg"] == [("bird", pytest.approx([5, 5, 10, 20]), 0)]  # found despite <filename> x2.png
    assert ix.problems == []


def test_voc_split_keeps_all_categories(voc_dataset):
    val = load_voc(voc_dataset, split="val")
    assert [Path(im.file).name for im in val.images] == ["x2.jpg"]
    assert val.categories == load_voc(voc_dataset, split="train").categories == [(1, "bird"), (2, "cat"), (3, "dog")]
    with pytest.raises(ValueError, match=r"ImageSets/Main/test\.txt"):
        load_voc(voc_dataset, split="test")


def test_voc_other_layouts(tmp_path):
    beside = tmp_path / "beside"
    write_image(beside / "p.jpg", (40, 30))
    write_voc_xml(beside / "p.xml", "p.jpg", (40, 30), [("a", 2, 3, 12, 13, 0)])
    folders = tmp_path / "folders"
    write_image(folders / "images/p.jpg", (40, 30))
    write_voc_xml(folders / "annotations/p.xml", "p.jpg", (0, 0), [("a", 2, 3, 12, 13, 0)])  # size 0: read the file
    for root in (beside, folders):
        assert detect_format(root) == "voc"
        ix = load_annotations(root)
        assert [(Path(im.file).name, im.width, im.height) for im in ix.images] == [("p.jpg", 40, 30)]
        assert Path(ix.images[0].file).is_file()
        assert boxes_by_file(ix) == {"p.jpg": [("a", pytest.approx([2, 3, 10, 10]), 0)]}


# ---- detection, conversion ------------------------------------------------------------------------

def test_detect_format(tmp_path, yolo_dataset, voc_dataset):
    assert detect_format(yolo_dataset) == "yolo"
    assert detect_format(yolo_dataset / "data.yaml") == "yolo"
    assert detect_format(voc_dataset) == "voc"
    (tmp_path / "x.json").write_text("{}")
    assert detect_format(tmp_path / "x.json") == "coco"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: cannot tell the dataset format"):
        load_annotations(empty)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt: unrecognised annotation file"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_annotations(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["yolo", "voc"])
def test_convert_round_trip(kind, yolo_dataset, voc_dataset, tmp_path):
    src = yolo_dataset if kind == "yolo" else voc_dataset
    original = load_annotations(src)
    for out in (src / "coco.json", tmp_path / "elsewhere" / "coco.json"):  # images inside and outside its folder
        convert(src, out)
        data = json.loads(out.read_text())
        # issue 15, problem 10: file names are always relative (../ where needed), never absolute
        assert not any(Path(im["file_name"]).is_absolute() for im in data["images"])
        assert all(im["file_name"].startswith("..") for im in data["images"]) == (out.parent != src)
        back = load_coco(out)
        assert back.problems == []
        assert back.categories == original.categories
        assert [Path(im.file) for im in back.images] == [Path(im.file) for im in original.images]
        assert_same_boxes(boxes_by_file(back), boxes_by_file(original))


def test_convert_cli(yolo_dataset, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert cli_main(["data", "convert", str(yolo_dataset), "--out", str(out), "--split", "val"]) == 0
    assert "1 images, 1 boxes, 3 categories" in capsys.readouterr().out
    assert len(load_coco(out).images) == 1
    assert cli_main(["data", "convert", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "nowhere: no such file or folder" in capsys.readouterr().out


# ---- real data sets (skipped when absent) ----------------------------------------------------------

def test_bccd_convert_and_load_back(tmp_path):
    root = shared("bccd")
    ix = load_annotations(root)
    assert len(ix.images) == 364
    assert ix.class_names == ["Platelets", "RBC", "WBC"]
    assert len(ix.annotations) == 4888 - 2  # two zero-size boxes dropped
    assert [p.severity for p in ix.problems] == ["error", "error"]
    assert all("zero-size box" in p.message for p in ix.problems)
    assert len(load_annotations(root, split="train").images) == 205
    out = convert(root, tmp_path / "bccd.json", split="val")
    assert len(out.images) == 87
    back = load_coco(tmp_path / "bccd.json")
    assert back.problems == []
    assert_same_boxes(boxes_by_file(back), boxes_by_file(out))


def test_coco128_convert_and_load_back(tmp_path):
    root = shared("coco128")
    ix = load_annotations(root)
    assert (len(ix.images), len(ix.annotations), len(ix.categories)) == (128, 939, 80)
    convert(root, tmp_path / "c.json")
    back = load_coco(tmp_path / "c.json")
    assert back.categories == ix.categories
    assert_same_boxes(boxes_by_file(back), boxes_by_file(ix))
