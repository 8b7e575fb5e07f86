"""Panoptic figures: a colour overlay of the segments, and per detected object its mask-head attention
maps (one per head, over the stride-32 memory) beside its final mask.

Stuff segments take their class colour, thing segments a colour varied per instance around their
class colour (so touching objects of one class stay apart); segment borders are drawn dark and each
segment is labelled at the pixel deepest inside it.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage

from ..panoptic_postprocess import PanopticResult
from .draw import _font, class_colour, font_size_for, text_colour


def _segment_colour(seg: dict, k: int, class_index: int) -> tuple[int, int, int]:
    base = np.array(class_colour(class_index), dtype=float)
    if not seg.get("isthing", True):
        return tuple(int(v) for v in base)
    rng = np.random.default_rng(k)  # per-instance shade: deterministic
    return tuple(int(v) for v in np.clip(base + rng.uniform(-60, 60, 3), 0, 255))


def draw_panoptic(image: Image.Image, result: PanopticResult, alpha: float = 0.55,
                  category_ids: list[int] | None = None) -> Image.Image:
    """The image with every segment filled in colour (alpha-blended), borders and labels."""
    base = np.asarray(image.convert("RGB"), dtype=float)
    ids = result.ids
    if ids.shape != base.shape[:2]:
        raise ValueError(f"segment map {ids.shape} and image {base.shape[:2]} differ in size")
    colours = np.zeros_like(base)
    painted = np.zeros(ids.shape, dtype=bool)
    cidx = {c: i for i, c in enumerate(category_ids or sorted({s["category_id"] for s in result.segments}))}
    seg_colour = {}
    for k, seg in enumerate(result.segments):
        m = ids == seg["id"]
        seg_colour[seg["id"]] = _segment_colour(seg, k, cidx.get(seg["category_id"], 0))
        colours[m] = seg_colour[seg["id"]]
        painted |= m
    out = base.copy()
    out[painted] = (1 - alpha) * base[painted] + alpha * colours[painted]
    border = np.zeros(ids.shape, dtype=bool)
    border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    border[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[border] = 0.3 * out[border]
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = _font(max(10, font_size_for(img.size) * 2 // 3))
    for seg in result.segments:
        m = ids == seg["id"]
        depth = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(depth.argmax()), depth.shape)
        text = str(seg.get("label", seg["category_id"]))
        if seg.get("score") is not None:
            text += f" {seg['score']:.2f}"
        box = draw.textbbox((x, y), text, font=font, anchor="mm")
        bg = seg_colour[seg["id"]]
        draw.rectangle(box, fill=bg)
        draw.text((x, y), text, fill=text_colour(bg), font=font, anchor="mm")
    return img


@torch.no_grad()
def plot_mask_attention(model, cfg, image: Image.Image, threshold: float = 0.7, max_detections: int = 6,
                        device: str = "cpu") -> tuple[Figure, int]:
    """One row per detection (best real class above `threshold`, at most `max_detections`): the image
    with its box, the mask head's attention map of each head (upsampled to the image), the final mask
    probability. -> (figure, number of detections shown)."""
    from torchvision.ops import box_convert

    from ..data.transforms import resize_for_inference

    x = resize_for_inference(image.convert("RGB"), cfg.image_size, cfg.max_image_size).to(device)
    model = model.to(device).eval()
    out = model([x], return_attention=True)
    prob = out["pred_logits"][0].float().softmax(-1)[:, :-1]
    scores, labels = prob.max(-1)
    order = scores.argsort(descending=True)
    order = order[scores[order] > threshold][:max_detections]
    att = out["mask_attention"][0][order].float()  # [K,heads,h,w]
    masks = out["pred_masks"][0][order].float().sigmoid()  # [K,H/4,W/4]
    W, H = image.size
    h, w = x.shape[-2:]
    fmask = out["attention"]["feature_mask"][0]
    rows, cols = int((~fmask).any(1).sum()), int((~fmask).any(0).sum())
    heads = att.shape[1]
    k = len(order)
    fig = Figure(figsize=(2.0 * (heads + 2), 2.0 * max(k, 1)))
    if k == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(image)
        ax.set_title(f"no detection above {threshold:g}")
        ax.axis("off")
        return fig, 0
    boxes = box_convert(out["pred_boxes"][0][order].float(), "cxcywh", "xyxy") * torch.tensor([W, H, W, H])
    cmap = colormaps["viridis"]
    for r in range(k):
        q = int(order[r])
        ax = fig.add_subplot(k, heads + 2, r * (heads + 2) + 1)
        ax.imshow(image)
        x0, y0, x1, y1 = boxes[r].tolist()
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="red", linewidth=1.5)
        ax.set_title(f"{cfg.class_names[int(labels[q])]} {float(scores[q]):.2f}", fontsize=8)
        ax.axis("off")
        for hd in range(heads):
            a = att[r, hd, :rows, :cols].numpy()
            ax = fig.add_subplot(k, heads + 2, r * (heads + 2) + 2 + hd)
            ax.imshow(a, cmap=cmap, extent=(0, W, H, 0), interpolation="nearest")
            ax.set_title(f"head {hd}", fontsize=7)
            ax.axis("off")
        m = masks[r, : -(-h // 4), : -(-w // 4)].numpy()
        ax = fig.add_subplot(k, heads + 2, r * (heads + 2) + heads + 2)
        ax.imshow(np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((W, H), Image.BILINEAR)),
                  cmap="gray", vmin=0, vmax=255)
        ax.set_title("mask", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig, k
