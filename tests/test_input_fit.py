"""The input size and query count fitted to the training set (engine/input_fit.py, issue 12)."""
import dataclasses
import json
from pathlib import Path

import pytest

from detrkit.config import TrainConfig, get_preset
from detrkit.data.index import Annotation, DatasetIndex, ImageRecord
from detrkit.engine.input_fit import MAX_UPSCALE, SIZE_STEP, fit_input, fit_to_data

from _train_helpers import tiny_data, tiny_model, tiny_train


def _index(boxes_per_image, side=200, size=(640, 480), classes=("cell", "blob")):
    """Every object is a "cell"; the index names `classes` (one class changes the crop phase)."""
    images, anns = [], []
    for i, n in enumerate(boxes_per_image):
        images.append(ImageRecord(i + 1, Path(f"/nowhere/{i}.jpg"), *size))
        for _ in range(n):
            anns.append(Annotation(len(anns) + 1, i + 1, 1, [5.0, 5.0, float(side), float(side)]))
    return DatasetIndex(images, anns, list(enumerate(classes, 1)), Path("/nowhere"))


def _tiny():
    p = get_preset("detr-tiny")
    return p.model.with_classes(["cell"], [1]), p.train


def test_data_the_preset_fits_is_left_as_it_is():
    model, train = _tiny()
    # 200 px in a 640x480 image: 60 px at the preset's 144 px input, ~2 cells of 32 px; 4 objects, 20 queries
    new_model, new_train, said = fit_to_data(_index([4, 2, 1]), model, train)
    assert (new_model, new_train, said) == (model, train, "")


def test_small_objects_grow_every_input_size_by_one_factor():
    model, train = _tiny()
    # 80 px boxes -> 24 px at 144 px: under one cell; the median should cover 1.5 cells (48 px): x2
    fit = fit_input(_index([3, 3], side=80), model)
    assert fit.median_side == pytest.approx(80 * 144 / 480)
    assert fit.scale == pytest.approx(1.5 * 32 / 24)
    new_model, new_train, said = fit_to_data(_index([3, 3], side=80), model, train)
    assert new_model.image_size == 288 and new_model.max_image_size == 448
    assert new_train.train_scales == [256, 288, 320] and new_train.train_max_size == 448
    assert new_train.crop_resize == [224, 256] and new_train.crop_size == [192, 256]
    sizes = [new_model.image_size, new_model.max_image_size, *new_train.train_scales, *new_train.crop_size]
    assert all(s % SIZE_STEP == 0 for s in sizes)
    assert "144 -> 288 px" in said and "24 px" in said
    assert new_model.num_queries == model.num_queries and "queries 20 ->" not in said


def test_the_upscale_is_capped():
    model, train = _tiny()
    fit = fit_input(_index([2], side=10), model)  # 3 px at 144 px: would need x16
    assert fit.scale == MAX_UPSCALE
    assert fit.apply(model, train)[0].image_size == 144 * MAX_UPSCALE


def test_crowded_images_get_more_queries():
    model, train = _tiny()
    new_model, _, said = fit_to_data(_index([28, 3]), model, train)
    assert new_model.num_queries == 40 and "queries 20 -> 40 (up to 28 objects" in said
    assert new_model.image_size == model.image_size  # the objects are large enough
    # room of 20%: 16 objects fit 20 queries, 17 do not
    assert fit_input(_index([16]), model).num_queries == 20
    assert fit_input(_index([17]), model).num_queries == 30
    assert fit_input(_index([500]), model).num_queries == 100  # capped


def test_crowded_images_keep_the_switches_as_set():
    """The fit sizes the input, the queries and the no-object weight; the convergence switches are the
    preset's or the user's, crowded or not (denoising without guidance did as well on crowded sets)."""
    model, train = _tiny()
    for dn_groups, guide in ((4, 0.0), (0, 0.0), (4, 2.0)):
        given = dataclasses.replace(train, dn_groups=dn_groups, attn_guide_coef=guide)
        fitted_model, fitted, said = fit_to_data(_index([28, 3]), model, given)
        assert fitted_model.num_queries == 40 and fitted.eos_coef > given.eos_coef  # the rest is fitted
        assert (fitted.dn_groups, fitted.attn_guide_coef) == (dn_groups, guide)
        assert "denoising" not in said and "guided" not in said


def test_config_files_with_the_retired_fit_switches_key_still_load():
    """config.json and checkpoints of 2026-12-06 carry `fit_switches`; it no longer changes anything."""
    _, train = _tiny()
    loaded = TrainConfig.from_dict({**train.to_dict(), "fit_switches": False})
    assert loaded == train and "fit_switches" not in loaded.to_dict()
    with pytest.raises(ValueError, match="unknown TrainConfig keys: \\['fit_switchez'\\]"):
        TrainConfig.from_dict({**train.to_dict(), "fit_switchez": False})


def test_one_class_data_pretrains_without_the_box_target():
    model, train = _tiny()
    assert train.pretrain_box_coef > 0
    _, one, said = fit_to_data(_index([4, 2, 1], classes=("cell",)), model, train)
    assert one.pretrain_box_coef == 0 and "the crop phase places no boxes (one class" in said
    assert dataclasses.replace(one, pretrain_box_coef=train.pretrain_box_coef) == train  # nothing else changed
    _, two, said = fit_to_data(_index([4, 2, 1]), model, train)
    assert two.pretrain_box_coef == train.pretrain_box_coef and said == ""
    # a preset without the box target says nothing about it
    off = dataclasses.replace(train, pretrain_box_coef=0.0)
    assert fit_to_data(_index([4, 2, 1], classes=("cell",)), model, off)[1:] == (off, "")


def test_dense_images_get_the_papers_no_object_balance():
    model, train = _tiny()
    # 2 objects per image in 20 queries: 18 empty slots at 0.1 weigh 0.9x the matched ones, within 2x of
    # the paper's 1.27x: left alone
    assert fit_input(_index([2, 2]), model, 0.1).eos_coef == 0.1
    # 12 per image in 20 queries: 8 empty slots at 0.1 weigh 0.07x; the paper's balance needs 1.27 * 12 / 8
    new_model, new_train, said = fit_to_data(_index([12, 12]), model, train)
    assert new_model.num_queries == 20 and new_train.eos_coef == 1.0  # capped at an unweighted class
    assert "no-object weight 0.1 -> 1 (12.0 objects per image in 20 queries)" in said
    # the same images with 40 queries: 28 empty slots -> 1.27 * 12 / 28 = 0.54
    fit = fit_input(_index([12, 12]), dataclasses.replace(model, num_queries=40), 0.1)
    assert fit.eos_coef == pytest.approx(round(0.1 * 92.7 / 7.3 * 12 / 28, 2))
    # it never lowers a preset's weight
    assert fit_input(_index([1, 0, 0, 0]), model, 0.5).eos_coef == 0.5


def test_off_by_default_outside_the_cpu_preset():
    model, train = _tiny()
    assert train.fit_to_data
    paper = get_preset("detr-r50")
    assert not paper.train.fit_to_data
    small = _index([40], side=20)
    assert fit_to_data(small, paper.model.with_classes(["cell"], [1]), paper.train)[2] == ""


def test_a_training_run_records_the_fitted_sizes(tmp_path):
    """train() fits before it builds anything: config.json and the model have the fitted values."""
    from detrkit.engine.train import train

    data = tiny_data(tmp_path / "data", 4)  # 64 px images with shapes of 12-30 px: under one 32-px cell at 64 px
    res = train(tiny_model(num_queries=2), tiny_train(fit_to_data=True, max_steps=1, eval_every_epochs=0),
                data, None, tmp_path / "run", progress=False, plots=False)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    fit = fit_input(json_index(data), tiny_model(num_queries=2))
    assert fit.scale > 1 and cfg["model"]["image_size"] == fit._size(64) > 64
    assert cfg["train"]["train_scales"] == [fit._size(64)]
    assert cfg["model"]["num_queries"] == fit.num_queries > 2 and fit.stride == 32


def json_index(path):
    from detrkit.data.formats import load_annotations

    return load_annotations(path)
