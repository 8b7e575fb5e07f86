"""A synthetic panoptic dataset: stuff regions (sky, ground, a texture band) and thing shapes on top.

Each image is split top to bottom by two wavy horizons into sky (a vertical blue-to-pale gradient),
optionally a band of diagonal stripes, and ground (a green-brown noisy texture); every region is one
stuff segment. 1-4 filled shapes (ellipse, rectangle, triangle) of random bright colour are drawn
over them, each kept at least 60 % visible. The same seed writes the same bytes.

Written, in COCO's layouts:
  out/panoptic.json + out/panoptic/*.png  -- panoptic (segments_info; PNG ids R + 256 G + 256^2 B)
  out/annotations.json                    -- COCO instances: one box and RLE mask per segment (things
                                             and stuff), what the box detector trains on
  out/images/*.png|jpg
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .panoptic import encode_mask, save_panoptic_json, segments_from_ids, write_segment_ids
from .synthetic import _shape_mask

log = logging.getLogger(__name__)

THINGS = [(1, "ellipse"), (2, "rectangle"), (3, "triangle")]
STUFF = [(10, "sky"), (11, "ground"), (12, "stripes")]
_MIN_VISIBLE = 0.6
_MIN_AREA = 40  # pixels: smallest thing drawn


def _horizon(rng: np.random.Generator, w: int, level: float, h: int) -> np.ndarray:
    """[W] row of a wavy boundary around `level` (fraction of the height)."""
    x = np.arange(w)
    amp = rng.uniform(0, 0.05) * h
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5) * w
    return level * h + amp * np.sin(2 * math.pi * x / period + phase)


def _stuff_colours(rng: np.random.Generator, name: str, h: int, w: int, rows: tuple[int, int]) -> np.ndarray:
    """[r1-r0,W,3] colours of rows r0..r1-1 of an h x w image (only the rows a region spans are drawn)."""
    r0, r1 = rows
    yy, xx = np.mgrid[r0:r1, 0:w].astype(np.float64)
    n = r1 - r0
    if name == "sky":
        top = np.array(colorsys.hsv_to_rgb(rng.uniform(0.55, 0.65), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.9))) * 255
        bottom = np.array([200.0, 215.0, 235.0]) + rng.normal(0, 10, 3)
        t = (yy / max(h - 1, 1))[..., None]
        return top * (1 - t) + bottom * t + rng.normal(0, 3, (n, w, 3))
    if name == "ground":
        base = np.array(colorsys.hsv_to_rgb(rng.uniform(0.08, 0.3), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.55))) * 255
        coarse = rng.normal(0, 18, (8, 8, 3))
        tex = np.asarray(Image.fromarray((coarse + 128).clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                         dtype=np.float64) - 128
        return base + tex[r0:r1] + rng.normal(0, 10, (n, w, 3))
    # stripes: two alternating colours along a diagonal
    a = np.array(colorsys.hsv_to_rgb(rng.uniform(), 0.3, 0.35)) * 255
    b = np.array(colorsys.hsv_to_rgb(rng.uniform(), 0.3, 0.7)) * 255
    period = rng.uniform(6, 12)
    angle = rng.uniform(0.3, 1.2) * rng.choice([-1, 1])
    on = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 2)[..., None]
    return a * on + b * (1 - on) + rng.normal(0, 4, (n, w, 3))


def render_panoptic_sample(rng: np.random.Generator, image_size: tuple[int, int] = (128, 192),
                           max_things: int = 4) -> tuple[Image.Image, np.ndarray, dict[int, int]]:
    """-> (RGB image, segment ids [H,W] int64 (every pixel labelled), {segment id: category id})."""
    lo, hi = image_size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = np.zeros((h, w, 3))
    ids = np.zeros((h, w), dtype=np.int64)
    category: dict[int, int] = {}
    rows = np.arange(h)[:, None]
    sky_end = _horizon(rng, w, rng.uniform(0.25, 0.5), h)
    band = rng.uniform() < 0.6
    band_end = _horizon(rng, w, min(sky_end.mean() / h + rng.uniform(0.15, 0.3), 0.85), h) if band else sky_end
    regions = [("sky", rows < sky_end[None]), ("ground", rows >= band_end[None])]
    if band:
        regions.append(("stripes", (rows >= sky_end[None]) & (rows < band_end[None])))
    stuff_id = dict((n, c) for c, n in STUFF)
    next_id = 1
    for name, region in regions:
        if region.sum() == 0:
            continue
        r0, r1 = (int(v) for v in np.nonzero(region.any(1))[0][[0, -1]])
        img[r0: r1 + 1][region[r0: r1 + 1]] = _stuff_colours(rng, name, h, w, (r0, r1 + 1))[region[r0: r1 + 1]]
        ids[region] = next_id
        category[next_id] = stuff_id[name]
        next_id += 1
    full: dict[int, int] = {}
    short = min(w, h)
    for _ in range(int(rng.integers(1, max_things + 1))):
        cid, shape = THINGS[int(rng.integers(len(THINGS)))]
        for _attempt in range(30):
            side = short * math.exp(rng.uniform(math.log(0.18), math.log(0.55)))
            aspect = math.exp(rng.uniform(-math.log(2.0), math.log(2.0)))
            bw, bh = min(side * math.sqrt(aspect), w - 2), min(side / math.sqrt(aspect), h - 2)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            m = _shape_mask(shape, (x0, y0, x0 + bw, y0 + bh), (w, h), rng)
            if m.sum() < _MIN_AREA:
                continue
            if any((ids[~m] == sid).sum() < _MIN_VISIBLE * area for sid, area in full.items()):
                continue
            colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.0))) * 255
            img[m] = colour + rng.normal(0, 3, (int(m.sum()), 3))
            ids[m] = next_id
            category[next_id] = cid
            full[next_id] = int(m.sum())
            next_id += 1
            break
    # a shape may cover a whole stuff region: keep only ids still present
    present = set(np.unique(ids).tolist())
    category = {k: v for k, v in category.items() if k in present}
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), ids, category


def _write_one(job: tuple) -> tuple[dict, dict, list[dict]]:
    """Render and write image i; -> (image record, panoptic annotation, instance annotations without ids)."""
    out, i, seed, image_size, image_format, max_things = job
    rng = np.random.default_rng([seed, i, 7])  # an independent stream per image: any worker, same bytes
    image, ids, category = render_panoptic_sample(rng, image_size, max_things)
    # segment ids spread over the RGB range (as COCO's are), so a PNG is not mostly black
    remap = {sid: int(rng.integers(1, 256 ** 3)) for sid in category}
    while len(set(remap.values())) < len(remap):
        remap = {sid: int(rng.integers(1, 256 ** 3)) for sid in category}
    lut = np.zeros(max(category) + 1, dtype=np.int64)
    for sid, new in remap.items():
        lut[sid] = new
    ids = lut[ids]
    category = {remap[k]: v for k, v in category.items()}
    name = f"{i:06d}"
    image.save(out / "images" / f"{name}.{image_format}",
               **({"quality": 92} if image_format == "jpg" else {"compress_level": 1}))
    write_segment_ids(ids, out / "panoptic" / f"{name}.png")
    segments = segments_from_ids(ids, category)
    record = {"id": i + 1, "file_name": f"images/{name}.{image_format}", "width": image.width,
              "height": image.height}
    instances = [{"image_id": i + 1, "category_id": s["category_id"], "bbox": [float(v) for v in s["bbox"]],
                  "area": float(s["area"]), "iscrowd": 0, "segmentation": encode_mask(ids == s["id"])}
                 for s in segments]
    return record, {"image_id": i + 1, "file_name": f"{name}.png", "segments_info": segments}, instances


def make_synthetic_panoptic(out_dir: str | os.PathLike, num_images: int = 200, seed: int = 0,
                            image_size: tuple[int, int] = (128, 192), image_format: str = "png",
                            max_things: int = 4, workers: int | None = None) -> Path:
    """Write the dataset (see module docstring); returns the path of panoptic.json. `workers`
    processes render in parallel (default: the CPU count, 1 for small sets); the bytes are the same."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "panoptic").mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seed, image_size, image_format, max_things) for i in range(num_images)]
    import multiprocessing

    workers = workers if workers is not None else (os.cpu_count() or 1) if num_images >= 200 else 1
    # fork (as DataLoader workers): a caller's script needs no __main__ guard; elsewhere, one process
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.map(_write_one, jobs, chunksize=32)
    else:
        done = [_write_one(j) for j in jobs]
    images = [d[0] for d in done]
    pan_anns = [d[1] for d in done]
    inst_anns = [{"id": k + 1, **a} for k, a in enumerate(a for d in done for a in d[2])]
    categories = [{"id": c, "name": n, "isthing": 1, "supercategory": "shape"} for c, n in THINGS]
    categories += [{"id": c, "name": n, "isthing": 0, "supercategory": "stuff"} for c, n in STUFF]
    path = save_panoptic_json(out / "panoptic.json", images, pan_anns, categories)
    (out / "annotations.json").write_text(json.dumps({
        "info": {"description": "detrkit synthetic panoptic", "seed": seed},
        "images": images, "annotations": inst_anns,
        "categories": [{k: c[k] for k in ("id", "name", "supercategory", "isthing")} for c in categories]}))
    log.info("wrote %d panoptic images to %s", num_images, out)
    return path


def make_synthetic_panoptic_splits(out_dir: str | os.PathLike, train: int = 200, val: int = 50, seed: int = 0,
                                   **options) -> tuple[Path, Path]:
    """out_dir/train and out_dir/val from different seeds; returns both panoptic.json paths."""
    out = Path(out_dir)
    return (make_synthetic_panoptic(out / "train", train, seed, **options),
            make_synthetic_panoptic(out / "val", val, seed + 1_000_003, **options))
