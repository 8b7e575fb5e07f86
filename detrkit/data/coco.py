"""COCO instances JSON <-> `DatasetIndex`.

Structural damage (not JSON, missing keys) raises `CocoFormatError` naming the file. Damage that
affects single entries (duplicate ids, unknown categories, impossible boxes) becomes a `Problem` in
`index.problems` and the offending annotations are left out, so training never sees them.
Crowd annotations (iscrowd=1) stay in the index; the training dataset leaves them out of targets.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator

from ..atomic import write_atomic
from .images import missing_reason, resolved
from .index import Annotation, DatasetIndex, ImageRecord, Problem

log = logging.getLogger(__name__)

# a box may poke out of the image by this much (pixels) before we call it out: float rounding in tools
_OUTSIDE_TOLERANCE = 1.0


class CocoFormatError(ValueError):
    """A COCO JSON file that cannot be read as a dataset at all."""


def _image_candidates(file_name: str, json_dir: Path, images_dir: Path | None) -> list[Path]:
    """Where an image named `file_name` in the JSON may live, most specific first."""
    rel = Path(file_name)
    candidates: list[Path] = []
    if images_dir is not None:
        candidates += [images_dir / rel, images_dir / rel.name]
    candidates += [json_dir / rel, json_dir / "images" / rel]
    return candidates


def _split_dirs(json_path: Path) -> list[Path]:
    """The official layout: annotations/instances_<split>.json beside images/<split>/ or <split>/."""
    stem = json_path.stem
    if not stem.startswith("instances_"):
        return []
    split = stem[len("instances_"):]
    root = json_path.parent.parent
    return [root / "images" / split, root / split]


def _resolve_image(file_name: str, json_path: Path, images_dir: Path | None) -> Path | None:
    rel = Path(file_name)
    if rel.is_absolute():
        return rel if rel.is_file() else None
    candidates = _image_candidates(file_name, json_path.parent, images_dir)
    candidates += [d / rel for d in _split_dirs(json_path)]
    for c in candidates:
        if c.is_file():
            return resolved(c)
    return None


def _require(entry, keys: tuple[str, ...], what: str, i: int, json_path: Path) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{json_path}: {what} #{i} is not an object: {entry!r:.80}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise CocoFormatError(f"{json_path}: {what} #{i} (id={entry.get('id')!r}) lacks key(s) {missing}")


def _int(entry: dict, key: str, what: str, i: int, json_path: Path) -> int:
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise CocoFormatError(f"{json_path}: {what} #{i} has a non-integer {key!r}: {v!r:.40}")
    return int(v)


def _bbox_problem(bbox, width: int | None, height: int | None) -> tuple[str, str] | None:
    """(severity, message) when a bbox is unusable ("error") or suspicious ("warning"), else None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "error", f"bbox must be [x, y, w, h], got {bbox!r:.80}"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "error", f"bbox has non-numeric values {bbox!r:.80}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "error", f"bbox has NaN/infinite values {bbox}"
    if w < 0 or h < 0:
        return "error", f"bbox has negative size {bbox}"
    if w == 0 or h == 0:
        return "error", f"bbox has zero size {bbox}"
    if width and height:
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return "error", f"bbox {bbox} lies entirely outside the {width}x{height} image"
        t = _OUTSIDE_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            return "warning", f"bbox {bbox} extends outside the {width}x{height} image (will be clamped)"
    return None


def _first_of_each_id(entries: list, keys: tuple, kind: str, json_path: Path, problems: list,
                      describe) -> Iterator[tuple[dict, int]]:
    """(entry, id) of each entry with all `keys`; a repeated id is an error Problem (describe(entry, id)
    says which) and only the first entry with it is kept."""
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        _require(entry, keys, kind, i, json_path)
        eid = _int(entry, "id", kind, i, json_path)
        if eid in seen:
            problems.append(Problem("error", f"{json_path} {kind} id {eid}",
                                    f"duplicate {kind} id ({describe(entry, eid)}); keeping the first"))
            continue
        seen.add(eid)
        yield entry, eid


def load_coco(json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """Read a COCO instances JSON into a `DatasetIndex` (image paths resolved, problems listed).

    Images are looked up per `file_name` in `images_dir`, then beside the JSON, then in `images/`
    beside it (and, for `annotations/instances_<split>.json`, in `images/<split>/` or `<split>/`).
    An image found nowhere is kept (so it is counted and reported at load time) with an error Problem.
    """
    json_path = Path(json_path)
    images_dir = Path(images_dir) if images_dir is not None else None
    if not json_path.is_file():
        raise CocoFormatError(f"{json_path}: annotation file not found")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CocoFormatError(f"{json_path}: top level must be an object with images/annotations/categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise CocoFormatError(f"{json_path}: missing top-level key(s) {missing}")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise CocoFormatError(f"{json_path}: '{k}' must be a list, got {type(data[k]).__name__}")

    problems: list[Problem] = []
    where = str(json_path)

    categories: dict[int, str] = {}
    stuff: set[int] = set()
    for c, cid in _first_of_each_id(data["categories"], ("id", "name"), "category", json_path, problems,
                                    lambda c, cid: f"names {categories[cid]!r}, {c['name']!r}"):
        categories[cid] = str(c["name"])
        if c.get("isthing", 1) in (0, False):  # COCO panoptic's flag, kept in instance files derived from it
            stuff.add(cid)

    images: dict[int, ImageRecord] = {}
    if images_dir is not None and not images_dir.is_dir():
        problems.append(Problem("error", str(images_dir), "images directory not found"))
    missing_files = 0
    for im, iid in _first_of_each_id(data["images"], ("id", "file_name"), "image", json_path, problems,
                                     lambda im, iid: repr(im["file_name"])):
        path = _resolve_image(str(im["file_name"]), json_path, images_dir)
        if path is None:
            missing_files += 1
            cands = _image_candidates(str(im["file_name"]), json_path.parent, images_dir)
            guess = next((c for c in cands if c.is_symlink()), cands[0])  # a loop or broken link: name it
            path = resolved(guess)
            reason = missing_reason(guess)
            reason = "not found" if reason == "file not found" else f"unreadable: {reason}"
            problems.append(Problem("error", f"{where} image id {iid}", f"image file {im['file_name']!r} {reason}"))
        w, h = im.get("width"), im.get("height")
        images[iid] = ImageRecord(iid, path, int(w) if w else None, int(h) if h else None)
    if missing_files:
        log.warning("%s: %d of %d image files not found", json_path, missing_files, len(images))

    annotations: list[Annotation] = []
    seen_ann: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        _require(a, ("id", "image_id", "category_id", "bbox"), "annotation", i, json_path)
        aid, iid, cid = (_int(a, k, "annotation", i, json_path) for k in ("id", "image_id", "category_id"))
        at = f"{where} annotation id {aid}"
        if aid in seen_ann:
            problems.append(Problem("error", at, "duplicate annotation id; left out"))
            continue
        seen_ann.add(aid)
        if iid not in images:
            problems.append(Problem("error", at, f"refers to unknown image id {iid}; left out"))
            continue
        if cid not in categories:
            problems.append(Problem("error", at, f"unknown category id {cid}; left out"))
            continue
        rec = images[iid]
        bad = _bbox_problem(a["bbox"], rec.width, rec.height)
        if bad is not None:
            severity, message = bad
            if severity == "error":
                problems.append(Problem("error", at, message + "; left out"))
                continue
            problems.append(Problem(severity, at, message))
        bbox = [float(v) for v in a["bbox"]]
        area = a.get("area")
        annotations.append(Annotation(aid, iid, cid, bbox, int(bool(a.get("iscrowd", 0))),
                                      float(area) if area is not None else None))

    n_err = sum(p.severity == "error" for p in problems)
    log.info("%s: %d images, %d boxes, %d classes", json_path, len(images), len(annotations), len(categories))
    if problems:
        log.warning("%s: %d problem(s) (%d errors); see index.problems", json_path, len(problems), n_err)
    return DatasetIndex(
        images=list(images.values()),
        annotations=annotations,
        categories=sorted(categories.items()),
        source=json_path,
        problems=problems,
        stuff_ids=frozenset(stuff),
    )


def save_coco(index: DatasetIndex, path: str | os.PathLike) -> Path:
    """Write `index` as COCO JSON; image file names are relative to the JSON's folder when inside it."""
    path = Path(path)
    # never leave a half-written annotation file
    return write_atomic(path, json.dumps(index.to_coco(relative_to=path.parent)))
