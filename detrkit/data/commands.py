"""`detrkit data ...` commands.

`register(sub)` creates the `data` parser and its own subparsers; every function in `DATA_COMMANDS`
is then called with that subparsers object to add one subcommand (synth here; check and convert
add themselves to the list).
"""
from __future__ import annotations

import argparse
from typing import Callable

from .synthetic import VARIANTS


def _run_synth(args: argparse.Namespace) -> int:
    from .coco import load_coco
    from .synthetic import DEFAULTS, make_synthetic

    default = DEFAULTS[args.variant].image_size
    lo, hi = args.min_side or default[0], args.max_side or default[1]
    if not 16 <= lo <= hi:
        print(f"error: need 16 <= --min-side <= --max-side, got {lo}, {hi}")
        return 2
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
    p.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="shapes",
                   help="shapes: 5 classes, ids 1-5; other: 3 different shapes, ids 3, 17, 90; hard: 4 classes, "
                        "1-9 objects of 10-120 px, random colours (either brighter), distractor lines")
    p.add_argument("--min-side", type=int, default=None, help="smallest image side in pixels (default: "
                   "192, hard: 224)")
    p.add_argument("--max-side", type=int, default=None, help="largest image side in pixels (default 320)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
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
