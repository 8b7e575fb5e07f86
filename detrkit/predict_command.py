"""`detrkit predict`: detect objects in image files, folders and globs.

Writes annotated copies (boxes, class names, scores) and/or a COCO-results JSON (bbox xywh in pixels
of the upright original image, the dataset's own category ids). The work is `predict.predict_files`.
"""
from __future__ import annotations

import argparse
import json
import logging

from .argtypes import count_or_model, overlap_or_none, positive_int, probability
from .device import WEIGHTS_HELP, add_device_argument, add_precision_argument

log = logging.getLogger(__name__)


def run_predict(args: argparse.Namespace) -> int:
    from .atomic import write_atomic
    from .data.images import find_images
    from .detector import Detector
    from .predict import predict_files

    if args.out is None and args.json is None:
        log.error("nothing to write: give --out DIR (annotated images) and/or --json FILE (COCO results)")
        return 2
    paths, problems = find_images(args.images, recursive=args.recursive)
    for p in problems:
        log.error(p)
    if not paths:
        log.error("no images to process")
        return 2
    detector = Detector.from_pretrained(args.weights, device=args.device, precision=args.precision)
    if args.duplicate_iou != "model":
        detector.config.duplicate_iou = args.duplicate_iou
    if args.classes_per_query != "model":
        detector.config.classes_per_query = args.classes_per_query
    if args.task == "panoptic":  # overlays, PNG segment maps, segments_info (engine/panoptic_commands.py)
        from .engine.panoptic_commands import predict_panoptic_files

        if args.out is None:
            log.error("--task panoptic writes images: give --out DIR")
            return 2
        threshold = detector.config.panoptic_threshold if args.threshold is None else args.threshold
        done, failed = predict_panoptic_files(detector, paths, args.out, threshold, progress=not args.no_progress)
        print(f"{done} image(s) segmented (queries above {threshold:g}); overlays in {args.out}, segment PNGs "
              f"in {args.out}/panoptic, segments_info in {args.out}/panoptic.json")
        for name, reason in failed:
            print(f"  skipped {name}: {reason}")
        return 0 if done else 1
    if args.threshold is None:
        args.threshold = 0.5
    summary = predict_files(detector, paths, out_dir=args.out, threshold=args.threshold, top_k=args.top_k,
                            batch_size=args.batch_size, progress=not args.no_progress)
    if args.json is not None:
        write_atomic(args.json, json.dumps(summary.records, indent=1))
    print(f"{summary.processed} image(s), {summary.detections} detection(s) above {args.threshold:g}"
          + (f"; annotated images in {args.out}" if args.out else "")
          + (f"; COCO results in {args.json}" if args.json else ""))
    if summary.failed:
        print(f"{len(summary.failed)} file(s) skipped:")
        for name, reason in summary.failed:
            print(f"  {name}: {reason}")
    return 0 if summary.processed else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="detect objects in images; write annotated images and/or COCO-results JSON",
        description="Detect objects in image files, folders and glob patterns (quote globs). "
                    "Boxes are in pixels of the upright (EXIF-applied) original image.")
    p.add_argument("images", nargs="+", help="image files, folders, or glob patterns such as 'photos/**/*.jpg'")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--out", help="folder to write the images with their boxes drawn into")
    p.add_argument("--json", help="COCO-results JSON file (image_id, file_name, category_id, bbox xywh, score)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="minimum score (default 0.5; with --task panoptic the model's own: the paper's 0.85 unless "
                        "chosen on held-out images when it was trained)")
    p.add_argument("--top-k", type=positive_int, default=None, help="keep at most K detections per image")
    p.add_argument("--duplicate-iou", type=overlap_or_none, default="model", metavar="IOU|none|model",
                   help="drop a box overlapping a higher-scoring box of its class by more than this IoU; none keeps "
                        "every box (the paper's post-processing); model (default): the weights' own setting")
    p.add_argument("--classes-per-query", type=count_or_model, default="model", metavar="K|model",
                   help="each query's K best classes, each a detection with its own probability; 1: each query's best "
                        "class (the paper's post-processing); model (default): the weights' own setting")
    p.add_argument("--task", choices=["detection", "panoptic"], default="detection",
                   help="panoptic (weights with a mask head): a colour overlay, a PNG segment map and "
                        "segments_info (COCO panoptic) per image")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (results do not depend on it)")
    add_device_argument(p)
    add_precision_argument(p, "auto",
                           "inference (auto: bf16 where it is fast, CPUs with AMX or AVX-512 bf16, recent GPUs)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)
