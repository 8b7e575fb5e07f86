"""Where the transformer looks: decoder cross-attention per detection, encoder self-attention per point.

The maps come from `DETR.forward(..., return_attention=True)`:
``attention = {encoder [Le,B,heads,N,N], decoder_cross [Ld,B,heads,Q,N], feature_mask [B,h,w]}``
with N = h*w feature tokens in row-major order and weights exactly 0 on padded keys. Averaging the
heads keeps each map a probability distribution over the image's valid (unpadded) feature cells.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from ..postprocess import postprocess
from .draw import class_colour, format_label

log = logging.getLogger(__name__)


def valid_feature_sizes(feature_mask: Tensor) -> list[tuple[int, int]]:
    """(rows, cols) of each image's unpadded feature region. feature_mask [B,h,w], True on padding
    (padding is bottom/right, so the valid region is a top-left rectangle)."""
    valid = ~feature_mask.bool()
    rows = valid.any(2).sum(1)
    cols = valid.any(1).sum(1)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def decoder_attention(attention: dict[str, Tensor], layer: int = -1) -> Tensor:
    """Cross-attention of every query over the feature grid, heads averaged.

    -> [B,Q,h,w]; over each image's valid cells every map sums to 1, and it is 0 on padding.
    """
    w = attention["decoder_cross"][layer]  # [B,heads,Q,N]
    b, _, q, n = w.shape
    h, wd = attention["feature_mask"].shape[-2:]
    if h * wd != n:
        raise ValueError(f"decoder attention has {n} keys but the feature mask is {h}x{wd}")
    return w.float().mean(1).reshape(b, q, h, wd)


def encoder_attention(attention: dict[str, Tensor], points: Tensor | Sequence[Sequence[Sequence[int]]],
                      layer: int = -1) -> Tensor:
    """Encoder self-attention of reference tokens over the feature grid, heads averaged.

    points [B,P,2] integer (col, row) feature-grid positions, one set per image -> [B,P,h,w];
    over each image's valid cells every map sums to 1, and it is 0 on padding.
    """
    enc = attention["encoder"][layer]  # [B,heads,N,N]
    b, _, n, _ = enc.shape
    h, wd = attention["feature_mask"].shape[-2:]
    pts = torch.as_tensor(points, dtype=torch.long, device=enc.device).reshape(b, -1, 2)
    if ((pts[..., 0] < 0) | (pts[..., 0] >= wd) | (pts[..., 1] < 0) | (pts[..., 1] >= h)).any():
        raise ValueError(f"reference points must lie on the {h}x{wd} feature grid (col, row), got {pts.tolist()}")
    tokens = pts[..., 1] * wd + pts[..., 0]  # [B,P], row-major
    rows = enc.float().mean(1)  # [B,N,N]
    picked = torch.gather(rows, 1, tokens[..., None].expand(-1, -1, n))  # [B,P,N]
    return picked.reshape(b, -1, h, wd)


@dataclass
class AttentionResult:
    """One image, its detections and where the model looked.

    image: the upright RGB image; boxes [K,4] xyxy pixels of it; scores [K]; labels [K]; slots [K]
    (the query index behind each detection); decoder_maps [K,hv,wv] (last layer, heads averaged,
    cropped to the valid cells); encoder_weights [hv*wv, hv*wv] (last layer, heads averaged, row r =
    where token r looks); cell_size (sy, sx): pixels of `image` per feature cell.
    """

    image: Image.Image
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    slots: np.ndarray
    class_names: list[str]
    decoder_maps: np.ndarray
    encoder_weights: np.ndarray
    cell_size: tuple[float, float]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.decoder_maps.shape[-2]), int(self.decoder_maps.shape[-1])

    def pixel_to_cell(self, x: float, y: float) -> tuple[int, int]:
        """(col, row) of the feature cell holding image pixel (x, y), clamped to the grid."""
        rows, cols = self.grid
        return (min(cols - 1, max(0, int(x // self.cell_size[1]))), min(rows - 1, max(0, int(y // self.cell_size[0]))))

    def encoder_map(self, x: float, y: float) -> np.ndarray:
        """[hv,wv] encoder self-attention of the cell holding pixel (x, y)."""
        col, row = self.pixel_to_cell(x, y)
        return self.encoder_weights[row * self.grid[1] + col].reshape(self.grid)


@torch.no_grad()
def compute_attention(detector: Any, image: Any, threshold: float = 0.5, max_detections: int | None = None
                      ) -> AttentionResult:
    """Run `detector` (.model, .config, .preprocess, .device) on one image (path or PIL) as a batch
    of one and collect the detections above `threshold` with their attention."""
    if isinstance(image, (str, Path)):
        from ..data.images import load_image

        image = load_image(image)
    image = image.convert("RGB") if image.mode != "RGB" else image
    model = detector.model
    was_training = model.training
    model.eval()
    try:
        tensors, sizes = detector.preprocess([image])
        x = tensors[0].to(detector.device)
        out = model([x], return_attention=True)
    finally:
        model.train(was_training)
    att = out["attention"]
    (hv, wv), = valid_feature_sizes(att["feature_mask"])
    det = postprocess(out["pred_logits"], out["pred_boxes"], sizes, threshold, max_detections,
                      detector.config.duplicate_iou, detector.config.classes_per_query)[0]
    keep, boxes = det["queries"], det["boxes"]
    h0, w0 = sizes[0]
    dec = decoder_attention(att)[0, keep, :hv, :wv]
    enc = att["encoder"][-1, 0].float().mean(0)  # [N,N]
    h, w = att["feature_mask"].shape[-2:]
    valid = torch.zeros(h, w, dtype=torch.bool)
    valid[:hv, :wv] = True
    valid = valid.flatten().to(enc.device)
    enc = enc[valid][:, valid]
    # feature cell size in pixels of the original image: the resized input is covered by hv x wv cells
    # of `stride` pixels, and the resize scaled the original by (H1/h0, W1/w0)
    stride = 16 if getattr(detector.config, "dilation", False) else 32
    h1, w1 = x.shape[-2:]
    cell = (stride * h0 / h1, stride * w0 / w1)
    return AttentionResult(
        image=image, boxes=boxes.cpu().numpy(), scores=det["scores"].cpu().numpy(),
        labels=det["labels"].cpu().numpy(), slots=keep.cpu().numpy(),
        class_names=list(detector.config.class_names), decoder_maps=dec.cpu().numpy(),
        encoder_weights=enc.cpu().numpy(), cell_size=cell,
    )


def default_points(result: AttentionResult, max_points: int = 4) -> list[tuple[float, float]]:
    """Reference points (x, y pixels): the centres of the top detections (distinct cells), else a few
    spread over the image."""
    pts, cells = [], set()
    for x0, y0, x1, y1 in result.boxes:
        p = ((x0 + x1) / 2, (y0 + y1) / 2)
        cell = result.pixel_to_cell(*p)
        if cell not in cells:
            cells.add(cell)
            pts.append((float(p[0]), float(p[1])))
        if len(pts) == max_points:
            return pts
    if not pts:
        w, h = result.image.size
        pts = [(w * fx, h * fy) for fx, fy in ((0.5, 0.5), (0.25, 0.3), (0.75, 0.3), (0.5, 0.8))][:max_points]
    return pts


def _thumbnail(result: AttentionResult, max_side: int = 1024) -> Image.Image:
    """The image at most `max_side` pixels on a side: panels are a few inches wide, and drawing a
    many-megapixel photo in every panel would be slow for nothing."""
    w, h = result.image.size
    if max(w, h) <= max_side:
        return result.image
    scale = max_side / max(w, h)
    return result.image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def _show_image(ax, result: AttentionResult) -> None:
    w, h = result.image.size
    ax.imshow(_thumbnail(result), extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)


def _show_map(ax, result: AttentionResult, amap: np.ndarray) -> None:
    """The map over a darkened grayscale copy of the image: colour and opacity grow with attention,
    so low-attention regions show the picture and the peaks stand out in bright yellow."""
    w, h = result.image.size
    ax.imshow(_thumbnail(result).convert("L"), cmap="gray", extent=(0, w, h, 0), vmin=0, vmax=400)
    norm = amap / max(float(amap.max()), 1e-12)
    rgba = colormaps["inferno"](norm)
    rgba[..., 3] = 0.1 + 0.85 * norm
    rows, cols = amap.shape
    extent = (0, cols * result.cell_size[1], rows * result.cell_size[0], 0)
    ax.imshow(rgba, extent=extent, interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


_PANEL = 2.6  # inches per image panel


def _image_height(result: AttentionResult) -> float:
    """Inches an image panel takes when it is about _PANEL wide (constrained layout trims a little)."""
    w, h = result.image.size
    return 0.93 * _PANEL * h / w


def _decoder_height(result: AttentionResult) -> float:
    return 2 * _image_height(result) + 0.95  # two image rows, two-line titles, suptitle


def _encoder_height(result: AttentionResult) -> float:
    return _image_height(result) + 0.75  # one image row, titles, suptitle


def _box_patch(box: np.ndarray, label: int, lw: float = 1.5) -> Rectangle:
    colour = np.asarray(class_colour(label)) / 255.0
    return Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec=colour, lw=lw)


def _plot_decoder(fig, result: AttentionResult, max_detections: int) -> None:
    k = min(len(result.slots), max_detections)
    if k == 0:
        ax = fig.subplots()
        _show_image(ax, result)
        ax.set_axis_off()
        ax.set_title("no detections above the threshold", fontsize=9)
        return
    axes = fig.subplots(2, k, squeeze=False)
    for i in range(k):
        box, label = result.boxes[i], int(result.labels[i])
        name = result.class_names[label] if label < len(result.class_names) else str(label)
        top, bottom = axes[0, i], axes[1, i]
        _show_image(top, result)
        top.add_patch(_box_patch(box, label, 2.0))
        top.set_xticks([])
        top.set_yticks([])
        top.set_title(f"{format_label(name, result.scores[i])}\n(slot {int(result.slots[i])})", fontsize=8)
        _show_map(bottom, result, result.decoder_maps[i])
        bottom.add_patch(_box_patch(box, label, 1.0))
    axes[0, 0].set_ylabel("detection", fontsize=8)
    axes[1, 0].set_ylabel("decoder attention", fontsize=8)
    fig.suptitle("Last decoder layer: cross-attention of each detection's query (heads averaged)", fontsize=9)


def _plot_encoder(fig, result: AttentionResult, points: Sequence[tuple[float, float]]) -> None:
    axes = fig.subplots(1, len(points) + 1, squeeze=False)[0]
    _show_image(axes[0], result)
    for j, (x, y) in enumerate(points):
        axes[0].plot(x, y, marker="o", ms=7, mfc="#ff2e63", mec="white", mew=1.2)
        axes[0].annotate(str(j + 1), (x, y), xytext=(5, 5), textcoords="offset points", color="white",
                         fontsize=9, fontweight="bold",
                         bbox=dict(boxstyle="round,pad=0.15", fc="#ff2e63", ec="none"))
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[0].set_title("reference points", fontsize=8)
    for j, (x, y) in enumerate(points):
        ax = axes[j + 1]
        _show_map(ax, result, result.encoder_map(x, y))
        ax.plot(x, y, marker="x", ms=8, mew=2, color="#00e5ff")
        ax.set_title(f"point {j + 1} ({x:.0f}, {y:.0f})", fontsize=8)
    fig.suptitle("Last encoder layer: self-attention of the feature cell under each point (heads averaged)",
                 fontsize=9)


def plot_decoder_attention(result: AttentionResult, max_detections: int = 6) -> Figure:
    """Per detection (up to `max_detections`): the image with its box above its cross-attention map."""
    k = max(1, min(len(result.slots), max_detections))
    fig = Figure(figsize=(_PANEL * max(k, 3), _decoder_height(result)), layout="constrained")
    _plot_decoder(fig, result, max_detections)
    return fig


def plot_encoder_attention(result: AttentionResult, points: Sequence[tuple[float, float]] | None = None) -> Figure:
    """The image with reference points (x, y pixels; default: detection centres) and, for each, the
    last encoder layer's self-attention of the feature cell under it."""
    points = list(points) if points else default_points(result)
    fig = Figure(figsize=(_PANEL * max(len(points) + 1, 3), _encoder_height(result)), layout="constrained")
    _plot_encoder(fig, result, points)
    return fig


def plot_attention(result: AttentionResult, points: Sequence[tuple[float, float]] | None = None,
                   max_detections: int = 6) -> Figure:
    """Both views in one figure: decoder attention per detection (top), encoder attention per point (bottom)."""
    points = list(points) if points else default_points(result)
    k = max(1, min(len(result.slots), max_detections))
    cols = max(k, len(points) + 1, 3)  # at least 3 panels wide, so the titles fit
    top_h, bottom_h = _decoder_height(result), _encoder_height(result)
    fig = Figure(figsize=(_PANEL * cols, top_h + bottom_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
    _plot_decoder(top, result, max_detections)
    _plot_encoder(bottom, result, points)
    return fig


def parse_points(text: str) -> list[tuple[float, float]]:
    """'x,y;x,y' (pixels of the upright image) -> [(x, y), ...]."""
    points = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        try:
            x, y = (float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"bad point {part!r}: expected 'x,y' in pixels, points separated by ';'") from None
        points.append((x, y))
    if not points:
        raise ValueError(f"no points in {text!r}: expected 'x,y;x,y'")
    return points
