"""A synthetic detection dataset of drawn shapes, small enough to train on a laptop CPU.

Each image has a darker textured, noisy background and 1-6 filled bright shapes of random hue, size (small to
large) and elongation (wide or tall), partly occluding each other. Boxes are the tight boxes of each
shape's visible pixels (COCO convention), so they match the drawing exactly. Output is deterministic
for a seed: the same seed writes the same bytes.

Variants: "shapes" (ellipse, rectangle, triangle, star, cross; category ids 1..5), "other"
(diamond, ring, hexagon; category ids 3, 17, 90 -- different shapes and non-contiguous ids, to show a
preset learns data it has never seen) and "hard" (ellipse, rectangle, triangle, cross; 1-9 objects of
10-120 px in 224-320 px images; object and background colours fully random, so either can be the
brighter; more and longer thin distractor lines): data nobody tuned a recipe for.
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

VARIANTS: dict[str, list[tuple[int, str]]] = {
    "shapes": [(1, "ellipse"), (2, "rectangle"), (3, "triangle"), (4, "star"), (5, "cross")],
    "other": [(3, "diamond"), (17, "ring"), (90, "hexagon")],
    "hard": [(1, "ellipse"), (2, "rectangle"), (3, "triangle"), (4, "cross")],
}


@dataclass(frozen=True)
class VariantDefaults:
    """What a variant draws unless the caller says otherwise."""

    image_size: tuple[int, int] = (192, 320)  # (min, max) side in pixels
    max_objects: int = 6
    object_size: tuple[float, float] = (0.1, 0.65)  # fraction of the shorter side, or pixels if object_px
    object_px: bool = False  # object_size is in pixels
    any_polarity: bool = False  # object and background colours fully random (either may be brighter)
    lines: tuple[int, int] = (0, 4)  # distractor line count range [lo, hi)


DEFAULTS: dict[str, VariantDefaults] = {
    "shapes": VariantDefaults(),
    "other": VariantDefaults(),
    "hard": VariantDefaults(image_size=(224, 320), max_objects=9, object_size=(10, 120), object_px=True,
                            any_polarity=True, lines=(2, 7)),
}
_HARD_CONTRAST = 60.0  # any-polarity colours: RGB distance to the background under the object

_MIN_VISIBLE = 0.6  # an occluded shape keeps at least this fraction of its pixels
_MIN_SIDE = 8  # pixels: the smallest box side drawn
_MIN_CONTRAST = 80.0  # RGB distance between a shape and the background under it
# Shapes are bright (any hue) on darker textured backgrounds. With fully random colours the
# light/dark polarity of a shape is random too, and a from-scratch CNN plateaus for thousands of
# steps before it finds colour-independent edges (measured: square vs circle, random colours, no
# progress in 300 steps; bright on dark, loss 0.19 by step 300). Colour still varies freely in hue.
_BACKGROUND_MAX = 110.0


def _shape_color(rng: np.random.Generator) -> np.ndarray:
    """A bright RGB colour of random hue and saturation."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.75, 1.0))
    return np.array([r, g, b]) * 255


@dataclass
class SyntheticObject:
    category_id: int
    bbox: list[float]  # xywh pixels: tight box of the visible pixels
    area: int  # visible pixels
    color: tuple[int, int, int]


@dataclass
class SyntheticSample:
    image: Image.Image
    objects: list[SyntheticObject]
    label_map: np.ndarray  # [H,W] int: 0 background, k = objects[k-1]


def _unit_polygon(name: str, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Outline in the unit square, or None for shapes drawn as ellipses."""
    if name == "rectangle":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if name == "triangle":
        pts = [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
        k = int(rng.integers(4))  # point up, right, down or left
        for _ in range(k):
            pts = [(1 - y, x) for x, y in pts]
        return pts
    if name == "star":
        turn = rng.uniform(0, 2 * math.pi / 5)
        return [
            (0.5 + (0.5 if j % 2 == 0 else 0.2) * math.cos(turn + j * math.pi / 5),
             0.5 + (0.5 if j % 2 == 0 else 0.2) * math.sin(turn + j * math.pi / 5))
            for j in range(10)
        ]
    if name == "cross":
        a, b = 0.34, 0.66
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if name == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if name == "hexagon":
        return [(0.5 + 0.5 * math.cos(j * math.pi / 3), 0.5 + 0.5 * math.sin(j * math.pi / 3)) for j in range(6)]
    return None


def _shape_mask(name: str, box: tuple[float, float, float, float], size: tuple[int, int],
                rng: np.random.Generator) -> np.ndarray:
    """Boolean [H,W] mask of a shape drawn into the pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if name in ("ellipse", "ring"):
        draw.ellipse([x0, y0, x1, y1], fill=255)
        if name == "ring":
            mx, my = (x1 - x0) * 0.25, (y1 - y0) * 0.25
            draw.ellipse([x0 + mx, y0 + my, x1 - mx, y1 - my], fill=0)
    else:
        pts = _unit_polygon(name, rng)
        w, h = x1 - x0, y1 - y0
        draw.polygon([(x0 + px * w, y0 + py * h) for px, py in pts], fill=255)
    return np.asarray(mask) > 0


def _background(rng: np.random.Generator, w: int, h: int, style: VariantDefaults = DEFAULTS["shapes"]) -> np.ndarray:
    """Float [H,W,3]: a colour gradient, low-frequency texture, distractor lines, pixel noise."""
    top = 255.0 if style.any_polarity else _BACKGROUND_MAX
    c0, c1 = rng.uniform(0, top, 3), rng.uniform(0, top, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(t.max() - t.min(), 1.0)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    coarse = rng.normal(0, 25, (6, 6, 3))
    texture = np.asarray(Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                         dtype=np.float64) - 128
    img = img + texture
    lines = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(lines)
    line_color = rng.uniform(0, 255.0 if style.any_polarity else _BACKGROUND_MAX + 40, 3)
    for _ in range(int(rng.integers(*style.lines))):
        draw.line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))], fill=255, width=int(rng.integers(1, 3)))
    on = np.asarray(lines) > 0
    img[on] = line_color
    img += rng.normal(0, rng.uniform(3, 12), img.shape)
    return img


def render_sample(rng: np.random.Generator, variant: str = "shapes",
                  image_size: tuple[int, int] | None = None, max_objects: int | None = None,
                  object_size: tuple[float, float] | None = None) -> SyntheticSample:
    """Draw one image with 1..max_objects shapes.

    `image_size` = (min, max) side length in pixels (width and height drawn separately);
    `object_size` = (min, max) shape size (log-uniform) as a fraction of the image's shorter side, in
    pixels for the "hard" variant. None: the variant's default (`DEFAULTS`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; choose one of {sorted(VARIANTS)}")
    style = DEFAULTS[variant]
    image_size = image_size or style.image_size
    max_objects = style.max_objects if max_objects is None else max_objects
    object_size = style.object_size if object_size is None else object_size
    lo, hi = image_size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = _background(rng, w, h, style)
    label_map = np.zeros((h, w), dtype=np.int32)
    full_area: list[int] = []
    colors: list[tuple[int, int, int]] = []
    categories: list[int] = []
    classes = VARIANTS[variant]
    short = min(w, h)
    if max_objects < 1 or not 0 < object_size[0] <= object_size[1] <= (short if style.object_px else 1):
        raise ValueError(f"need max_objects >= 1 and 0 < min <= max <= {'the image side' if style.object_px else 1} "
                         f"object_size, got {max_objects}, {object_size}")
    scale = 1.0 if style.object_px else short
    # pixels: in the pixel-sized variant no box side leaves object_size
    min_side = max(_MIN_SIDE, object_size[0]) if style.object_px else _MIN_SIDE
    max_side = object_size[1] if style.object_px else math.inf
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cid, name = classes[int(rng.integers(len(classes)))]
        for _attempt in range(30):
            side = scale * math.exp(rng.uniform(math.log(object_size[0]), math.log(object_size[1])))
            aspect = math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))  # wide or tall
            bw = float(np.clip(side * math.sqrt(aspect), min_side, min(w - 2, max_side)))
            bh = float(np.clip(side / math.sqrt(aspect), min_side, min(h - 2, max_side)))
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            mask = _shape_mask(name, (x0, y0, x0 + bw, y0 + bh), (w, h), rng)
            if mask.sum() < _MIN_SIDE * _MIN_SIDE // 2:
                continue
            # keep every earlier shape mostly visible
            covered = np.bincount(label_map[mask], minlength=len(full_area) + 1)[1:]
            visible = np.bincount(label_map.ravel(), minlength=len(full_area) + 1)[1:]
            if any(v - c < _MIN_VISIBLE * a for v, c, a in zip(visible, covered, full_area)):
                continue
            under = img[mask].mean(axis=0)
            for _c in range(10):
                if style.any_polarity:  # any colour: darker or brighter than what is under it
                    color = np.rint(rng.uniform(0, 255, 3))
                    if np.linalg.norm(color - under) >= _HARD_CONTRAST:
                        break
                else:
                    color = np.rint(_shape_color(rng))
                    if np.linalg.norm(color - under) >= _MIN_CONTRAST:
                        break
            img[mask] = color
            label_map[mask] = len(full_area) + 1
            full_area.append(int(mask.sum()))
            colors.append(tuple(int(v) for v in color))
            categories.append(cid)
            break
    objects = []
    for k, (cid, color) in enumerate(zip(categories, colors), start=1):
        ys, xs = np.nonzero(label_map == k)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        objects.append(SyntheticObject(cid, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], int(len(xs)), color))
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return SyntheticSample(image, objects, label_map)


def _sample_rng(seed: int, i: int, variant: str) -> np.random.Generator:
    # an independent stream per image (same image whatever num_images) and per variant
    return np.random.default_rng([seed, i, list(VARIANTS).index(variant)])


def make_synthetic(
    out_dir: str | os.PathLike,
    num_images: int = 200,
    seed: int = 0,
    variant: str = "shapes",
    image_size: tuple[int, int] | None = None,
    image_format: str = "jpg",
    max_objects: int | None = None,
    object_size: tuple[float, float] | None = None,
) -> Path:
    """Write `out_dir/annotations.json` (COCO) and `out_dir/images/*.jpg|png`; return the JSON path."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"synthetic {variant}", unit="img", disable=None, leave=False):
        sample = render_sample(_sample_rng(seed, i, variant), variant, image_size, max_objects, object_size)
        name = f"images/{i:06d}.{image_format}"
        if image_format == "jpg":
            sample.image.save(out / name, quality=92)
        else:
            sample.image.save(out / name)
        images.append({"id": i + 1, "file_name": name, "width": sample.image.width, "height": sample.image.height})
        for obj in sample.objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj.category_id,
                "bbox": obj.bbox, "area": float(obj.area), "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"detrkit synthetic '{variant}'", "seed": seed, "num_images": num_images},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in VARIANTS[variant]],
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco, indent=1))
    log.info("wrote %d images, %d boxes to %s", len(images), len(annotations), out)
    return path


def make_synthetic_splits(out_dir: str | os.PathLike, train: int = 200, val: int = 50, seed: int = 0,
                          **options) -> tuple[Path, Path]:
    """`out_dir/train/` and `out_dir/val/`, drawn from different seeds; returns both JSON paths.

    `options` are make_synthetic's (variant, image_size, image_format, max_objects, object_size).
    """
    out = Path(out_dir)
    # val uses a distinct seed stream so no image repeats between the splits
    train_json = make_synthetic(out / "train", train, seed, **options)
    val_json = make_synthetic(out / "val", val, seed + 1_000_003, **options)
    return train_json, val_json
