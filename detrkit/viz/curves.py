"""Training curves from a run's metrics.jsonl: loss terms and AP over training.

The reader is liberal: one JSON object per line, with "step" and/or "epoch" and any of loss,
loss_ce, loss_bbox, loss_giou, AP, AP50 (also prefixed, e.g. "train/loss", "eval_AP", or nested,
e.g. {"eval": {"AP": ...}}). Unreadable lines are skipped with a warning naming the line.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "loss_ce", "loss_bbox", "loss_giou")
AP_KEYS = ("AP", "AP50", "AP75")
_EVAL_PREFIXES = ("val", "eval", "test", "valid", "validation")


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(_flatten(v, key))
        else:
            flat[key] = v
    return flat


def _split_key(key: str) -> tuple[str, str]:
    """'eval/AP' -> ('eval', 'AP'); 'train_loss_ce' -> ('train', 'loss_ce'); 'loss' -> ('', 'loss')."""
    for sep in ("/", "."):
        if sep in key:
            head, _, tail = key.rpartition(sep)
            return head, tail
    for name in sorted(LOSS_KEYS + AP_KEYS, key=len, reverse=True):
        if key.endswith("_" + name):
            return key[: -len(name) - 1], name
    return "", key


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or RUN_DIR containing one), flattened ("eval/AP")."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (expected RUN_DIR/metrics.jsonl)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            log.warning("%s:%d: not JSON (%s); skipped", path, lineno, e.msg)
            continue
        if not isinstance(rec, dict):
            log.warning("%s:%d: not a JSON object; skipped", path, lineno)
            continue
        records.append(_flatten(rec))
    return records


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def metric_series(records: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """series name (e.g. "loss_ce", "eval/AP") -> {"x": [...], "y": [...], "axis": "step" | "epoch"}.

    A series uses "step" for its x axis when every record holding it has one, else "epoch".
    Records whose "split", "phase" or "type" field says eval/val/test count as eval series.
    """
    raw: dict[str, list[tuple[float | None, float | None, float]]] = {}
    for rec in records:
        step, epoch = _number(rec.get("step")), _number(rec.get("epoch"))
        split = str(rec.get("split", rec.get("phase", rec.get("type", "")))).lower()
        for key, value in rec.items():
            y = _number(value)
            if y is None:
                continue
            prefix, name = _split_key(key)
            if name not in LOSS_KEYS + AP_KEYS:
                continue
            is_eval = prefix.lower().split("/")[-1].split("_")[0] in _EVAL_PREFIXES or split in _EVAL_PREFIXES
            series = f"eval/{name}" if is_eval else name
            raw.setdefault(series, []).append((step, epoch, y))
    out = {}
    for name, pts in raw.items():
        axis = "step" if all(p[0] is not None for p in pts) else "epoch"
        col = 0 if axis == "step" else 1
        pts = [p for p in pts if p[col] is not None]
        if not pts:
            continue
        pts.sort(key=lambda p: p[col])
        out[name] = {"x": np.array([p[col] for p in pts]), "y": np.array([p[2] for p in pts]), "axis": axis}
    return out


def _smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average over ~`span` points, bias-corrected at the start."""
    alpha = 2.0 / (span + 1)
    out, acc, norm = np.empty_like(y, dtype=np.float64), 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        norm = (1 - alpha) * norm + alpha
        out[i] = acc / norm
    return out


def plot_training_curves(run: str | Path | list[dict[str, Any]], title: str | None = None) -> Figure:
    """Loss terms (left) and AP (right) over training, from RUN_DIR, a metrics.jsonl path or records.

    Noisy training losses (more than 50 points) are shown faint with an exponential moving average
    on top. Eval losses are dashed.
    """
    records = run if isinstance(run, list) else read_metrics(run)
    series = metric_series(records)
    losses = [k for k in series if k.split("/")[-1] in LOSS_KEYS]
    aps = [k for k in series if k.split("/")[-1] in AP_KEYS]
    if not losses and not aps:
        raise ValueError("no loss or AP values in the metrics (looked for " + ", ".join(LOSS_KEYS + AP_KEYS) + ")")
    panels = int(bool(losses)) + int(bool(aps))
    fig = Figure(figsize=(5.2 * panels, 3.8), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    colours = {"loss": "black", "loss_ce": "#4e79a7", "loss_bbox": "#f28e2b", "loss_giou": "#59a14f",
               "AP": "#e15759", "AP50": "#4e79a7", "AP75": "#59a14f"}
    if losses:
        ax = axes.pop(0)
        for key in sorted(losses, key=lambda k: (k.startswith("eval"), LOSS_KEYS.index(k.split("/")[-1]))):
            s, name = series[key], key.split("/")[-1]
            dashed = key.startswith("eval")
            if len(s["y"]) > 50 and not dashed:
                ax.plot(s["x"], s["y"], color=colours[name], alpha=0.2, lw=0.8)
                ax.plot(s["x"], _smooth(s["y"], max(5, len(s["y"]) // 40)), color=colours[name], lw=1.6, label=key)
            else:
                ax.plot(s["x"], s["y"], color=colours[name], lw=1.6, ls="--" if dashed else "-",
                        marker="o" if len(s["y"]) < 30 else None, ms=3, label=key)
        ax.set_xlabel(series[losses[0]]["axis"])
        ax.set_ylabel("loss")
        if all((series[k]["y"] > 0).all() for k in losses):
            ax.set_yscale("log")
        ax.set_title("Losses", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, frameon=False)
    if aps:
        ax = axes.pop(0)
        for key in sorted(aps, key=lambda k: AP_KEYS.index(k.split("/")[-1])):
            s = series[key]
            ax.plot(s["x"], s["y"], color=colours[key.split("/")[-1]], lw=1.6, marker="o", ms=3,
                    label=key.split("/")[-1])
        ax.set_xlabel(series[aps[0]]["axis"])
        ax.set_ylabel("AP (COCO box)")
        ax.set_title("Validation AP", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
