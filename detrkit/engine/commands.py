"""`detrkit train`, `detrkit eval` and `detrkit main-job`.

Configuration: a preset, then a config file (JSON or YAML with optional "model" / "train" sections, or
flat keys), then `--set key=value` (key: a ModelConfig or TrainConfig field, optionally prefixed with
`model.` or `train.`; value parsed as YAML), then the dedicated flags (--epochs, --max-minutes, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..argtypes import non_negative_int, positive_float, positive_int
from ..config import ModelConfig, TrainConfig, get_preset

log = logging.getLogger(__name__)

COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
COCO_LABELS = (
    "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AP @[IoU=0.50      | area=   all | maxDets=100]",
    "AP @[IoU=0.75      | area=   all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= large | maxDets=100]",
)


# ------------------------------------------------------------------------------------------ config
def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def apply_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, values: dict[str, Any],
                    source: str) -> tuple[ModelConfig, TrainConfig]:
    """Set fields by name ("lr", "model.hidden_dim", "train.epochs"); unknown names are an error."""
    m, t = model_cfg.to_dict(), train_cfg.to_dict()
    mf, tf = _fields(ModelConfig), _fields(TrainConfig)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ValueError(f"{source}: unknown section {section!r} in {key!r} (use model.* or train.*)")
        in_model, in_train = name in mf and section != "train", name in tf and section != "model"
        if in_model and in_train:
            raise ValueError(f"{source}: {name!r} is ambiguous; write model.{name} or train.{name}")
        if not (in_model or in_train):
            raise ValueError(f"{source}: unknown setting {key!r}; ModelConfig fields: {sorted(mf)}; "
                             f"TrainConfig fields: {sorted(tf)}")
        _check_type(ModelConfig if in_model else TrainConfig, name, value, source)
        (m if in_model else t)[name] = value
    try:
        return ModelConfig.from_dict(m), TrainConfig.from_dict(t)
    except (TypeError, ValueError) as e:  # a value that contradicts another (hidden_dim vs nheads, ...)
        raise ValueError(f"{source}: {e}") from None


def _check_type(cls, name: str, value: Any, source: str) -> None:
    """A setting's value must have its field's type (an int for an int, a list for a list, ...)."""
    ftype = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    options = [o.strip() for o in ftype.split("|")]
    if value is None:
        ok = "None" in options
    else:
        ok = False
        for o in options:
            base = o.split("[")[0]
            if base == "bool":
                ok |= isinstance(value, bool)
            elif base == "int":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif base == "float":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif base == "str":
                ok |= isinstance(value, str)
            elif base == "list":
                ok |= isinstance(value, list)
            else:
                ok = True  # a type this check does not know: left to the config class
    if not ok:
        raise ValueError(f"{source}: {name} must be {ftype.replace('|', 'or')}, got {value!r}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON or YAML file -> flat {key: value} (sections "model"/"train" become prefixes)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of settings, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key == "preset":
            continue
        else:
            flat[key] = value
    return flat


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """["lr=1e-4", "train_scales=[224,256]"] -> {"lr": 1e-4, "train_scales": [224, 256]}."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: cannot parse the value ({e})") from None
    return out


def build_configs(preset: str, config_file: str | None = None, sets: list[str] | None = None,
                  **flags: Any) -> tuple[ModelConfig, TrainConfig]:
    """preset -> config file -> --set -> explicit flags (None flags are ignored)."""
    if config_file:
        file_values = load_config_file(config_file)
        preset = load_preset_name(config_file) or preset
    p = get_preset(preset)
    m, t = p.model, p.train
    if config_file:
        m, t = apply_overrides(m, t, file_values, str(config_file))
    m, t = apply_overrides(m, t, parse_sets(sets), "--set")
    m, t = apply_overrides(m, t, {k: v for k, v in flags.items() if v is not None}, "command line")
    return m, t


def load_preset_name(config_file: str) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(Path(config_file).read_text())
    except Exception:
        return None
    return data.get("preset") if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------- train
def train_command(args: argparse.Namespace) -> int:
    from .train import train

    _set_threads(args.threads)
    model_cfg, train_cfg = build_configs(
        args.preset, args.config, args.set, epochs=args.epochs, max_minutes=args.max_minutes,
        max_steps=args.max_steps, batch_size=args.batch_size, amp=args.amp,
    )
    result = train(model_cfg, train_cfg, args.data, args.val, args.out, device=args.device, resume=args.resume,
                   images_dir=args.images, val_images_dir=args.val_images, split=args.split,
                   val_split=args.val_split, init_weights=args.weights, keep_class_names=args.keep_class_names)
    if result.status == "nothing_to_do":
        print(f"nothing to do: {result.run_dir} has already trained {result.step} steps, all its epochs and "
              f"--max-steps allow; raise --epochs or --max-steps to train further")
        return 0
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; continue with: detrkit train ... --out {args.out} --resume")
        return 0
    if result.metrics:
        print_coco(result.metrics)
    print(f"run folder: {result.run_dir}  (weights: {result.run_dir / 'final'}, best: {result.run_dir / 'best'})")
    if result.bad_samples:
        print(f"{result.bad_samples} bad samples skipped, listed in {result.run_dir / 'bad_samples.jsonl'}")
    return 0


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # several CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# -------------------------------------------------------------------------------------------- eval
def load_weights(path: str | os.PathLike):
    """A model from a training checkpoint (last.pt) or any weights Detector.from_pretrained takes."""
    from ..model import build_model

    path = Path(path)
    if path.is_dir() and (path / "last.pt").exists() and not (path / "model.safetensors").exists():
        path = path / "last.pt"
    if path.suffix == ".pt":
        from .checkpoint import load_checkpoint

        state = load_checkpoint(path)
        cfg = ModelConfig.from_dict(state["model_cfg"])
        weights = state["ema"] if state.get("ema") is not None else state["model"]
    else:
        from ..detector import load_weights as load_any

        weights, cfg = load_any(path)
    model = build_model(cfg)
    model.load_state_dict(weights)
    return model.eval(), cfg


def evaluate_weights(weights: str | os.PathLike, data, images_dir=None, split=None, batch_size: int = 4,
                     device: str = "cpu", amp: str = "none", num_workers: int = 0) -> dict:
    """Evaluate saved weights on a dataset; returns evaluate()'s dict."""
    from ..data.dataset import DetectionDataset
    from ..data.transforms import make_transforms
    from .evaluate import evaluate
    from .train import as_index, coco_ground_truth

    model, cfg = load_weights(weights)
    index = as_index(data, images_dir, split)
    if index.no_box_message():
        log.warning("%s; every AP below is -1 (undefined), not a score", index.no_box_message())
    missing = set(index.category_ids) - set(cfg.category_ids)
    if missing:
        log.warning("%s: categories %s are not known to the model (it knows %s)", index.source,
                    sorted(missing), cfg.category_ids)
    dataset = DetectionDataset(index, make_transforms(TrainConfig(), cfg, False), skip_bad=True)
    model.to(device)
    return evaluate(model, dataset, cfg.category_ids, coco_ground_truth(index), batch_size=batch_size,
                    device=torch.device(device), amp=amp, num_workers=num_workers), cfg


def print_coco(metrics: dict) -> None:
    for name, label in zip(COCO_NAMES, COCO_LABELS):
        if name in metrics:
            print(f" {label} = {float(metrics[name]):.3f}")


def print_per_class(metrics: dict, cfg: ModelConfig) -> None:
    per_class = metrics.get("per_class") or metrics.get("per_class_AP")
    if not per_class:
        return
    print(f"\n{'id':>6}  {'class':<24} {'AP':>7}")
    if isinstance(per_class, dict):
        rows = list(per_class.items())
    else:
        rows = [(r.get("name", r.get("category_id")), r.get("AP")) for r in per_class]
    names = dict(zip(cfg.class_names, cfg.category_ids))
    for name, ap in rows:
        cid = names.get(name, "")
        ap_s = "   n/a" if ap is None or (isinstance(ap, float) and ap < 0) else f"{float(ap):7.3f}"
        print(f"{cid!s:>6}  {str(name):<24} {ap_s}")


def eval_command(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from ..data.panoptic import is_panoptic_json

    if is_panoptic_json(args.data):  # PQ/SQ/RQ + mask AP (engine/panoptic_commands.py)
        from .panoptic_commands import eval_panoptic_command

        return eval_panoptic_command(args.weights, args.data, args.device, args.panoptic_threshold, args.out)
    metrics, cfg = evaluate_weights(args.weights, args.data, args.images, args.split, args.batch_size,
                                    args.device, args.amp, args.num_workers)
    print_coco(metrics)
    print_per_class(metrics, cfg)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, default=float))
        print(f"\nwrote {out}")
    return 0


# ---------------------------------------------------------------------------------------- main job
def main_job_command(args: argparse.Namespace) -> int:
    from .main_job import run_main_job

    _set_threads(args.threads)
    if args.panoptic:
        from .panoptic_commands import main_job_panoptic

        return main_job_panoptic(args)
    minutes = 15.0 if args.minutes is None else args.minutes
    summary = run_main_job(args.out, minutes=minutes, preset=args.preset, variant=args.variant,
                           num_train=args.num_train, num_val=args.num_val, sets=args.set)
    print_coco(summary["metrics"])
    print(f"\nmain job: AP {summary['metrics'].get('AP', 0):.3f}  AP50 {summary['metrics'].get('AP50', 0):.3f}  "
          f"in {summary['minutes']:.1f} min  -> {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train DETR on a COCO / YOLO / VOC dataset",
                              description="Train (or resume) a run. Settings: --preset, then --config, "
                                          "then --set key=value, then the flags below.")
    p.add_argument("--data", required=True, help="training annotations (COCO JSON, YOLO or VOC folder)")
    p.add_argument("--val", help="validation annotations (evaluated after each epoch)")
    p.add_argument("--images", help="image folder of --data (COCO JSON only)")
    p.add_argument("--val-images", help="image folder of --val (COCO JSON only)")
    p.add_argument("--split", help="split of --data (e.g. train2017, train)")
    p.add_argument("--val-split", help="split of --val (e.g. val2017, val)")
    p.add_argument("--preset", default="detr-tiny", help="named configuration (default detr-tiny)")
    p.add_argument("--config", help="JSON or YAML file of settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--max-minutes", type=positive_float, help="stop after this long, evaluate and save")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--amp", choices=["none", "bf16"])
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--weights", help="fine-tune from these weights (published name, native, authors' .pth or "
                                     "Hugging Face dir); the class head is re-initialised for the dataset")
    p.add_argument("--keep-class-names", action="store_true",
                   help="with --weights: keep the head rows of classes whose names the checkpoint also has")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.set_defaults(func=train_command)

    e = subparsers.add_parser("eval", help="COCO evaluation of saved weights (PQ + mask AP on COCO panoptic data)")
    e.add_argument("--weights", required=True, help="native weights folder / .safetensors, or a last.pt")
    e.add_argument("--data", required=True, help="annotations (COCO JSON, YOLO or VOC folder)")
    e.add_argument("--images", help="image folder (COCO JSON only)")
    e.add_argument("--split")
    e.add_argument("--batch-size", type=positive_int, default=4)
    e.add_argument("--num-workers", type=non_negative_int, default=0)
    e.add_argument("--amp", choices=["none", "bf16"], default="none")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--panoptic-threshold", type=float, default=0.85,
                   help="panoptic data: queries kept above this score (the paper: 0.85)")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--threads", type=positive_int)
    e.set_defaults(func=eval_command)

    j = subparsers.add_parser("main-job", help="synthetic data -> train detr-tiny on CPU -> evaluate -> figures")
    j.add_argument("--out", default="runs/main", help="run folder (default runs/main)")
    j.add_argument("--minutes", type=positive_float, default=None,
                   help="total time budget (default 15; 20 with --panoptic)")
    j.add_argument("--panoptic", action="store_true",
                   help="the panoptic job: synthetic things + stuff, detector then mask head, PQ (give --out)")
    j.add_argument("--preset", default="detr-tiny")
    j.add_argument("--variant", default=None, help="synthetic dataset variant (default: the generator's)")
    j.add_argument("--num-train", type=positive_int, default=None)
    j.add_argument("--num-val", type=positive_int, default=None)
    j.add_argument("--set", action="append", metavar="KEY=VALUE")
    j.add_argument("--threads", type=positive_int)
    j.set_defaults(func=main_job_command)
