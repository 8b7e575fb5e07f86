"""`detrkit viz queries | attention | curves`: the figures, from the command line."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..argtypes import positive_int, probability
from ..device import add_device_argument

log = logging.getLogger(__name__)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad slot ids {text!r}: expected comma-separated integers like 1,5,9") from None
    if not ids:
        raise argparse.ArgumentTypeError("no slot ids given")
    return ids


def run_queries(args: argparse.Namespace) -> int:
    from ..data.formats import dataset_images
    from ..detector import Detector
    from .queries import collect_slot_predictions, save_query_figures

    files = dataset_images(args.data, args.images, args.split)
    if args.max_images:
        files = files[: args.max_images]
    if not files:
        log.error("%s: no images", args.data)
        return 2
    detector = Detector.from_pretrained(args.weights, device=args.device)
    preds = collect_slot_predictions(detector, files, batch_size=args.batch_size)
    paths = save_query_figures(preds, args.out, args.slot_ids, n=args.slots, threshold=args.threshold,
                               small_area=args.small_area, min_score=args.min_score)
    for what, p in paths.items():
        print(f"{what}: {p}")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from ..detector import Detector
    from .attention import compute_attention, parse_points, plot_attention

    points = parse_points(args.points) if args.points else None
    detector = Detector.from_pretrained(args.weights, device=args.device)
    result = compute_attention(detector, args.image, threshold=args.threshold, max_detections=args.max_detections)
    if len(result.slots) == 0:
        log.warning("%s: no detection scores above %g; the figure shows encoder attention only",
                    args.image, args.threshold)
    fig = plot_attention(result, points, max_detections=args.max_detections)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"{len(result.slots)} detection(s) above {args.threshold:g}; figure: {args.out}")
    return 0


def run_masks(args: argparse.Namespace) -> int:
    from ..data.images import load_image
    from ..engine.panoptic import load_panoptic_model
    from .panoptic import plot_mask_attention

    model, cfg = load_panoptic_model(args.weights)
    fig, k = plot_mask_attention(model, cfg, load_image(args.image), threshold=args.threshold,
                                 max_detections=args.max_detections, device=args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"{k} detection(s) above {args.threshold:g}; figure: {args.out}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    from .curves import plot_training_curves

    fig = plot_training_curves(args.run_dir, title=args.title or Path(args.run_dir).name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"figure: {args.out}")
    return 0


def _image_figure_parser(sub, name: str, help_text: str, weights_help: str, example: str, threshold: float,
                         dpi: int) -> argparse.ArgumentParser:
    """A figure of one image's detections: image, --weights, --out, --threshold, --max-detections,
    --device, --dpi."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("image", help="an image file")
    p.add_argument("--weights", required=True, help=weights_help)
    p.add_argument("--out", required=True, help=f"figure file, e.g. {example}")
    p.add_argument("--threshold", type=probability, default=threshold, help="detections scoring above this are shown")
    p.add_argument("--max-detections", type=positive_int, default=6)
    add_device_argument(p)
    p.add_argument("--dpi", type=positive_int, default=dpi)
    return p


def register(subparsers) -> None:
    viz = subparsers.add_parser("viz", help="figures: query slots, attention maps, training curves")
    sub = viz.add_subparsers(dest="viz_command", required=True)

    q = sub.add_parser("queries", help="box centres predicted by each query slot over a dataset (paper Fig. 7)",
                       description="Writes FIG.png, FIG.json (the numbers), FIG_usage.png and FIG_usage.json "
                                   "(how often each slot fires, per class).")
    q.add_argument("--weights", required=True, help="model weights (as for predict)")
    q.add_argument("--data", required=True, help="dataset (COCO JSON / folder, YOLO, VOC) or a folder of images")
    q.add_argument("--images", help="COCO image folder when not beside the JSON")
    q.add_argument("--split", help="dataset split (e.g. val2017)")
    q.add_argument("--out", required=True, help="figure file, e.g. queries.png")
    pick = q.add_mutually_exclusive_group()
    pick.add_argument("--slots", type=positive_int, default=20, help="show the N most used slots (default 20)")
    pick.add_argument("--slot-ids", type=_parse_ids, help="show these slots (0-based), e.g. 1,5,9")
    q.add_argument("--threshold", type=probability, default=0.5, help="a slot 'fires' when its score is above this")
    q.add_argument("--small-area", type=probability, default=0.1,
                   help="boxes covering less than this fraction of the image are 'small' (default 0.1)")
    q.add_argument("--min-score", type=probability, default=None,
                   help="plot only boxes scoring above this (default: every image's box, as in the paper)")
    q.add_argument("--max-images", type=positive_int, default=None, help="use at most N images")
    q.add_argument("--batch-size", type=positive_int, default=4)
    add_device_argument(q)
    q.set_defaults(func=run_queries)

    a = _image_figure_parser(sub, "attention", "decoder attention per detection and encoder attention per point",
                             "model weights (as for predict)", "attention.png", threshold=0.5, dpi=130)
    a.add_argument("--points", help="encoder reference points 'x,y;x,y' in image pixels "
                                    "(default: centres of the detections)")
    a.set_defaults(func=run_attention)

    m = _image_figure_parser(sub, "masks", "per detection: the mask head's attention map of each head and the "
                             "final mask", "panoptic weights (with a mask head)", "masks.png", threshold=0.7, dpi=110)
    m.set_defaults(func=run_masks)

    c = sub.add_parser("curves", help="loss terms and AP over training from RUN_DIR/metrics.jsonl")
    c.add_argument("run_dir", help="a run folder holding metrics.jsonl (or the file itself)")
    c.add_argument("--out", required=True, help="figure file, e.g. curves.png")
    c.add_argument("--title", help="figure title (default: the run folder's name)")
    c.add_argument("--dpi", type=positive_int, default=130)
    c.set_defaults(func=run_curves)
