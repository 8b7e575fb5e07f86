"""The engine's parts on their own: one training step (accumulation, bf16), the EMA, the config checks."""
from __future__ import annotations

import pytest
import torch

from detrkit.config import ModelConfig, TrainConfig
from detrkit.engine.ema import ModelEMA
from detrkit.engine.step import TrainStep, param_groups
from detrkit.losses import SetCriterion
from detrkit.model import build_model

from _train_helpers import tiny_model, tiny_train


def _batch(n: int, seed: int = 0):
    """n images of one size (no padding) with two boxes each (every micro-batch normalises alike)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 64, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.cat([0.3 + 0.4 * torch.rand(2, 2, generator=g), 0.1 + 0.2 * torch.rand(2, 2, generator=g)], 1),
                "labels": torch.randint(0, 2, (2,), generator=g)} for _ in range(n)]
    return images, targets


def _stepper(cfg: TrainConfig, sgd: bool = False, ema: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_model(class_names=["a", "b"])).train()
    if sgd:  # the update is linear in the gradient, so equal gradients give equal weights
        opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    crit = SetCriterion.from_config(cfg, model.cfg.num_classes)
    return TrainStep(model, crit, opt, cfg, torch.device("cpu"), ema=ModelEMA(model, ema) if ema else None)


def test_accumulating_two_micro_batches_equals_one_batch_of_both():
    images, targets = _batch(4)
    cfg = dict(eos_coef=1.0, clip_max_norm=0.0, lr=0.1)
    big = _stepper(tiny_train(batch_size=4, **cfg), sgd=True)
    acc = _stepper(tiny_train(batch_size=2, accumulate=2, **cfg), sgd=True)
    initial = {k: v.clone() for k, v in big.model.state_dict().items()}
    out_big = big(images, targets)
    acc.accumulate(images[:2], targets[:2], sync=False)
    acc.accumulate(images[2:], targets[2:])
    out_acc = acc.apply()
    assert out_big.applied and out_acc.applied and out_acc.images == 4
    assert out_acc.losses["loss"] == pytest.approx(out_big.losses["loss"], rel=1e-5)
    assert out_acc.grad_norm == pytest.approx(out_big.grad_norm, rel=1e-4)
    moved = 0
    for (name, a), b in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, initial[name]))
    assert moved > 10  # the step changed the weights


def test_ema_follows_the_weights_by_its_decay():
    images, targets = _batch(2)
    step = _stepper(tiny_train(), ema=0.75)
    expected = {k: v.clone() for k, v in step.model.state_dict().items()}
    for _ in range(3):
        step(images, targets)
        for k, v in step.model.state_dict().items():
            expected[k] = 0.75 * expected[k] + 0.25 * v if v.dtype.is_floating_point else v.clone()
    ema = step.ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-6, msg=k)
    trained = step.model.state_dict()["class_embed.weight"]
    assert not torch.allclose(ema["class_embed.weight"], trained)  # an average, not a copy
    assert not any(p.requires_grad for p in step.ema.module.parameters())


def test_bf16_training_runs_under_autocast_and_learns():
    images, targets = _batch(2)
    step = _stepper(tiny_train(amp="bf16"))
    dtypes = []
    step.model.class_embed.register_forward_hook(
        lambda m, i, o: dtypes.append((o.dtype, torch.is_autocast_enabled("cpu"))))
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    outcomes = [step(images, targets) for _ in range(3)]
    assert dtypes and all(d == (torch.bfloat16, True) for d in dtypes)
    assert all(o.applied and torch.isfinite(torch.tensor(o.losses["loss"])) for o in outcomes)
    changed = [k for k, v in step.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "class_embed.weight" in changed and any(k.startswith("transformer.") for k in changed)
    assert all(p.dtype == torch.float32 for p in step.model.parameters())  # master weights stay float32
    assert outcomes[-1].losses["loss"] < outcomes[0].losses["loss"]


@pytest.mark.parametrize("cls, kw, field", [
    (TrainConfig, dict(amp="fp16"), "amp"),
    (TrainConfig, dict(schedule="linear"), "schedule"),
    (TrainConfig, dict(batch_size=0), "batch_size"),
    (TrainConfig, dict(lr=-1e-4), "lr"),
    (TrainConfig, dict(epochs=0), "epochs"),
    (TrainConfig, dict(max_steps=0), "max_steps"),
    (TrainConfig, dict(warmup_steps=-5), "warmup_steps"),
    (TrainConfig, dict(accumulate=0), "accumulate"),
    (TrainConfig, dict(ema_decay=1.0), "ema_decay"),
    (TrainConfig, dict(train_scales=[]), "train_scales"),
    (TrainConfig, dict(crop_size=[96]), "crop_size"),
    (TrainConfig, dict(cache_views=2, lr_backbone=1e-5), "cache_views"),
    (ModelConfig, dict(num_queries=0), "num_queries"),
    (ModelConfig, dict(dropout=1.5), "dropout"),
    (ModelConfig, dict(backbone="vgg16"), "backbone"),
])
def test_configs_reject_bad_values_when_built_naming_the_field(cls, kw, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}\b"):
        cls(**kw)


def test_settings_merge_in_order_and_an_explicit_preset_wins(tmp_path):
    from detrkit.config import build_configs

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("preset: detr-small\nlr: 3.0e-4\nmodel:\n  num_queries: 7\n")
    m, t = build_configs(None, cfg_file)  # no --preset: the file's
    assert (m.backbone, m.num_queries, t.lr) == ("resnet34", 7, 3e-4)
    m, t = build_configs("detr-tiny", cfg_file, ["lr=5e-4"], epochs=3)  # --preset beats the file's preset:
    assert (m.backbone, m.num_queries, t.lr, t.epochs) == ("resnet18", 7, 5e-4, 3)
    cfg_file.write_text("preset: detr-huge\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown preset 'detr-huge'"):
        build_configs("detr-tiny", cfg_file)
    cfg_file.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ValueError, match=r"run\.yaml: TrainConfig\.batch_size"):
        build_configs(None, cfg_file)


def test_every_command_defaults_to_the_same_device_and_a_broken_command_module_is_an_error(monkeypatch):
    import importlib

    from detrkit import cli
    from detrkit.device import default_device

    parser = cli.build_parser()
    for argv in (["train", "--data", "d", "--out", "o"], ["eval", "--weights", "w", "--data", "d"],
                 ["predict", "x.jpg", "--weights", "w"], ["viz", "attention", "x.jpg", "--weights", "w", "--out", "a.png"]):
        assert parser.parse_args(argv).device == default_device(), argv
    # bench builds its own parser when it runs (it needs torch for that; `detrkit --help` does not)
    import argparse

    from detrkit import bench

    bench_parser = argparse.ArgumentParser()
    bench.register(bench_parser.add_subparsers(dest="command"))
    assert bench_parser.parse_args(["bench"]).device == default_device()
    real = importlib.import_module

    def broken(name, *a, **k):
        if name == "detrkit.viz.commands":
            raise ImportError("matplotlib is missing")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="matplotlib"):
        cli.build_parser()


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    # on an AVX2-only CPU bfloat16 is emulated (~15x slower than float32): "auto" must not pick it there
    from detrkit.config import get_preset
    from detrkit.device import resolve_amp
    from detrkit.model import fuse

    monkeypatch.setattr(fuse, "native_bf16_cpu", lambda: "avx512_bf16" if native else None)
    want = "bf16" if native else "none"
    assert resolve_amp("auto", "cpu") == want
    assert resolve_amp("bf16", "cpu") == "bf16" and resolve_amp("none", "cpu") == "none"  # explicit wins
    assert get_preset("detr-tiny").train.amp == "auto"
    step = _stepper(tiny_train(amp="auto"))
    assert step.amp_dtype == (torch.bfloat16 if native else None)


def test_hardware_bf16_is_read_from_the_cpu_flags(tmp_path):
    from detrkit.model.fuse import native_bf16_cpu

    cases = {"fpu avx2 avx512f avx512bw": None, "fpu avx2 avx512f avx512_bf16 avx512bw": "avx512_bf16",
             "fpu avx512f amx_tile amx_bf16 avx512_bf16": "amx_bf16"}
    for flags, want in cases.items():
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
        assert native_bf16_cpu(str(tmp_path / "cpuinfo")) == want, flags
    assert native_bf16_cpu(str(tmp_path / "missing")) is None


def test_training_records_the_precision_auto_chose(tmp_path, monkeypatch):
    import json

    from detrkit.engine.train import train
    from detrkit.model import fuse

    from _train_helpers import tiny_data

    monkeypatch.setattr(fuse, "native_bf16_cpu", lambda: None)
    train_json = tiny_data(tmp_path / "data", n=4)
    train(tiny_model(), tiny_train(amp="auto", max_steps=1), train_json, None, tmp_path / "run", device="cpu",
          progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["amp"] == "none"


def test_aspect_grouped_batches_hold_one_orientation_and_keep_every_index():
    from detrkit.engine.run_data import aspect_grouped

    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(103, generator=gen).tolist()
    wide = {i: bool(torch.rand((), generator=gen) < 0.5) for i in order}
    wide.update({order[5]: None, order[50]: None})  # sizes unknown (e.g. a bad sample)
    out = aspect_grouped(order, wide.__getitem__, batch_size=8)
    assert sorted(out) == sorted(order)  # a permutation: nothing lost, nothing repeated
    batches = [out[k:k + 8] for k in range(0, len(out), 8)]
    pure = [len({wide[i] for i in b}) == 1 and wide[b[0]] is not None for b in batches]
    # one known orientation per batch, except the tail (the two partial buckets and the unknown sizes):
    # the pure batches come first, and the tail (at most 7 + 7 + 2 indices) spans at most 3 batches
    assert pure == sorted(pure, reverse=True) and sum(pure) >= len(batches) - 3
    mixed_before = sum(len({wide[i] for i in order[k:k + 8]}) > 1 for k in range(0, len(order), 8))
    assert mixed_before > len(batches) - sum(pure)  # a random order mixes most batches
    assert aspect_grouped(order, wide.__getitem__, 8) == out  # deterministic: resumption relies on it


def test_a_detection_dataset_knows_each_images_orientation_from_its_declared_size():
    from pathlib import Path

    from detrkit.data.dataset import DetectionDataset
    from detrkit.data.index import DatasetIndex, ImageRecord

    images = [ImageRecord(1, Path("a.jpg"), 320, 240), ImageRecord(2, Path("b.jpg"), 200, 300),
              ImageRecord(3, Path("c.jpg"))]
    ds = DetectionDataset(DatasetIndex(images=images, annotations=[], categories=[(1, "x")], source=Path("a.json")))
    assert [ds.landscape(i) for i in range(3)] == [True, False, None]


def test_the_feature_cache_never_takes_detrs_share_of_the_budget():
    """Its share (CACHE_SHARE) after the crops; after a long dense phase only what leaves DETR
    DETR_SHARE of --max-minutes; nothing once that is gone (the first view still runs: CacheLimit)."""
    from detrkit.engine.run_plan import CACHE_SHARE, DETR_SHARE, cache_seconds

    cfg = TrainConfig(max_minutes=15)
    budget = 15 * 60
    assert cache_seconds(TrainConfig(), 100.0) is None
    assert cache_seconds(cfg, 180.0) == pytest.approx(budget * CACHE_SHARE)  # after 3 min of crops
    after_dense = 420.0  # crops and a dense phase: 7 min
    assert cache_seconds(cfg, after_dense) == pytest.approx(budget * (1 - DETR_SHARE) - after_dense)
    assert cache_seconds(cfg, after_dense) < budget * CACHE_SHARE
    assert cache_seconds(cfg, 600.0) == 0.0
