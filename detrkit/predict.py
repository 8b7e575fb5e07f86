"""Detecting objects in image files: the COCO result records of each file and annotated copies.

An unreadable file is reported by name and skipped; the others are still processed. Boxes are in
pixels of the upright (EXIF-applied) original image, with the dataset's own category ids.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from .data.images import load_image

log = logging.getLogger(__name__)


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
                  threshold: float | None = 0.5, top_k: int | None = None, batch_size: int = 4,
                  progress: bool = True) -> PredictSummary:
    """Detect objects in `paths` with `detector` (a `Detector`); draw them into `out_dir` (if given);
    return the COCO result records.

    Each record: image_id, file_name, then what `Detections.to_coco` writes (category_id, the
    dataset's id; bbox [x, y, w, h] pixels of the upright original; score; category_name): with
    threshold None, the records of `detrkit eval` on the same weights and files. Files that fail to load are logged and
    listed in `failed`. The files are read as the detector's batches need them.
    """
    from .viz.draw import draw_detections

    paths = [Path(p) for p in paths]
    ids, names = image_ids_for(paths), output_names(paths)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(0, [], 0, [])
    loaded: collections.deque = collections.deque()  # (index, image) handed to the detector, not yet answered
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    try:
        images = _readable(paths, loaded, summary.failed, bar)
        for det in detector.predict_iter(images, threshold=threshold, top_k=top_k, batch_size=batch_size):
            i, image = loaded.popleft()
            for r in det.to_coco(ids[i]):
                summary.records.append({"image_id": r.pop("image_id"), "file_name": str(paths[i]), **r})
            if out is not None:
                drawn = draw_detections(image, det.boxes.numpy(), det.labels.numpy(), det.scores.numpy(),
                                        list(detector.config.class_names))
                target = out / names[i]
                drawn.save(target, quality=92) if target.suffix == ".jpg" else drawn.save(target)
            summary.processed += 1
            summary.detections += len(det)
            bar.update(1)
    finally:
        bar.close()
    return summary


def _readable(paths: list[Path], loaded: collections.deque, failed: list, bar) -> Iterator:
    """The images of `paths` that load, each also queued in `loaded` with its index; failures are
    logged and listed in `failed`."""
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except Exception as e:  # report and go on: one bad file must not stop the run
            reason = getattr(e, "problem", None) or str(e) or type(e).__name__  # MemoryError: ""
            log.error("skipping %s: %s", path, reason)
            failed.append((str(path), reason))
            bar.update(1)
            continue
        loaded.append((i, image))
        yield image
