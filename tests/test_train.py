"""Training loop: it learns (overfits a few images), skips non-finite steps, survives bad images."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.train import NonFiniteLossError, train
from detrkit.engine.schedule import lr_factor
from detrkit.losses import SetCriterion

from _train_helpers import StepClock, tiny_data, tiny_model, tiny_train


def test_lr_schedule_warmup_step_and_cosine():
    assert lr_factor(0, 100, "step", drop_step=50, warmup_steps=4) == pytest.approx(1 / 5)
    assert lr_factor(3, 100, "step", drop_step=50, warmup_steps=4) == pytest.approx(4 / 5)
    assert lr_factor(49, 100, "step", drop_step=50) == 1.0
    assert lr_factor(50, 100, "step", drop_step=50) == pytest.approx(0.1)
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "linear")


@pytest.mark.slow
def test_overfits_a_few_images(tmp_path):
    data = tiny_data(tmp_path / "data", 2, seed=3)
    cfg = tiny_train(batch_size=2, epochs=300, lr=1e-3, lr_backbone=1e-4, warmup_steps=10)
    result = train(tiny_model(hidden_dim=64, dim_feedforward=128), cfg, data, data, tmp_path / "run", progress=False)
    assert result.status == "completed" and result.step == 300
    assert result.metrics["AP50"] >= 0.95, result.metrics
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["AP50"] == pytest.approx(result.metrics["AP50"])
    for name in ("final", "best"):
        assert (tmp_path / "run" / name / "model.safetensors").exists()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    # losses went down
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("type") == "train"]
    assert losses[-1] < 0.5 * losses[0]


def _nan_on(calls: set[int]):
    """Wrap SetCriterion.total so that the given (1-based) calls return NaN."""
    original = SetCriterion.total
    count = {"n": 0}

    def total(self, losses):
        count["n"] += 1
        t = original(self, losses)
        return t * float("nan") if count["n"] in calls else t

    return total


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch, caplog):
    data = tiny_data(tmp_path / "data", 4)
    weights = []
    monkeypatch.setattr(SetCriterion, "total", _nan_on({2}))
    with caplog.at_level(logging.WARNING):
        result = train(tiny_model(), tiny_train(epochs=1), data, None, tmp_path / "run", progress=False,
                       step_callback=lambda s, m: weights.append({k: v.clone() for k, v in m.state_dict().items()}),
                       check_data=False)
    assert result.status == "completed" and result.step == 2 and result.skipped_steps == 1
    # step 2 was skipped: the weights after it are those after step 1
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "non-finite" in caplog.text


def test_non_finite_loss_aborts_after_five_in_a_row(tmp_path, monkeypatch):
    data = tiny_data(tmp_path / "data", 4)
    monkeypatch.setattr(SetCriterion, "total", _nan_on(set(range(1, 100))))
    with pytest.raises(NonFiniteLossError, match="5 steps in a row"):
        train(tiny_model(), tiny_train(epochs=10), data, None, tmp_path / "run", progress=False, check_data=False)


def test_bad_samples_are_counted_listed_and_skipped(tmp_path, caplog):
    data = tiny_data(tmp_path / "data", 6)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    images[1].write_bytes(b"")  # zero-byte file
    raw = images[4].read_bytes()
    images[4].write_bytes(raw[: len(raw) // 2])  # truncated PNG
    with caplog.at_level(logging.WARNING):
        result = train(tiny_model(), tiny_train(epochs=2), data, None, tmp_path / "run", progress=False)
    assert result.status == "completed"
    assert result.bad_samples == 2
    listed = [json.loads(l) for l in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in listed) == sorted(str(p) for p in (images[1], images[4]))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"] == 2


def test_lr_backbone_zero_freezes_the_backbone(tmp_path):
    data = tiny_data(tmp_path / "data", 4)
    seen = {}

    def cb(step, model):
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}

    train(tiny_model(), tiny_train(lr_backbone=0.0, epochs=1), data, None, tmp_path / "run", progress=False,
          step_callback=cb, check_data=False)
    a, b = seen[1], seen[2]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("transformer."))


def test_schedule_fitted_to_the_time_budget_ends_with_the_time(tmp_path):
    """With fit_schedule_to_time, a run whose epochs cannot fit in max_minutes gets a schedule that
    ends when the time does: at 50 ms a step, 9 s hold 180 steps, far below the epoch budget, and the
    cosine learning rate is run down instead of cut at full height; --resume keeps the fitted schedule."""
    data = tiny_data(tmp_path / "data", 4)
    cfg = tiny_train(lr_backbone=0.0, epochs=100_000, max_minutes=0.15, fit_schedule_to_time=True,
                     warmup_steps=5, checkpoint_every_epochs=0)
    clock = StepClock(0.05)
    result = train(tiny_model(), cfg, data, None, tmp_path / "run", progress=False, check_data=False,
                   clock=clock, step_callback=clock.tick)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["scheduler"]["total_steps"] == 180  # fitted after 50 steps: 50 + 6.5 s / 0.05 s
    assert result.status == "max_minutes" and result.step == 180  # the epochs alone would be 200,000 steps
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r.get("type") == "train"]
    assert lrs[-1] < 0.01 * cfg.lr
    # --resume keeps the fitted schedule as its ceiling: nothing is left, where the epoch budget would
    # have it train on for the whole new budget
    clock = StepClock(0.05)
    again = train(tiny_model(), cfg, data, None, tmp_path / "run", progress=False, check_data=False, resume=True,
                  clock=clock, step_callback=clock.tick)
    assert again.step == 180
