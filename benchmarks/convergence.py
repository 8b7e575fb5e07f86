"""The convergence benchmark: each variant of a preset under the same wall-clock budget on several
datasets, one ablation table in docs/convergence.md.

    python benchmarks/convergence.py --out /tmp/conv --minutes 15 \
        --datasets hard,bccd,bccd-rbc,main --variants base,dn,cdn,groups,iou,enc,hybrid,guide,all

Every run appends one JSON line to OUT/results.jsonl (so runs of several sessions add up) and the
table is rewritten from all of them: AP, AP50, APs (val), optimizer steps, minutes (the whole run:
pretraining, feature caching, training, evaluations), and the minutes at which the run's evaluation
first reached AP50 0.3 and 0.5 (only as fine as its evaluations). The machine's load average at the
start and end of each run is recorded: on a shared machine the same budget buys fewer steps. Below
the table, each variant is set against the `base` run of the same command (what the switch bought in
minutes, and at an evaluation step both reached, mid-run, what it bought per step).

Datasets (prepared once under OUT/data):
  hard      `detrkit data synth --variant hard` (2000 train / 200 val images)
  bccd      BCCD (VOC) from ../shared/data/bccd ($DETRKIT_BCCD), splits train / val
  bccd-rbc  BCCD with only the RBC class: ~13 touching cells per image, a constant box cannot score
  main      the main job's data (4000 / 100 images, engine/main_job.py's generator settings)
Held out (never used to choose a setting; run them to check a change, not to tune it):
  other     `detrkit data synth --variant other` (3 other shapes: diamond, ring, hexagon; 160-288 px
            images, up to 6 objects of 10-65% of the shorter side; 2000 train / 200 val, seed 7)
  other-one `other` with its three shapes merged into one class: one-class data nobody tuned for
  other-crowd `other`'s shapes, up to 30 per image (6-22% of the shorter side of 224-320 px images):
            crowded (more objects than the preset's queries), 2000 / 200 images, seed 11
  hard-crowd `hard` with up to 24 objects of 10-60 px: crowded, any-polarity colours, distractor
            lines; 2000 / 200 images, seed 13
  coco128   COCO photos from ../shared/data/coco128 ($DETRKIT_COCO128): 80 classes, crowd regions;
            a fixed seeded hold-out of 20% of the 128 images is the validation split
Variants: preset (the preset as shipped, nothing overridden), base (every switch off), dn (denoising
queries), cdn (denoising with contrastive negatives), groups (group queries), iou (IoU-aware class
target), enc (the encoder head), hybrid (one-to-many matching in the decoder layers before the last),
guide (guided cross-attention), all (every switch); `--set key=value` applies to every run. Each row
records the switches as the run trained them (read back from its config.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detrkit.config import ModelConfig, TrainConfig, apply_overrides, get_preset, parse_sets  # noqa: E402

log = logging.getLogger("convergence")

_OFF = {"dn_groups": 0, "dn_negatives": False, "query_groups": 1, "iou_aware": False, "enc_aux_coef": 0.0,
        "one_to_many": 1, "attn_guide_coef": 0.0}
VARIANTS: dict[str, dict] = {
    "preset": {},  # the preset exactly as shipped
    "base": _OFF,
    "dn": {**_OFF, "dn_groups": 4},
    "cdn": {**_OFF, "dn_groups": 4, "dn_negatives": True},
    "groups": {**_OFF, "query_groups": 3},
    "iou": {**_OFF, "iou_aware": True},
    "enc": {**_OFF, "enc_aux_coef": 1.0},
    "hybrid": {**_OFF, "one_to_many": 3},
    "guide": {**_OFF, "attn_guide_coef": 1.0},
    "all": {"dn_groups": 4, "dn_negatives": True, "query_groups": 3, "iou_aware": True, "enc_aux_coef": 1.0,
            "one_to_many": 3, "attn_guide_coef": 1.0},
}
THRESHOLDS = (0.3, 0.5)
SHARED_BCCD = Path(os.environ.get("DETRKIT_BCCD", ROOT.parent / "shared" / "data" / "bccd"))
SHARED_COCO128 = Path(os.environ.get("DETRKIT_COCO128", ROOT.parent / "shared" / "data" / "coco128"))
DATASETS = ("hard", "bccd", "bccd-rbc", "main", "other", "other-one", "other-crowd", "hard-crowd", "coco128")
# the crowded held-out sets: make_synthetic's options (more objects than detr-tiny's 20 queries)
CROWDED = {
    "other-crowd": dict(seed=11, variant="other", image_size=(224, 320), max_objects=30, object_size=(0.06, 0.22)),
    "hard-crowd": dict(seed=13, variant="hard", max_objects=24, object_size=(10, 60)),
}


# ------------------------------------------------------------------------------------------- data
def _write_coco(index, path: Path, keep: set[str] | None = None) -> Path:
    coco = index.to_coco()
    if keep is not None:
        ids = {c["id"] for c in coco["categories"] if c["name"] in keep}
        coco["categories"] = [c for c in coco["categories"] if c["id"] in ids]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def _one_class(src: Path, dst: Path) -> Path:
    """src's COCO file with every category merged into one, image paths made absolute."""
    coco = json.loads(src.read_text())
    for im in coco["images"]:
        im["file_name"] = str((src.parent / im["file_name"]).resolve())
    for a in coco["annotations"]:
        a["category_id"] = 1
    coco["categories"] = [{"id": 1, "name": "shape", "supercategory": "shape"}]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(coco))
    return dst


def prepare(name: str, data_root: Path, bccd: Path = SHARED_BCCD) -> tuple[Path, Path]:
    """(train annotations, val annotations) of a benchmark dataset, written once under data_root."""
    out = data_root / name
    train_json, val_json = out / "train" / "annotations.json", out / "val" / "annotations.json"
    if train_json.exists() and val_json.exists():
        return train_json, val_json
    if name == "hard":
        from detrkit.data.synthetic import make_synthetic_splits

        return make_synthetic_splits(out, train=2000, val=200, seed=0, variant="hard")
    if name == "main":
        from detrkit.data.synthetic import make_synthetic_splits
        from detrkit.engine import main_job as mj

        return make_synthetic_splits(out, train=mj.DEFAULT_NUM_TRAIN, val=mj.DEFAULT_NUM_VAL, seed=0,
                                     variant="shapes", image_size=mj.DEFAULT_IMAGE_SIZE,
                                     max_objects=mj.DEFAULT_MAX_OBJECTS, object_size=mj.DEFAULT_OBJECT_SIZE)
    if name in ("bccd", "bccd-rbc"):
        from detrkit.data.formats import load_annotations

        if not bccd.is_dir():
            raise FileNotFoundError(f"{bccd}: BCCD not found (VOC layout with ImageSets/Main/train.txt, val.txt)")
        keep = {"RBC"} if name == "bccd-rbc" else None
        return (_write_coco(load_annotations(bccd, split="train"), train_json, keep),
                _write_coco(load_annotations(bccd, split="val"), val_json, keep))
    if name == "other":
        from detrkit.data.synthetic import make_synthetic_splits

        return make_synthetic_splits(out, train=2000, val=200, seed=7, variant="other", image_size=(160, 288))
    if name in CROWDED:  # held out: crowded images no setting was chosen on
        from detrkit.data.synthetic import make_synthetic_splits

        return make_synthetic_splits(out, train=2000, val=200, **CROWDED[name])
    if name == "other-one":  # held out too: `other` with its three shapes as one class "shape"
        return tuple(_one_class(src, dst) for src, dst in zip(prepare("other", data_root), (train_json, val_json)))
    if name == "coco128":
        from detrkit.data.coco import load_coco
        from detrkit.data.split import hold_out

        ann = SHARED_COCO128 / "annotations" / "instances_train2017.json"
        if not ann.is_file():
            raise FileNotFoundError(f"{ann}: coco128 not found (annotations/instances_train2017.json, "
                                    "images/train2017/)")
        train, val = hold_out(load_coco(ann, SHARED_COCO128 / "images" / "train2017"), fraction=0.2, seed=0)
        return _write_coco(train, train_json), _write_coco(val, val_json)
    raise ValueError(f"unknown benchmark dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------- shared backbone
def shared_backbone(dataset: str, train_json: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    data_root: Path) -> tuple[Path, float]:
    """The preset's self-pretrained backbone for a dataset, made once and reused by every variant
    (so variants differ only in what they switch, and a busy machine spends its minutes on them).
    -> (backbone weights file, minutes the pretraining took)."""
    import torch

    from detrkit.data.coco import load_coco
    from detrkit.data.dataset import DetectionDataset
    from detrkit.engine.backbone_start import start_backbone
    from detrkit.model import build_model

    tag = (f"{model_cfg.backbone}-{train_cfg.pretrain_steps}-{int(train_cfg.pretrain_background)}-"
           f"{train_cfg.pretrain_dense_steps}-{train_cfg.seed}")
    path = data_root / dataset / f"backbone-{tag}.pth"
    info = path.with_suffix(".json")
    if path.exists() and info.exists():
        return path, json.loads(info.read_text())["minutes"]
    from detrkit.engine.input_fit import fit_to_data

    index = load_coco(train_json)
    # the sizes the run will train at (the dense phase works at the detector's input scale)
    model_cfg, train_cfg, _ = fit_to_data(index, model_cfg.with_classes(index.class_names, index.category_ids),
                                          train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    t0 = time.monotonic()
    start = start_backbone(model, model.cfg, dataclasses.replace(train_cfg, backbone_weights="none"),
                           DetectionDataset(index), __import__("torch").device("cpu"), progress=False)
    minutes = (time.monotonic() - t0) / 60
    torch.save(model.backbone.body.state_dict(), path)
    info.write_text(json.dumps({"minutes": minutes, **start.to_dict()}))
    return path, minutes


# -------------------------------------------------------------------------------------------- run
def first_reach(evals: list[dict], step_minutes: dict[int, float], threshold: float) -> float | None:
    """Minutes (run start to the evaluation's step) of the first evaluation with AP50 >= threshold."""
    for e in evals:
        if e.get("AP50", 0.0) >= threshold:
            step = e["step"]
            known = [s for s in step_minutes if s <= step]
            return step_minutes[max(known)] if known else None
    return None


def machine(device: str) -> str:
    """The CPU (or GPU) model, cores and the precision the run trained in: what the minutes depend on."""
    import torch

    from detrkit.device import resolve_amp

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), "cpu") + f", {os.cpu_count()} cores"
    amp = resolve_amp("auto", device)
    return f"{name}, {'bf16' if amp == 'bf16' else 'float32'}"


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, total) CPU ticks since boot from /proc/stat (None elsewhere). On a shared virtual machine
    the host may take a third of the time a run was given; its minutes then buy far fewer steps."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of the CPU time between two `cpu_ticks` readings that the host gave to others."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def variant_configs(preset: str, variant: str, sets: dict) -> tuple[ModelConfig, TrainConfig]:
    """The preset with the variant's switches, then `--set` on top (the library's override rules: a
    value is coerced to its field's type, `lr=5e-4` is a number)."""
    p = get_preset(preset)
    # fit_to_data leaves every switch as set (it sizes the input, queries and no-object weight), so a
    # variant trains its switches as it names them
    model_cfg, train_cfg = apply_overrides(p.model, p.train, VARIANTS[variant], f"variant {variant}")
    return apply_overrides(model_cfg, train_cfg, sets, "--set")


def run_one(dataset: str, variant: str, preset: str, minutes: float, out: Path, sets: dict,
            device: str = "cpu", reuse_backbone: bool = False, grid: str | None = None) -> dict:
    from detrkit.engine.train import train

    train_json, val_json = prepare(dataset, out / "data")
    model_cfg, train_cfg = variant_configs(preset, variant, sets)
    train_cfg.max_minutes = minutes
    pretrain_minutes = None
    if reuse_backbone and train_cfg.backbone_weights == "none" and (train_cfg.pretrain_steps > 0
                                                                    or train_cfg.pretrain_dense_steps > 0):
        path, pretrain_minutes = shared_backbone(dataset, train_json, model_cfg, train_cfg, out / "data")
        train_cfg.backbone_weights = str(path)
    run_dir = out / "runs" / f"{dataset}-{variant}-{time.strftime('%H%M%S')}"
    load_start, ticks_start = os.getloadavg(), cpu_ticks()
    t0 = time.monotonic()
    step_minutes: dict[int, float] = {}

    def tick(step, model):
        step_minutes[step] = (time.monotonic() - t0) / 60

    result = train(model_cfg, train_cfg, train_json, val_json, run_dir, device=device, progress=False,
                   step_callback=tick)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"type": "eval"' in line]
    m = result.metrics
    ran = json.loads((run_dir / "config.json").read_text())["train"]
    row = {
        "dataset": dataset, "variant": variant, "preset": preset, "budget_min": minutes,
        "AP": m.get("AP"), "AP50": m.get("AP50"), "APs": m.get("APs"), "steps": result.step,
        "minutes": result.seconds / 60, "status": result.status,
        **{f"min_to_{t}": first_reach(evals, step_minutes, t) for t in THRESHOLDS},
        "load_start": load_start[0], "load_end": os.getloadavg()[0], "cpus": os.cpu_count(),
        "cpu_stolen": stolen_share(ticks_start, cpu_ticks()),
        "machine": machine(device),
        "threads": __import__("torch").get_num_threads(),
        "sets": sets, "grid": grid, "run_dir": str(run_dir), "shared_backbone_minutes": pretrain_minutes, "date": time.strftime("%Y-%m-%d %H:%M"),
        "curve": [(e["step"], round(e.get("AP50", 0.0), 3)) for e in evals],
        # the switches as the run trained them (the preset's may have been changed by fit_to_data)
        "switches": {k: ran[k] for k in _OFF},
    }
    changed = [f"{k} {getattr(train_cfg, k)} -> {ran[k]}" for k in _OFF if ran[k] != getattr(train_cfg, k)]
    if changed:
        row["note"] = "changed by fit_to_data: " + ", ".join(changed)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


# ------------------------------------------------------------------------------------------ table
def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and v < 0):  # COCO's -1: no object of that size
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    lines = ["| dataset | preset | variant | budget (min) | AP | AP50 | APs | steps | minutes | min to AP50 0.3 | "
             "min to AP50 0.5 | load avg (start/end) | CPU stolen | machine | settings |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], list(VARIANTS).index(r["variant"]), r["date"])):
        sets = ", ".join(f"{k}={v}" for k, v in r.get("sets", {}).items()) or "-"
        if r.get("shared_backbone_minutes") is not None:
            sets += f"; backbone pretrained once ({r['shared_backbone_minutes']:.1f} min, not in the budget)"
        if r.get("note"):  # what the code or the preset was at the time, when it matters for the reading
            sets += f"; {r['note']}"
        lines.append(
            f"| {r['dataset']} | {r['preset']} | {r['variant']} | {r['budget_min']:g} | {_fmt(r['AP'])} | {_fmt(r['AP50'])} | "
            f"{_fmt(r['APs'])} | {r['steps']} | {r['minutes']:.1f} | {_fmt(r['min_to_0.3'], 1)} | "
            f"{_fmt(r['min_to_0.5'], 1)} | {r['load_start']:.1f} / {r['load_end']:.1f} | {_fmt(r.get('cpu_stolen'), 2)} | "
            f"{r.get('machine', 'Intel Xeon (AMX), 2 cores, bf16')} | {sets} |")
    return "\n".join(lines)


def _common_step(a: list, b: list) -> int | None:
    """The evaluation step two curves share nearest the middle of the shorter run. Not the last one: each
    cosine is fitted to its own run's time, so late in a slower run its learning rate is already low,
    which flatters it; mid-run both still learn at a similar rate."""
    shared = {s for s, _ in a} & {s for s, _ in b}
    if not shared:
        return None
    middle = min(a[-1][0], b[-1][0]) / 2
    return min(shared, key=lambda s: (abs(s - middle), s))


def bought(rows: list[dict]) -> str:
    """What each switch bought: every variant against the `base` of the same invocation (`grid`: one
    command, one machine, one shared backbone), at the end of the budget (what a minute buys, the
    step's cost included) and at an evaluation step both reached, mid-run (what a step buys)."""
    lines = ["| dataset | grid | variant | AP (base) | AP50 (base) | steps (base) | at step | AP50 there (base) |",
             "|---|---|---|---|---|---|---|---|"]
    grids: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("grid"):
            grids.setdefault((r["dataset"], r["grid"]), {})[r["variant"]] = r  # a rerun replaces the row
    for (dataset, grid), by_variant in sorted(grids.items()):
        base = by_variant.get("base")
        if base is None:
            continue
        for variant in (v for v in VARIANTS if v in by_variant and v != "base"):
            r = by_variant[variant]
            step = _common_step(r.get("curve", []), base.get("curve", []))
            there = ("-", "-") if step is None else (
                f"{dict(r['curve'])[step]:.3f} ({dict(base['curve'])[step]:.3f})", str(step))
            lines.append(f"| {dataset} | {grid} | {variant} | {_fmt(r['AP'])} ({_fmt(base['AP'])}) | "
                         f"{_fmt(r['AP50'])} ({_fmt(base['AP50'])}) | {r['steps']} ({base['steps']}) | "
                         f"{there[1]} | {there[0]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def write_table(out: Path, doc: Path) -> None:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    marker = "<!-- convergence table: benchmarks/convergence.py rewrites from here -->"
    head = doc.read_text().split(marker)[0] if doc.exists() else "# Convergence benchmark\n\n"
    summary = bought(rows)
    if summary:
        summary = ("\n\nWhat each switch bought: each variant against the `base` run of the same command "
                   "(same machine, same backbone), at the end of the budget and at an evaluation step both "
                   "reached, the one nearest the middle of the shorter run:\n\n" + summary)
    doc.write_text(head + marker + "\n\n" + table(rows) + summary + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for data, runs and results.jsonl")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of each run")
    ap.add_argument("--datasets", default="hard,bccd,bccd-rbc,main")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--preset", default="detr-tiny")
    ap.add_argument("--set", action="append", default=[], help="key=value for every run (ModelConfig or TrainConfig)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "convergence.md"), help="the table's markdown file")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from results.jsonl and stop")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse-backbone", action="store_true",
                    help="self-pretrain the backbone once per dataset and start every variant from it (its "
                         "minutes are reported, not counted in the budget)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (on a busy machine 1 is several times faster than 2: no thread sync waits)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        sets = parse_sets(args.set)
        grid = time.strftime("%Y-%m-%d %H:%M")  # rows of one command compare with its own base
        for dataset in args.datasets.split(","):
            for variant in args.variants.split(","):
                if variant not in VARIANTS:
                    raise SystemExit(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
                row = run_one(dataset, variant, args.preset, args.minutes, out, sets, args.device,
                              args.reuse_backbone, grid)
                print(json.dumps({k: row[k] for k in ("dataset", "variant", "AP", "AP50", "steps", "minutes")}))
    write_table(out, Path(args.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
