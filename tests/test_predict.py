"""`detrkit predict`: inputs, boxes in original upright pixels, annotated images, bad files skipped."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detrkit.cli import main
from detrkit.config import ModelConfig
from detrkit.detector import Detector
from detrkit.model import build_model
from detrkit.data.images import find_images
from detrkit.predict import image_ids_for, output_names, predict_files
from detrkit.viz.draw import class_colour

CLASSES = ["cat", "dog", "bird"]
CATEGORY_IDS = [3, 7, 11]


def tiny_config() -> ModelConfig:
    return ModelConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
                       dropout=0.0, num_queries=4, image_size=64, max_image_size=96, class_names=CLASSES,
                       category_ids=CATEGORY_IDS)


class FixedModel(nn.Module):
    """Every image: slot 0 = "dog" (p~1) at cxcywh (0.5, 0.5, 0.5, 0.5) of the unpadded image;
    slot 1 = "bird" (p~0.47) at (0.25, 0.25, 0.1, 0.2); slots 2-3 = no object."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, mask=None, return_attention=False, batch_invariant=False):
        self.calls.append([tuple(im.shape[-2:]) for im in images])
        b = len(images)
        logits = torch.zeros(b, 4, 4)
        logits[:, 0, 1] = 10.0
        logits[:, 1, 2] = 1.0
        logits[:, 2:, 3] = 10.0
        boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.1, 0.2], [0.5] * 4, [0.5] * 4]).expand(b, 4, 4)
        return {"pred_logits": logits, "pred_boxes": boxes.clone()}


def _exif_rotated_jpeg(path, stored=(120, 60), orientation=6):
    """A JPEG stored `stored` (w, h) whose EXIF says rotate for display (6: 90 degrees clockwise)."""
    im = Image.new("RGB", stored, (128, 128, 128))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)


def _make_images(d):
    d.mkdir()
    _exif_rotated_jpeg(d / "rotated.jpg")  # upright: 60 wide, 120 high
    Image.new("L", (90, 40), 100).save(d / "gray.png")
    Image.new("RGBA", (50, 70), (10, 200, 30, 120)).save(d / "rgba.png")
    Image.new("P", (64, 48), 3).save(d / "palette.png")
    Image.new("CMYK", (80, 50), (0, 100, 200, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((30, 44), 40000, dtype=np.uint16)).save(d / "deep16.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image, and not picked from the folder")
    upright = {"rotated.jpg": (60, 120), "gray.png": (90, 40), "rgba.png": (50, 70), "palette.png": (64, 48),
               "cmyk.jpg": (80, 50), "deep16.png": (44, 30)}
    return upright


def test_boxes_are_in_original_upright_pixels_and_bad_files_are_skipped(tmp_path, caplog):
    upright = _make_images(tmp_path / "in")
    paths, problems = find_images([tmp_path / "in"])
    assert problems == [] and len(paths) == 7  # 6 images + the broken one, not notes.txt
    model = FixedModel()
    det = Detector(model, tiny_config())
    summary = predict_files(det, paths, out_dir=tmp_path / "out", threshold=0.5, batch_size=3, progress=False)
    assert summary.processed == 6
    assert [f for f, _ in summary.failed] == [str(tmp_path / "in" / "broken.jpg")]
    assert "broken.jpg" in caplog.text
    # batches of mixed sizes reached the model (the broken file dropped from its batch)
    assert any(len(set(shapes)) > 1 for shapes in model.calls)
    by_file = {r["file_name"].rsplit("/", 1)[-1]: r for r in summary.records}
    assert set(by_file) == set(upright)
    for name, (w, h) in upright.items():
        r = by_file[name]
        assert r["category_id"] == 7  # "dog": the dataset's own id, not the class index 1
        np.testing.assert_allclose(r["bbox"], [0.25 * w, 0.25 * h, 0.5 * w, 0.5 * h], atol=1e-3)
        assert r["score"] > 0.99
        out = Image.open(tmp_path / "out" / (name.rsplit(".", 1)[0] + (".jpg" if name.endswith(".jpg") else ".png")))
        assert out.size == (w, h), name  # the upright size: EXIF rotation applied
    # the box on the rotated image is drawn where the JSON says, on the upright picture
    a = np.asarray(Image.open(tmp_path / "out" / "rotated.jpg")).astype(int)
    x0, y0 = 15, 30  # 0.25 * (60, 120)
    edge = a[y0 + 10: y0 + 50, x0: x0 + 2].reshape(-1, 3).mean(0)
    inside = a[y0 + 10: y0 + 50, x0 + 10: x0 + 20].reshape(-1, 3).mean(0)
    # JPEG smears colour, so compare hue: the orange edge (R >> B) against the grey inside (R = B)
    assert edge[0] - edge[2] > 60 and abs(inside[0] - inside[2]) < 10
    assert np.abs(a[5, 55] - 128).max() < 10  # outside every box and tag: untouched grey
    # lossless output: exact class colour on the grayscale image's box edge (bottom edge, y = 0.75 * 40)
    g = np.asarray(Image.open(tmp_path / "out" / "gray.png"))
    assert tuple(g[30, 45]) == class_colour(1)


def test_threshold_and_top_k(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (40, 20)).save(d / "a.png")
    det = Detector(FixedModel(), tiny_config())
    low = predict_files(det, [d / "a.png"], threshold=0.3, progress=False)
    assert sorted(r["category_id"] for r in low.records) == [7, 11]
    bird = next(r for r in low.records if r["category_id"] == 11)
    np.testing.assert_allclose(bird["bbox"], [8.0, 3.0, 4.0, 4.0], atol=1e-3)  # (0.25-0.05)*40, (0.25-0.1)*20
    top1 = predict_files(det, [d / "a.png"], threshold=0.3, top_k=1, progress=False)
    assert [r["category_id"] for r in top1.records] == [7]


def test_find_images_files_folders_globs_and_problems(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    for name in ("a/1.jpg", "a/2.PNG", "a/sub/3.jpg", "b.tif"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "empty").mkdir()
    found, problems = find_images([tmp_path / "a", str(tmp_path / "*.tif"), tmp_path / "a" / "1.jpg",
                                   tmp_path / "missing.jpg", str(tmp_path / "*.gif"), tmp_path / "empty"])
    assert [p.name for p in found] == ["1.jpg", "2.PNG", "b.tif"]  # no duplicates, folder not recursive
    assert len(problems) == 3
    assert any("missing.jpg: no such file" in p for p in problems)
    assert any("*.gif: pattern matches no image" in p for p in problems)
    assert any("holds no image files" in p for p in problems)
    rec, _ = find_images([tmp_path / "a"], recursive=True)
    assert [p.name for p in rec] == ["1.jpg", "2.PNG", "3.jpg"]
    found, _ = find_images([str(tmp_path / "**" / "*.jpg")])
    assert sorted(p.name for p in found) == ["1.jpg", "3.jpg"]


def test_image_ids_and_output_names(tmp_path):
    from pathlib import Path

    assert image_ids_for([Path("000000000139.jpg"), Path("x/000000000285.png")]) == [139, 285]
    assert image_ids_for([Path("a.jpg"), Path("12.jpg")]) == [1, 2]
    assert image_ids_for([Path("a/7.jpg"), Path("b/007.jpg")]) == [1, 2]  # same number twice
    assert output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("c/x.tiff"), Path("y.JPEG")]) == \
        ["x.jpg", "x_2.jpg", "x.png", "y.jpg"]


def test_cli_predict_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    weights = Detector(build_model(tiny_config()), tiny_config()).save_pretrained(tmp_path / "w")
    _make_images(tmp_path / "in")
    out, js = tmp_path / "out", tmp_path / "res" / "results.json"
    rc = main(["predict", str(tmp_path / "in"), str(tmp_path / "nothere.jpg"), "--weights", str(weights),
               "--out", str(out), "--json", str(js), "--threshold", "0", "--top-k", "2", "--batch-size", "4",
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 image(s)" in printed and "broken.jpg" in printed
    records = json.loads(js.read_text())
    assert len(records) == 12  # top 2 of each of the 6 readable images
    assert {r["category_id"] for r in records} <= set(CATEGORY_IDS)
    assert set(records[0]) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
    assert sorted(p.name for p in out.iterdir()) == ["cmyk.jpg", "deep16.png", "gray.png", "palette.png",
                                                     "rgba.png", "rotated.jpg"]
    assert main(["predict", str(tmp_path / "nothere.jpg"), "--weights", str(weights), "--json", str(js)]) == 2
    assert main(["predict", str(tmp_path / "in"), "--weights", str(weights)]) == 2  # nothing to write


@pytest.mark.parametrize("classes_per_query", [1, 2])
def test_predict_gives_the_records_and_the_ap_of_eval(tmp_path, classes_per_query):
    """`predict` and `eval` share one resize and one inference path: on the same weights and images
    (batches alike), predict's COCO records are eval's, number for number, and so is the AP. Both follow
    the weights' post-processing (each query's 2 best classes), and the flags override it."""
    from detrkit.data.coco import load_coco
    from detrkit.data.synthetic import make_synthetic
    from detrkit.engine.evaluate import CocoEvaluator, evaluate_weights
    from detrkit.predict import predict_files

    ann = make_synthetic(tmp_path / "data", 7, seed=1, image_size=(48, 90), image_format="jpg")
    index = load_coco(ann)
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
                      dropout=0.0, num_queries=5, image_size=64, max_image_size=96,
                      class_names=index.class_names, category_ids=index.category_ids,
                      classes_per_query=classes_per_query)
    torch.manual_seed(0)
    weights = Detector(build_model(cfg), cfg).save_pretrained(tmp_path / "w")
    metrics, _ = evaluate_weights(weights, ann, batch_size=3, device="cpu", results_path=tmp_path / "eval.json")
    evaluated = json.loads((tmp_path / "eval.json").read_text())

    det = Detector.from_pretrained(weights, precision="float32")
    files = [im.file for im in index.images]
    assert len({tuple(Image.open(f).size) for f in files}) > 1  # mixed sizes: padding in the batches
    summary = predict_files(det, files, threshold=None, batch_size=3, progress=False)
    id_of = {str(im.file): im.id for im in index.images}
    predicted = [{k: (id_of[r["file_name"]] if k == "image_id" else v) for k, v in r.items() if k != "file_name"}
                 for r in summary.records]
    assert len(predicted) == 5 * classes_per_query * len(files)
    assert predicted == evaluated  # same boxes and scores to the last bit, same order
    ev = CocoEvaluator(index.to_coco())
    ev.add(predicted)
    assert ev.summarize()["AP50"] == metrics["AP50"] and ev.summarize()["AP"] == metrics["AP"]
    # the flags: the paper's one class per query, whatever the weights say
    assert main(["eval", "--weights", str(weights), "--data", str(ann), "--classes-per-query", "1",
                 "--results", str(tmp_path / "one.json")]) == 0
    assert main(["predict", *map(str, files), "--weights", str(weights), "--classes-per-query", "1",
                 "--threshold", "0", "--json", str(tmp_path / "p1.json"), "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "one.json").read_text())) == 5 * len(files)
    assert len(json.loads((tmp_path / "p1.json").read_text())) == 5 * len(files)
