"""What each object-query slot predicts across a dataset: the paper's Figure 7, and slot usage.

Run the model over many images and keep, for every image, the box of every slot (one per slot per
image, whatever its score). A panel per slot scatters those boxes' centres in the unit square (y down,
as in an image) coloured by shape: green small, red large horizontal, blue large vertical.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image
from tqdm.auto import tqdm

from ..postprocess import class_scores
from .draw import PALETTE

log = logging.getLogger(__name__)

KIND_NAMES = ("small", "horizontal", "vertical")
KIND_COLOURS = {"small": "#2ca02c", "horizontal": "#d62728", "vertical": "#1f77b4"}
DEFAULT_SMALL_AREA = 0.1


@dataclass
class SlotPredictions:
    """Every slot's prediction on every image.

    boxes [I,Q,4] cxcywh in [0,1] of each image; scores [I,Q] best real-class probability;
    labels [I,Q] its contiguous class index; image_sizes [I,2] (h, w) pixels of the upright image;
    files: the I image names; class_names: the model's classes.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_sizes: np.ndarray
    files: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.boxes.shape[1])

    @classmethod
    def from_outputs(cls, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                     files: Sequence[str] = (), class_names: Sequence[str] = ()) -> "SlotPredictions":
        """From raw model outputs: pred_logits [I,Q,C+1] (last = no object), pred_boxes [I,Q,4]."""
        scores, labels = class_scores(pred_logits)
        return cls(
            boxes=pred_boxes.float().cpu().numpy(), scores=scores.cpu().numpy(), labels=labels.cpu().numpy(),
            image_sizes=np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2),
            files=[str(f) for f in files], class_names=list(class_names),
        )


def _load_image(item: Any) -> Image.Image:
    from ..data.images import load_image

    return load_image(item) if isinstance(item, (str, Path)) else item


@torch.no_grad()
def collect_slot_predictions(detector: Any, images: Iterable[Any], *, batch_size: int = 4,
                             progress: bool = True) -> SlotPredictions:
    """Run `detector` (a `Detector`: .model, .config, .preprocess) over `images` (paths or PIL images)
    and keep every slot's box on every image. Files that cannot be read are logged and skipped."""
    images = list(images)
    model = detector.model
    was_training = model.training
    model.eval()
    logits, boxes, sizes, names = [], [], [], []
    bar = tqdm(total=len(images), desc="query slots", unit="img", disable=not progress)
    try:
        for start in range(0, len(images), batch_size):
            chunk, chunk_names = [], []
            for item in images[start: start + batch_size]:
                name = str(item) if isinstance(item, (str, Path)) else f"image {len(names) + len(chunk)}"
                try:
                    chunk.append(_load_image(item))
                    chunk_names.append(name)
                except Exception as e:  # one unreadable file must not stop a whole dataset
                    log.error("skipping %s: %s", name, e)
                bar.update(1)
            if not chunk:
                continue
            tensors, orig_sizes = detector.preprocess(chunk)
            tensors = [t.to(detector.device) for t in tensors]
            out = model(tensors, batch_invariant=True)
            logits.append(out["pred_logits"].float().cpu())
            boxes.append(out["pred_boxes"].float().cpu())
            sizes.extend((int(h), int(w)) for h, w in orig_sizes)
            names.extend(chunk_names)
    finally:
        bar.close()
        model.train(was_training)
    if not names:
        raise ValueError("no readable images to run the model on")
    return SlotPredictions.from_outputs(torch.cat(logits), torch.cat(boxes), sizes, names,
                                        list(detector.config.class_names))


def box_kinds(boxes: np.ndarray, image_sizes: np.ndarray, small_area: float = DEFAULT_SMALL_AREA) -> np.ndarray:
    """Shape class of each box: 0 small (w*h < small_area, as fractions of the image), else 1 horizontal
    (w >= h in pixels), else 2 vertical.

    boxes [I,Q,4] cxcywh in [0,1]; image_sizes [I,2] (h, w) -> [I,Q] int in {0, 1, 2}.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 1, 2)
    w, h = boxes[..., 2], boxes[..., 3]
    kinds = np.where(w * sizes[..., 1] >= h * sizes[..., 0], 1, 2)
    return np.where(w * h < small_area, 0, kinds)


def slot_usage(preds: SlotPredictions, threshold: float = 0.5) -> dict[str, Any]:
    """How often each slot fires (score > threshold), overall and per class.

    -> {"threshold", "num_images", "fires" [Q] counts, "fraction" [Q], "per_class" [Q][C] counts,
        "class_names"}.
    """
    fires = preds.scores > threshold  # [I,Q]
    num_classes = max(len(preds.class_names), int(preds.labels.max()) + 1 if preds.labels.size else 0)
    per_class = np.zeros((preds.num_slots, num_classes), dtype=np.int64)
    img_idx, slot_idx = np.nonzero(fires)
    np.add.at(per_class, (slot_idx, preds.labels[img_idx, slot_idx]), 1)
    counts = fires.sum(0)
    return {
        "threshold": float(threshold),
        "num_images": preds.num_images,
        "fires": counts.tolist(),
        "fraction": (counts / max(1, preds.num_images)).tolist(),
        "per_class": per_class.tolist(),
        "class_names": list(preds.class_names) or [str(i) for i in range(num_classes)],
    }


def choose_slots(preds: SlotPredictions, n: int = 20, slot_ids: Sequence[int] | None = None,
                 threshold: float = 0.5) -> list[int]:
    """The slots to show: `slot_ids` (0-based, checked) if given, else the `n` that fire most often
    above `threshold` (ties: mean score, then lower index)."""
    if slot_ids is not None:
        bad = [s for s in slot_ids if not 0 <= int(s) < preds.num_slots]
        if bad:
            raise ValueError(f"slot ids {bad} out of range: the model has slots 0..{preds.num_slots - 1}")
        return [int(s) for s in slot_ids]
    if n < 1:
        raise ValueError(f"number of slots must be >= 1, got {n}")
    fires = (preds.scores > threshold).sum(0)
    mean_score = preds.scores.mean(0)
    order = np.lexsort((np.arange(preds.num_slots), -mean_score, -fires))
    return [int(s) for s in order[: min(n, preds.num_slots)]]


def query_figure_data(preds: SlotPredictions, slots: Sequence[int], small_area: float = DEFAULT_SMALL_AREA,
                      min_score: float | None = None) -> dict[str, Any]:
    """The numbers behind the figure: per slot, the centres, sizes, kinds and scores it predicts."""
    kinds = box_kinds(preds.boxes, preds.image_sizes, small_area)
    panels = []
    for s in slots:
        keep = np.ones(preds.num_images, dtype=bool) if min_score is None else preds.scores[:, s] > min_score
        idx = np.nonzero(keep)[0]
        panels.append({
            "slot": int(s),
            "image_index": idx.tolist(),
            "centres": preds.boxes[idx, s, :2].round(6).tolist(),
            "sizes": preds.boxes[idx, s, 2:].round(6).tolist(),
            "kinds": [KIND_NAMES[k] for k in kinds[idx, s]],
            "scores": preds.scores[idx, s].round(6).tolist(),
            "labels": preds.labels[idx, s].tolist(),
        })
    return {
        "num_images": preds.num_images,
        "files": preds.files,
        "small_area": small_area,
        "min_score": min_score,
        "kind_rule": f"small if w*h < {small_area:g} of the image area; otherwise horizontal if w >= h "
                     "(pixels), else vertical",
        "panels": panels,
    }


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 5) if n <= 20 else int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def plot_query_slots(preds: SlotPredictions, slots: Sequence[int] | None = None, *, n: int = 20,
                     threshold: float = 0.5, small_area: float = DEFAULT_SMALL_AREA,
                     min_score: float | None = None, panel_size: float = 2.0) -> Figure:
    """Figure 7 of the paper: a panel per slot, its box centres over all images in the unit square.

    slots: which slots (0-based); None picks the `n` most used above `threshold`.
    min_score: plot only boxes scoring above it (None: every image's box, as in the paper).
    """
    if slots is None:
        slots = choose_slots(preds, n=n, threshold=threshold)
    data = query_figure_data(preds, slots, small_area, min_score)
    usage = (preds.scores > threshold).mean(0)
    rows, cols = _grid(len(slots))
    fig = Figure(figsize=(cols * panel_size, rows * panel_size + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, panel in zip(axes, data["panels"]):
        pts = np.asarray(panel["centres"], dtype=np.float64).reshape(-1, 2)
        kinds = np.asarray(panel["kinds"])
        # small boxes first so the rarer large ones stay visible on top
        for kind in KIND_NAMES:
            sel = kinds == kind
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=6, c=KIND_COLOURS[kind], alpha=0.6, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # y down, as in an image
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"slot {panel['slot']}  ({100 * usage[panel['slot']]:.0f}% > {threshold:g})", fontsize=8)
    for ax in axes[len(slots):]:
        ax.set_axis_off()
    handles = [
        Line2D([], [], ls="", marker="o", color=KIND_COLOURS["small"], label=f"small: w·h < {small_area:g} of image"),
        Line2D([], [], ls="", marker="o", color=KIND_COLOURS["horizontal"], label="large horizontal: w ≥ h"),
        Line2D([], [], ls="", marker="o", color=KIND_COLOURS["vertical"], label="large vertical: w < h"),
    ]
    what = "every image's box" if min_score is None else f"boxes scoring > {min_score:g}"
    fig.suptitle(f"Box centres predicted by each query slot over {preds.num_images} images ({what})", fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def plot_slot_usage(preds: SlotPredictions, threshold: float = 0.5, *, max_classes: int = 10) -> Figure:
    """Stacked bars: for each slot, how many images it fires on (score > threshold), split by class.

    The `max_classes` most frequent classes get their own colour; the rest are grouped as "other".
    """
    usage = slot_usage(preds, threshold)
    per_class = np.asarray(usage["per_class"], dtype=np.int64).reshape(preds.num_slots, -1)
    names = usage["class_names"]
    totals = per_class.sum(0)
    top = [int(c) for c in np.argsort(-totals, kind="stable")[:max_classes] if totals[c] > 0]
    other = per_class.sum(1) - per_class[:, top].sum(1) if top else per_class.sum(1)
    fig = Figure(figsize=(max(6.0, 0.18 * preds.num_slots + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(preds.num_slots)
    bottom = np.zeros(preds.num_slots)
    for c in top:
        colour = np.asarray(PALETTE[c % len(PALETTE)]) / 255.0
        ax.bar(x, per_class[:, c], bottom=bottom, color=colour, width=0.85, label=names[c])
        bottom += per_class[:, c]
    if other.any():
        ax.bar(x, other, bottom=bottom, color="0.6", width=0.85, label="other")
    ax.set_xlabel("query slot")
    ax.set_ylabel(f"images with score > {threshold:g}")
    ax.set_xlim(-0.6, preds.num_slots - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Slot usage over {preds.num_images} images, by predicted class", fontsize=10)
    if top or other.any():
        fig.legend(fontsize=7, loc="outside right upper", frameon=False, title="class", title_fontsize=7)
    return fig


def save_query_figures(preds: SlotPredictions, out: str | Path, slots: Sequence[int] | None = None, *,
                       n: int = 20, threshold: float = 0.5, small_area: float = DEFAULT_SMALL_AREA,
                       min_score: float | None = None, dpi: int = 150) -> dict[str, Path]:
    """Write the query figure to `out`, its numbers to `out`.json, and the slot usage to
    `out`_usage.png / `out`_usage.json. Returns the written paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if slots is None:
        slots = choose_slots(preds, n=n, threshold=threshold)
    fig = plot_query_slots(preds, slots, threshold=threshold, small_area=small_area, min_score=min_score)
    fig.savefig(out, dpi=dpi)
    data_path = out.with_suffix(".json")
    data = query_figure_data(preds, slots, small_area, min_score)
    data["threshold"] = threshold
    data_path.write_text(json.dumps(data))
    usage_png = out.with_name(out.stem + "_usage.png")
    plot_slot_usage(preds, threshold).savefig(usage_png, dpi=dpi)
    usage_json = out.with_name(out.stem + "_usage.json")
    usage_json.write_text(json.dumps(slot_usage(preds, threshold), indent=1))
    return {"figure": out, "data": data_path, "usage_figure": usage_png, "usage_data": usage_json}
