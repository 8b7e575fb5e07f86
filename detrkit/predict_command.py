"""`detrkit predict`: detect objects in image files, folders and globs.

Writes annotated copies (boxes, class names, scores) and/or a COCO-results JSON (bbox xywh in pixels
of the upright original image, the dataset's own category ids). An unreadable file is reported by
name and skipped; the others are still processed.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from .argtypes import positive_int, probability

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})
_GLOB_CHARS = set("*?[")


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their image files, sorted) and glob patterns.

    -> (image paths in order, without duplicates; problems: inputs that matched nothing or do not exist).
    A file named explicitly is kept whatever its suffix (the loader decides whether it is an image).
    """
    found: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{text}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in files:
                add(p)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                problems.append(f"{text}: pattern matches no image files")
            for p in files:
                add(p)
        else:
            problems.append(f"{text}: no such file or folder")
    return found, problems


def image_ids_for(paths: Sequence[Path]) -> list[int]:
    """COCO image ids: the file stems when all are distinct integers (COCO's 000000000139.jpg -> 139),
    otherwise 1, 2, 3... in order."""
    stems = [p.stem for p in paths]
    if stems and all(s.isdigit() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(paths) + 1))


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct output file name per input: the stem, with .jpg for JPEG inputs and .png otherwise
    (lossless, and any mode saves); clashes get _2, _3..."""
    names, used = [], set()
    for p in paths:
        suffix = ".jpg" if p.suffix.lower() in (".jpg", ".jpeg", ".jfif") else ".png"
        name, k = p.stem + suffix, 2
        while name.lower() in used:
            name, k = f"{p.stem}_{k}{suffix}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


@dataclass
class PredictSummary:
    processed: int
    failed: list[tuple[str, str]]  # (file, reason)
    detections: int
    records: list[dict[str, Any]]


def predict_files(detector: Any, paths: Sequence[Path], *, out_dir: str | Path | None = None,
                  threshold: float = 0.5, top_k: int | None = None, batch_size: int = 4,
                  progress: bool = True) -> PredictSummary:
    """Detect objects in `paths`; draw them into `out_dir` (if given); return the COCO result records.

    Each record: image_id, file_name, category_id (the dataset's id), bbox [x, y, w, h] pixels of the
    upright original, score. Files that fail to load are logged and listed in `failed`.
    """
    from .data.images import load_image
    from .viz.draw import draw_detections

    paths = [Path(p) for p in paths]
    ids = image_ids_for(paths)
    names = output_names(paths)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    processed = detections = 0
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            batch = []  # (index, image)
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append((i, load_image(paths[i])))
                except Exception as e:  # report and go on: one bad file must not stop the run
                    reason = getattr(e, "problem", None) or str(e) or type(e).__name__  # MemoryError: ""
                    log.error("skipping %s: %s", paths[i], reason)
                    failed.append((str(paths[i]), reason))
                    bar.update(1)
            if not batch:
                continue
            results = detector.predict([im for _, im in batch], threshold=threshold, top_k=top_k,
                                       batch_size=batch_size)
            for (i, image), det in zip(batch, results):
                for (x0, y0, x1, y1), cid, score in zip(det.boxes.tolist(), det.category_ids, det.scores.tolist()):
                    records.append({"image_id": ids[i], "file_name": str(paths[i]), "category_id": int(cid),
                                    "bbox": [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)],
                                    "score": round(float(score), 5)})
                if out is not None:
                    drawn = draw_detections(image, det.boxes.numpy(), det.labels.numpy(), det.scores.numpy(),
                                            list(detector.config.class_names))
                    target = out / names[i]
                    drawn.save(target, quality=92) if target.suffix == ".jpg" else drawn.save(target)
                processed += 1
                detections += len(det)
                bar.update(1)
    finally:
        bar.close()
    return PredictSummary(processed, failed, detections, records)


def run_predict(args: argparse.Namespace) -> int:
    from .detector import Detector

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
    if args.task == "panoptic":  # overlays, PNG segment maps, segments_info (engine/panoptic_commands.py)
        from .engine.panoptic_commands import predict_panoptic_files

        if args.out is None:
            log.error("--task panoptic writes images: give --out DIR")
            return 2
        threshold = 0.85 if args.threshold is None else args.threshold
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary.records, indent=1))
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
    p.add_argument("--weights", required=True,
                   help="detrkit run dir / .safetensors, authors' .pth, Hugging Face dir, or a published name")
    p.add_argument("--out", help="folder for annotated images")
    p.add_argument("--json", help="COCO-results JSON file (image_id, file_name, category_id, bbox xywh, score)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="minimum score (default 0.5; with --task panoptic 0.85, the paper's)")
    p.add_argument("--top-k", type=positive_int, default=None, help="keep at most K detections per image")
    p.add_argument("--task", choices=["detection", "panoptic"], default="detection",
                   help="panoptic (weights with a mask head): a colour overlay, a PNG segment map and "
                        "segments_info (COCO panoptic) per image")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--precision", choices=["auto", "float32", "bf16"], default="auto",
                   help="auto (default): bf16 where it is fast (CPUs with AMX, recent GPUs), else float32")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)
