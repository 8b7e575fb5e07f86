"""Checkpoints: exact resume after SIGTERM, atomic writes under SIGKILL, damaged checkpoint fallback."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkit.engine.checkpoint import CheckpointError, load_checkpoint, load_latest
from detrkit.engine.train import train

from _train_helpers import tiny_data, tiny_model, tiny_train

# dropout and augmentation on: resuming must restore the RNGs and the per-sample augmentation
MODEL = dict(dropout=0.1)
TRAIN = dict(epochs=2, batch_size=2, hflip=True, train_scales=[48, 56, 64], lr=5e-4)


def _final(run: Path) -> dict:
    return load_checkpoint(run / "last.pt")


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, caplog):
    data = tiny_data(tmp_path / "data", 6)  # 3 steps per epoch, 6 steps in all
    full = train(tiny_model(**MODEL), tiny_train(**TRAIN), data, None, tmp_path / "full", progress=False,
                 check_data=False)
    assert full.status == "completed" and full.step == 6

    def stop_at_4(step, model):  # mid-epoch 2: sampler position and RNG state matter
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    part = train(tiny_model(**MODEL), tiny_train(**TRAIN), data, None, tmp_path / "part", progress=False,
                 step_callback=stop_at_4, check_data=False)
    assert part.status == "interrupted" and part.step == 4
    state = _final(tmp_path / "part")
    assert (state["step"], state["epoch"], state["batches_done"]) == (4, 1, 1)
    assert not (tmp_path / "part" / "final").exists()

    resumed = train(tiny_model(**MODEL), tiny_train(**TRAIN), data, None, tmp_path / "part", progress=False,
                    resume=True, check_data=False)
    assert resumed.status == "completed" and resumed.step == 6
    a, b = _final(tmp_path / "full"), _final(tmp_path / "part")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    # the optimizer moments too
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-6)


def test_truncated_checkpoint_clear_error_and_fallback(tmp_path, caplog):
    data = tiny_data(tmp_path / "data", 4)
    run = tmp_path / "run"
    train(tiny_model(), tiny_train(epochs=2, checkpoint_every_epochs=1), data, None, run, progress=False,
          check_data=False)
    assert (run / "last.pt").exists() and (run / "last.prev.pt").exists()
    raw = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="last.pt.*(truncated|checksum)"):
        load_checkpoint(run / "last.pt")
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(run)
    assert path.name == "last.prev.pt" and state["step"] == 2  # the end of epoch 1
    assert "previous checkpoint" in caplog.text
    # training resumes from the fallback and finishes the run
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train(tiny_model(), tiny_train(epochs=2, checkpoint_every_epochs=1), data, None, run,
                       progress=False, resume=True, check_data=False)
    assert "previous checkpoint" in caplog.text
    assert result.step == 4 and load_checkpoint(run / "last.pt")["step"] == 4
    (run / "last.prev.pt").write_bytes(b"garbage")
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(run)


_WORKER = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from _train_helpers import tiny_model, tiny_train
from detrkit.engine.train import train
real, calls = getattr(os, {call!r}), [0]
def killing(*args, **kwargs):  # SIGKILL just before the n-th call: no cleanup, no flush, like a power cut
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, {call!r}, killing)
train(tiny_model(), tiny_train(epochs=50, checkpoint_every_steps=1), {data!r}, None, {run!r}, progress=False,
      check_data=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("call, n", [
    ("fsync", 3),    # step 2's new file written but not yet flushed to disk
    ("replace", 2),  # step 2's file complete; last.pt not yet moved to last.prev.pt
    ("replace", 3),  # last.pt moved aside, the new one not yet in place: only last.prev.pt
    ("replace", 5),  # the same one checkpoint later
])
def test_sigkill_always_leaves_a_loadable_checkpoint(tmp_path, call, n):
    data = tiny_data(tmp_path / "data", 4)
    run = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(Path(__file__).parent), data=str(data), run=str(run), call=call, n=n))
    proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state, path = load_latest(run)
    assert state["step"] >= 1
    assert set(state) >= {"model", "optimizer", "rng", "order", "batches_done"}
    if (call, n) == ("replace", 3):
        assert path.name == "last.prev.pt" and not (run / "last.pt").exists()
