"""Image loading, COCO reading/writing, transforms and the detection dataset."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image

from conftest import shared_data
from detrkit.data import images as images_mod
from detrkit.data.coco import CocoFormatError, load_coco, save_coco
from detrkit.data.dataset import BadSample, DetectionDataset, collate
from detrkit.data.images import ImageError, image_size, load_image
from detrkit.data.index import Annotation, DatasetIndex, ImageRecord
from detrkit.data.synthetic import make_synthetic
from detrkit.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, MIN_SIDE, NormalizeBoxes, RandomShortSideResize, RandomSizeCrop, eval_transforms,
    make_target, make_transforms, resize_for_inference, resized_shape, train_transforms,
)
from detrkit.config import get_preset

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"), num_images=6, seed=1, image_size=(64, 96),
                          image_format="png")


def _write_coco(path: Path, images, annotations, categories) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _png(path: Path, w: int = 40, h: int = 30, color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)
    return path


# ---------------------------------------------------------------- images


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "missing.jpg",
        "empty": tmp_path / "empty.jpg",
        "text": tmp_path / "text.jpg",
        "truncated_jpg": tmp_path / "truncated.jpg",
        "truncated_png": tmp_path / "truncated.png",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["truncated_jpg"].write_bytes(data[: len(data) // 2])
    png = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    files["truncated_png"].write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return files


def test_bad_images_raise_image_error_naming_the_file(tmp_path):
    expected = {"missing": "not found", "empty": "empty", "text": "not an image",
                "truncated_jpg": "truncated", "truncated_png": "truncated"}
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert str(path) in str(e.value), kind
        assert expected[kind] in str(e.value), (kind, str(e.value))
        assert isinstance(e.value, ValueError)


def test_bad_images_become_bad_samples(tmp_path):
    files = _bad_files(tmp_path)
    records = [ImageRecord(i + 1, p, 64, 64) for i, p in enumerate(files.values())]
    records.append(ImageRecord(99, _png(tmp_path / "ok.png"), 40, 30))
    index = DatasetIndex(records, [], [(1, "thing")], tmp_path / "x.json")
    ds = DetectionDataset(index, eval_transforms(32, 64), skip_bad=True)
    items = [ds[i] for i in range(len(ds))]
    bad = [x for x in items if isinstance(x, BadSample)]
    assert [b.index for b in bad] == list(range(len(files)))
    assert [b.path for b in bad] == list(files.values())
    assert all(b.reason for b in bad)
    images, targets, bad2 = collate(items)
    assert len(images) == 1 and len(targets) == 1 and targets[0]["image_id"] == 99 and len(bad2) == len(files)

    # with DataLoader workers the bad samples still reach the main process
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)
    got_bad = [b.path for _, _, bb in loader for b in bb]
    assert got_bad == list(files.values())

    strict = DetectionDataset(index, eval_transforms(32, 64), skip_bad=False)
    with pytest.raises(ImageError, match="truncated.png"):
        strict[4]


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_image_loads_upright(tmp_path, orientation):
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # stored as 60 wide, 40 high
    stored[:10, :10] = (255, 0, 0)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    im = load_image(path)
    upright_w, upright_h = (40, 60) if orientation in (6, 8) else (60, 40)
    assert im.size == (upright_w, upright_h)
    assert image_size(path) == (upright_w, upright_h)
    # 6 = rotate 90 clockwise to display: top-left goes to top-right; 8: to bottom-left; 3: bottom-right
    corner = {6: (upright_w - 5, 5), 8: (5, upright_h - 5), 3: (upright_w - 5, upright_h - 5)}[orientation]
    r, g, b = im.getpixel(corner)
    assert r > 200 and g < 60 and b < 60
    assert im.getpixel((upright_w // 2, upright_h // 2))[0] < 30

    index = DatasetIndex([ImageRecord(1, path, upright_w, upright_h)],
                         [Annotation(1, 1, 1, [0, 0, 10, 10])], [(1, "a")], tmp_path / "a.json")
    _, target = DetectionDataset(index, None)[0]
    assert target["orig_size"].tolist() == [upright_h, upright_w]
    assert target["size"].tolist() == [upright_h, upright_w]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    a = np.asarray(load_image(path))
    assert a.shape == (8, 256, 3) and a.dtype == np.uint8
    expected = np.rint(ramp / 257.0)
    assert np.abs(a[..., 0].astype(int) - expected).max() <= 1
    assert a[0, 128, 0] in (127, 128)  # clipping would give 255 here


def test_color_modes_load_as_rgb(tmp_path):
    # CMYK JPEG
    p = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 30, 90)).convert("CMYK").save(p, quality=98)
    assert np.abs(np.asarray(load_image(p))[8, 8].astype(int) - (200, 30, 90)).max() <= 6

    # palette PNG with a transparent index: transparent -> black, opaque keeps its colour
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 255, 255, 0, 128, 255] + [0] * 762)
    pal.paste(1, (5, 0, 10, 10))
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    im = load_image(p)
    assert im.mode == "RGB" and im.getpixel((1, 1)) == (0, 0, 0) and im.getpixel((8, 8)) == (0, 128, 255)

    # RGBA half transparent: composited on black
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (200, 100, 50, 128)).save(p)
    assert np.abs(np.asarray(load_image(p))[0, 0].astype(int) - (100, 50, 25)).max() <= 1

    # grayscale, gray+alpha, 1-bit
    for mode, value, expect in [("L", 77, (77, 77, 77)), ("LA", (200, 255), (200, 200, 200)), ("1", 1, (255, 255, 255))]:
        p = tmp_path / f"m{mode}.png"
        Image.new(mode, (8, 8), value).save(p)
        im = load_image(p)
        assert im.mode == "RGB" and im.getpixel((3, 3)) == expect, mode


def test_large_images_load_with_warning_up_to_a_cap(tmp_path, monkeypatch, caplog):
    p = _png(tmp_path / "big.png", 100, 80)
    # pretend the bomb limit is tiny: Pillow alone would refuse this image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(images_mod, "_PILLOW_WARN_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)
    with caplog.at_level(logging.WARNING, logger="detrkit.data.images"):
        assert load_image(p).size == (100, 80)
    assert any("very large" in r.getMessage() and "big.png" in r.getMessage() for r in caplog.records)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="big.png.*decompression bomb.*100x80"):
        load_image(p)


# ---------------------------------------------------------------- COCO


def test_coco_round_trip(synth, tmp_path):
    a = load_coco(synth)
    assert not a.problems and len(a.images) == 6 and len(a.annotations) > 6
    out = save_coco(a, tmp_path / "elsewhere" / "copy.json")  # images outside: ../ relative paths
    b = load_coco(out)
    assert b.categories == a.categories and b.images == a.images and b.annotations == a.annotations
    assert not b.problems

    inside = save_coco(a, synth.parent / "again.json")  # beside the images: relative names
    names = [im["file_name"] for im in json.loads(inside.read_text())["images"]]
    assert all(n.startswith("images/") for n in names)
    assert load_coco(inside).images == a.images


def test_converted_dataset_survives_a_move(synth, tmp_path):
    """Issue 15, problem 10: `data convert` wrote absolute file names, so a copied dataset pointed back
    at the original images. Relative names keep the copy self-contained."""
    import shutil

    a = load_coco(synth)
    save_coco(a, synth.parent / "annotations" / "converted.json")
    moved = tmp_path / "moved"
    shutil.copytree(synth.parent, moved)
    b = load_coco(moved / "annotations" / "converted.json")
    assert not b.problems
    assert all(Path(im.file).is_relative_to(moved.resolve()) for im in b.images)


def test_coco_image_lookup(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    _png(tmp_path / "pics" / "one.png")
    _png(ann_dir / "two.png")
    _png(ann_dir / "images" / "three.png")
    _png(tmp_path / "pics" / "sub" / "four.png")
    imgs = [{"id": i, "file_name": n, "width": 40, "height": 30}
            for i, n in enumerate(["one.png", "two.png", "three.png", "sub/four.png", "five.png"], start=1)]
    index = load_coco(_write_coco(ann_dir / "x.json", imgs, [], cats), images_dir=tmp_path / "pics")
    files = {im.id: im.file for im in index.images}
    assert files[1] == (tmp_path / "pics" / "one.png").resolve()
    assert files[2] == (ann_dir / "two.png").resolve()
    assert files[3] == (ann_dir / "images" / "three.png").resolve()
    assert files[4] == (tmp_path / "pics" / "sub" / "four.png").resolve()
    assert [p.where.endswith("image id 5") and "five.png" in p.message for p in index.problems] == [True]


def test_coco_structural_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{ not json")
    with pytest.raises(CocoFormatError, match="broken.json.*not valid JSON"):
        load_coco(p)
    p = tmp_path / "nocats.json"
    p.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CocoFormatError, match=r"nocats.json.*categories"):
        load_coco(p)
    p = _write_coco(tmp_path / "nobbox.json", [{"id": 1, "file_name": "a.png"}],
                    [{"id": 7, "image_id": 1, "category_id": 1}], [{"id": 1, "name": "a"}])
    with pytest.raises(CocoFormatError, match=r"nobbox.json.*annotation #0.*bbox"):
        load_coco(p)
    with pytest.raises(CocoFormatError, match="not found"):
        load_coco(tmp_path / "absent.json")


def test_coco_recoverable_problems(tmp_path):
    _png(tmp_path / "images" / "a.png", 100, 50)
    _png(tmp_path / "images" / "b.png", 100, 50)
    imgs = [{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
            {"id": 1, "file_name": "b.png", "width": 100, "height": 50},  # duplicate id
            {"id": 2, "file_name": "b.png", "width": 100, "height": 50}]
    good = [10, 10, 20, 20]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": good},
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": good},  # duplicate annotation id
        {"id": 2, "image_id": 1, "category_id": 4, "bbox": good},  # unknown category
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [10, 10, -5, 20]},
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [10, 10, float("nan"), 20]},
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [10, 10, 0, 20]},
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [150, 10, 10, 10]},  # outside
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [90, 40, 30, 30]},  # partly outside: kept, warned
        {"id": 8, "image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 50], "iscrowd": 1},  # crowd: kept
        {"id": 9, "image_id": 3, "category_id": 2, "bbox": good},  # unknown image
    ]
    cats = [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}]
    index = load_coco(_write_coco(tmp_path / "p.json", imgs, anns, cats))
    assert index.categories == [(2, "two"), (5, "five")]
    assert index.category_to_index == {2: 0, 5: 1}
    assert [im.id for im in index.images] == [1, 2]
    assert index.images[0].file.name == "a.png"
    assert sorted(a.id for a in index.annotations) == [1, 7, 8]
    assert [a.iscrowd for a in index.annotations if a.id == 8] == [1]
    errors = [p for p in index.problems if p.severity == "error"]
    warnings = [p for p in index.problems if p.severity == "warning"]
    text = "\n".join(map(str, errors))
    for needle in ["image id 1: duplicate image id", "annotation id 1: duplicate annotation id",
                   "unknown category id 4", "negative size", "NaN", "zero size", "entirely outside",
                   "unknown image id 3"]:
        assert needle in text, needle
    assert len(errors) == 8
    assert len(warnings) == 1 and "annotation id 7" in warnings[0].where
    assert all("p.json" in p.where for p in index.problems)


def test_coco128_loads():
    root = Path(shared_data("coco128"))
    index = load_coco(root / "annotations" / "instances_train2017.json")
    assert len(index.images) == 128 and len(index.categories) == 80 and not index.problems
    assert all(im.file.is_file() for im in index.images)
    assert sum(a.iscrowd for a in index.annotations) == 10
    by_image = index.annotations_by_image()
    assert sorted(im.file.name for im in index.images if not by_image[im.id]) == ["000000000250.jpg", "000000000508.jpg"]
    ds = DetectionDataset(index, eval_transforms(64, 96))
    assert ds.num_crowd == 10
    assert ds.num_boxes == len(index.annotations) - 10 - ds.num_degenerate
    empty = next(i for i, im in enumerate(ds.images) if im.file.name == "000000000250.jpg")
    image, target = ds[empty]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["orig_size"].tolist() == [ds.images[empty].height, ds.images[empty].width]
    assert min(target["size"].tolist()) == 64 and tuple(image.shape[1:]) == tuple(target["size"].tolist())


# ---------------------------------------------------------------- transforms


def test_resized_shape_follows_the_authors_rule():
    # (h, w) -> expected (h, w) for shorter side 800, longer at most 1333
    cases = {(480, 640): (800, 1066), (427, 640): (800, 1199), (500, 2000): (333, 1332), (2000, 500): (1332, 333),
             (800, 1000): (800, 1000), (1000, 1000): (800, 800), (100, 150): (800, 1200), (600, 1000): (800, 1333)}
    for (h, w), want in cases.items():
        assert resized_shape(h, w, 800, 1333) == want, (h, w)
    assert resized_shape(500, 2000, 800, None) == (800, 3200)
    # the reference's rounding lets very elongated images pass the limit slightly; we keep it, to match
    assert resized_shape(534, 2441, 800, 1333) == (292, 1334)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(10, 3000, (200, 2)):
        oh, ow = resized_shape(int(h), int(w), 800, 1333)
        if min(oh, ow) == MIN_SIDE:  # too thin for the rule (short side < 16 px): floored, stretched
            assert round(1333 * min(h, w) / max(h, w)) < MIN_SIDE and max(oh, ow) == 1333
            continue
        assert abs(oh / ow - h / w) <= (h / w) / min(oh, ow) + 1e-9  # aspect kept to a pixel
        if min(oh, ow) != 800:  # capped: the longer side is at the limit, to rounding
            assert abs(max(oh, ow) - 1333) <= max(h, w) / min(h, w) + 1


def test_eval_transform_and_inference_resize_sizes():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    x, t = eval_transforms(32, 45)(im, make_target(torch.tensor([[8.0, 4, 40, 24]]), torch.tensor([0]), 48, 80))
    assert tuple(x.shape) == (3, *resized_shape(48, 80, 32, 45)) == (3, 27, 45)
    y = resize_for_inference(im, 32, 45)
    assert torch.allclose(x, y, atol=1e-5)
    # normalisation: un-normalising gives back pixel values in [0, 1]
    pix = x * STD + MEAN
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    assert torch.allclose(t["boxes"], torch.tensor([[24 / 80, 14 / 48, 32 / 80, 20 / 48]]), atol=1e-5)


def _two_box_image(w=120, h=90):
    """Black image, a red box (label 0) and a green box (label 1); returns (PIL, boxes xyxy)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 15, 50, 40], [60, 30, 110, 85]])
    a[15:40, 10:50, 0] = 255
    a[30:85, 60:110, 1] = 255
    return Image.fromarray(a), boxes


def _pixel_box(x: torch.Tensor, channel: int) -> torch.Tensor | None:
    """Tight xyxy box of pixels brighter than half in one channel of a normalised image."""
    pix = (x * STD + MEAN)[channel]
    ys, xs = torch.nonzero(pix > 0.5, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _check_boxes_follow(x: torch.Tensor, target: dict) -> None:
    h, w = x.shape[-2:]
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape[1] == 4
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
    cx, cy, bw, bh = boxes.unbind(1)
    xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
    labels = target["labels"].tolist()
    for channel in (0, 1):
        drawn = _pixel_box(x, channel)
        if channel in labels:
            box = xyxy[labels.index(channel)]
            if drawn is None:  # a crop kept only a sub-pixel sliver of the box
                assert min(box[2] - box[0], box[3] - box[1]) < 1.5, box
                continue
            assert (drawn - box).abs().max() <= 1.5, (channel, drawn, box)
        else:  # removed by a crop: at most a sliver of its pixels may remain
            assert drawn is None or ((drawn[2] - drawn[0]) * (drawn[3] - drawn[1])) <= 2


def test_boxes_follow_the_image_under_flip_resize_and_crop():
    im, boxes = _two_box_image()
    labels = torch.tensor([0, 1])
    steps = [
        v2.RandomHorizontalFlip(1.0),
        RandomShortSideResize([45], 100),
        RandomSizeCrop(30, 70),
    ]
    from detrkit.data.transforms import _finish
    for step in steps:
        for seed in range(6):
            torch.manual_seed(seed)
            x, t = v2.Compose([step] + _finish())(im, make_target(boxes, labels, 90, 120))
            _check_boxes_follow(x, t)


def test_train_transforms_keep_boxes_on_objects():
    im, boxes = _two_box_image()
    tr = train_transforms([48, 64, 80], 100, [60, 70], (30, 60))
    sizes, counts = set(), []
    for seed in range(40):
        torch.manual_seed(seed)
        x, t = tr(im, make_target(boxes, torch.tensor([0, 1]), 90, 120))
        _check_boxes_follow(x, t)
        short, long = min(x.shape[-2:]), max(x.shape[-2:])
        assert short in (48, 64, 80) or 99 <= long <= 101, (short, long)  # a scale, or capped at max_size
        sizes.add(short)
        counts.append(len(t["labels"]))
    assert len(sizes) >= 3
    assert min(counts) < 2 and max(counts) == 2  # crops sometimes remove a box


def test_make_transforms_maps_the_config():
    preset = get_preset("detr-tiny")
    tr = make_transforms(preset.train, preset.model, train=True)
    ev = make_transforms(preset.train, preset.model, train=False)
    im = Image.new("RGB", (400, 300))
    t = make_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 300, 400)
    x, _ = ev(im, t)
    assert tuple(x.shape[1:]) == resized_shape(300, 400, preset.model.image_size, preset.model.max_image_size)
    for seed in range(5):
        torch.manual_seed(seed)
        x, tt = tr(im, t)
        assert min(x.shape[1:]) in preset.train.train_scales or max(x.shape[1:]) == preset.train.train_max_size
        assert tt["boxes"].shape == (0, 4)
    no_flip = make_transforms(type(preset.train)(hflip=False), preset.model, train=True)
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in no_flip.transforms)
    assert any(isinstance(s, v2.RandomHorizontalFlip) for s in tr.transforms)
    assert isinstance(tr.transforms[-1], NormalizeBoxes)


# ---------------------------------------------------------------- dataset


def test_dataset_targets(tmp_path):
    _png(tmp_path / "a.png", 100, 50)
    _png(tmp_path / "b.png", 60, 40)
    index = DatasetIndex(
        [ImageRecord(10, tmp_path / "a.png", 100, 50), ImageRecord(20, tmp_path / "b.png", 60, 40)],
        [
            Annotation(1, 10, 7, [10, 10, 20, 10]),
            Annotation(2, 10, 3, [90, 40, 30, 30]),  # clamped to [90, 40, 100, 50]
            Annotation(3, 10, 7, [0, 0, 100, 50], iscrowd=1),  # crowd: not a target
            Annotation(4, 10, 3, [120, 10, 10, 10]),  # outside: zero area once clamped
            Annotation(5, 10, 3, [5, 5, 0, 10]),  # zero width
        ],
        [(3, "three"), (7, "seven")],
        tmp_path / "x.json",
    )
    ds = DetectionDataset(index, None)
    assert len(ds) == 2 and ds.num_degenerate == 2 and ds.num_crowd == 1
    image, t = ds[0]
    assert image.shape == (3, 50, 100) and image.dtype == torch.float32
    assert t["image_id"] == 10 and t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    want = torch.tensor([[20 / 100, 15 / 50, 20 / 100, 10 / 50], [95 / 100, 45 / 50, 10 / 100, 10 / 50]])
    assert torch.allclose(t["boxes"], want, atol=1e-6)
    assert t["orig_size"].tolist() == [50, 100] and t["size"].tolist() == [50, 100]
    image, t = ds[1]  # no annotations: valid, empty targets
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["image_id"] == 20
    images, targets, bad = collate([ds[0], ds[1]])
    assert [tuple(i.shape) for i in images] == [(3, 50, 100), (3, 40, 60)] and bad == []

    ds = DetectionDataset(index, eval_transforms(25, 100))
    _, t = ds[0]
    assert t["size"].tolist() == [25, 50] and t["orig_size"].tolist() == [50, 100]
    assert torch.allclose(t["boxes"], want, atol=1e-6)  # normalised boxes do not change under a resize


def test_dataset_on_synthetic(synth):
    index = load_coco(synth)
    ds = DetectionDataset(index, train_transforms([48, 64], 96, [60], (40, 60)))
    n = 0
    for i in range(len(ds)):
        x, t = ds[i]
        assert x.shape[0] == 3 and tuple(x.shape[1:]) == tuple(t["size"].tolist())
        assert len(t["boxes"]) == len(t["labels"]) and ((t["labels"] >= 0) & (t["labels"] < 5)).all()
        assert torch.isfinite(t["boxes"]).all() and (t["boxes"][:, 2:] > 0).all()
        n += len(t["boxes"])
    assert n > 0 and not math.isnan(n)
