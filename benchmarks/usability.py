"""Command-line speed a user feels, as a table: `detrkit --help`, `detrkit train --help`, and `detrkit eval`
on coco128 with its 12 numbers checked against pycocotools run directly on the same detections.

    python benchmarks/usability.py [--weights W] [--data DIR] [--runs 3] [--out FILE.md]

--weights: any weights `detrkit eval` takes (default: detr-tiny for coco128's 80 classes, seeded random
init: the speed is the same as trained weights'); --data: a coco128 folder (annotations/instances_train2017.json
and images/train2017/; default ../shared/data/coco128 beside the checkout). Timings are wall seconds of a
fresh process, the best of --runs; the load average is printed with them because a shared machine's
other work shows in every number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "detrkit.cli", *args]


def _times(cmd: list[str], runs: int, env: dict) -> list[float]:
    """Wall seconds of each of `runs` runs of cmd, in order (the first one pays for cold caches)."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        out.append(time.perf_counter() - t)
    return out


def _timed(cmd: list[str], runs: int, env: dict) -> float:
    return min(_times(cmd, runs, env))


def _random_weights(ann: Path, out: Path) -> Path:
    from detrkit.config import get_preset
    from detrkit.detector import Detector
    import torch

    torch.manual_seed(0)
    cats = json.loads(ann.read_text())["categories"]
    cfg = get_preset("detr-tiny").model.with_classes([c["name"] for c in cats], [c["id"] for c in cats])
    return Detector.from_config(cfg).save_pretrained(out)


def _pycocotools_stats(ann: Path, results: Path) -> list[float]:
    """The 12 numbers of pycocotools' own COCOeval on the detections `detrkit eval --results` wrote."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        E = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return [float(v) for v in E.stats]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "coco128"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sys.path.insert(0, str(ROOT))
    rows = []
    load = os.getloadavg()[0]
    rows.append(("detrkit --help", f"{_timed(_cli('--help'), args.runs, env):.2f} s", "under 1 s"))
    rows.append(("detrkit train --help", f"{_timed(_cli('train', '--help'), args.runs, env):.2f} s", "under 1 s"))
    data = Path(args.data)
    ann, images = data / "annotations" / "instances_train2017.json", data / "images" / "train2017"
    if ann.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            weights = args.weights or str(_random_weights(ann, Path(tmp) / "w"))
            metrics, results = Path(tmp) / "metrics.json", Path(tmp) / "results.json"
            cmd = _cli("eval", "--weights", weights, "--data", str(ann), "--images", str(images), "--out", str(metrics),
                       "--results", str(results), "--device", "cpu")
            runs = _times(cmd, args.runs, env)
            ours = json.loads(metrics.read_text())
            ref = _pycocotools_stats(ann, results)
            diff = max(abs(float(ours[k]) - r) for k, r in zip(STATS, ref))
            rows.append(("detrkit eval coco128 (128 photos, whole process)", f"{min(runs):.1f} s",
                         f"under 10 s (best of {len(runs)}; first run {runs[0]:.1f} s, with cold file caches)"))
            rows.append(("its 12 numbers vs pycocotools", "equal" if diff < 1e-9 else f"max diff {diff:.2g}",
                         " ".join(f"{k} {float(ours[k]):.3f}" for k in STATS)))
    else:
        rows.append(("detrkit eval coco128", f"skipped: {ann} not found", ""))
    lines = [f"load average at start: {load:.1f} on {os.cpu_count()} cores", "",
             "| what | measured | goal / detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
