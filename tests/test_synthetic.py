"""The synthetic shapes generator: determinism, boxes that match the drawing, variants, command."""
from __future__ import annotations

import json

import numpy as np
import pytest

from detrkit.cli import main as cli_main
from detrkit.data.coco import load_coco
from detrkit.data.images import load_image
from detrkit.data.synthetic import VARIANTS, _sample_rng, make_synthetic, make_synthetic_splits, render_sample


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = make_synthetic(tmp_path / "a", num_images=4, seed=5, image_size=(48, 64))
    b = make_synthetic(tmp_path / "b", num_images=4, seed=5, image_size=(48, 64))
    c = make_synthetic(tmp_path / "c", num_images=4, seed=6, image_size=(48, 64))
    ta, tb, tc = _tree(a.parent), _tree(b.parent), _tree(c.parent)
    assert len(ta) == 5 and ta == tb
    assert all(ta[k] != tc[k] for k in ta if k.startswith("images/"))


def test_boxes_match_the_drawn_shapes(tmp_path):
    for seed in range(12):
        sample = render_sample(np.random.default_rng(seed), "shapes", (64, 96))
        pixels = np.asarray(sample.image)
        assert 1 <= len(sample.objects) <= 6
        for k, obj in enumerate(sample.objects, start=1):
            ys, xs = np.nonzero(sample.label_map == k)
            x, y, w, h = obj.bbox
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj.area == len(xs)
            # every visible pixel of the shape has the shape's colour
            assert (pixels[ys, xs] == obj.color).all()

    # the written files agree with the drawing (PNG is lossless)
    path = make_synthetic(tmp_path, num_images=3, seed=2, image_size=(64, 96), image_format="png")
    index = load_coco(path)
    by_image = index.annotations_by_image()
    for i, rec in enumerate(index.images):
        sample = render_sample(_sample_rng(2, i, "shapes"), "shapes", (64, 96))
        assert np.array_equal(np.asarray(load_image(rec.file)), np.asarray(sample.image))
        assert [a.bbox for a in by_image[rec.id]] == [o.bbox for o in sample.objects]
        assert [a.category_id for a in by_image[rec.id]] == [o.category_id for o in sample.objects]


def test_shapes_variety():
    boxes, counts, classes, sizes = [], [], set(), set()
    for seed in range(40):
        sample = render_sample(np.random.default_rng(seed), "shapes")
        w, h = sample.image.size
        assert 192 <= w <= 320 and 192 <= h <= 320
        sizes.add((w, h))
        counts.append(len(sample.objects))
        for o in sample.objects:
            boxes.append(o.bbox[2:])
            classes.add(o.category_id)
    wh = np.array(boxes)
    assert classes == {1, 2, 3, 4, 5}
    assert min(counts) == 1 and max(counts) >= 5
    assert (wh[:, 0] / wh[:, 1] > 1.6).any() and (wh[:, 1] / wh[:, 0] > 1.6).any()  # wide and tall
    assert wh.max(axis=1).min() < 40 and wh.max(axis=1).max() > 150  # small and large
    assert len(sizes) > 30


def test_other_variant_has_its_own_shapes_and_ids(tmp_path):
    path = make_synthetic(tmp_path, num_images=10, seed=0, variant="other", image_size=(64, 96))
    index = load_coco(path)
    assert index.categories == [(3, "diamond"), (17, "ring"), (90, "hexagon")]
    assert not index.problems and {a.category_id for a in index.annotations} <= {3, 17, 90}
    assert not set(index.class_names) & {name for _, name in VARIANTS["shapes"]}
    # not the same layouts as the default variant with the same seed
    for i in range(3):
        a = render_sample(_sample_rng(0, i, "shapes"), "shapes", (64, 96))
        b = render_sample(_sample_rng(0, i, "other"), "other", (64, 96))
        assert a.image.size != b.image.size or [o.bbox for o in a.objects] != [o.bbox for o in b.objects]
    with pytest.raises(ValueError, match="variant"):
        make_synthetic(tmp_path / "x", num_images=1, variant="nope")


def test_splits(tmp_path):
    train, val = make_synthetic_splits(tmp_path, train=3, val=2, seed=0, image_size=(48, 64))
    assert train == tmp_path / "train" / "annotations.json" and val == tmp_path / "val" / "annotations.json"
    t, v = load_coco(train), load_coco(val)
    assert len(t.images) == 3 and len(v.images) == 2
    t_bytes = {im.file.read_bytes() for im in t.images}
    assert not t_bytes & {im.file.read_bytes() for im in v.images}


def test_object_count_and_size_knobs():
    """max_objects caps the shapes per image; object_size bounds each box's longer side (a shape is drawn
    at size*sqrt(aspect) at most, aspect <= 2.5) and the shapes are bright on a darker background."""
    for i in range(20):
        s = render_sample(_sample_rng(1, i, "shapes"), "shapes", (96, 128), max_objects=2, object_size=(0.3, 0.4))
        assert 1 <= len(s.objects) <= 2
        short = min(s.image.size)
        for o in s.objects:
            assert max(o.bbox[2], o.bbox[3]) <= 0.4 * short * 2.5 ** 0.5 + 1
            assert max(o.color) >= 0.75 * 255 - 1
    with pytest.raises(ValueError, match="max_objects"):
        render_sample(_sample_rng(0, 0, "shapes"), max_objects=0)
    with pytest.raises(ValueError, match="object_size"):
        render_sample(_sample_rng(0, 0, "shapes"), object_size=(0.5, 0.2))


def test_data_synth_command(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "synth", str(out), "--images", "3", "--seed", "4", "--variant", "other"]) == 0
    data = json.loads((out / "annotations.json").read_text())
    assert len(data["images"]) == 3 and [c["id"] for c in data["categories"]] == [3, 17, 90]
    assert all((out / im["file_name"]).is_file() for im in data["images"])
    assert "3 images" in capsys.readouterr().out


def test_hard_variant_properties():
    """4 classes, 1-9 objects of 10-120 px (box sides, before occlusion trims them) in 224-320 px
    images, and objects both darker and brighter than their background."""
    counts, darker, brighter, sides = [], 0, 0, []
    for seed in range(40):
        sample = render_sample(np.random.default_rng(seed), "hard")
        w, h = sample.image.size
        assert 224 <= w <= 320 and 224 <= h <= 320
        counts.append(len(sample.objects))
        pixels = np.asarray(sample.image).astype(float)
        background = pixels[sample.label_map == 0].mean()
        for k, o in enumerate(sample.objects, start=1):
            assert o.category_id in (1, 2, 3, 4)
            sides.append(max(o.bbox[2], o.bbox[3]))
            if pixels[sample.label_map == k].mean() < background:
                darker += 1
            else:
                brighter += 1
    assert min(counts) == 1 and max(counts) == 9 and len(set(counts)) >= 7
    assert max(sides) <= 121 and min(sides) < 16  # 121: the rasteriser includes the end pixel and np.median(sides) < 60
    assert darker > 20 and brighter > 20


def test_synth_command_hard(tmp_path):
    assert cli_main(["data", "synth", str(tmp_path / "h"), "--images", "3", "--variant", "hard"]) == 0
    index = load_coco(tmp_path / "h" / "annotations.json")
    assert index.class_names == ["ellipse", "rectangle", "triangle", "cross"]
    assert all(224 <= r.width <= 320 and 224 <= r.height <= 320 for r in index.images)
