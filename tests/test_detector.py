"""Detector: loading by name (local files only), prediction on any image a user has."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit import Detector, get_preset
from detrkit.data.transforms import resized_shape as inference_size
from detrkit.weights import authors, hub
from detrkit.weights.coco_names import authors_class_names


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("detr-tiny").model.with_classes(["cat", "dog", "bird"], [3, 17, 90])
    return Detector.from_config(cfg)


def test_inference_size_follows_the_authors_rule():
    assert inference_size(480, 640, 800, 1333) == (800, 1066)
    assert inference_size(640, 480, 800, 1333) == (1066, 800)
    assert inference_size(100, 1000, 800, 1333) == (133, 1330)  # long side capped (int rounding as theirs)
    assert inference_size(800, 900, 800, 1333) == (800, 900)


def test_predict_accepts_every_kind_of_input(tiny, tmp_path):
    rgb = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    inputs = [tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb,
              torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255]
    results = tiny.predict(inputs, threshold=None, top_k=5)
    assert len(results) == len(inputs)
    for r in results:
        assert r.image_size == (90, 120)
        assert r.boxes.shape == (5, 4) and len(r.label_names) == 5
        assert set(r.category_ids) <= {3, 17, 90}
        assert set(r.label_names) <= {"cat", "dog", "bird"}
        assert torch.all(r.scores[:-1] >= r.scores[1:])
        assert torch.allclose(r.boxes, results[0].boxes, atol=1e-3)  # same picture, same answer
    gray = tiny.predict(Image.fromarray(rgb[..., 0]), threshold=None)[0]
    assert gray.boxes.shape[0] == tiny.config.num_queries


def test_predict_is_independent_of_batch_size_and_maps_to_original_pixels(tiny):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in [(60, 200), (180, 90), (128, 128)]]
    one = [tiny.predict(im, threshold=None)[0] for im in images]
    many = tiny.predict(images, threshold=None, batch_size=3)
    for a, b, im in zip(one, many, images):
        assert torch.allclose(a.boxes, b.boxes, atol=1e-3) and torch.allclose(a.scores, b.scores, atol=1e-5)
        h, w = im.shape[-2:]
        assert (b.boxes[:, [0, 2]] <= w + 1e-3).all() and (b.boxes[:, [1, 3]] <= h + 1e-3).all()


def test_boxes_land_on_the_upright_image(tiny, tmp_path):
    """An EXIF-rotated file is seen upright: sizes are the upright ones."""
    arr = np.zeros((60, 100, 3), np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    r = tiny.predict(tmp_path / "r.jpg", threshold=None)[0]
    assert r.image_size == (100, 60)
    assert (r.boxes[:, [0, 2]] <= 60 + 1e-3).all()


def test_threshold_and_top_k(tiny):
    im = torch.rand(3, 64, 64)
    everything = tiny.predict(im, threshold=None)[0]
    cut = float(everything.scores[3])
    assert len(tiny.predict(im, threshold=cut)[0]) == 3
    assert len(tiny.predict(im, threshold=None, top_k=2)[0]) == 2


def test_published_name_downloads_into_cache_with_hash_check(tmp_path, monkeypatch):
    """A local file:// mirror stands in for the authors' server: no network in tests."""
    cfg = get_preset("detr-r50").model.with_classes(authors_class_names())
    cfg.enc_layers = cfg.dec_layers = 1  # a small file; the loader infers the layer counts
    from detrkit import build_model

    sd = authors.to_authors_keys(build_model(cfg).state_dict())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    src = mirror / "payload.pth"
    torch.save({"model": sd}, src)
    prefix = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    name = f"detr-r50-{prefix}.pth"
    src.rename(mirror / name)
    monkeypatch.setattr(hub, "_BASE", mirror.as_uri() + "/")
    monkeypatch.setitem(hub.PUBLISHED, "detr-r50", (name, prefix))
    monkeypatch.setenv("DETRKIT_CACHE", str(tmp_path / "cache"))
    det = Detector.from_pretrained("detr-r50")
    assert (tmp_path / "cache" / name).exists()
    assert det.config.enc_layers == 1 and det.config.class_names[1] == "person"

    monkeypatch.setitem(hub.PUBLISHED, "detr-r101", (name.replace("r50", "r101"), "00000000"))
    (mirror / name).rename(mirror / name.replace("r50", "r101"))
    with pytest.raises(RuntimeError, match="hash"):
        hub.published_path("detr-r101")
    assert not (tmp_path / "cache" / name.replace("r50", "r101")).exists()


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_optimised_inference_matches_the_plain_model(tiny, precision):
    from detrkit.postprocess import postprocess

    det = Detector(tiny.model, tiny.config, precision=precision)
    im = torch.rand(3, 100, 150)
    fast = det.predict(im, threshold=None)[0]
    tensors, sizes = det.preprocess(im)
    with torch.no_grad():
        out = tiny.model(tensors)
    ref = postprocess(out["pred_logits"], out["pred_boxes"], sizes)[0]
    if precision == "float32":
        assert torch.allclose(fast.scores, ref["scores"], atol=1e-4)
        assert torch.allclose(fast.boxes, ref["boxes"], atol=1e-2)  # pixels: 1e-4 of the size
    else:  # same best queries, boxes within 1% of the image size
        assert torch.equal(fast.labels[:3], ref["labels"][:3])
        assert (fast.boxes[:3] - ref["boxes"][:3]).abs().max() < 0.01 * 150
