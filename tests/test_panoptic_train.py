"""The panoptic stages end to end on a few tiny synthetic images: frozen / joint mask-head training,
evaluation, Detector.predict(task="panoptic"), figures, and bad samples skipped."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit import Detector, get_preset
from detrkit.data.panoptic import load_panoptic, read_segment_ids, segments_from_ids
from detrkit.data.panoptic_dataset import PanopticDataset, panoptic_transforms
from detrkit.data.synthetic_panoptic import make_synthetic_panoptic
from detrkit.engine.panoptic import load_panoptic_model, train_mask_head
from detrkit.model import build_model
from detrkit.panoptic_postprocess import PanopticResult
from detrkit.weights.native import load_native, save_native


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pantrain")
    train_json = make_synthetic_panoptic(root / "train", num_images=6, seed=0, image_size=(64, 80))
    val_json = make_synthetic_panoptic(root / "val", num_images=3, seed=9, image_size=(64, 80))
    index = load_panoptic(train_json)
    cfg = get_preset("detr-tiny").model.with_classes([n for _, n, _ in index.categories],
                                                     [c for c, _, _ in index.categories])
    cfg.num_queries, cfg.image_size, cfg.max_image_size = 8, 64, 96
    cfg.queries_at = "attention"  # exportable to transformers
    torch.manual_seed(0)
    save_native(build_model(cfg).state_dict(), cfg, root / "detector")
    return root, train_json, val_json


def test_frozen_stage_trains_only_the_head_then_joint(setup):
    root, train_json, val_json = setup
    res = train_mask_head(root / "detector", train_json, val_json, root / "stage2", max_steps=3, batch_size=3,
                          lr=1e-3, progress=False, eval_threshold=0.0, amp=True)  # frozen detector in bf16
    assert res.steps == 3
    before, _ = load_native(root / "detector")
    after, cfg = load_native(root / "stage2" / "final")
    assert cfg.stuff_category_ids == [10, 11, 12]
    assert all(torch.equal(after["detr." + k], v) for k, v in before.items())  # detector frozen
    fresh, _ = load_panoptic_model(root / "detector")  # a detector alone gets a fresh head, same seed
    assert any(not torch.equal(after[k], v) for k, v in fresh.state_dict().items() if k.startswith("mask_head."))
    metrics = json.loads((root / "stage2" / "metrics.json").read_text())
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mask_AP", "per_class_PQ"):
        assert key in metrics
    assert 0.0 <= metrics["PQ"] <= 1.0 and metrics["images"] == 3

    joint = train_mask_head(root / "stage2" / "final", train_json, None, root / "joint", joint=True, max_steps=2,
                            batch_size=3, lr=1e-3, progress=False)
    assert joint.steps == 2
    again, _ = load_native(root / "joint" / "final")
    assert any(not torch.equal(again[k], after[k]) for k in after if k.startswith("detr.transformer."))


def test_detector_predicts_panoptic_and_png_round_trips(setup, tmp_path):
    root, train_json, val_json = setup
    if not (root / "stage2" / "final").exists():
        train_mask_head(root / "detector", train_json, None, root / "stage2", max_steps=1, batch_size=3,
                        progress=False)
    det = Detector.from_pretrained(root / "stage2" / "final")
    assert det.segmentation is not None
    image = Image.open(load_panoptic(val_json).records[0].image.file)
    [res] = det.predict(image, task="panoptic", panoptic_threshold=0.0)
    assert isinstance(res, PanopticResult) and res.ids.shape == (image.height, image.width)
    assert res.segments and all(s["area"] > 4 for s in res.segments)
    measured = segments_from_ids(res.ids, {s["id"]: s["category_id"] for s in res.segments})
    assert sorted((m["id"], m["area"], m["bbox"]) for m in measured) == \
        sorted((s["id"], s["area"], s["bbox"]) for s in res.segments)
    assert len(det.predict(image)) == 1  # the detector inside still detects boxes
    # native and Hugging Face round trips keep the mask head
    det.save_pretrained(tmp_path / "native")
    assert Detector.from_pretrained(tmp_path / "native").segmentation is not None
    det.export_huggingface(tmp_path / "hf")
    again = Detector.from_pretrained(tmp_path / "hf")
    [res2] = again.predict(image, task="panoptic", panoptic_threshold=0.0)
    assert np.array_equal(res2.ids, res.ids)
    with pytest.raises(ValueError, match="no mask head"):
        Detector.from_pretrained(root / "detector").predict(image, task="panoptic")


def test_figures(setup):
    from detrkit.viz.panoptic import draw_panoptic, plot_mask_attention

    root, train_json, _ = setup
    model, cfg = load_panoptic_model(root / "detector")
    image = Image.open(load_panoptic(train_json).records[0].image.file).convert("RGB")
    fig, k = plot_mask_attention(model, cfg, image, threshold=0.0, max_detections=2)
    assert k == 2 and len(fig.axes) == 2 * (cfg.nheads + 2)
    rec = load_panoptic(train_json).records[0]
    ids = read_segment_ids(rec.png)
    segs = [{"id": s.id, "category_id": s.category_id, "isthing": s.category_id < 10, "label": str(s.category_id)}
            for s in rec.segments]
    out = draw_panoptic(image, PanopticResult(ids, segs))
    assert out.size == image.size and np.asarray(out).std() > 0


def test_bad_panoptic_samples_are_counted_skips(setup, tmp_path):
    root, train_json, _ = setup
    import shutil

    shutil.copytree(train_json.parent, tmp_path / "set")
    path = tmp_path / "set" / "panoptic.json"
    index = load_panoptic(path)
    png = index.records[0].png
    png.write_bytes(png.read_bytes()[:200])  # truncated
    ds = PanopticDataset(index, panoptic_transforms(False, [64], 96))
    bad = ds[0]
    assert type(bad).__name__ == "BadSample" and str(png) in str(bad)
    image_t, target = ds[1]
    assert target["masks"].shape[0] == len(target["labels"]) == len(target["boxes"]) > 0
    assert target["masks"].shape[-2:] == image_t.shape[-2:]
    res = train_mask_head(root / "detector", path, None, tmp_path / "run", max_steps=2, batch_size=6,
                          progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"] >= 1
    assert res.steps == 2


def test_cli_synth_panoptic_and_viz_masks(setup, tmp_path, capsys):
    from detrkit.cli import main

    root, _, _ = setup
    assert main(["data", "synth", str(tmp_path / "syn"), "--panoptic", "--images", "3", "--min-side", "48",
                 "--max-side", "64"]) == 0
    assert "stuff: sky, ground, stripes" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "syn" / "panoptic.json")]) == 0
    image = sorted((tmp_path / "syn" / "images").iterdir())[0]
    assert main(["viz", "masks", str(image), "--weights", str(root / "detector"), "--threshold", "0",
                 "--max-detections", "2", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 0


def test_panoptic_predict_files_and_eval_command(setup, tmp_path, capsys):
    from detrkit.engine.panoptic_commands import eval_panoptic_command, predict_panoptic_files

    root, train_json, val_json = setup
    if not (root / "stage2" / "final").exists():
        train_mask_head(root / "detector", train_json, None, root / "stage2", max_steps=1, batch_size=3,
                        progress=False)
    det = Detector.from_pretrained(root / "stage2" / "final")
    images = sorted((val_json.parent / "images").iterdir())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    n, failed = predict_panoptic_files(det, images + [bad], tmp_path / "out", threshold=0.0, progress=False)
    assert n == len(images) and [f for f, _ in failed] == [str(bad)]
    data = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    for ann in data["annotations"]:
        ids = read_segment_ids(tmp_path / "out" / "panoptic" / ann["file_name"])
        measured = segments_from_ids(ids, {s["id"]: s["category_id"] for s in ann["segments_info"]})
        assert sorted((m["id"], m["area"], m["bbox"]) for m in measured) == \
            sorted((s["id"], s["area"], s["bbox"]) for s in ann["segments_info"])
        assert (tmp_path / "out" / ann["file_name"]).exists()  # the overlay
    assert eval_panoptic_command(str(root / "stage2" / "final"), str(val_json), threshold=0.0,
                                 out=str(tmp_path / "m.json")) == 0
    text = capsys.readouterr().out
    assert "things" in text and "stuff" in text and "mask AP" in text
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 3


def test_cli_train_masks_eval_predict_panoptic(setup, tmp_path, capsys):
    from detrkit.cli import main

    root, train_json, val_json = setup
    assert main(["train-masks", "--data", str(train_json), "--frozen-weights", str(root / "detector"),
                 "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "3", "--cache-views", "1"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", "--weights", str(tmp_path / "run" / "final"), "--data", str(val_json),
                 "--panoptic-threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "PQ" in out and "stuff" in out and "mask AP" in out
    images = sorted((val_json.parent / "images").iterdir())
    assert main(["predict", str(images[0]), "--weights", str(tmp_path / "run" / "final"), "--task", "panoptic",
                 "--threshold", "0", "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "panoptic.json").exists()
    assert (tmp_path / "pred" / "panoptic" / f"{images[0].stem}.png").exists()


def _first_losses(monkeypatch, run):
    """The loss terms of the first step of `run()`, whichever way the head's inputs came."""
    from detrkit.engine import panoptic

    seen = []
    losses_of = panoptic._masks_and_losses

    def record(*args, **kwargs):
        loss, terms = losses_of(*args, **kwargs)
        seen.append({"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}})
        return loss, terms

    monkeypatch.setattr(panoptic, "_masks_and_losses", record)
    run()
    monkeypatch.undo()
    return seen[0]


def test_cached_detector_outputs_give_the_uncached_first_step(setup, tmp_path, monkeypatch):
    """One view, no flip, one scale: the cache holds exactly what the detector computes on the step's
    image, so the first step's losses match. Batch size 1, because the synthetic images differ in size:
    a padded batch runs the backbone over the padding (its border features, and the maps in the padding,
    depend on the batch), while the cache keeps each image's maps alone and pads them with zeros."""
    root, train_json, _ = setup
    kwargs = dict(max_steps=1, batch_size=1, hflip=False, progress=False, lr=1e-3)
    plain = _first_losses(monkeypatch, lambda: train_mask_head(root / "detector", train_json, None,
                                                               tmp_path / "plain", **kwargs))
    cached = _first_losses(monkeypatch, lambda: train_mask_head(root / "detector", train_json, None,
                                                                tmp_path / "cached", cache_views=1, **kwargs))
    assert plain.keys() == cached.keys() and plain["loss"] > 0
    for k in plain:
        assert cached[k] == pytest.approx(plain[k], rel=1e-4), k


def test_cached_entries_have_each_images_own_sizes_and_pad_back_to_the_batch(setup):
    """Images of different sizes: each entry's maps have the sizes the image alone gives, and a padded
    batch of entries has the shapes (and feature mask) of the detector's own padded batch."""
    from detrkit.engine.mask_cache import _detect_chunk, cached_batch

    root, _, _ = setup
    model, _ = load_panoptic_model(root / "detector")
    images = [torch.randn(3, h, w) for h, w in ((64, 80), (50, 71), (33, 47))]
    with torch.no_grad():
        entries = _detect_chunk(lambda ims: model.detect(ims), images, 32, torch.float32)
        for im, entry in zip(images, entries):
            _, alone = model.detect([im])
            assert entry["memory"].shape == alone["memory"][0].shape and not entry["fmask"].all()
            assert [f.shape for f in entry["fpns"]] == [f[0].shape for f in alone["fpns"]]
        outputs, batch = model.detect(images)
    got_outputs, got = cached_batch(entries, torch.device("cpu"))
    assert torch.equal(got_outputs["pred_boxes"], outputs["pred_boxes"])
    assert got["memory"].shape == batch["memory"].shape and torch.equal(got["fmask"], batch["fmask"])
    assert [f.shape for f in got["fpns"]] == [f.shape for f in batch["fpns"]]
    assert got["src_proj"].shape == batch["src_proj"].shape and got["queries"].shape == batch["queries"].shape


def test_a_short_cached_run_lowers_the_mask_losses_and_evaluates(setup, tmp_path):
    root, train_json, val_json = setup
    res = train_mask_head(root / "detector", train_json, val_json, tmp_path / "run", max_steps=20, batch_size=3,
                          lr=1e-3, cache_views=2, progress=False, eval_threshold=0.0)
    assert res.steps == 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = [r for r in rows if r["type"] == "train"]
    assert last["loss_mask"] + last["loss_dice"] < first["loss_mask"] + first["loss_dice"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 20 and 0.0 <= metrics["PQ"] <= 1.0


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_detector_cache_keeps_to_its_share_of_the_time(setup, tmp_path, monkeypatch, caplog):
    """max_minutes 0.05 (3 s; the cache's share 1.05 s) and a detector that takes 0.25 s a batch (on a
    fake clock): a view of 6 images in batches of 3 takes 0.5 s, so 2 of 3 views are cached, said in words."""
    import logging

    from detrkit.engine import mask_cache

    clock = FakeClock()
    detect_chunk = mask_cache._detect_chunk

    def slow(*args):
        clock.now += 0.25
        return detect_chunk(*args)

    monkeypatch.setattr(mask_cache, "_detect_chunk", slow)
    root, train_json, _ = setup
    with caplog.at_level(logging.INFO, logger="detrkit.engine"):
        res = train_mask_head(root / "detector", train_json, None, tmp_path / "run", max_steps=2, batch_size=3,
                              max_minutes=0.05, cache_views=3, progress=False, clock=clock)
    assert res.steps == 2
    assert "cached 2 of 3 views: view 3 would pass the caching share of --max-minutes" in caplog.text
    assert "cached the frozen detector's outputs for 2 view(s) x 6 images" in caplog.text


def test_the_head_uses_its_time_when_the_first_steps_are_slow(setup, tmp_path, monkeypatch):
    """30 s; steps 0-9 take 1 s, later ones 0.1 s (on a fake clock). A count fitted once to the slow start
    ended at 75 steps, after 16.5 s; re-measured as it goes it grows to fill the time: 10 + ~200 steps."""
    from detrkit.engine import panoptic

    clock = FakeClock()
    real_step = panoptic._step

    def timed_step(run, loss_fn, inputs, targets, step, total):
        clock.now += 1.0 if step < 10 else 0.1
        return real_step(run, loss_fn, inputs, targets, step, total)

    monkeypatch.setattr(panoptic, "_step", timed_step)
    root, train_json, _ = setup
    res = train_mask_head(root / "detector", train_json, None, tmp_path / "run", batch_size=3, epochs=1000,
                          max_minutes=0.5, progress=False, clock=clock)
    assert 195 <= res.steps <= 211
    assert clock.now <= 30.2


def test_train_masks_help_names_the_caching_share():
    import argparse

    from detrkit.engine.panoptic import CACHE_SHARE
    from detrkit.engine.panoptic_commands import add_train_masks_parser

    parser = add_train_masks_parser(argparse.ArgumentParser().add_subparsers())
    text = " ".join(parser.format_help().split())
    assert f"at most {round(100 * CACHE_SHARE)}% of --max-minutes" in text and "(default: 0)" in text
