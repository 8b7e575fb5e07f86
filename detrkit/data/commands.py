"""`detrkit data ...` commands.

`register(sub)` creates the `data` parser and its own subparsers; every function in `DATA_COMMANDS`
is then called with that subparsers object to add one subcommand (synth here; check and convert
add themselves to the list).
"""
from __future__ import annotations

import argparse
from typing import Callable

from ..argtypes import non_negative_int, positive_int
from .synthetic import VARIANTS


def _run_synth(args: argparse.Namespace) -> int:
    from .coco import load_coco
    from .synthetic import make_synthetic

    lo, hi = args.min_side, args.max_side
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
                   help="shapes: 5 classes, ids 1-5; other: 3 different shapes, ids 3, 17, 90")
    p.add_argument("--min-side", type=positive_int, default=192, help="smallest image side in pixels")
    p.add_argument("--max-side", type=positive_int, default=320, help="largest image side in pixels")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
    p.add_argument("--panoptic", action="store_true",
                   help="a panoptic set instead: stuff regions (sky, ground, stripes) under thing shapes; "
                        "COCO panoptic (panoptic.json + PNGs) and instances with masks (annotations.json)")
    p.set_defaults(func=_run_synth)


def add_check_command(data_sub) -> None:
    from .check import add_check_parser
    add_check_parser(data_sub)


def add_convert_command(data_sub) -> None:
    from .formats import add_convert_parser
    add_convert_parser(data_sub)


# each adds one `detrkit data <name>` subcommand to the data subparsers
DATA_COMMANDS: list[Callable] = [add_synth_command, add_check_command, add_convert_command]


def register(sub) -> None:
    data = sub.add_parser("data", help="datasets: synthesise, check, convert")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for add in DATA_COMMANDS:
        add(data_sub)
