"""A corpus of broken datasets: each must give a clear message naming the file and the problem,
either as an exception (the dataset cannot be read at all) or as a recorded Problem."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.cli import main as cli_main
from detrkit.data.check import check_dataset
from detrkit.data.coco import CocoFormatError, load_coco
from detrkit.data.voc import load_voc
from detrkit.data.yolo import load_yolo


def write_image(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 90)).save(path)
    return path


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


def has(problems, *parts: str, severity: str | None = None) -> bool:
    """Some problem mentions every one of `parts` (in its location or message)."""
    return any(all(s in str(p) for s in parts) and (severity is None or p.severity == severity) for p in problems)


def coco(tmp_path, images=None, annotations=None, categories=None, name="ann.json") -> Path:
    write_image(tmp_path / "a.jpg", (64, 48))
    write_image(tmp_path / "b.jpg", (64, 48))
    data = {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                                                     {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }
    p = tmp_path / name
    p.write_text(json.dumps(data))  # json writes float("nan") as NaN, which json.load reads back
    return p


def ann(i, bbox, image_id=1, category_id=1):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


# ---- COCO JSON ----------------------------------------------------------------------------------

def test_coco_not_json(tmp_path, capsys):
    p = tmp_path / "broken.json"
    p.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match=r"broken\.json: not valid JSON"):
        load_coco(p)
    report = check_dataset(p)
    assert not report.ok and not report.readable and has(report.errors, "broken.json", "not valid JSON")
    assert report.errors[0].where == str(p)  # the file named once, as the location
    assert cli_main(["data", "check", str(p)]) == 1
    assert "broken.json: not valid JSON" in capsys.readouterr().out


def test_coco_missing_keys(tmp_path):
    p = tmp_path / "nokeys.json"
    p.write_text(json.dumps({"images": [], "categories": []}))
    report = check_dataset(p)
    assert has(report.errors, "nokeys.json", "missing top-level key(s) ['annotations']")
    p.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(CocoFormatError, match=r"nokeys\.json: image #0 .* lacks key\(s\) \['file_name'\]"):
        load_coco(p)


@pytest.mark.parametrize("bbox, says", [
    ([10, 10, -5, 8], "negative size"),
    ([10, 10, float("nan"), 8], "NaN"),
    ([10, 10, 0, 8], "zero size"),
    ([100, 100, 5, 5], "entirely outside"),
    ([10, 10, "w", 8], "non-numeric"),
])
def test_coco_bad_boxes(tmp_path, bbox, says):
    p = coco(tmp_path, annotations=[ann(7, bbox), ann(8, [1, 1, 5, 5])])
    report = check_dataset(p, decode_images=False)
    assert has(report.errors, "ann.json", "annotation id 7", says)
    assert report.boxes.count == 1  # the bad box is left out, the good one counted


def test_coco_unknown_category_and_duplicates(tmp_path):
    p = coco(tmp_path,
             images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                     {"id": 1, "file_name": "b.jpg", "width": 64, "height": 48}],
             annotations=[ann(1, [1, 1, 5, 5]), ann(1, [2, 2, 5, 5]), ann(2, [1, 1, 5, 5], category_id=99),
                          ann(3, [1, 1, 5, 5], image_id=42)])
    report = check_dataset(p, decode_images=False)
    assert has(report.errors, "image id 1", "duplicate image id")
    assert has(report.errors, "annotation id 1", "duplicate annotation id")
    assert has(report.errors, "annotation id 2", "unknown category id 99")
    assert has(report.errors, "annotation id 3", "unknown image id 42")


# ---- YOLO ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, says", [
    ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 fields 'class cx cy w h', got 6"),
    ("0 0.5 abc 0.2 0.2", "non-numeric value"),
    ("0 0.5 0.5 1.2 0.2", "values must be normalised to [0,1]"),
    ("0 -0.1 0.5 0.2 0.2", "values must be normalised to [0,1]"),
    ("0 0.5 0.5 nan 0.2", "values must be normalised to [0,1]"),
    ("5 0.5 0.5 0.2 0.2", "class index 5 not in names"),
    ("1.5 0.5 0.5 0.2 0.2", "not a non-negative integer"),
    ("0 0.5 0.5 0 0.2", "zero-size box"),
])
def test_yolo_bad_lines(tmp_path, line, says):
    write_image(tmp_path / "images/im.jpg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/im.txt").write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [a, b]\n")
    ix = load_yolo(tmp_path)
    assert len(ix.annotations) == 1  # the good line stays, the bad one is skipped
    assert has(ix.problems, "im.txt:2", says, severity="error"), messages(ix.problems)
    assert has(check_dataset(tmp_path).errors, "im.txt:2", says)


# ---- Pascal VOC ---------------------------------------------------------------------------------

def test_voc_broken_xml(tmp_path):
    write_image(tmp_path / "JPEGImages/good.jpg")
    write_image(tmp_path / "JPEGImages/bad.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations/good.xml").write_text(
        "<annotation><filename>good.jpg</filename><object><name>a</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>9</xmax><ymax>8</ymax></bndbox></object></annotation>")
    (tmp_path / "Annotations/bad.xml").write_text("<annotation><filename>bad.jpg</filename><object>")
    ix = load_voc(tmp_path)
    assert [Path(im.file).name for im in ix.images] == ["good.jpg"]  # the broken one is left out
    assert has(ix.problems, "bad.xml", "broken XML", "image left out", severity="error")
    report = check_dataset(tmp_path)
    assert has(report.errors, "bad.xml", "broken XML")
    # size came from the image header since <size> is absent
    assert (ix.images[0].width, ix.images[0].height) == (64, 48)


@pytest.mark.parametrize("box, says", [
    ("<xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax>", "zero-size box 'a'"),
    ("<xmin>9</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax>", "negative-size box 'a'"),
    ("<xmin>x</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax>", "bndbox needs numeric"),
    ("<xmin>1</xmin><ymin>5</ymin><ymax>9</ymax>", "bndbox needs numeric"),
])
def test_voc_bad_boxes(tmp_path, box, says):
    write_image(tmp_path / "p.jpg")
    (tmp_path / "p.xml").write_text(
        f"<annotation><filename>p.jpg</filename><size><width>64</width><height>48</height></size>"
        f"<object><name>a</name><bndbox>{box}</bndbox></object>"
        f"<object><name>a</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        f"</annotation>")
    ix = load_voc(tmp_path)
    assert len(ix.annotations) == 1
    assert has(ix.problems, "p.xml (object 1)", says, "dropped", severity="error"), messages(ix.problems)


def test_voc_split_lists_missing_file(tmp_path):
    write_image(tmp_path / "JPEGImages/a.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations/a.xml").write_text("<annotation><filename>a.jpg</filename></annotation>")
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    (tmp_path / "ImageSets/Main/train.txt").write_text("a\nzz\n")
    ix = load_voc(tmp_path, split="train")
    assert len(ix.images) == 1
    assert has(ix.problems, "train.txt", "'zz' is listed", "zz.xml does not exist")


# ---- image files ----------------------------------------------------------------------------------

def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_bad_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    _truncated_jpeg(tmp_path / "cut.jpg")
    write_image(tmp_path / "fine.jpg")
    names = ["empty.jpg", "text.jpg", "cut.jpg", "fine.jpg", "gone.jpg"]
    p = coco(tmp_path, images=[{"id": i, "file_name": n, "width": 64, "height": 48}
                               for i, n in enumerate(names, start=1)],
             annotations=[ann(i, [1, 1, 10, 10], image_id=i) for i in range(1, 6)])
    report = check_dataset(p)
    assert has(report.errors, "empty.jpg", "empty file (0 bytes)")
    assert has(report.errors, "text.jpg", "not an image file")
    assert has(report.errors, "cut.jpg", "truncated")
    assert has(report.errors, "gone.jpg", "not found")
    assert sum("gone.jpg" in str(e) for e in report.errors) == 1  # the reader's report, not repeated
    assert not has(report.errors, "fine.jpg")
    assert report.images_decoded == 1
    # header-only checking still finds the empty and the non-image file, not the truncation
    quick = check_dataset(p, decode_images=False)
    assert has(quick.errors, "empty.jpg", "empty file") and has(quick.errors, "text.jpg", "not an image")
    assert not has(quick.errors, "cut.jpg")


def test_yolo_unreadable_image_left_out(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/broken.jpg").write_text("nope")
    write_image(tmp_path / "images/ok.jpg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/broken.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "labels/ok.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    ix = load_yolo(tmp_path)
    assert [Path(im.file).name for im in ix.images] == ["ok.jpg"]
    assert has(ix.problems, "broken.jpg", "image left out", "not an image file", severity="error")
