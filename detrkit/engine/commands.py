"""`detrkit train`, `detrkit eval` and `detrkit main-job`: parse the arguments, call the library, print.

Settings: --preset, then --config, then --set key=value, then the dedicated flags (config.build_configs).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from ..argtypes import count_or_model, non_negative_int, overlap_or_none, positive_float, positive_int, probability
from ..config import DEFAULT_PRESET, build_configs
from ..device import WEIGHTS_HELP, add_device_argument, add_precision_argument, amp_of

if TYPE_CHECKING:
    from ..config import ModelConfig

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


# ------------------------------------------------------------------------------------------- train
def train_command(args: argparse.Namespace) -> int:
    from .train import train

    _set_threads(args.threads)
    model_cfg, train_cfg = build_configs(
        args.preset, args.config, args.set, epochs=args.epochs, max_minutes=args.max_minutes,
        max_steps=args.max_steps, batch_size=args.batch_size,
        amp=None if args.precision == "auto" else amp_of(args.precision, args.device),
        backbone_weights=args.backbone_weights,
    )
    result = train(model_cfg, train_cfg, args.data, args.val, args.out, device=args.device, resume=args.resume,
                   images_dir=args.images, val_images_dir=args.val_images, split=args.split,
                   val_split=args.val_split, init_weights=args.weights, keep_class_names=args.keep_class_names,
                   val_fraction=args.val_fraction, plots=not args.no_plots)
    if result.status == "nothing_to_do":
        print(f"nothing to do: {result.run_dir} has already trained {result.step} steps, all its epochs and "
              f"--max-steps allow; raise --epochs or --max-steps to train further")
        return 0
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; continue with: detrkit train ... --out {result.run_dir} --resume")
        return 0
    if result.metrics:
        print_coco(result.metrics)
    best = result.run_dir / "best"
    print(f"run folder: {result.run_dir}  (weights: {result.run_dir / 'final'}"
          f"{f', best: {best}' if best.exists() else ''}; --weights {result.run_dir} takes the best)")
    if result.bad_samples:
        print(f"{result.bad_samples} bad samples skipped, listed in {result.run_dir / 'bad_samples.jsonl'}")
    if result.stop_reason:
        print(result.stop_reason)
    if result.diagnosis and not result.diagnosis.get("ok", True):
        print(result.diagnosis["text"])
    return 0


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # several CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# -------------------------------------------------------------------------------------------- eval
def print_coco(metrics: dict) -> None:
    from .evaluate import STAT_NAMES

    for name, label in zip(STAT_NAMES, COCO_LABELS):
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
    from ..atomic import write_atomic
    from .evaluate import evaluate_weights

    _set_threads(args.threads)
    from ..data.panoptic import is_panoptic_json

    if is_panoptic_json(args.data):  # PQ/SQ/RQ + mask AP (engine/panoptic_commands.py)
        from .panoptic_commands import eval_panoptic_command

        return eval_panoptic_command(args.weights, args.data, args.device, args.panoptic_threshold, args.out)
    holder: list = []
    metrics, cfg = evaluate_weights(args.weights, args.data, args.images, args.split, args.batch_size,
                                    args.device, amp_of(args.precision, args.device), args.num_workers,
                                    results_path=args.results, evaluator_out=holder,
                                    duplicate_iou=args.duplicate_iou, classes_per_query=args.classes_per_query)
    print_coco(metrics)
    print_per_class(metrics, cfg)
    if args.out:
        write_atomic(args.out, json.dumps(metrics, indent=2, default=float))
        print(f"\nwrote {args.out}")
    if args.results:
        print(f"wrote {args.results}")
    if args.plots and holder:
        from ..viz.plots import write_eval_plots
        from .run_data import as_index

        written = write_eval_plots(holder[0], args.plots, cfg.class_names, cfg.category_ids,
                                   index=as_index(args.data, args.images, args.split))
        print(f"plots in {args.plots}: {', '.join(p.name for p in written)}")
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


def _fraction(text: str) -> float:
    """--val-fraction: a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train DETR on a COCO / YOLO / VOC dataset",
                              description="Train (or resume) a run. Settings: --preset, then --config, "
                                          "then --set key=value, then the flags below. --max-minutes covers every "
                                          "phase (data check, backbone pretraining, feature cache, training, "
                                          "evaluation); the run prints its plan first.")
    p.add_argument("--data", required=True, help="training annotations: COCO JSON, YOLO or Pascal VOC folder")
    p.add_argument("--val", help="validation annotations (default: the dataset's val split, else --val-fraction "
                                 "of --data held out)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="without --val and without a val split: the seeded share of the images held out for "
                        "validation, written to OUT/split.json and OUT/val.json (0: no validation)")
    p.add_argument("--images", help="image folder of --data (COCO JSON only)")
    p.add_argument("--val-images", help="image folder of --val (COCO JSON only)")
    p.add_argument("--split", help="split of --data (e.g. train2017, train)")
    p.add_argument("--val-split", help="split of --val (e.g. val2017, val)")
    p.add_argument("--preset", default=None,
                   help=f"named configuration (default: the config file's preset, else {DEFAULT_PRESET})")
    p.add_argument("--config", help="JSON or YAML file of settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--out", required=True,
                   help="run folder; if it holds another run, this one goes to OUT-2 (OUT-3, ...) unless --resume")
    p.add_argument("--epochs", type=positive_int, help="epochs (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int,
                   help="DETR optimizer steps at most; also caps the backbone pretraining steps (default: none)")
    p.add_argument("--max-minutes", type=positive_float,
                   help="time budget for the whole run, every phase included; then evaluate and save "
                        "(default: none)")
    p.add_argument("--batch-size", type=positive_int, help="images per step (default: the preset's)")
    add_precision_argument(p, "auto", "training compute (auto: the preset's; evaluation is always float32)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pt")
    p.add_argument("--weights", help="fine-tune from these weights, the class head re-initialised for the dataset: "
                                     + WEIGHTS_HELP)
    p.add_argument("--backbone-weights", metavar="imagenet|none|PATH",
                   help="the backbone's start: torchvision's ImageNet weights (downloaded once into torch hub's "
                        "cache, hash-checked), none, or a ResNet state dict file (default: the preset's)")
    p.add_argument("--keep-class-names", action="store_true",
                   help="with --weights: keep the head rows of classes whose names the checkpoint also has")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the plots at the end (PR curves, confusion matrix, predictions, labels, results.csv)")
    add_device_argument(p)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=train_command)

    e = subparsers.add_parser("eval", help="COCO evaluation of saved weights (PQ + mask AP on COCO panoptic data)")
    e.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    e.add_argument("--data", required=True, help="annotations: COCO JSON, YOLO or Pascal VOC folder (a run's "
                                                 "held-out split: RUN/val.json)")
    e.add_argument("--images", help="image folder (COCO JSON only)")
    e.add_argument("--split", help="split of --data (e.g. val)")
    e.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (results do not depend on it)")
    e.add_argument("--num-workers", type=non_negative_int, default=0, help="image loading processes")
    add_precision_argument(e, "float32", "inference")
    e.add_argument("--out", help="write the metrics as JSON to this file")
    e.add_argument("--results", help="write the detections as COCO results JSON (with class names) to this file")
    e.add_argument("--plots", metavar="DIR", help="write PR curves, confusion matrix, prediction mosaic and label "
                                                  "statistics into this folder")
    e.add_argument("--panoptic-threshold", type=probability, default=None,
                   help="panoptic data: queries kept above this score (default: the model's own, the paper's 0.85 "
                        "unless chosen on held-out images when it was trained)")
    e.add_argument("--duplicate-iou", type=overlap_or_none, default="model", metavar="IOU|none|model",
                   help="drop a box overlapping a higher-scoring box of its class by more than this IoU; none keeps "
                        "every box (the paper's post-processing); model (default): the weights' own setting")
    e.add_argument("--classes-per-query", type=count_or_model, default="model", metavar="K|model",
                   help="each query's K best classes, each a detection with its own probability; 1: each query's best "
                        "class (the paper's post-processing); model (default): the weights' own setting")
    add_device_argument(e)
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    e.set_defaults(func=eval_command)

    j = subparsers.add_parser("main-job", help="synthetic data -> train detr-tiny on CPU -> evaluate -> figures")
    j.add_argument("--out", default="runs/main", help="run folder")
    j.add_argument("--minutes", type=positive_float, default=None,
                   help="total time budget (default 15; 20 with --panoptic)")
    j.add_argument("--panoptic", action="store_true",
                   help="the panoptic job: synthetic things + stuff, detector then mask head, PQ (give --out)")
    j.add_argument("--preset", default=DEFAULT_PRESET, help="named configuration")
    j.add_argument("--variant", default=None, help="synthetic dataset variant (default: the generator's)")
    j.add_argument("--num-train", type=positive_int, default=None, help="training images (default: the job's)")
    j.add_argument("--num-val", type=positive_int, default=None, help="validation images (default: the job's)")
    j.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    j.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    j.set_defaults(func=main_job_command)
