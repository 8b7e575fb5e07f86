"""What a run writes about itself: metrics.jsonl, TensorBoard events (tb/), config.json, the progress bar,
bad_samples.jsonl, and at the end metrics.json and curves.png. Only rank 0 writes."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..config import ModelConfig, TrainConfig
from . import distributed as dist_utils
from .state import Plan, RunState
from .step import StepOutcome

log = logging.getLogger(__name__)

LOG_EVERY_STEPS = 10


def _bad_to_dict(bad: Any) -> dict:
    if dataclasses.is_dataclass(bad):
        d = dataclasses.asdict(bad)
    elif isinstance(bad, dict):
        d = dict(bad)
    else:
        d = {"problem": str(bad)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


class RunLog:
    """The run's records. clock() -> seconds, for the images/s of the logged windows."""

    def __init__(self, run_dir: Path, progress: bool, clock: Callable[[], float]):
        self.run_dir, self.clock = run_dir, clock
        self.main, self.rank = dist_utils.rank() == 0, dist_utils.rank()
        self.progress = progress
        self.writer = None
        self.bar = None
        self.bad_file = run_dir / "bad_samples.jsonl"
        self.bad_seen: set[str] = set()
        if self.bad_file.exists():
            for line in self.bad_file.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    self.bad_seen.add(json.loads(line).get("key", ""))
        self._window: dict[str, float] = {}
        self._window_n = self._window_images = 0
        self._window_t = clock()
        self.last_train: dict[str, float] = {}  # the last logged window's averages (the diagnosis reads them)

    def write(self, record: dict) -> None:
        """One line of metrics.jsonl."""
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def start(self, model_cfg: ModelConfig, train_cfg: TrainConfig, state: RunState, resumed: bool,
              info: dict | None = None) -> None:
        """config.json (with `info`, e.g. what the backbone started from), the TensorBoard writer
        (optional at run time) and the progress bar."""
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=state.step if resumed else None)
            except Exception as e:
                log.warning("TensorBoard logging disabled: %s", e)
            (self.run_dir / "config.json").write_text(json.dumps(
                {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "world_size": dist_utils.world_size(),
                 **(info or {})}, indent=2))
        self.bar = tqdm(total=state.total_steps, initial=state.step, disable=not (self.main and self.progress),
                        desc="train", dynamic_ncols=True, unit="step")

    def bad_samples(self, bad: list, epoch: int) -> None:
        """Log each unreadable sample once (across resumes) and list it in bad_samples.jsonl."""
        for b in bad or []:
            rec = _bad_to_dict(b)
            key = json.dumps(rec, sort_keys=True, default=str)
            if key not in self.bad_seen:
                self.bad_seen.add(key)
                log.warning("skipping a bad sample: %s", rec)
                with open(self.bad_file, "a") as f:
                    f.write(json.dumps({"key": key, "rank": self.rank, "epoch": epoch, **rec}, default=str) + "\n")

    def bad_total(self) -> int:
        """Distinct bad samples seen by all ranks (collective)."""
        return len(set().union(*[set(s) for s in dist_utils.all_gather_object(sorted(self.bad_seen))]))

    def step(self, outcome: StepOutcome, state: RunState, plan: Plan, lr: float) -> None:
        """Average the applied steps' losses; every LOG_EVERY_STEPS steps write them with lr and images/s."""
        self.bar.update(1)
        if outcome.applied:
            for k, v in outcome.losses.items():
                self._window[k] = self._window.get(k, 0.0) + v
            self._window_n += 1
            self._window_images += outcome.images * dist_utils.world_size()
        if not self._window_n or (state.step % LOG_EVERY_STEPS and state.step != state.total_steps):
            return
        now = self.clock()
        avg = {k: v / self._window_n for k, v in self._window.items()}
        self.last_train = avg
        ips = self._window_images / max(now - self._window_t, 1e-9)
        self.write({"type": "train", "step": state.step, "epoch": state.epoch + state.batches_done / plan.batches_per_epoch,
                    "lr": lr, "images_per_s": ips, "grad_norm": outcome.grad_norm, **avg})
        self._scalars("train", {**avg, "lr": lr, "images_per_s": ips}, state.step)
        self.bar.set_postfix(loss=f"{avg.get('loss', 0):.3f}", ce=f"{avg.get('loss_ce', 0):.3f}",
                             l1=f"{avg.get('loss_bbox', 0):.3f}", giou=f"{avg.get('loss_giou', 0):.3f}",
                             ips=f"{ips:.1f}")
        self._window, self._window_n, self._window_images, self._window_t = {}, 0, 0, now

    def evaluation(self, metrics: dict[str, float], state: RunState) -> None:
        self.write({"type": "eval", "step": state.step, "epoch": state.epoch, **metrics})
        self._scalars("eval", metrics, state.step)
        log.info("epoch %d step %d: AP %.3f AP50 %.3f", state.epoch, state.step, metrics.get("AP") or 0.0,
                 metrics.get("AP50", 0.0))

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def finish(self, summary: dict | None) -> None:
        """Close the bar and the writer; summary (a finished run): metrics.json and curves.png."""
        if self.bar is not None:
            self.bar.close()
        if not self.main:
            return
        if summary is not None:
            (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
            try:
                save_curves(self.run_dir, self.run_dir / "curves.png")
            except Exception as e:  # a plot must never fail a finished run
                log.warning("could not draw %s: %s", self.run_dir / "curves.png", e)
        if self.writer is not None:
            self.writer.close()


def save_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Loss terms and AP / AP50 over training (from RUN_DIR/metrics.jsonl) as a PNG."""
    from ..viz.curves import plot_training_curves  # builds a Figure without pyplot: no backend needed

    fig = plot_training_curves(run_dir)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png
