"""Command-line pieces of the panoptic task: parse and print; the work is in engine/panoptic.py.

`detrkit train-masks` (the paper's second stage, or joint training), the panoptic branch of
`detrkit eval` (PQ/SQ/RQ + mask AP when the data is a COCO panoptic JSON), `detrkit predict --task
panoptic` (overlay, PNG segment map and segments_info JSON per image) and `detrkit main-job --panoptic`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from ..argtypes import non_negative_int, positive_float, positive_int
from ..device import add_device_argument

log = logging.getLogger(__name__)


def print_pq(metrics: dict) -> None:
    """PQ/SQ/RQ (percent) for all, things, stuff, then per class; mask AP when present."""
    print(f"{'':<16}{'PQ':>7}{'SQ':>7}{'RQ':>7}")
    for label, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        print(f"{label:<16}" + "".join(f"{100 * metrics[k + suffix]:7.1f}" for k in ("PQ", "SQ", "RQ")))
    for name, s in (metrics.get("per_class_PQ") or {}).items():
        print(f"  {name[:14]:<14}{100 * s['pq']:7.1f}{100 * s['sq']:7.1f}{100 * s['rq']:7.1f}"
              f"   tp {s['tp']} fp {s['fp']} fn {s['fn']}")
    if "mask_AP" in metrics:
        print(f"mask AP {metrics['mask_AP']:.3f}  AP50 {metrics['mask_AP50']:.3f}  AP75 {metrics['mask_AP75']:.3f}")
    print(f"(panoptic threshold {metrics.get('panoptic_threshold', 0.85):g}, {metrics.get('images')} images)")
    if "at_paper_threshold" in metrics:
        m = metrics["at_paper_threshold"]
        print(f"at the paper's threshold 0.85: PQ {100 * m['PQ']:.1f} (things {100 * m['PQ_th']:.1f}, "
              f"stuff {100 * m['PQ_st']:.1f})")


def eval_panoptic_command(weights: str, data: str, device: str = "cpu", threshold: float | None = None,
                          out: str | None = None) -> int:
    from .panoptic import evaluate_panoptic, load_panoptic_model

    model, cfg = load_panoptic_model(weights)
    if not cfg.stuff_category_ids:
        from ..data.panoptic import load_panoptic

        cfg.stuff_category_ids = sorted(load_panoptic(data).stuff_ids)
    metrics = evaluate_panoptic(model, cfg, data, device=device, threshold=threshold)
    print_pq(metrics)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2, default=float))
        print(f"\nwrote {out}")
    return 0


def predict_panoptic_files(detector, paths: Sequence[Path], out_dir: str | Path, threshold: float | None = None,
                           progress: bool = True) -> tuple[int, list[tuple[str, str]]]:
    """Per image: OUT/<stem>.png (colour overlay), OUT/panoptic/<stem>.png (segment ids, COCO panoptic
    RGB encoding); OUT/panoptic.json holds every image's segments_info (COCO panoptic format)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from ..data.images import load_image
    from ..predict import image_ids_for
    from ..viz.panoptic import draw_panoptic

    out = Path(out_dir)
    (out / "panoptic").mkdir(parents=True, exist_ok=True)
    ids = image_ids_for(paths)
    anns, images, failed = [], [], []
    for i, path in enumerate(tqdm(paths, desc="panoptic", unit="img", disable=not progress)):
        try:
            image = load_image(path)
        except Exception as e:  # one bad file must not stop the run
            reason = getattr(e, "problem", None) or str(e)
            log.error("skipping %s: %s", path, reason)
            failed.append((str(path), reason))
            continue
        [res] = detector.predict(image, task="panoptic", panoptic_threshold=threshold)
        stem = Path(path).stem if not (out / f"{Path(path).stem}.png").exists() else f"{Path(path).stem}_{i}"
        draw_panoptic(image, res, category_ids=list(detector.config.category_ids)).save(out / f"{stem}.png")
        Image.fromarray(res.to_rgb()).save(out / "panoptic" / f"{stem}.png")
        images.append({"id": ids[i], "file_name": str(path), "width": image.width, "height": image.height})
        anns.append({"image_id": ids[i], "file_name": f"{stem}.png", "segments_info": res.segments})
    cats = [{"id": c, "name": n, "isthing": int(c not in detector.config.stuff_category_ids)}
            for c, n in zip(detector.config.category_ids, detector.config.class_names) if n != "N/A"]
    (out / "panoptic.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return len(images), failed


def train_masks_command(args: argparse.Namespace) -> int:
    from .panoptic import train_mask_head

    res = train_mask_head(args.frozen_weights, args.data, args.val, args.out, joint=args.joint, lr=args.lr,
                          batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                          max_minutes=args.max_minutes, device=args.device, cache_views=args.cache_views,
                          calib_json=args.calibrate)
    print(f"{res.steps} steps in {res.seconds / 60:.1f} min; panoptic weights in {Path(args.out) / 'final'}")
    if res.metrics:
        print_pq(res.metrics)
    return 0


def add_train_masks_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-masks", help="panoptic: train the mask head on a frozen box detector (the paper's 2nd stage)",
        description="The paper's two stages: first `detrkit train` the box detector on the panoptic set's boxes "
                    "(things and stuff; e.g. the annotations.json that `data synth --panoptic` writes), then this "
                    "trains the mask head with the detector frozen. --joint trains both together instead.")
    p.add_argument("--data", required=True, help="COCO panoptic JSON of the training set (PNGs in <json stem>/)")
    p.add_argument("--val", help="COCO panoptic JSON of the validation set (PQ at the end)")
    p.add_argument("--calibrate", metavar="JSON",
                   help="COCO panoptic JSON of held-out images (neither --data nor --val): the keep threshold that "
                        "gives the best PQ there is stored with the weights (default: the paper's 0.85)")
    p.add_argument("--frozen-weights", required=True,
                   help="the box detector (run dir / weights); or panoptic weights to continue")
    p.add_argument("--out", required=True, help="run folder: final/ (panoptic weights), metrics.json")
    p.add_argument("--joint", action="store_true", help="train detector and mask head together (not frozen)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="default 1e-4 (the paper)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per step")
    p.add_argument("--epochs", type=positive_int, default=25, help="default 25 (the paper)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps at most (default: none)")
    p.add_argument("--max-minutes", type=positive_float, help="time budget (default: none)")
    # 35% is panoptic.CACHE_SHARE, not imported here: --help loads no torch (a test checks they agree)
    p.add_argument("--cache-views", type=non_negative_int, default=0,
                   help="run the frozen detector once on this many augmented views of each training image and "
                        "train the head on its stored outputs: steps several times faster, augmentation limited to "
                        "these views. Memory grows with views x images x image size (~1 MB an image at 144x192 "
                        "with ResNet-18): for small images. Caching takes at most 35%% of --max-minutes "
                        "(fewer views if more would not fit). "
                        "0: the detector runs on every step. Not with --joint (default: %(default)s)")
    add_device_argument(p)
    p.set_defaults(func=train_masks_command)
    return p


def register(subparsers) -> None:
    """`detrkit train-masks`; eval, predict and main-job take their panoptic options in their own modules."""
    add_train_masks_parser(subparsers)


def main_job_panoptic(args: argparse.Namespace) -> int:
    """`detrkit main-job --panoptic`: the synthetic panoptic set, the two stages, PQ."""
    from .panoptic_main_job import run_panoptic_main_job

    summary = run_panoptic_main_job(args.out, minutes=args.minutes if args.minutes is not None else 20.0,
                                    num_train=args.num_train, num_val=args.num_val, sets=args.set)
    import json as _json

    metrics = _json.loads((Path(args.out) / "metrics.json").read_text())
    print_pq(metrics)
    print(f"\npanoptic main job: PQ {summary['PQ']:.3f} (things {summary['PQ_th']:.3f}, stuff {summary['PQ_st']:.3f}) "
          f"in {summary['minutes']:.1f} min -> {args.out}")
    return 0
