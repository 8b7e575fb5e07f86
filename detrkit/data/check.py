"""`detrkit data check`: find what is wrong with a dataset before training on it.

The format readers already record the problems they meet while parsing (bad lines, broken XML,
duplicate ids, impossible boxes, ...); the checker gathers those, then looks at the images
themselves (missing, unreadable, truncated, size different from the annotations) and at the boxes
against the real image sizes, and summarises classes and box sizes.

Heuristics, stated:
  * corners stored as xywh (COCO only; YOLO and VOC boxes are computed by our readers): a box
    [a, b, c, d] that overflows its W x H image as xywh (a + c > W or b + d > H, 1 px tolerance) but
    is a proper box inside it when read as corners (c > a, d > b, c <= W, d <= H) counts as
    "xyxy-like". Any such box gives a dataset-level warning; 20 % or more of all boxes (and at least
    3) make it an error.
  * normalised boxes in COCO: every box within [0, 1] on images larger than 2 px is an error.
  * size buckets use the box area w*h with COCO's thresholds 32^2 and 96^2 (COCO's own evaluation
    uses the segmentation area where there is one).
"""
from __future__ import annotations

import logging
import math
import os
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from detrkit.data.formats import detect_format, load_annotations
from detrkit.data.images import ImageError, image_size, load_image, resolved
from detrkit.data.index import DatasetIndex, Problem
from detrkit.data.images import IMAGE_SUFFIXES
from detrkit.data.transforms import MIN_SIDE
from detrkit.data.yolo import label_path_for

log = logging.getLogger(__name__)

SMALL_AREA = 32 ** 2  # COCO's size buckets (applied here to box areas)
LARGE_AREA = 96 ** 2
_TOLERANCE = 1.0  # pixels a box may poke out of its image (float rounding in tools) before it counts
# a share of boxes above this that only fit the image when read as corners -> an error, not a warning
_XYXY_ERROR_SHARE = 0.2
# long side / short side above this is called out: such an image cannot be resized keeping its shape
MAX_ASPECT_RATIO = 20.0


@dataclass
class BoxStats:
    count: int = 0
    small: int = 0; medium: int = 0; large: int = 0  # noqa: E702  (COCO's area classes)
    width: tuple[float, float, float] | None = None  # min, median, max (pixels)
    height: tuple[float, float, float] | None = None


@dataclass
class CheckReport:
    source: Path
    dataset_format: str  # coco / yolo / voc / coco-panoptic
    split: str | None = None
    readable: bool = True  # False when the annotations could not be read at all
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    num_images: int = 0
    images_with_boxes: int = 0  # images with at least one non-crowd box
    images_without_boxes: int = 0
    images_decoded: int = 0  # 0 when the check ran without decoding
    class_counts: dict[str, int] = field(default_factory=dict)  # non-crowd boxes per category name
    crowd_boxes: int = 0  # iscrowd=1 (COCO crowd regions, VOC difficult objects)
    unused_categories: list[str] = field(default_factory=list)  # listed but without any box
    boxes: BoxStats = field(default_factory=BoxStats)
    index: DatasetIndex | None = field(default=None, repr=False, compare=False)  # None: unreadable or panoptic
    preset: str | None = None  # set with `training`: what training that preset on this data will warn about
    training: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: Problem) -> None:
        (self.errors if problem.severity == "error" else self.warnings).append(problem)

    def format(self, max_problems: int = 20) -> str:
        """A human summary; at most `max_problems` errors and warnings are listed each."""
        lines = [f"Dataset: {self.source} ({self.dataset_format.upper()}{f', split {self.split}' if self.split else ''})"]
        if not self.readable:
            return "\n".join(lines + [f"Error: {p.where}: {p.message}" for p in self.errors]
                             + ["Result: the annotations cannot be read"])
        decoded = f"; {self.images_decoded} decoded" if self.images_decoded else "; not decoded"
        lines.append(f"Images: {self.num_images} ({self.images_with_boxes} with boxes, "
                     f"{self.images_without_boxes} without{decoded})")
        crowd = f" (+ {self.crowd_boxes} crowd/difficult regions)" if self.crowd_boxes else ""
        lines.append(f"Boxes: {self.boxes.count} in {len(self.class_counts)} classes{crowd}")
        if self.class_counts:
            width = max(len(n) for n in self.class_counts)
            cells = [f"{name:<{width}} {n:>6}"
                     for name, n in sorted(self.class_counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            cols = 1 if len(cells) <= 12 else 3  # long class lists in columns, read top to bottom
            rows = math.ceil(len(cells) / cols)
            for r in range(rows):
                lines.append("  " + "   ".join(cells[r::rows]))
        if self.unused_categories:
            lines.append(f"Categories without boxes ({len(self.unused_categories)}): "
                         f"{', '.join(self.unused_categories)}")
        b = self.boxes
        if b.count:
            lines.append(f"Box sizes: small (<32x32) {b.small}, medium {b.medium}, large (>=96x96) {b.large}")
            lines.append("  width  min {:.1f}  median {:.1f}  max {:.1f} px".format(*b.width))
            lines.append("  height min {:.1f}  median {:.1f}  max {:.1f} px".format(*b.height))
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if not items:
                continue
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {p.where}: {p.message}" for p in items[:max_problems]]
            if len(items) > max_problems:
                lines.append(f"  ... and {len(items) - max_problems} more")
        if self.preset is not None:
            lines += _training_lines(self.preset, self.training)
        lines.append("Result: OK" + (f" ({len(self.warnings)} warnings)" if self.warnings else "")
                     if self.ok else f"Result: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def _training_lines(preset: str, warnings: list[str]) -> list[str]:
    if not warnings:
        return [f"Training with preset {preset}: no warnings"]
    return [f"Training with preset {preset} ({len(warnings)} warning(s)):"] + [f"  {w}" for w in warnings]


def _box_where(fmt: str, index: DatasetIndex, file: Path, ann_id: int) -> str:
    """Where to fix a box: the label file (YOLO), the XML (VOC), the JSON (COCO)."""
    if fmt == "yolo":
        return str(label_path_for(file))
    if fmt == "voc":
        return f"{index.source} (image {file.name})"
    return f"{index.source} annotation id {ann_id}"


def _open_one(path: Path, decode: bool) -> tuple[int, int] | ImageError:
    try:
        return load_image(path).size if decode else image_size(path)
    except ImageError as e:
        return e


def _check_images(index: DatasetIndex, report: CheckReport, decode: bool,
                  reported_missing: set[int]) -> dict[int, tuple[int, int]]:
    """Open (and decode) every image; -> {image id: upright (w, h)} of the readable ones."""
    todo = [im for im in index.images if im.id not in reported_missing]
    sizes: dict[int, tuple[int, int]] = {}
    # Pillow decodes with the GIL released, so threads use several cores; map keeps the order
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda im: _open_one(im.file, decode), todo)
        for im, res in zip(todo, tqdm(results, total=len(todo), desc="checking images", unit="img",
                                      disable=None)):
            if isinstance(res, ImageError):
                report.add(Problem("error", str(res.path), res.problem))
                continue
            w, h = res
            report.images_decoded += decode
            sizes[im.id] = (w, h)
            if im.width and im.height and (im.width, im.height) != (w, h):
                if (im.width, im.height) == (h, w):
                    msg = (f"annotations say {im.width}x{im.height} but the upright image is {w}x{h} "
                           f"(EXIF rotation?); boxes may not match the picture")
                else:
                    msg = f"annotations say {im.width}x{im.height} but the image is {w}x{h}"
                report.add(Problem("error", str(im.file), msg))
    return sizes


def _unlisted_images(index: DatasetIndex, also_listed: frozenset[Path] = frozenset()) -> list[Problem]:
    """Image files in the dataset's image folders that no annotation entry lists (resolved paths in
    `also_listed` belong to another split of the run, e.g. a val.json over the same folder)."""
    listed = {resolved(im.file) for im in index.images} | also_listed
    out = []
    for folder in sorted({im.file.parent for im in index.images}):
        if not folder.is_dir():
            continue
        extra = sorted(p.name for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and resolved(p) not in listed)
        if extra:
            out.append(Problem("warning", str(folder),
                               f"{len(extra)} image file(s) have no annotation entry "
                               f"(e.g. {', '.join(extra[:3])}); they are not part of the dataset"))
    return out


def _check_boxes(index: DatasetIndex, fmt: str, report: CheckReport, sizes: dict[int, tuple[int, int]]) -> None:
    images = {im.id: im for im in index.images}
    known_cats = dict(index.categories)
    names = Counter()
    widths, heights = [], []
    with_boxes: set[int] = set()
    xyxy_like: list[int] = []
    normalised_like = 0
    for a in index.annotations:
        im = images.get(a.image_id)
        if im is None:
            report.add(Problem("error", f"{index.source} annotation id {a.id}",
                               f"refers to unknown image id {a.image_id}"))
            continue
        where = _box_where(fmt, index, im.file, a.id)
        if a.category_id not in known_cats:
            report.add(Problem("error", where, f"category id {a.category_id} is not in the category list"))
            continue
        x, y, w, h = (float(v) for v in a.bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.add(Problem("error", where, f"box {a.bbox} has NaN or infinite values"))
            continue
        if w <= 0 or h <= 0:
            report.add(Problem("error", where, f"box {a.bbox} has {'zero' if min(w, h) == 0 else 'negative'} size"))
            continue
        # bounds against the real image size; COCO's reader already checked against the declared one
        declared = (im.width, im.height) if im.width and im.height else None
        real = sizes.get(im.id, declared)
        if real is not None:
            W, H = real
            if x >= W or y >= H or x + w <= 0 or y + h <= 0:
                if not (fmt == "coco" and real == declared):
                    report.add(Problem("error", where, f"box {a.bbox} lies entirely outside the {W}x{H} image"))
            elif x < -_TOLERANCE or y < -_TOLERANCE or x + w > W + _TOLERANCE or y + h > H + _TOLERANCE:
                if not (fmt == "coco" and real == declared):
                    report.add(Problem("warning", where,
                                       f"box {a.bbox} extends outside the {W}x{H} image (will be clipped)"))
                # corners stored as xywh: x+w overflows, yet (x, y, w, h) read as (x0, y0, x1, y1)
                # is a proper box inside the image
                if w > x and h > y and w <= W + _TOLERANCE and h <= H + _TOLERANCE:
                    xyxy_like.append(a.id)
            if max(x + w, y + h) <= 1.0 + 1e-6 and min(W, H) > 2:
                normalised_like += 1
        if a.iscrowd:
            report.crowd_boxes += 1
            continue
        names[known_cats[a.category_id]] += 1
        with_boxes.add(a.image_id)
        widths.append(w)
        heights.append(h)
        area = w * h
        report.boxes.small += area < SMALL_AREA
        report.boxes.medium += SMALL_AREA <= area < LARGE_AREA
        report.boxes.large += area >= LARGE_AREA

    if fmt == "coco" and xyxy_like:
        share = len(xyxy_like) / max(len(index.annotations), 1)
        severity = "error" if share >= _XYXY_ERROR_SHARE and len(xyxy_like) >= 3 else "warning"
        report.add(Problem(severity, str(index.source),
                           f"{len(xyxy_like)} of {len(index.annotations)} boxes overflow their image as "
                           f"[x, y, w, h] but fit it as [x0, y0, x1, y1]: are the boxes stored as corners? "
                           f"(annotation ids {', '.join(map(str, xyxy_like[:5]))})"))
    if normalised_like and normalised_like == len(index.annotations) and normalised_like >= 3:
        report.add(Problem("error", str(index.source),
                           f"all {normalised_like} boxes lie within [0, 1]: they look normalised, "
                           f"but COCO boxes are in pixels"))
    report.class_counts = dict(names)
    report.unused_categories = [n for n in known_cats.values() if n not in names]
    report.boxes.count = len(widths)
    if widths:
        report.boxes.width = (min(widths), statistics.median(widths), max(widths))
        report.boxes.height = (min(heights), statistics.median(heights), max(heights))
    report.images_with_boxes = len(with_boxes & set(images))
    report.images_without_boxes = len(images) - report.images_with_boxes


def _extreme_shapes(index: DatasetIndex, sizes: dict[int, tuple[int, int]]) -> list[Problem]:
    """Images so thin that the network sees little of them (the short side may be floored)."""
    out = []
    for im in index.images:
        w, h = sizes.get(im.id, (im.width, im.height))
        if not w or not h:
            continue
        ratio = max(w, h) / min(w, h)
        if ratio > MAX_ASPECT_RATIO:
            out.append(Problem("warning", str(im.file),
                               f"extreme aspect ratio {w}x{h} ({ratio:.0f}:1): at the network's input size its "
                               f"short side is a few pixels (floored at {MIN_SIDE} px, stretching it)"))
    return out


def _duplicate_ids(index: DatasetIndex) -> list[Problem]:
    out = []
    for what, ids in (("image", [im.id for im in index.images]), ("annotation", [a.id for a in index.annotations])):
        for i, n in Counter(ids).items():
            if n > 1:
                out.append(Problem("error", f"{index.source} {what} id {i}", f"duplicate {what} id ({n} times)"))
    return out


def _unreadable(path: Path, e: Exception) -> Problem:
    """The readers' exceptions start with the file they concern ("<file>: <what>"); split that off."""
    text = str(e)
    head, sep, rest = text.partition(": ")
    if sep and (head == str(path) or Path(head).exists()):
        return Problem("error", head, rest)
    return Problem("error", str(path), text)


def check_dataset(path: str | os.PathLike, split: str | None = None, images_dir: str | os.PathLike | None = None,
                  decode_images: bool = True, also_listed: frozenset[Path] = frozenset()) -> CheckReport:
    """Check a dataset in any supported format; see `CheckReport`.

    also_listed: resolved image paths another split lists (no "no annotation entry" warning for them).

    With `decode_images` every image is fully decoded (finds truncated and corrupt files); without,
    only the headers are read (finds missing, empty and non-image files, and the sizes).
    A dataset whose annotation file cannot be read at all gives a report with that one error.
    """
    path = Path(path)
    from .panoptic import is_panoptic_json  # panoptic sets and instance masks: data/panoptic_check.py

    if is_panoptic_json(path):
        from .panoptic_check import check_panoptic

        return check_panoptic(path, images_dir, decode_images=decode_images)
    try:
        fmt = detect_format(path)
    except (ValueError, OSError) as e:
        report = CheckReport(source=path, dataset_format="unknown", split=split, readable=False)
        report.add(_unreadable(path, e))
        return report
    report = CheckReport(source=path, dataset_format=fmt, split=split)
    try:
        index = load_annotations(path, split, images_dir)
    except (ValueError, OSError) as e:
        report.readable = False
        report.add(_unreadable(path, e))
        return report
    report.source, report.index = index.source, index

    # the COCO reader names images it cannot find; do not report them a second time
    reported_missing = {
        im.id for im in index.images
        for p in index.problems if p.where.endswith(f"image id {im.id}")
        and ("not found" in p.message or "unreadable:" in p.message)
    } if fmt == "coco" and index.problems else set()
    for p in index.problems:
        report.add(p)
    for p in _duplicate_ids(index):
        report.add(p)
    report.num_images = len(index.images)
    sizes = _check_images(index, report, decode_images, reported_missing)
    _check_boxes(index, fmt, report, sizes)
    no_boxes = index.no_box_message()
    if no_boxes:
        report.add(Problem("error", str(index.source), no_boxes.split(": ", 1)[1]))
    for p in _extreme_shapes(index, sizes):
        report.add(p)
    if fmt == "coco":
        from .panoptic_check import instance_mask_problems

        for p in instance_mask_problems(index.source):
            report.add(p)
    if fmt in ("coco", "voc") and split is None:  # YOLO's reader reports unlabelled images itself
        for p in _unlisted_images(index, also_listed):
            report.add(p)
    log.info("checked %s: %d errors, %d warnings", report.source, len(report.errors), len(report.warnings))
    return report
