"""torchrun DDP on CPU (gloo): ranks stay identical, and 2 x batch b equals 1 x batch 2b."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkit.engine.train import train

from _train_helpers import tiny_data, tiny_model, tiny_train

# deterministic: no dropout, no augmentation, one image size (no padding), eos_coef 1 (plain CE mean)
MODEL = dict(dropout=0.0)
TRAIN = dict(epochs=2, hflip=False, eos_coef=1.0, lr=1e-3, lr_backbone=1e-4, clip_max_norm=0.5)

_WORKER = """
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from _train_helpers import tiny_model, tiny_train
from detrkit.engine.train import train
rank = int(os.environ["RANK"])
snaps = []
def cb(step, model):
    snaps.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
train(tiny_model(**{model!r}), tiny_train(batch_size=2, **{train!r}), {data!r}, None, {run!r},
      progress=False, step_callback=cb, check_data=False)
torch.save(snaps, os.path.join({run!r}, f"snaps{{rank}}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # images hold different numbers of boxes, so the ranks' target counts differ: equality with the
    # single process needs the box losses divided by the global (all-reduced) count
    data = tiny_data(tmp_path / "data", 8)
    run = tmp_path / "ddp"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(Path(__file__).parent), model=MODEL, train=TRAIN, data=str(data),
                                     run=str(run)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    snaps0, snaps1 = torch.load(run / "snaps0.pt"), torch.load(run / "snaps1.pt")
    assert len(snaps0) == len(snaps1) == 4  # 8 images / (2 ranks x 2) = 2 steps per epoch, 2 epochs
    for a, b in zip(snaps0, snaps1):
        assert torch.equal(a, b)  # identical weights in both processes after every step

    torch.set_num_threads(2)
    single = []
    train(tiny_model(**MODEL), tiny_train(batch_size=4, **TRAIN), data, None, tmp_path / "single", progress=False,
          step_callback=lambda s, m: single.append(torch.cat([p.detach().flatten() for p in m.parameters()]).clone()),
          check_data=False)
    assert len(single) == 4
    assert not torch.equal(single[0], single[-1])  # it trained
    for step, (a, b) in enumerate(zip(snaps0, single), 1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")
