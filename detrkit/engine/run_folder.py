"""Run folders that never lose work.

Policy (as Ultralytics does): a new run never writes into a folder that holds another run. When `--out
runs/x` already holds one, the new run goes to the first free numbered sibling, `runs/x-2`, `runs/x-3`,
..., and says so. `--resume` is the one way to continue in the same folder. An existing folder without
a run in it (empty, or made by hand) is used as it is.

On resume, `metrics.jsonl` is cut back to the checkpoint's step, so the steps run again after it are
logged once, not twice.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# what a run leaves in its folder; any of them means the folder holds a run
RUN_MARKERS = ("metrics.jsonl", "metrics.json", "last.pt", "last.prev.pt", "final", "best", "config.json",
               "split.json")


def holds_run(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def claim_run_dir(out: str | os.PathLike, resume: bool = False) -> Path:
    """The folder this run writes to: `out` itself when resuming, when it does not exist or when it holds no
    run; otherwise the first free `out-N` (N = 2, 3, ...), created atomically so two runs started at once
    cannot pick the same one."""
    out = Path(out)
    if resume:
        out.mkdir(parents=True, exist_ok=True)
        return out
    try:
        out.mkdir(parents=True)
        return out
    except FileExistsError:
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder; choose another --out") from None
        if not holds_run(out):
            return out
    base = out.name
    match = re.fullmatch(r"(.*)-(\d+)", base)
    if match and holds_run(out):
        base = match.group(1)  # runs/x-2 taken: continue at runs/x-3, not runs/x-2-2
    n = int(match.group(2)) + 1 if match else 2
    while True:
        candidate = out.with_name(f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            n += 1
            continue
        log.warning("%s holds an earlier run (use --resume to continue it); this run writes to %s", out, candidate)
        return candidate


def trim_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the records of `path` (a metrics.jsonl) logged after optimizer step `step`: what a resumed run
    is about to log again. Records without a step (pretraining, notes) stay. Returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by a kill
            continue
        s = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(s, (int, float)) and s > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)
        log.info("%s: dropped %d record(s) after step %d (the resumed run logs those steps again)", path, dropped,
                 step)
    return dropped
