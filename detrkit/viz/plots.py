"""The plots a detection user expects after a run or an evaluation.

- `plot_pr_curves`: precision-recall curve of each class, read from pycocotools' accumulated
  precision array (IoU 0.5 by default), with the mean over classes in bold;
- `confusion_matrix` / `plot_confusion_matrix`: ground-truth class against predicted class, with a
  background row (predictions that match no object) and a background column (objects nothing found);
- `prediction_mosaic`: validation images, ground truth on the left of each pair, predictions on the right;
- `label_statistics` / `plot_label_statistics`: boxes per class, box size and box centre histograms;
- `write_results_csv`: one row per evaluation record of a run's metrics.jsonl.

`write_eval_plots` writes all of them for one `CocoEvaluator`. Every figure is a matplotlib `Figure`
built without pyplot, so nothing depends on a display or a global backend.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKGROUND = "background"


# ------------------------------------------------------------------------------ precision-recall
def pr_curves(coco_eval, iou: float = 0.5) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(recall thresholds [R], {category id: precision [R]}) at one IoU, all areas, the largest maxDets.

    coco_eval: an evaluated and accumulated pycocotools COCOeval. Classes without ground truth (all -1)
    are left out; a precision of -1 elsewhere (recall never reached) becomes 0.
    """
    if not getattr(coco_eval, "eval", None) or "precision" not in coco_eval.eval:
        raise ValueError("pr_curves: the COCOeval has not been accumulated (call evaluate() and accumulate())")
    params = coco_eval.params
    t = np.flatnonzero(np.isclose(params.iouThrs, iou))
    if not len(t):
        raise ValueError(f"pr_curves: IoU {iou} is not one of the evaluated thresholds {list(params.iouThrs)}")
    precision = coco_eval.eval["precision"][t[0], :, :, 0, -1]  # [R, K]
    curves = {}
    for k, cat in enumerate(params.catIds):
        p = precision[:, k]
        if (p < 0).all():
            continue
        curves[int(cat)] = np.where(p < 0, 0.0, p)
    return np.asarray(params.recThrs), curves


def plot_pr_curves(coco_eval, class_names: dict[int, str], iou: float = 0.5, max_labelled: int = 12) -> Figure:
    """Precision against recall for every class with ground truth, the mean over them in bold.

    The legend names the `max_labelled` classes with the highest AP at this IoU (with their AP) and the mean;
    the other curves are drawn thin and grey so that many classes stay readable.
    """
    recall, curves = pr_curves(coco_eval, iou)
    fig = Figure(figsize=(7, 5.5), dpi=120)
    ax = fig.add_subplot()
    ap = {c: float(p.mean()) for c, p in curves.items()}
    ranked = sorted(curves, key=lambda c: -ap[c])
    labelled = set(ranked[:max_labelled])
    from .draw import PALETTE

    for i, c in enumerate(reversed(ranked)):
        if c in labelled:
            colour = np.array(PALETTE[ranked.index(c) % len(PALETTE)]) / 255
            ax.plot(recall, curves[c], lw=1.2, color=colour, label=f"{class_names.get(c, c)} {ap[c]:.3f}")
        else:
            ax.plot(recall, curves[c], lw=0.6, color="0.75")
    if curves:
        mean = np.mean(np.stack(list(curves.values())), axis=0)
        ax.plot(recall, mean, lw=3, color="black", label=f"all classes {mean.mean():.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall at IoU {iou:g} ({len(curves)} classes; legend: AP{int(round(iou * 100))})")
    ax.grid(alpha=0.3)
    if curves:
        handles, labels = ax.get_legend_handles_labels()
        order = [len(labels) - 1] + list(range(len(labels) - 1))[::-1]  # mean first, then best class first
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="lower left",
                  framealpha=0.85)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ confusion matrix
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [N,4] and b [M,4] -> [N,M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def confusion_matrix(ground_truth: Sequence[tuple[Any, Any]], predictions: Sequence[tuple[Any, Any, Any]],
                     num_classes: int, iou_threshold: float = 0.5, score_threshold: float = 0.25) -> np.ndarray:
    """Counts [C+1, C+1]: row = true class, column = predicted class; index C is the background.

    ground_truth[i] = (boxes [N,4] xyxy, labels [N]) and predictions[i] = (boxes [K,4] xyxy, scores [K],
    labels [K]) of image i, labels contiguous in [0, C). Predictions below `score_threshold` are ignored.
    Within an image, ground-truth boxes and predictions are paired one to one by decreasing IoU (any
    class), pairs below `iou_threshold` excepted. A pair counts at [true, predicted]; an unpaired object
    at [true, C] (missed); an unpaired prediction at [C, predicted] (a false detection).
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"confusion_matrix: {len(ground_truth)} ground-truth images but {len(predictions)} "
                         "prediction images")
    C = num_classes
    m = np.zeros((C + 1, C + 1), dtype=np.int64)
    for (gb, gl), (pb, ps, pl) in zip(ground_truth, predictions):
        gb = np.asarray(gb, dtype=np.float64).reshape(-1, 4)
        gl = np.asarray(gl, dtype=np.int64).reshape(-1)
        pb = np.asarray(pb, dtype=np.float64).reshape(-1, 4)
        ps = np.asarray(ps, dtype=np.float64).reshape(-1)
        pl = np.asarray(pl, dtype=np.int64).reshape(-1)
        for name, lab in (("ground-truth", gl), ("predicted", pl)):
            if lab.size and (lab.min() < 0 or lab.max() >= C):
                raise ValueError(f"confusion_matrix: {name} label out of range [0, {C}): {lab.min()}..{lab.max()}")
        keep = ps >= score_threshold
        pb, pl = pb[keep], pl[keep]
        gt_used = np.zeros(len(gb), dtype=bool)
        pred_used = np.zeros(len(pb), dtype=bool)
        if len(gb) and len(pb):
            iou = _box_iou(gb, pb)
            gi, pi = np.nonzero(iou >= iou_threshold)
            for k in np.argsort(-iou[gi, pi], kind="stable"):
                g, p = gi[k], pi[k]
                if gt_used[g] or pred_used[p]:
                    continue
                gt_used[g] = pred_used[p] = True
                m[gl[g], pl[p]] += 1
        np.add.at(m, (gl[~gt_used], C), 1)
        np.add.at(m, (C, pl[~pred_used]), 1)
    return m


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], normalize: bool = True,
                          title: str | None = None) -> Figure:
    """A confusion matrix from `confusion_matrix` as a heat map (rows: truth, columns: prediction).

    normalize: each row divided by its total (the share of a true class that went to each prediction;
    the background row, which has no objects, by its own total), counts written in the cells when few.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or len(class_names) != n - 1:
        raise ValueError(f"plot_confusion_matrix: a {matrix.shape} matrix for {len(class_names)} classes "
                         f"(expected ({len(class_names) + 1}, {len(class_names) + 1}))")
    names = list(class_names) + [BACKGROUND]
    shown = matrix / np.maximum(matrix.sum(1, keepdims=True), 1) if normalize else matrix
    side = min(14.0, max(5.0, 0.32 * n + 2.5))
    fig = Figure(figsize=(side + 1, side), dpi=120)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "count")
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n < 30 else 5)
    ax.set_yticks(range(n), names, fontsize=8 if n < 30 else 5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 21:  # cell text only where it stays readable
        top = shown.max() or 1
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{shown[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}", ha="center",
                            va="center", fontsize=7, color="white" if shown[i, j] > 0.6 * top else "black")
    ax.set_title(title or "Confusion matrix (last row: false detections; last column: missed objects)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def coco_to_arrays(coco_gt: dict, results: Sequence[dict], category_ids: Sequence[int], image_ids: Sequence[int]
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """COCO ground truth (crowd regions left out) and result records -> per-image arrays for
    `confusion_matrix`, in the order of `image_ids`, with boxes xyxy and contiguous labels."""
    to_label = {int(c): i for i, c in enumerate(category_ids)}
    gt = {int(i): ([], []) for i in image_ids}
    for a in coco_gt["annotations"]:
        if a.get("iscrowd", 0) or int(a["image_id"]) not in gt or int(a["category_id"]) not in to_label:
            continue
        x, y, w, h = a["bbox"]
        gt[int(a["image_id"])][0].append([x, y, x + w, y + h])
        gt[int(a["image_id"])][1].append(to_label[int(a["category_id"])])
    dt = {int(i): ([], [], []) for i in image_ids}
    for r in results:
        if int(r["image_id"]) not in dt or int(r["category_id"]) not in to_label:
            continue
        x, y, w, h = r["bbox"]
        d = dt[int(r["image_id"])]
        d[0].append([x, y, x + w, y + h])
        d[1].append(float(r["score"]))
        d[2].append(to_label[int(r["category_id"])])
    gts = [(np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(lab, dtype=np.int64)) for b, lab in gt.values()]
    dts = [(np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(s, dtype=np.float64),
            np.asarray(lab, dtype=np.int64)) for b, s, lab in dt.values()]
    return gts, dts


# ------------------------------------------------------------------------------ prediction mosaic
def prediction_mosaic(samples: Sequence[dict], class_names: Sequence[str], tile_height: int = 320,
                      columns: int = 2):
    """A PIL image: for each sample, its ground truth (left) beside its predictions (right).

    samples: dicts with image (PIL), gt_boxes [N,4] xyxy, gt_labels [N], boxes [K,4] xyxy, scores [K],
    labels [K] (labels contiguous). `columns` pairs per row; each panel is scaled to `tile_height`.
    """
    from PIL import Image, ImageDraw

    from .draw import draw_detections, font_size_for, _font

    if not samples:
        raise ValueError("prediction_mosaic: no samples")
    pairs = []
    for s in samples:
        image = s["image"].convert("RGB")
        scale = tile_height / image.height
        size = (max(1, round(image.width * scale)), tile_height)
        small = image.resize(size)
        gt = draw_detections(small, np.asarray(s["gt_boxes"], dtype=np.float64).reshape(-1, 4) * scale,
                             s["gt_labels"], None, class_names)
        pred = draw_detections(small, np.asarray(s["boxes"], dtype=np.float64).reshape(-1, 4) * scale,
                               s["labels"], s["scores"], class_names)
        pairs.append((gt, pred))
    gap, header = 6, font_size_for((tile_height, tile_height)) + 8
    pair_w = max(g.width + p.width for g, p in pairs) + gap
    rows = (len(pairs) + columns - 1) // columns
    cols = min(columns, len(pairs))
    canvas = Image.new("RGB", (cols * (pair_w + gap) + gap, header + rows * (tile_height + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size_for((tile_height, tile_height)))
    for c in range(cols):
        x = gap + c * (pair_w + gap)
        draw.text((x, 4), "ground truth", fill="black", font=font)
        draw.text((x + pairs[0][0].width + gap, 4), "predictions", fill="black", font=font)
    for i, (g, p) in enumerate(pairs):
        x = gap + (i % columns) * (pair_w + gap)
        y = header + (i // columns) * (tile_height + gap)
        canvas.paste(g, (x, y))
        canvas.paste(p, (x + g.width + gap, y))
    return canvas


# ------------------------------------------------------------------------------ label statistics
@dataclass
class LabelStatistics:
    """Boxes of a dataset: per-class counts and, per box, its centre and size relative to the image."""

    class_names: list[str]
    counts: np.ndarray  # [C] boxes per class (crowd regions excluded)
    cx: np.ndarray  # [M] box centre x / image width
    cy: np.ndarray  # [M]
    w: np.ndarray  # [M] box width / image width
    h: np.ndarray  # [M]
    images: int


def label_statistics(index) -> LabelStatistics:
    """LabelStatistics of a `DatasetIndex`. Image sizes come from the annotations, else from the image
    file's header (no decoding); boxes of images whose size cannot be had count only per class."""
    from PIL import Image

    to_class = index.category_to_index
    counts = np.zeros(len(index.categories), dtype=np.int64)
    sizes, files = {}, {im.id: im.file for im in index.images}
    for im in index.images:
        if im.width and im.height:
            sizes[im.id] = (im.width, im.height)
    rel = []
    for a in index.annotations:
        if a.iscrowd or a.category_id not in to_class:
            continue
        counts[to_class[a.category_id]] += 1
        if a.image_id not in sizes:
            try:
                with Image.open(files[a.image_id]) as f:
                    sizes[a.image_id] = f.size
            except Exception:  # an unreadable image is the checker's business; its boxes still count
                sizes[a.image_id] = None
        size = sizes[a.image_id]
        if size:
            x, y, w, h = (float(v) for v in a.bbox)
            rel.append(((x + w / 2) / size[0], (y + h / 2) / size[1], w / size[0], h / size[1]))
    r = np.asarray(rel, dtype=np.float64).reshape(-1, 4)
    return LabelStatistics(index.class_names, counts, r[:, 0], r[:, 1], r[:, 2], r[:, 3], len(index.images))


def plot_label_statistics(stats: LabelStatistics) -> Figure:
    """Four panels: boxes per class, box width against height, box centres, and box size (sqrt of the
    relative area) with the COCO small / medium limits at a 640-pixel image for orientation."""
    fig = Figure(figsize=(11, 8), dpi=110)
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    n = len(stats.class_names)
    from .draw import PALETTE

    colours = [np.array(PALETTE[i % len(PALETTE)]) / 255 for i in range(n)]
    ax.bar(range(n), stats.counts, color=colours)
    ax.set_xticks(range(n), stats.class_names, rotation=90 if n > 6 else 0, fontsize=8 if n < 30 else 5)
    ax.set(ylabel="boxes", title=f"boxes per class ({int(stats.counts.sum())} boxes, {stats.images} images)")
    empty = [name for name, c in zip(stats.class_names, stats.counts) if c == 0]
    if empty:
        ax.text(0.99, 0.97, f"no boxes: {', '.join(empty[:6])}{'...' if len(empty) > 6 else ''}",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="crimson")
    bins = np.linspace(0, 1, 41)
    ax = axes[0, 1]
    ax.hist2d(stats.w, stats.h, bins=[bins, bins], cmap="Blues", cmin=1)
    ax.set(xlabel="width / image width", ylabel="height / image height", title="box sizes", aspect="equal")
    ax = axes[1, 0]
    ax.hist2d(stats.cx, stats.cy, bins=[bins, bins], cmap="Blues", cmin=1)
    ax.set(xlabel="centre x / image width", ylabel="centre y / image height", title="box centres",
           xlim=(0, 1), ylim=(1, 0), aspect="equal")
    ax = axes[1, 1]
    side = np.sqrt(np.clip(stats.w * stats.h, 0, None))
    ax.hist(side, bins=bins, color="#4e79a7")
    for limit, name in ((32, "small"), (96, "medium")):
        ax.axvline(limit / 640, color="0.4", ls="--", lw=1)
        ax.text(limit / 640, ax.get_ylim()[1] * 0.95, f" {name}<", fontsize=7, color="0.3")
    ax.set(xlabel="sqrt(box area / image area)", ylabel="boxes", title="box size (COCO limits at 640 px)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ results.csv
def eval_records(metrics_jsonl: str | Path) -> list[dict]:
    """The evaluation records of a metrics.jsonl (type "eval"), in file order; bad lines are skipped."""
    records = []
    for lineno, line in enumerate(Path(metrics_jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", metrics_jsonl, lineno)
            continue
        if isinstance(rec, dict) and rec.get("type") == "eval":
            records.append(rec)
    return records


def write_results_csv(metrics_jsonl: str | Path, out_csv: str | Path) -> Path:
    """results.csv: one row per evaluation record of `metrics_jsonl` with step, epoch, the 12 COCO numbers
    and, where the run logged them, the mean training losses of the last logged step before it."""
    metrics_jsonl, out_csv = Path(metrics_jsonl), Path(out_csv)
    rows, last_train = [], {}
    for line in metrics_jsonl.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("type") == "train":
            last_train = rec
        elif rec.get("type") == "eval":
            row = {"step": rec.get("step"), "epoch": rec.get("epoch")}
            row.update({k: rec.get(k) for k in STAT_NAMES})
            row.update({f"train_{k}": last_train.get(k) for k in ("loss", "loss_ce", "loss_bbox", "loss_giou")})
            row["lr"] = last_train.get("lr")
            rows.append(row)
    fields = ["step", "epoch", *STAT_NAMES, "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou",
              "lr"]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return out_csv


# ------------------------------------------------------------------------------ all of it
def write_eval_plots(evaluator, out_dir: str | Path, class_names: Sequence[str], category_ids: Sequence[int],
                     score_threshold: float = 0.25, mosaic_images: int = 8, index=None) -> list[Path]:
    """PR curves, confusion matrix and prediction mosaic of an evaluated `CocoEvaluator` (images read
    from its ground truth's file_name), plus label statistics of `index` when given. -> files written."""
    from ..data.images import load_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    E = evaluator.coco_eval if evaluator.coco_eval is not None else evaluator.run()
    names = {int(c): n for c, n in zip(category_ids, class_names)}
    fig = plot_pr_curves(E, names)
    fig.savefig(out / "pr_curves.png")
    written.append(out / "pr_curves.png")

    gt = evaluator.coco_gt.dataset
    image_ids = list(E.params.imgIds)
    gts, dts = coco_to_arrays(gt, evaluator.results, category_ids, image_ids)
    matrix = confusion_matrix(gts, dts, len(class_names), score_threshold=score_threshold)
    fig = plot_confusion_matrix(matrix, class_names,
                                title=f"Confusion matrix, score >= {score_threshold:g}, IoU >= 0.5 "
                                      "(last row: false detections; last column: missed objects)")
    fig.savefig(out / "confusion_matrix.png")
    written.append(out / "confusion_matrix.png")
    np.savetxt(out / "confusion_matrix.csv", matrix, fmt="%d", delimiter=",",
               header=",".join(list(class_names) + [BACKGROUND]))

    files = {int(im["id"]): im.get("file_name") for im in gt["images"]}
    samples = []
    for (gb, gl), (pb, ps, pl), image_id in zip(gts, dts, image_ids):
        if len(samples) >= mosaic_images:
            break
        path = files.get(int(image_id))
        if not path or not Path(path).is_file():
            continue
        keep = ps >= score_threshold
        try:
            image = load_image(path)
        except Exception as e:
            log.warning("mosaic: cannot read %s (%s)", path, e)
            continue
        samples.append({"image": image, "gt_boxes": gb, "gt_labels": gl, "boxes": pb[keep], "scores": ps[keep],
                        "labels": pl[keep]})
    if samples:
        prediction_mosaic(samples, class_names).save(out / "val_predictions.jpg", quality=88)
        written.append(out / "val_predictions.jpg")
    if index is not None:
        fig = plot_label_statistics(label_statistics(index))
        fig.savefig(out / "labels.png")
        written.append(out / "labels.png")
    return written
