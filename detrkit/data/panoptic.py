"""COCO panoptic format and COCO instance masks.

Panoptic: a JSON with `images`, `categories` (id, name, isthing) and `annotations`, one per image:
{image_id, file_name (the PNG), segments_info: [{id, category_id, iscrowd, bbox xywh, area}]}, plus
one PNG per image whose RGB encodes each pixel's segment id as id = R + 256 G + 256^2 B (0: void).
The PNGs live in `<json dir>/<json stem>/` (COCO's layout: annotations/panoptic_val2017.json and
annotations/panoptic_val2017/) unless a folder is given.

Instance masks: COCO instances annotations carry `segmentation` as polygons, uncompressed RLE
(counts as a list) or compressed RLE (counts as a string); pycocotools decodes all three.

For the box detector (the paper's first stage) a panoptic set is also a detection set: every
segment, thing or stuff, is a box (`to_detection_index`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .coco import CocoFormatError, _resolve_image
from .index import Annotation, DatasetIndex, ImageRecord, Problem

log = logging.getLogger(__name__)


class PanopticFormatError(ValueError):
    """A panoptic file (JSON or PNG) that cannot be used; the message names the file."""


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W] int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """[H,W] ids (< 256^3) -> [H,W,3] uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


@dataclass
class Segment:
    id: int
    category_id: int
    bbox: list[float]  # xywh pixels
    area: int
    iscrowd: int = 0


@dataclass
class PanopticRecord:
    image: ImageRecord
    png: Path
    segments: list[Segment]


@dataclass
class PanopticIndex:
    records: list[PanopticRecord]
    categories: list[tuple[int, str, bool]]  # (category id, name, isthing), sorted by id
    source: Path
    problems: list[Problem] = field(default_factory=list)

    @property
    def thing_ids(self) -> set[int]:
        return {cid for cid, _, thing in self.categories if thing}

    @property
    def stuff_ids(self) -> set[int]:
        return {cid for cid, _, thing in self.categories if not thing}

    def to_detection_index(self) -> DatasetIndex:
        """Every segment (things and stuff) as a box: what the box detector trains on."""
        anns = []
        for rec in self.records:
            for s in rec.segments:
                anns.append(Annotation(len(anns) + 1, rec.image.id, s.category_id, list(s.bbox), s.iscrowd, float(s.area)))
        return DatasetIndex([r.image for r in self.records], anns, [(c, n) for c, n, _ in self.categories],
                            self.source, list(self.problems))


def read_segment_ids(png: str | os.PathLike) -> np.ndarray:
    """A panoptic PNG -> [H,W] int64 segment ids. Missing, truncated or non-RGB files raise
    PanopticFormatError naming the file."""
    png = Path(png)
    if not png.is_file():
        raise PanopticFormatError(f"{png}: segment PNG not found")
    try:
        with Image.open(png) as im:
            im.load()  # decode fully here: a truncated file fails now, not half-way through a batch
            if im.mode != "RGB":
                raise PanopticFormatError(f"{png}: segment PNG must be RGB, got mode {im.mode}")
            arr = np.asarray(im)
    except PanopticFormatError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise PanopticFormatError(f"{png}: cannot decode the segment PNG ({e})") from e
    return rgb2id(arr)


def write_segment_ids(ids: np.ndarray, png: str | os.PathLike) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id2rgb(ids), "RGB").save(png)
    return png


def segments_from_ids(ids: np.ndarray, category_of: dict[int, int], iscrowd: dict[int, int] | None = None
                      ) -> list[dict]:
    """segments_info (id, category_id, iscrowd, bbox xywh, area) measured from an id map; id 0 is void."""
    out = []
    for sid in np.unique(ids):
        if sid == 0 or int(sid) not in category_of:
            continue
        ys, xs = np.nonzero(ids == sid)
        x0, y0 = int(xs.min()), int(ys.min())
        out.append({"id": int(sid), "category_id": int(category_of[int(sid)]),
                    "iscrowd": int((iscrowd or {}).get(int(sid), 0)),
                    "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "area": int(len(xs))})
    return out


def _png_dir(json_path: Path, png_dir: Path | None) -> Path:
    if png_dir is not None:
        return png_dir
    return json_path.parent / json_path.stem


def load_panoptic(json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                  png_dir: str | os.PathLike | None = None) -> PanopticIndex:
    """Read a COCO panoptic JSON. Structural damage raises PanopticFormatError; per-entry damage
    (unknown image or category, missing PNG, missing image) becomes a Problem and the entry is left out
    of training (records keep images whose PNG is missing out)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise PanopticFormatError(f"{json_path}: panoptic annotation file not found")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PanopticFormatError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list)
                                         for k in ("images", "annotations", "categories")):
        raise PanopticFormatError(f"{json_path}: needs lists 'images', 'annotations' and 'categories'")
    where = str(json_path)
    problems: list[Problem] = []
    cats: dict[int, tuple[str, bool]] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise PanopticFormatError(f"{json_path}: category #{i} lacks id or name")
        cats[int(c["id"])] = (str(c["name"]), bool(c.get("isthing", 1)))
    images: dict[int, ImageRecord] = {}
    imdir = Path(images_dir) if images_dir is not None else None
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise PanopticFormatError(f"{json_path}: image #{i} lacks id or file_name")
        path = _resolve_image(str(im["file_name"]), json_path, imdir)
        if path is None:
            problems.append(Problem("error", f"{where} image id {im['id']}", f"image file {im['file_name']!r} not found"))
            path = (json_path.parent / str(im["file_name"])).resolve()
        images[int(im["id"])] = ImageRecord(int(im["id"]), path, im.get("width"), im.get("height"))
    pdir = _png_dir(json_path, Path(png_dir) if png_dir is not None else None)
    records: list[PanopticRecord] = []
    annotated: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "file_name" not in a:
            raise PanopticFormatError(f"{json_path}: annotation #{i} lacks image_id or file_name")
        iid = int(a["image_id"])
        at = f"{where} image id {iid}"
        if iid not in images:
            problems.append(Problem("error", at, "panoptic annotation for an unknown image; left out"))
            continue
        segments = []
        for s in a.get("segments_info") or []:
            try:
                seg = Segment(int(s["id"]), int(s["category_id"]), [float(v) for v in s["bbox"]],
                              int(s["area"]), int(s.get("iscrowd", 0)))
            except (KeyError, TypeError, ValueError):
                problems.append(Problem("error", at, f"segment {s!r:.80} lacks id/category_id/bbox/area; left out"))
                continue
            if seg.category_id not in cats:
                problems.append(Problem("error", at, f"segment {seg.id}: unknown category id {seg.category_id}; left out"))
                continue
            segments.append(seg)
        png = pdir / str(a["file_name"])
        if not png.is_file():
            problems.append(Problem("error", str(png), f"segment PNG of image id {iid} not found"))
            continue
        annotated.add(iid)
        records.append(PanopticRecord(images[iid], png, segments))
    for iid in images.keys() - annotated:
        if not any(p.where == f"{where} image id {iid}" for p in problems):
            problems.append(Problem("warning", f"{where} image id {iid}", "image has no panoptic annotation"))
    if problems:
        log.warning("%s: %d problem(s); see index.problems", json_path, len(problems))
    return PanopticIndex(records, sorted((cid, n, t) for cid, (n, t) in cats.items()), json_path, problems)


def is_panoptic_json(path: str | os.PathLike) -> bool:
    """A JSON whose annotations carry segments_info (cheap: reads the file once)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    anns = data.get("annotations") if isinstance(data, dict) else None
    return isinstance(anns, list) and bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]


def save_panoptic_json(path: str | os.PathLike, images: list[dict], annotations: list[dict],
                       categories: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    os.replace(tmp, path)
    return path


# ---- COCO instance masks ------------------------------------------------------------------------

def instance_mask(segmentation, height: int, width: int) -> np.ndarray | None:
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE) -> [H,W] bool, or None when
    there is none (a mask-less annotation). Malformed values raise CocoFormatError."""
    from pycocotools import mask as mask_utils

    if segmentation is None or (isinstance(segmentation, list) and len(segmentation) == 0):
        return None
    try:
        if isinstance(segmentation, list):  # polygons [[x0,y0,x1,y1,...], ...]
            polys = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
            if not polys:
                raise ValueError("no polygon with at least 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            if list(rle.get("size", [])) != [height, width]:
                raise ValueError(f"RLE size {rle.get('size')} differs from the image's {[height, width]}")
        else:
            raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError) as e:
        raise CocoFormatError(f"segmentation cannot be decoded: {e}") from e


def encode_mask(mask: np.ndarray) -> dict:
    """[H,W] bool -> compressed RLE with counts as str (JSON-ready), what COCO results want."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_or_problem(annotation: dict, size: tuple[int, int], where: str, consequence: str
                    ) -> tuple[np.ndarray | None, Problem | None]:
    """The mask [H,W] bool of one COCO instance annotation, or None and the Problem that says why not
    (an unreadable segmentation is an error; a missing one a warning ending in `consequence`)."""
    try:
        m = instance_mask(annotation.get("segmentation"), *size)
    except CocoFormatError as e:
        return None, Problem("error", where, str(e))
    if m is None:
        return None, Problem("warning", where, f"annotation has no mask (segmentation missing or empty); {consequence}")
    return m, None


def load_instance_masks(json_path: str | os.PathLike) -> tuple[dict[int, list[tuple[int, np.ndarray]]], list[Problem]]:
    """COCO instances JSON -> {image_id: [(annotation id, mask [H,W] bool)]}; annotations without a
    usable mask are counted as problems (skipped), never a crash."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    problems: list[Problem] = []
    for a in data["annotations"]:
        at = f"{json_path} annotation id {a.get('id')}"
        size = sizes.get(int(a["image_id"]))
        if size is None:
            problems.append(Problem("error", at, f"unknown image id {a['image_id']}"))
            continue
        m, problem = mask_or_problem(a, size, at, "skipped")
        if problem is not None:
            problems.append(problem)
            continue
        out.setdefault(int(a["image_id"]), []).append((int(a["id"]), m))
    return out, problems


__all__ = ["PanopticFormatError", "rgb2id", "id2rgb", "Segment", "PanopticRecord", "PanopticIndex",
           "read_segment_ids", "write_segment_ids", "segments_from_ids", "load_panoptic", "is_panoptic_json",
           "save_panoptic_json", "instance_mask", "encode_mask", "load_instance_masks"]
