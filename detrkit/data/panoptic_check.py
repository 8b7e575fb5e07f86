"""`detrkit data check` for COCO panoptic sets and COCO instance masks.

Panoptic: what the detection checker does (images readable, sizes, boxes), then every segment PNG is
decoded and compared with its segments_info: an id in the PNG that the JSON does not list (or the
reverse: a listed segment without pixels), an area that differs from the pixel count, a bbox that
differs from the pixels' extent, a PNG whose size differs from the image, a truncated or unreadable
PNG. Instances: annotations whose segmentation is missing (when others have one) or cannot be
decoded.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from . import check
from .index import Problem
from .panoptic import PanopticFormatError, load_panoptic, mask_or_problem, read_segment_ids

log = logging.getLogger(__name__)

_BBOX_TOLERANCE = 1.0  # pixels


def _check_png(rec, size: tuple[int, int] | None) -> list[Problem]:
    try:
        ids = read_segment_ids(rec.png)
    except PanopticFormatError as e:
        return [Problem("error", str(rec.png), str(e).split(": ", 1)[-1])]
    out = []
    where = str(rec.png)
    h, w = ids.shape
    expected = size or ((rec.image.width, rec.image.height) if rec.image.width and rec.image.height else None)
    if expected is not None and (w, h) != tuple(expected):
        out.append(Problem("error", where, f"PNG is {w}x{h} but the image is {expected[0]}x{expected[1]}"))
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    listed = {s.id: s for s in rec.segments}
    unlisted = sorted(set(area) - set(listed) - {0})
    if unlisted:
        out.append(Problem("error", where, f"segment id(s) {unlisted[:5]} in the PNG are missing from the JSON's "
                                           f"segments_info ({sum(area[i] for i in unlisted)} px)"))
    for sid, s in listed.items():
        n = area.get(sid, 0)
        if n == 0:
            out.append(Problem("error", where, f"segment {sid} (category {s.category_id}) is listed but has no "
                                               f"pixels in the PNG (a mask-less segment)"))
            continue
        if n != s.area:
            out.append(Problem("error", where, f"segment {sid}: area {s.area} in the JSON but {n} px in the PNG"))
        ys, xs = np.nonzero(ids == sid)
        real = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        if max(abs(float(a) - float(b)) for a, b in zip(real, s.bbox)) > _BBOX_TOLERANCE:
            out.append(Problem("warning", where, f"segment {sid}: bbox {s.bbox} in the JSON but "
                                                 f"{[int(v) for v in real]} from the PNG"))
    return out


def check_panoptic(json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                   png_dir: str | os.PathLike | None = None, decode_images: bool = True) -> "check.CheckReport":
    path = Path(json_path)
    report = check.CheckReport(source=path, dataset_format="coco-panoptic")
    try:
        index = load_panoptic(path, images_dir, png_dir)
    except (PanopticFormatError, OSError) as e:
        report.readable = False
        report.add(check._unreadable(path, e))
        return report
    det = index.to_detection_index()
    for p in index.problems:
        report.add(p)
    report.num_images = len(det.images)
    sizes = check._check_images(det, report, decode_images, set())
    check._check_boxes(det, "coco", report, sizes)
    for rec in index.records:
        for p in _check_png(rec, sizes.get(rec.image.id)):
            report.add(p)
    log.info("checked %s: %d errors, %d warnings", path, len(report.errors), len(report.warnings))
    return report


def instance_mask_problems(json_path: str | os.PathLike) -> list[Problem]:
    """Problems of the masks in a COCO instances JSON; none when it carries no masks at all."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        anns, images = data["annotations"], data["images"]
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images
                 if im.get("height") and im.get("width")}
    except (OSError, ValueError, KeyError, TypeError):
        return []  # the detection checker reports structural damage
    if not any(isinstance(a, dict) and a.get("segmentation") for a in anns):
        return []
    out = []
    for a in anns:
        where = f"{json_path} annotation id {a.get('id')}"
        size = sizes.get(int(a.get("image_id", -1)))
        if size is None:
            continue
        m, problem = mask_or_problem(a, size, where, "mask training and mask AP skip it")
        if problem is not None:
            out.append(problem)
        elif not m.any():
            out.append(Problem("warning", where, "mask is empty (no pixel inside the image)"))
    return out
