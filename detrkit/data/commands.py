"""`detrkit data ...` commands.

`register(sub)` creates the `data` parser and its own subparsers; every function in `DATA_COMMANDS`
is then called with that subparsers object to add one subcommand (synth, check, convert).
"""
from __future__ import annotations

import argparse
from typing import Callable

from ..argtypes import non_negative_int, positive_int
from ..config import DEFAULT_PRESET, PRESETS
from .synthetic import VARIANTS


def _run_synth(args: argparse.Namespace) -> int:
    from .coco import load_coco
    from .synthetic import DEFAULTS, make_synthetic

    default = DEFAULTS[args.variant].image_size
    lo, hi = args.min_side or default[0], args.max_side or default[1]
    if not 16 <= lo <= hi:
        print(f"error: need 16 <= --min-side <= --max-side, got {lo}, {hi}")
        return 2
    if args.panoptic:
        from .panoptic import load_panoptic
        from .synthetic_panoptic import make_synthetic_panoptic

        path = make_synthetic_panoptic(args.out_dir, num_images=args.images, seed=args.seed, image_size=(lo, hi),
                                       image_format=args.format)
        index = load_panoptic(path)
        n = sum(len(r.segments) for r in index.records)
        print(f"wrote {len(index.records)} images, {n} segments, things: "
              f"{', '.join(name for _, name, t in index.categories if t)}; stuff: "
              f"{', '.join(name for _, name, t in index.categories if not t)} to {path.parent}")
        print(f"panoptic: {path} (+ {path.parent / 'panoptic'}/*.png); boxes and masks: "
              f"{path.parent / 'annotations.json'}")
        return 0
    path = make_synthetic(args.out_dir, num_images=args.images, seed=args.seed, variant=args.variant,
                          image_size=(lo, hi), image_format=args.format)
    index = load_coco(path)
    print(f"wrote {len(index.images)} images, {len(index.annotations)} boxes, "
          f"{len(index.categories)} classes ({', '.join(index.class_names)}) to {path.parent}")
    print(f"annotations: {path}")
    return 0


def add_synth_command(data_sub) -> None:
    p = data_sub.add_parser("synth", help="write a synthetic shapes dataset (COCO JSON + images)")
    p.add_argument("out_dir", help="output folder: OUT_DIR/annotations.json and OUT_DIR/images/")
    p.add_argument("--images", type=positive_int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="shapes",
                   help="shapes: 5 classes, ids 1-5; other: 3 different shapes, ids 3, 17, 90; hard: 4 classes, "
                        "1-9 objects of 10-120 px, random colours (either brighter), distractor lines")
    p.add_argument("--min-side", type=positive_int, default=None, help="smallest image side in pixels (default: "
                   "192, hard: 224)")
    p.add_argument("--max-side", type=positive_int, default=None, help="largest image side in pixels (default 320)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
    p.add_argument("--panoptic", action="store_true",
                   help="a panoptic set instead: stuff regions (sky, ground, stripes) under thing shapes; "
                        "COCO panoptic (panoptic.json + PNGs) and instances with masks (annotations.json)")
    p.set_defaults(func=_run_synth)


def _dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="COCO .json (instances, or panoptic for check), YOLO data.yaml or folder, "
                                "or Pascal VOC folder")
    p.add_argument("--split", default=None, help="dataset split (train, val, ...); default: all")
    p.add_argument("--images", default=None, help="image folder (COCO only, when not beside the JSON)")


def _run_check(args: argparse.Namespace) -> int:
    from .check import check_dataset

    report = check_dataset(args.path, split=args.split, images_dir=args.images, decode_images=not args.no_decode)
    if report.index is not None:
        report.preset, report.training = args.preset, _training_warnings(report.index, args)
    print(report.format(max_problems=args.max_problems))
    return 0 if report.ok else 1


def _training_warnings(index, args: argparse.Namespace) -> list[str]:
    """The warnings `detrkit train --preset ... --set ...` would give at its start on this data."""
    from ..config import build_configs
    from ..engine.preflight import dataset_warnings

    model_cfg, train_cfg = build_configs(args.preset, None, args.set)
    return dataset_warnings(index, model_cfg, train_cfg)


def add_check_command(data_sub) -> None:
    p = data_sub.add_parser("check", help="check a dataset (COCO / YOLO / Pascal VOC) for problems",
                            description="Check annotations and images; exit status 1 when errors are found.")
    _dataset_arguments(p)
    p.add_argument("--no-decode", action="store_true", help="read image headers only (faster; misses truncation)")
    p.add_argument("--max-problems", type=non_negative_int, default=20, help="list at most this many errors and warnings each")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="also list what training this preset on the data would warn about (too few queries, "
                        "objects below a feature cell, warmup longer than the run, classes without boxes)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a preset setting to check with, as for train (e.g. model.num_queries=40)")
    p.set_defaults(func=_run_check)


def _run_convert(args: argparse.Namespace) -> int:
    from .formats import convert

    try:
        index = convert(args.path, args.out, split=args.split, images_dir=args.images)
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 1
    errors = [p for p in index.problems if p.severity == "error"]
    print(f"wrote {args.out}: {len(index.images)} images, {len(index.annotations)} boxes, "
          f"{len(index.categories)} categories")
    if errors:
        print(f"{len(errors)} error(s) in the source; the offending entries were left out "
              f"(run `detrkit data check {args.path}` for details)")
    return 0


def add_convert_command(data_sub) -> None:
    p = data_sub.add_parser("convert", help="convert a YOLO / Pascal VOC / COCO dataset to COCO JSON",
                            description="Convert a dataset (format detected from PATH) to COCO JSON.")
    _dataset_arguments(p)
    p.add_argument("--out", required=True, help="COCO JSON file to write")
    p.set_defaults(func=_run_convert)


# each adds one `detrkit data <name>` subcommand to the data subparsers
DATA_COMMANDS: list[Callable] = [add_synth_command, add_check_command, add_convert_command]


def register(sub) -> None:
    data = sub.add_parser("data", help="datasets: synthesise, check, convert")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for add in DATA_COMMANDS:
        add(data_sub)
