"""Issue 15 end to end on tiny data: run folders, budgets, one --weights, the automatic split, warnings,
SIGTERM during evaluation, the command line and a run's outputs. Each test names the problem it covers."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from _train_helpers import StepClock, tiny_data, tiny_model, tiny_train
from detrkit import cli
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.train import train

TINY = {"model": {k: v for k, v in tiny_model().to_dict().items() if k not in ("class_names", "category_ids")},
        "train": tiny_train(pretrain_steps=0, cache_views=0).to_dict()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"), 6)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _train_cli(data, config, out, *extra):
    return cli.main(["train", "--data", str(data), "--config", str(config), "--out", str(out), "--device", "cpu",
                     "--no-plots", *extra])


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tb" not in p.parts}


def test_1_train_twice_into_the_same_out_keeps_both_runs(data, config, tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    assert _train_cli(data, config, out, "--max-steps", "2", "--val", str(data)) == 0
    first = _digest(out)
    assert "best/model.safetensors" in first and "final/model.safetensors" in first
    assert _train_cli(data, config, out, "--max-steps", "3", "--val", str(data)) == 0
    assert _digest(out) == first  # the first run is untouched
    second = tmp_path / "runs" / "x-2"
    assert (second / "final" / "model.safetensors").exists()
    assert "x-2" in capsys.readouterr().out
    steps = [json.loads(line).get("step") for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 3  # its own records only


def test_2_max_steps_bounds_the_backbone_pretraining(data, tmp_path):
    cfg = tiny_train(lr_backbone=0.0, pretrain_steps=50, pretrain_batch_size=4, max_steps=2)
    train(tiny_model(), cfg, data, None, tmp_path / "run", progress=False, check_data=False, plots=False)
    pre = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("type") == "backbone_start"]
    assert "(2 steps" in pre[0]  # was 50 whatever --max-steps said


def _pretrain_on_step_clock(data, monkeypatch, durations, max_seconds: float) -> int:
    """Pretraining steps run under max_seconds when step k takes durations(k) seconds (a fake clock
    advanced once per step, where the step asks for its learning rate)."""
    from detrkit.data.dataset import DetectionDataset
    from detrkit.data.formats import load_annotations
    from detrkit.engine import pretrain
    from detrkit.model import build_model

    now = [0.0]
    calls = [0]
    real_lr_factor = pretrain.lr_factor

    def lr_factor(step, total, schedule):
        now[0] += durations(calls[0])
        calls[0] += 1
        return real_lr_factor(step, total, schedule)

    monkeypatch.setattr(pretrain, "lr_factor", lr_factor)
    index = load_annotations(data)
    model = build_model(tiny_model().with_classes(index.class_names))
    cfg = tiny_train(pretrain_steps=1000, pretrain_batch_size=4)
    res = pretrain.pretrain_backbone(model.backbone.body, "resnet18", DetectionDataset(index), cfg,
                                     len(index.class_names), __import__("torch").device("cpu"), progress=False,
                                     max_seconds=max_seconds, clock=lambda: now[0])
    return res.steps


def test_2_pretraining_fitted_to_its_share_of_the_time(data, monkeypatch):
    # 2 s per step, 12 s: 6 steps, not 1000
    assert _pretrain_on_step_clock(data, monkeypatch, lambda k: 2.0, 12.0) == 6
    # a slow first step (kernel selection, memory) is not taken for the speed: 60 s, then 2 s per step,
    # in 200 s gives 1 + 70 steps (timing the first step too gave 9)
    assert _pretrain_on_step_clock(data, monkeypatch, lambda k: 60.0 if k == 0 else 2.0, 200.0) == 71


def test_3_one_weights_everywhere(data, config, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    assert _train_cli(data, config, out, "--max-steps", "2", "--val", str(data)) == 0
    image = next(Path(data).parent.rglob("*.png"))
    for weights in (out, out / "last.pt", out / "final", out / "final" / "model.safetensors"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="detrkit.weights.load"):
            rc = cli.main(["predict", str(image), "--weights", str(weights), "--json", str(tmp_path / "p.json"),
                           "--device", "cpu"])
        assert rc == 0, weights
        used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("weights: ")]
        assert used, weights
    # a run folder means its best/ (here: the validated weights), which the log names
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detrkit.weights.load"):
        assert cli.main(["eval", "--weights", str(out), "--data", str(data), "--device", "cpu",
                         "--out", str(tmp_path / "m.json")]) == 0
    assert any(str(out / "best") in r.getMessage() for r in caplog.records)
    # best_AP recorded in training (float32 evaluation) == `detrkit eval` of best/ (problem 10)
    best_ap = json.loads((out / "metrics.json").read_text())["best_AP"]
    assert json.loads((tmp_path / "m.json").read_text())["AP"] == pytest.approx(best_ap, abs=1e-9)


def _voc_folder(root: Path, n: int = 10, objects: int = 1) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i in range(n):
        Image.new("RGB", (64, 64), (40, 40, 40)).save(root / "JPEGImages" / f"im{i}.jpg")
        objs = "".join(f"<object><name>cell</name><bndbox><xmin>{2 + j}</xmin><ymin>4</ymin><xmax>{40 + j}</xmax>"
                       f"<ymax>50</ymax></bndbox></object>" for j in range(objects))
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename><size><width>64</width><height>64</height></size>"
            f"{objs}</annotation>")
    return root


def test_5_6_automatic_split_and_warnings(config, tmp_path, caplog):
    voc = _voc_folder(tmp_path / "voc", n=10, objects=9)  # 9 objects per image, the tiny model has 8 queries
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert _train_cli(voc, config, out, "--max-steps", "2") == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 9
    assert (out / "val.json").exists() and (out / "best").is_dir()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("type") == "eval"]
    assert evals, "the held-out images were evaluated"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "more objects than the model's 8 queries" in messages
    # eval reuses the split: the held-out images only
    assert cli.main(["eval", "--weights", str(out), "--data", str(out / "val.json"), "--device", "cpu"]) == 0


def test_7_sigterm_during_the_evaluation_saves_the_training_state(data, tmp_path, monkeypatch):
    import detrkit.engine.validation as validation

    real = validation.evaluate

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the evaluation runs
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "evaluate", evaluate_then_signal)
    cfg = tiny_train(epochs=3, eval_every_epochs=1, pretrain_steps=0)
    result = train(tiny_model(), cfg, data, data, tmp_path / "run", progress=False, check_data=False, plots=False)
    assert result.status == "interrupted"
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == result.step == 3  # the first epoch's steps, nothing lost, nothing extra
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "best").exists()


def test_9_help_is_complete_light_and_consistent():
    parser = cli.build_parser()
    missing = []

    def walk(p, name):
        for action in p._actions:
            if action.option_strings and action.help in (None, "") and "-h" not in action.option_strings:
                missing.append(f"{name} {action.option_strings[0]}")
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")

    walk(parser, "detrkit")
    assert not missing, missing
    sub = {a.dest: a for a in parser._actions}["command"].choices
    for command in ("train", "eval", "predict"):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        assert "--precision" in flags and "--amp" not in flags, command
        assert "--device" in flags and "--out" in flags, command
    help_text = sub["eval"].format_help()
    assert "(default: float32)" in help_text and "(default: auto)" in help_text
    # building the whole parser imports no torch (--help in well under a second)
    code = "import sys, detrkit.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_10_resume_keeps_one_record_per_step_and_adds_the_seconds(data, tmp_path):
    # a clock that advances 1 s per step: the seconds are exact, whatever the machine's load
    first_clock, resumed_clock = StepClock(1.0), StepClock(1.0)
    cfg = tiny_train(epochs=4, max_steps=4, checkpoint_every_steps=2, pretrain_steps=0)
    run = tmp_path / "run"
    train(tiny_model(), cfg, data, None, run, progress=False, check_data=False, plots=False,
          clock=first_clock, step_callback=first_clock.tick)
    assert json.loads((run / "metrics.json").read_text())["seconds"] == 4.0
    # a killed run: its log went on past the last checkpoint (step 4 logged, checkpoint at step 2)
    (run / "last.pt").unlink()
    (run / "last.prev.pt").rename(run / "last.pt")
    resumed = train(tiny_model(), tiny_train(epochs=4, max_steps=8, checkpoint_every_steps=2), data, None, run,
                    progress=False, check_data=False, resume=True, plots=False,
                    clock=resumed_clock, step_callback=resumed_clock.tick)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("type") == "train"]
    assert steps == sorted(set(steps)) and resumed.step == 8
    # 2 s up to the checkpoint it resumed from, plus 6 steps of the resumed part
    assert json.loads((run / "metrics.json").read_text())["seconds"] == 8.0
    assert not (run / "best").exists()  # no validation, no best/


def test_python_training_api_mirrors_the_cli(data, tmp_path):
    from detrkit import Detector

    settings = {k: v for k, v in TINY["model"].items()}
    settings.update({f"train.{k}": v for k, v in TINY["train"].items() if k not in ("max_steps",)})
    det = Detector.from_preset("detr-tiny", **settings)
    metrics = det.train(data=data, val=data, out=tmp_path / "run", max_steps=2, plots=False)
    assert metrics["status"] == "max_steps" and metrics["step"] == 2 and "AP" in metrics
    assert det.config.class_names == json.loads((tmp_path / "run" / "config.json").read_text())["model"]["class_names"]
    image = next(Path(data).parent.rglob("*.png"))
    [r] = det.predict(image, threshold=0.0, top_k=2)
    assert len(r.label_names) == 2 and r.plot().size == Image.open(image).size
