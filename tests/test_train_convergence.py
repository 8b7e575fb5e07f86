"""The engine with the issue-12 parts: the backbone start recorded (config.json, checkpoints, log), a
paper preset trained from a local file standing in for the ImageNet download, every convergence switch
through the training loop and out to Hugging Face, a small dataset using its time until the validation
AP plateaus, and the end-of-run diagnosis."""
from __future__ import annotations

import json
import urllib.error

import pytest
import torch

from detrkit import Detector
from detrkit.cli import main as cli_main
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.train import plateaued, train

from _train_helpers import StepClock, tiny_data, tiny_model, tiny_train
from test_backbone_start import _fake_imagenet_file


def test_train_detr_r50_starts_from_the_imagenet_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(url, *a, **k):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    file_state = _fake_imagenet_file("resnet50")
    data = tiny_data(tmp_path / "data", 2)
    args = ["train", "--preset", "detr-r50", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
            "--set", "train_scales=[64]", "--set", "train_max_size=64", "--set", "crop_resize=[64]",
            "--set", "crop_size=[64,64]", "--set", "num_workers=0", "--set", "num_queries=10",
            "--set", "enc_layers=1", "--set", "dec_layers=1", "--set", "checkpoint_every_epochs=0"]
    assert cli_main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backbone_start"]["kind"] == "imagenet" and "resnet50-0676ba61.pth" in config["backbone_start"]["description"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["backbone_start"]["kind"] == "imagenet"
    weights = Detector.from_pretrained(tmp_path / "run" / "final").model.backbone.body.state_dict()
    # conv1, layer1 and every frozen batch-norm buffer never train: they are the file's, exactly
    frozen = [k for k in weights if k.startswith(("conv1.", "bn1.", "layer1.")) or ".bn" in k or "downsample.1" in k]
    assert len(frozen) > 150
    for k in frozen:
        assert torch.equal(weights[k], file_state[k]), k
    # the trained layers started there and moved by at most a few lr_backbone steps
    assert (weights["layer4.0.conv1.weight"] - file_state["layer4.0.conv1.weight"]).abs().max() < 1e-3

    # offline without the file: the clear error, naming the file and the folder
    (tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth").unlink()
    capsys.readouterr()
    assert cli_main(args + ["--out", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet50-0676ba61.pth" in err
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in err and "--backbone-weights none" in err


def test_every_switch_through_the_loop_then_huggingface(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = tiny_data(tmp_path / "data", 4)
    cfg = tiny_train(lr_backbone=0.0, epochs=2, dn_groups=2, query_groups=2, iou_aware=True,
                     checkpoint_every_epochs=1)
    model_cfg = tiny_model(dec_layers=2)
    result = train(model_cfg, cfg, data, None, tmp_path / "run", progress=False, check_data=False)
    assert result.status == "completed" and result.step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("type") == "train"]
    assert train_rows and {"loss_dn_ce", "loss_dn_bbox", "g1_loss_ce"} <= set(train_rows[-1])
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["extra"] is not None and "extra_queries" in ckpt["extra"]
    det = Detector.from_pretrained(tmp_path / "run" / "final")
    reference = set(__import__("detrkit").build_model(det.config).state_dict())
    assert set(det.model.state_dict()) == reference  # exactly the plain model's keys
    out = det.export_huggingface(tmp_path / "hf")
    _, info = transformers.DetrForObjectDetection.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_plateau_rule():
    assert not plateaued([(1, 0.1), (2, 0.2), (3, 0.3)])  # too few evaluations
    assert not plateaued([(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.31)])
    assert plateaued([(1, 0.1), (2, 0.3), (3, 0.3), (4, 0.302), (5, 0.29)])
    # a flat AP near zero is DETR before its queries specialise, not a plateau
    assert not plateaued([(1, 0.001), (2, 0.004), (3, 0.003), (4, 0.004), (5, 0.003)])
    assert plateaued([(1, 0.001), (2, 0.004), (3, 0.003), (4, 0.004), (5, 0.003)], floor=0.0)
    # AP 0.011 at BCCD's first evaluations was no plateau (it reached 0.096 later): below the floor
    assert not plateaued([(56, 0.004), (112, 0.011), (168, 0.010), (224, 0.011), (280, 0.011)])
    # a gain of 10% of the best still counts as progress
    assert not plateaued([(1, 0.1), (2, 0.3), (3, 0.31), (4, 0.32), (5, 0.335)])
    # three flat evaluations a few steps apart late in a long run are no plateau either
    assert not plateaued([(100, 0.1), (1000, 0.3), (1010, 0.3), (1020, 0.3), (1030, 0.3)])
    assert plateaued([(100, 0.1), (1000, 0.3), (1300, 0.3), (1600, 0.3), (1900, 0.3)])


def _untrainable_run(tmp_path, max_minutes: float):
    """2 epochs of 2 steps at lr 1e-6 (the AP stays near zero), evaluated each epoch, under a clock that
    moves 0.05 s a step."""
    data = tiny_data(tmp_path / "data", 4)
    cfg = tiny_train(lr=1e-6, lr_backbone=0.0, epochs=2, max_minutes=max_minutes, fit_schedule_to_time=True,
                     eval_every_epochs=1)
    clock = StepClock(0.05)
    return train(tiny_model(), cfg, data, data, tmp_path / "run", progress=False, check_data=False,
                 clock=clock, step_callback=clock.tick)


def test_a_run_that_has_not_started_to_detect_uses_all_its_time(tmp_path):
    """The epoch count would end it after 4 steps and its AP stays at zero (lr 1e-6): no plateau stop,
    the run trains until --max-minutes (1.2 s of a clock that moves 0.05 s a step)."""
    result = _untrainable_run(tmp_path, max_minutes=0.02)
    # the schedule fitted to the time ends it ("completed": its fitted steps are done), not the plateau
    assert result.status in ("completed", "max_minutes") and result.step >= 20 and result.epoch > 2
    assert not result.stop_reason
    assert result.best_ap is not None and result.best_ap < 0.01


def test_a_small_dataset_uses_its_time_until_the_ap_plateaus(tmp_path, monkeypatch):
    """2 epochs of 2 steps would end in 4 steps; under a time budget the run goes on past the epoch
    count, evaluating each epoch, and when the AP plateaus its learning rate decays over a last stretch
    and it ends -- saying so, and the diagnosis names what went wrong in a run this short."""
    import detrkit.engine.run_log as run_log_module
    import detrkit.engine.train as train_module

    monkeypatch.setattr(train_module, "PLATEAU_FLOOR", 0.0)  # this run's AP stays near zero
    monkeypatch.setattr(run_log_module, "LOG_EVERY_STEPS", 1)  # a training window on every step
    result = _untrainable_run(tmp_path, max_minutes=10)
    assert result.epoch > 2 and result.step > 4  # the epoch count did not end it
    assert result.step < 100  # the plateau did, long before the 10 minutes
    assert "validation AP has plateaued" in result.stop_reason and "2-epoch ceiling" in result.stop_reason
    assert result.status == "completed"  # the shortened schedule ran to its end, the step it named
    assert f"ending the run at step {result.step} of the" in result.stop_reason
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["stop_reason"] == result.stop_reason
    d = result.diagnosis
    assert d is not None and not d["ok"] and "too few steps" in d["text"]
    assert summary["diagnosis"]["problems"] == d["problems"]
    # the last logged training window's class error is what the diagnosis read
    windows = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"]
    assert windows and d["class_error"] == round(windows[-1]["class_error"], 1)
    # the plateau did not stop the run at its full learning rate: the rate decayed first
    lrs = [w["lr"] for w in windows]
    assert lrs[-1] < 0.25 * max(lrs) and lrs.index(max(lrs)) < len(lrs) - 2


def test_evaluations_take_a_bounded_share_of_a_timed_run(tmp_path):
    """Under --max-minutes an evaluation that took s seconds is followed by the next no sooner than
    s / EVAL_SHARE later, whatever the epoch cadence; without a time budget the epochs alone decide."""
    from detrkit.engine.validation import EVAL_SHARE, Validator

    now = [100.0]
    timed = Validator(object(), None, tiny_model(), tiny_train(max_minutes=15, eval_every_epochs=2), torch.device("cpu"),
                      tmp_path, None, False, lambda: now[0])
    assert timed.due(2) and not timed.due(3)  # nothing evaluated yet: the epochs decide
    timed.seconds, timed.ended_at = 10.0, 100.0  # the last evaluation took 10 s and ended at t = 100
    now[0] = 100.0 + 10.0 / EVAL_SHARE - 1
    assert not timed.due(4)
    now[0] = 100.0 + 10.0 / EVAL_SHARE
    assert timed.due(4) and not timed.due(5)
    untimed = Validator(object(), None, tiny_model(), tiny_train(eval_every_epochs=2), torch.device("cpu"),
                        tmp_path, None, False, lambda: now[0])
    untimed.seconds, untimed.ended_at = 10.0, now[0]
    assert untimed.due(4)


def test_epoch_end_checkpoints_of_a_timed_run_wait_a_minute():
    from types import SimpleNamespace

    from detrkit.engine.train import CHECKPOINT_SECONDS, _checkpoint_due

    now = [500.0]
    run = SimpleNamespace(budget=SimpleNamespace(max_seconds=900.0, clock=lambda: now[0]), last_checkpoint=None,
                          device=torch.device("cpu"))
    assert _checkpoint_due(run)  # the first one
    run.last_checkpoint = 500.0
    now[0] = 500.0 + CHECKPOINT_SECONDS - 1
    assert not _checkpoint_due(run)
    now[0] = 500.0 + CHECKPOINT_SECONDS
    assert _checkpoint_due(run)
    run.budget.max_seconds = None  # no time budget: every epoch's checkpoint, as configured
    now[0] = 501.0
    assert _checkpoint_due(run)
