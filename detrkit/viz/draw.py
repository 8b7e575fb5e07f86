"""Drawing detections on an image: boxes, class names and scores that stay readable on any photo.

Each class gets a colour from a qualitative palette; a label is text on a filled tag of the class
colour, in black or white, whichever contrasts more with the tag (WCAG relative luminance). Every box
has a thin dark-and-light edge, so it shows on bright and dark backgrounds alike. Line width and font
size scale with the image.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A qualitative palette (the 10 Tableau colours, then 10 lighter/darker companions): neighbouring
# class indices get clearly different hues.
_PALETTE_HEX = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)) for h in _PALETTE_HEX
)


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of contiguous class index `label` (cycles through `PALETTE`)."""
    return PALETTE[int(label) % len(PALETTE)]


def _luminance(rgb: Sequence[int]) -> float:
    def lin(c: float) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio against `background` (RGB)."""
    lum = _luminance(background)
    contrast_black = (lum + 0.05) / 0.05
    contrast_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if contrast_black >= contrast_white else (255, 255, 255)


def line_width_for(size: tuple[int, int]) -> int:
    """Box line width in pixels for an image of `size` (w, h): about 0.4% of the mean side, at least 2."""
    return max(2, round(0.004 * (size[0] + size[1]) / 2))


def font_size_for(size: tuple[int, int]) -> int:
    """Label font size in pixels for an image of `size` (w, h): about 3% of the shorter side, at least 12."""
    return max(12, round(0.03 * min(size)))


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def format_label(name: str | None, score: float | None) -> str:
    parts = [p for p in (name, None if score is None else f"{float(score):.2f}") if p]
    return " ".join(parts)


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None = None,
    names: Sequence[str] | None = None,
    *,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """Draw boxes with class-coloured labels on a copy of `image` (returned as RGB, same size).

    boxes [K,4] xyxy pixels of `image`; labels [K] contiguous class indices (they pick the colour);
    scores [K] or None; names: class names indexed by label (None: the label number is shown).
    Boxes are drawn largest first so small ones stay visible, then the labels, each at the first free
    spot among above / inside the top / below / inside the bottom of its box, most confident first.
    """
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(labels)} labels")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(scores)} scores")
    w, h = out.size
    lw = line_width or line_width_for(out.size)
    font = _font(font_size or font_size_for(out.size))
    draw = ImageDraw.Draw(out)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = []
    for x0, y0, x1, y1 in boxes.tolist():
        # both corners inside the image, in order (a box beyond the edge of a 1-px image included)
        x0, x1 = (min(max(v, 0.0), w - 1.0) for v in (min(x0, x1), max(x0, x1)))
        y0, y1 = (min(max(v, 0.0), h - 1.0) for v in (min(y0, y1), max(y0, y1)))
        clipped.append((x0, y0, x1, y1))
    # all boxes first (largest first, so small ones stay visible), then all tags, so no line crosses a label
    for i in np.argsort(-area, kind="stable"):
        x0, y0, x1, y1 = clipped[i]
        # thin dark outline around the coloured line: it reads on bright and dark backgrounds alike
        draw.rectangle((x0 - lw, y0 - lw, x1 + lw, y1 + lw), outline=(0, 0, 0), width=1)
        draw.rectangle((x0, y0, x1, y1), outline=class_colour(labels[i]), width=lw)
    # tags: the most confident first get the best free spot; drawn in reverse so they end on top
    order = np.argsort(-scores, kind="stable") if scores is not None else np.arange(len(boxes))
    placed: list[tuple[float, float, float, float]] = []
    tags = []
    for i in order:
        label = int(labels[i])
        name = names[label] if names is not None and 0 <= label < len(names) else str(label)
        text = format_label(name, None if scores is None else scores[i])
        rect = _place_tag(draw, text, clipped[i], font, lw, (w, h), placed)
        placed.append(rect)
        tags.append((rect, text, class_colour(label)))
    for rect, text, colour in reversed(tags):
        _draw_tag(draw, rect, text, colour, font, lw)
    return out


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(draw: ImageDraw.ImageDraw, text: str, box: tuple[float, float, float, float], font, lw: int,
               size: tuple[int, int], placed: list[tuple[float, float, float, float]]
               ) -> tuple[float, float, float, float]:
    """Where the tag goes: above the box's top-left corner, else just inside it, else at the box's
    bottom (below, then inside): the first spot on the image that overlaps no tag placed before."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, lw // 2 + 1)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    tx = min(max(0.0, box[0] - lw / 2), max(0.0, size[0] - tw))
    candidates = [box[1] - th, box[1], box[3] + lw, box[3] - th]
    spots = [(tx, ty, tx + tw, ty + th) for ty in candidates if 0 <= ty and ty + th <= size[1]]
    if not spots:
        spots = [(tx, 0.0, tx + tw, float(th))]
    for spot in spots:
        if not any(_overlaps(spot, p) for p in placed):
            return spot
    return spots[0]


def _draw_tag(draw: ImageDraw.ImageDraw, rect: tuple[float, float, float, float], text: str,
              colour: tuple[int, int, int], font, lw: int) -> None:
    """A filled tag of the class colour with the text in black or white, whichever contrasts more."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    pad = max(2, lw // 2 + 1)
    draw.rectangle(rect, fill=colour)
    draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=text_colour(colour), font=font)
