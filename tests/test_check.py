"""The dataset checker: statistics, image/box checks against real image sizes, heuristics, CLI, real data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from detrkit.cli import main as cli_main
from detrkit.data.check import check_dataset

from conftest import shared_data as shared


def write_image(path: Path, size, exif_orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (200, 100, 50))
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)


def write_coco(root: Path, images, boxes, categories=((1, "a"), (2, "b"), (3, "unused"))) -> Path:
    """images: (file, w, h) written as files of that size; boxes: (image index, category, xywh, iscrowd)."""
    for name, w, h in images:
        write_image(root / name, (w, h))
    data = {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(images)],
            "annotations": [{"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": b, "iscrowd": cr}
                            for k, (i, c, b, cr) in enumerate(boxes)],
            "categories": [{"id": i, "name": n} for i, n in categories]}
    p = root / "ann.json"
    p.write_text(json.dumps(data))
    return p


def wheres(problems) -> list[str]:
    return [f"{p.where}: {p.message}" for p in problems]


def test_statistics_of_a_clean_dataset(tmp_path):
    p = write_coco(tmp_path, [("x.jpg", 200, 100), ("y.jpg", 200, 100), ("z.jpg", 50, 50)], [
        (0, 1, [0, 0, 10, 10], 0),     # area 100: small
        (0, 1, [10, 10, 40, 40], 0),   # 1600: medium
        (1, 2, [0, 0, 100, 100], 0),   # 10000: large
        (1, 2, [5, 5, 20, 30], 1),     # crowd: counted apart
    ])
    r = check_dataset(p)
    assert r.ok and r.errors == [] and r.warnings == []
    assert r.dataset_format == "coco"
    assert (r.num_images, r.images_with_boxes, r.images_without_boxes, r.images_decoded) == (3, 2, 1, 3)
    assert r.class_counts == {"a": 2, "b": 1}
    assert r.crowd_boxes == 1
    assert r.unused_categories == ["unused"]
    assert (r.boxes.count, r.boxes.small, r.boxes.medium, r.boxes.large) == (3, 1, 1, 1)
    assert r.boxes.width == (10, 40, 100) and r.boxes.height == (10, 40, 100)
    text = r.format()
    for s in ("Images: 3 (2 with boxes, 1 without; 3 decoded)", "Boxes: 3 in 2 classes (+ 1 crowd",
              "small (<32x32) 1, medium 1, large (>=96x96) 1", "width  min 10.0  median 40.0  max 100.0",
              "Categories without boxes (1): unused", "Result: OK"):
        assert s in text, text


def test_declared_size_differs_from_image(tmp_path):
    write_image(tmp_path / "rot.jpg", (80, 40), exif_orientation=6)  # stored 80x40, upright 40x80
    p = write_coco(tmp_path, [("small.jpg", 100, 50)], [(0, 1, [50, 10, 40, 30], 0)])
    data = json.loads(p.read_text())
    Image.new("RGB", (60, 30)).save(tmp_path / "small.jpg")  # resized after annotating
    data["images"].append({"id": 2, "file_name": "rot.jpg", "width": 80, "height": 40})
    p.write_text(json.dumps(data))
    r = check_dataset(p)
    assert any("small.jpg" in w and "annotations say 100x50 but the image is 60x30" in w for w in wheres(r.errors))
    assert any("rot.jpg" in w and "upright image is 40x80 (EXIF rotation?)" in w for w in wheres(r.errors))
    # the box fits the declared 100x50 but not the real 60x30 image
    assert any("annotation id 1" in w and "extends outside the 60x30 image" in w for w in wheres(r.warnings))


def test_xyxy_stored_as_xywh(tmp_path):
    corners = [[60, 10, 90, 40], [50, 20, 95, 45], [70, 5, 80, 30], [10, 10, 30, 30]]
    p = write_coco(tmp_path, [("x.jpg", 100, 50)], [(0, 1, b, 0) for b in corners])
    r = check_dataset(p, decode_images=False)
    hint = [w for w in wheres(r.errors) if "stored as corners" in w]
    assert len(hint) == 1 and "3 of 4 boxes" in hint[0] and "ann.json" in hint[0]
    # a single box poking out is only a warning
    p = write_coco(tmp_path, [("x.jpg", 100, 50)], [(0, 1, [60, 10, 90, 40], 0)] + [(0, 1, [1, 1, 5, 5], 0)] * 9)
    r = check_dataset(p, decode_images=False)
    assert r.ok and any("1 of 10 boxes" in w for w in wheres(r.warnings))


def test_normalised_boxes_in_coco(tmp_path):
    p = write_coco(tmp_path, [("x.jpg", 100, 50)], [(0, 1, [0.1, 0.1, 0.2, 0.3], 0)] * 3)
    r = check_dataset(p, decode_images=False)
    assert any("look normalised" in w for w in wheres(r.errors))


def test_yolo_box_outside_image_and_unlabelled(tmp_path):
    write_image(tmp_path / "images/a.jpg", (100, 50))
    write_image(tmp_path / "images/b.jpg", (100, 50))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/a.txt").write_text("0 0.95 0.5 0.3 0.2\n0 0.5 0.5 0.1 0.1\n")
    r = check_dataset(tmp_path)
    assert r.dataset_format == "yolo"
    assert any(w.startswith(str(tmp_path / "labels/a.txt")) and "extends outside the 100x50 image" in w
               for w in wheres(r.warnings))
    assert any("b.jpg" in w and "no label file" in w for w in wheres(r.warnings))
    assert r.ok and (r.images_with_boxes, r.images_without_boxes) == (1, 1)


def test_unlisted_images_in_coco_folder(tmp_path):
    p = write_coco(tmp_path, [("x.jpg", 20, 20)], [(0, 1, [1, 1, 5, 5], 0)])
    write_image(tmp_path / "stray.png", (20, 20))
    r = check_dataset(p)
    assert any("1 image file(s) have no annotation entry (e.g. stray.png)" in w for w in wheres(r.warnings))


def test_two_splits_over_one_folder_are_not_unannotated(tmp_path, caplog):
    """train.json and val.json over one image folder: neither split's images are "unannotated" files of
    the other; a file that neither lists still is."""
    import dataclasses
    import logging

    from detrkit.config import get_preset
    from detrkit.engine.run_data import load_run_data

    train = write_coco(tmp_path, [("a.jpg", 64, 48), ("b.jpg", 64, 48)], [(0, 1, [1, 1, 30, 30], 0), (1, 2, [5, 5, 20, 20], 0)])
    train = train.rename(tmp_path / "train.json")
    val = write_coco(tmp_path, [("c.jpg", 64, 48)], [(0, 1, [2, 2, 25, 25], 0)]).rename(tmp_path / "val.json")
    preset = get_preset("detr-tiny")
    cfg = dataclasses.replace(preset.train, fit_to_data=False)
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        load_run_data(train, val, preset.model, cfg)
    assert not [r for r in caplog.records if "no annotation entry" in r.getMessage()]
    write_image(tmp_path / "stray.png", (20, 20))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        load_run_data(train, val, preset.model, cfg)
    warned = [r.getMessage() for r in caplog.records if "no annotation entry" in r.getMessage()]
    assert len(warned) == 2 and all("1 image file(s)" in w and "stray.png" in w for w in warned)


def test_check_cli(tmp_path, capsys):
    good = write_coco(tmp_path / "good", [("x.jpg", 20, 20)], [(0, 1, [1, 1, 5, 5], 0)])
    assert cli_main(["data", "check", str(good)]) == 0
    assert "Result: OK" in capsys.readouterr().out
    bad = write_coco(tmp_path / "bad", [("x.jpg", 20, 20)], [(0, 1, [1, 1, -5, 5], 0)])
    assert cli_main(["data", "check", str(bad), "--no-decode"]) == 1
    out = capsys.readouterr().out
    # its only box is dropped, so no image has a box left: a second error
    assert "annotation id 1: bbox has negative size" in out and "Result: 2 error(s)" in out
    assert "no image has a box" in out
    assert cli_main(["data", "check", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such file or folder" in capsys.readouterr().out


def test_check_cli_shows_what_training_a_preset_would_warn_about(tmp_path, capsys):
    """Crowded synthetic images (up to 60 small shapes) against detr-tiny's 20 queries: `data check` says
    what training will fit to the data (more queries); without the fit it gives the warning `train`
    would give at its start, with the fix, and a --set that fixes it silences it."""
    from collections import Counter

    from detrkit.data.synthetic import make_synthetic

    path = make_synthetic(tmp_path / "crowded", num_images=4, variant="hard", image_size=(320, 320),
                          max_objects=60, object_size=(12, 20))
    per_image = Counter(a["image_id"] for a in json.loads(path.read_text())["annotations"])
    crowded = [n for n in per_image.values() if n > 20]
    assert crowded  # the data this test is about
    assert cli_main(["data", "check", str(path), "--no-decode"]) == 0
    out = capsys.readouterr().out
    assert "Training with preset detr-tiny (" in out
    assert f"fitted to the training set: input 144 -> 288 px" in out
    assert f"queries 20 -> {min(100, -(-max(crowded) * 12 // 100) * 10)} (up to {max(crowded)} objects" in out
    assert "more objects than the model's" not in out
    assert out.index("Training with preset") < out.index("Result: OK")
    assert cli_main(["data", "check", str(path), "--no-decode", "--set", "fit_to_data=false"]) == 0
    out = capsys.readouterr().out
    assert f"{len(crowded)} of 4 images have more objects than the model's 20 queries (up to {max(crowded)}" in out
    assert "fitted" not in out
    assert cli_main(["data", "check", str(path), "--no-decode", "--set", "fit_to_data=false",
                     "--set", "model.num_queries=100"]) == 0
    assert "queries" not in capsys.readouterr().out


# ---- real data sets (skipped when absent) ----------------------------------------------------------

def test_bccd_findings():
    r = check_dataset(shared("bccd"))
    assert (r.num_images, r.images_decoded, r.images_with_boxes) == (364, 364, 364)
    assert r.class_counts == {"RBC": 4153, "WBC": 372, "Platelets": 361}
    assert len(r.errors) == 2 and r.warnings == []
    assert all("zero-size box 'RBC'" in e.message for e in r.errors)
    assert sorted(Path(e.where.split(" ")[0]).name for e in r.errors) == ["BloodImage_00338.xml",
                                                                            "BloodImage_00343.xml"]
    assert (r.boxes.small, r.boxes.medium, r.boxes.large) == (39, 1524, 3323)


def test_coco128_findings():
    r = check_dataset(shared("coco128"))
    assert r.ok and r.errors == [] and r.warnings == []
    assert (r.num_images, r.images_decoded, r.images_with_boxes, r.images_without_boxes) == (128, 128, 126, 2)
    assert (r.boxes.count, r.crowd_boxes) == (929, 10)
    assert len(r.class_counts) == 71 and r.class_counts["person"] == 254
    assert len(r.unused_categories) == 9
