"""COCO box evaluation with pycocotools.

Every one of the Q predictions of an image is kept (no threshold), as in the paper. The model runs with
`batch_invariant=True`, so the numbers do not depend on the evaluation batch size.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ModelConfig
from ..postprocess import coco_records, postprocess

log = logging.getLogger(__name__)

# The 12 numbers of COCOeval.stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def _quiet_pycocotools():
    """pycocotools prints progress to stdout; keep it for the debug log instead."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("pycocotools:\n%s", buf.getvalue().rstrip())


def _gt_dataset(coco_gt: dict | COCO) -> dict:
    dataset = coco_gt.dataset if isinstance(coco_gt, COCO) else coco_gt
    if not isinstance(dataset, dict):
        raise TypeError(f"coco_gt must be a COCO JSON dict or a pycocotools COCO, got {type(coco_gt).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"COCO ground truth has no {missing} (a COCO JSON dict needs images, annotations, "
                         "categories)")
    return dataset


class CocoEvaluator:
    """Collects COCO result records and scores them against a ground truth.

    coco_gt: a COCO JSON dict (crowd regions included; they are ignored the COCO way) or a pycocotools
    COCO. Records are {image_id, category_id (the dataset's id), bbox [x,y,w,h] pixels, score}.
    By default every ground-truth image is evaluated (an image without results counts as all misses);
    once `add` is given `image_ids`, only the images named so far are.
    Stats are pycocotools' own, in [0,1], -1 where there is no ground truth to measure.
    """

    def __init__(self, coco_gt: dict | COCO, iou_type: str = "bbox"):
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        self.iou_type = iou_type
        gt = dict(_gt_dataset(coco_gt))
        # COCOeval reads area and iscrowd of every annotation; fill them where a minimal file omits them.
        gt["annotations"] = [
            {**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": a.get("iscrowd", 0)}
            for a in gt["annotations"]
        ]
        self.coco_gt = COCO()
        self.coco_gt.dataset = gt
        with _quiet_pycocotools():
            self.coco_gt.createIndex()
        self.category_names = {c["id"]: c["name"] for c in gt["categories"]}
        self.results: list[dict] = []
        self.image_ids: set[int] | None = None
        self.coco_eval: COCOeval | None = None

    def add(self, results: Sequence[dict], image_ids: Sequence[int] | None = None) -> None:
        """Add result records; image_ids (optional) are the images these results cover (even with none)."""
        known_images, known_cats = self.coco_gt.imgs, self.category_names
        for i, r in enumerate(results):
            missing = {"image_id", "category_id", "bbox", "score"} - set(r)
            if missing:
                raise ValueError(f"result record {i} lacks {sorted(missing)}: {r}")
            if r["image_id"] not in known_images:
                raise ValueError(f"result record {i}: image_id {r['image_id']} is not in the ground truth")
            if r["category_id"] not in known_cats:
                raise ValueError(f"result record {i}: category_id {r['category_id']} is not a ground-truth "
                                 f"category (known: {sorted(known_cats)})")
            if len(r["bbox"]) != 4:
                raise ValueError(f"result record {i}: bbox must be [x, y, w, h], got {r['bbox']}")
        self.results.extend(results)
        if image_ids is not None:
            unknown = [i for i in image_ids if i not in known_images]
            if unknown:
                raise ValueError(f"image ids {unknown[:5]} are not in the ground truth")
            self.image_ids = (self.image_ids or set()) | {int(i) for i in image_ids}
        self.coco_eval = None

    def _detections(self) -> COCO:
        if self.results:
            with _quiet_pycocotools():
                return self.coco_gt.loadRes(list(self.results))
        # loadRes cannot take an empty list: an empty result set scores 0 wherever there is ground truth
        dt = COCO()
        dt.dataset = {"images": list(self.coco_gt.dataset["images"]),
                      "categories": list(self.coco_gt.dataset["categories"]), "annotations": []}
        with _quiet_pycocotools():
            dt.createIndex()
        return dt

    def run(self) -> COCOeval:
        """Evaluate, accumulate and summarise with pycocotools; the COCOeval is kept as `coco_eval`."""
        E = COCOeval(self.coco_gt, self._detections(), self.iou_type)
        if self.image_ids is not None:
            E.params.imgIds = sorted(self.image_ids | {int(r["image_id"]) for r in self.results})
        with _quiet_pycocotools():
            E.evaluate()
            E.accumulate()
            E.summarize()
        self.coco_eval = E
        return E

    def _per_class(self, iou: float | None) -> dict[int, float]:
        """AP (all areas, 100 detections) of each category id, at one IoU threshold or averaged."""
        E = self.coco_eval if self.coco_eval is not None else self.run()
        precision = E.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M max-dets]
        if iou is not None:
            precision = precision[np.isclose(E.params.iouThrs, iou)]
        out = {}
        for k, cat in enumerate(E.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            out[cat] = float(p.mean()) if p.size else -1.0
        return out

    def summarize(self) -> dict[str, Any]:
        """{AP, AP50, ..., ARl: float, per_class: {category name: AP}} (-1: no ground truth)."""
        E = self.run()
        summary: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, E.stats)}
        summary["per_class"] = {self.category_names[c]: ap for c, ap in self._per_class(None).items()}
        return summary

    def format_table(self) -> str:
        """Per-class AP and AP50 with ground-truth counts, as aligned text."""
        ap, ap50 = self._per_class(None), self._per_class(0.5)
        img_ids = set(self.coco_eval.params.imgIds)
        counts = {c: 0 for c in ap}
        for a in self.coco_gt.dataset["annotations"]:
            if a["image_id"] in img_ids and not a["iscrowd"] and a["category_id"] in counts:
                counts[a["category_id"]] += 1
        width = max([len("class")] + [len(n) for n in self.category_names.values()])
        lines = [f"{'id':>6}  {'class':<{width}}  {'gt':>6}  {'AP':>6}  {'AP50':>6}"]
        for c in ap:
            cells = ["   n/a" if v < 0 else f"{v:6.3f}" for v in (ap[c], ap50[c])]  # fractions, as everywhere
            lines.append(f"{c:>6}  {self.category_names[c]:<{width}}  {counts[c]:>6}  {cells[0]}  {cells[1]}")
        return "\n".join(lines)

    def write_results(self, path: str | os.PathLike) -> Path:
        """The result records as a COCO results JSON file (what loadRes reads), each with its class name
        under "category_name" (pycocotools ignores keys it does not know)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.category_names
        path.write_text(json.dumps([{**r, "category_name": names.get(r["category_id"])} for r in self.results]))
        return path


def predictions_to_coco_results(outputs: dict, targets: Sequence[dict], category_ids: Sequence[int],
                                duplicate_iou: float | None = None, classes_per_query: int = 1) -> list[dict]:
    """Model outputs -> COCO result records, all Q (x classes_per_query) per image (no threshold;
    duplicates dropped only with a duplicate_iou, as `postprocess`).

    outputs: pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1]; targets: B dicts with image_id and
    orig_size [2] (h, w of the original image); category_ids[label] is the dataset id of class `label`.
    """
    num_classes = outputs["pred_logits"].shape[-1] - 1
    if len(category_ids) != num_classes:
        raise ValueError(f"the model has {num_classes} classes but {len(category_ids)} category ids were given")
    orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]).reshape(2) for t in targets])
    dets = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes, duplicate_iou=duplicate_iou,
                       classes_per_query=classes_per_query)
    records = []
    for t, d in zip(targets, dets):
        records += coco_records(t["image_id"], d["boxes"], [category_ids[i] for i in d["labels"].tolist()],
                                d["scores"])
    return records


class EvaluationInterrupted(Exception):
    """An evaluation ended early because `should_stop` said so (SIGINT/SIGTERM during training)."""


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _inference_runner(model: nn.Module, amp: str) -> nn.Module:
    """What evaluation runs: for a DETR, its inference copy (batch norm folded into the convolutions,
    packed oneDNN kernels on a CPU; the same outputs to float rounding, 2-4x faster on a CPU, which is
    most of an evaluation's time); any other module (a wrapper, a stand-in in tests) as it is."""
    from ..model import DETR

    if type(model) is not DETR:
        return model
    from ..model.fuse import optimize_for_inference

    return optimize_for_inference(model, torch.bfloat16 if amp == "bf16" else torch.float32)


class FeatureMemo:
    """A frozen backbone's features of one evaluation set, kept from the first pass over it: later passes
    (`model_outputs(..., memo=)`) read no image and run only the transformer. On hard (200 validation
    images, 288 px) an evaluation during training took 13 s, 10 of them in the backbone, whose weights
    never change when it is frozen. Keeps at most `max_bytes`; a set that does not fit is evaluated
    from its images every time."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.batches: list[tuple] = []  # (BackboneFeatures, targets) of each batch, in order
        self.bytes = 0
        self.complete = False  # every batch of a whole pass is here
        self.overflow = False

    def add(self, feats, targets) -> None:
        if self.overflow:
            return
        self.bytes += feats.features.numel() * feats.features.element_size() + feats.mask.numel()
        if self.bytes > self.max_bytes:
            self.overflow, self.batches = True, []
            log.info("evaluation: the validation set's backbone features pass %d MiB, so each evaluation reads "
                     "its images again", self.max_bytes >> 20)
            return
        self.batches.append((feats, targets))

    def restart(self) -> None:
        """A pass over the images begins: what an interrupted one kept is dropped (it would repeat)."""
        if not self.overflow:
            self.batches, self.bytes = [], 0


def model_outputs(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu",
                  amp: str = "none", num_workers: int = 0, collate_fn: Callable | None = None,
                  progress: bool = True, should_stop: Callable[[], bool] | None = None,
                  memo: FeatureMemo | None = None):
    """Run `model` over `dataset` (items (image [3,H,W], target dict)) in evaluation mode -> yields
    (outputs, targets) per batch: outputs pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh in [0,1].

    A DETR runs as its inference copy (`_inference_runner`), with `batch_invariant=True`. The model keeps
    its train/eval mode afterwards. Unreadable images (the collate's bad list) are logged and skipped.
    should_stop() is asked after each batch; when it says yes the pass ends with `EvaluationInterrupted`.
    Loader workers ignore SIGINT/SIGTERM: the main process decides, so a signal never ends in a
    dead-worker traceback. memo: only for a model whose backbone does not change between the calls
    (frozen weights and batch norm) on the same dataset: the first whole pass keeps the backbone's
    features, later ones start from them (the same outputs, bit for bit).
    """
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    if collate_fn is None:
        from ..data.dataset import collate as collate_fn
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_fn, worker_init_fn=_ignore_signals if num_workers else None)
    was_training = model.training
    model.eval()
    runner = _inference_runner(model, amp)
    if runner is model:  # a stand-in: no backbone of its own to keep
        memo = None
    bad_count = 0
    try:
        if memo is not None and memo.complete:
            for feats, targets in tqdm(memo.batches, desc="eval", unit="batch", disable=not progress):
                yield runner.from_features(feats), targets
                if should_stop is not None and should_stop():
                    raise EvaluationInterrupted("evaluation stopped by a signal")
            return
        if memo is not None:
            memo.restart()
        for images, targets, bad in tqdm(loader, desc="eval", unit="batch", disable=not progress):
            for b in bad:
                log.warning("evaluation skips %s", b)
            bad_count += len(bad)
            if images:
                images = [im.to(device, non_blocking=True) for im in images]
                if memo is not None:
                    feats = runner.features(images)
                    memo.add(feats, targets)
                    outputs = runner.from_features(feats)
                else:
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=amp == "bf16" and runner is model):
                        outputs = runner(images, batch_invariant=True)
                yield outputs, targets
            if should_stop is not None and should_stop():
                raise EvaluationInterrupted("evaluation stopped by a signal")
        if memo is not None:
            memo.complete = not memo.overflow
    finally:
        model.train(was_training)
    if bad_count:
        log.warning("%d unreadable images were left out of the evaluation", bad_count)


def evaluate(model: nn.Module, dataset, category_ids: Sequence[int], coco_gt: dict | COCO, batch_size: int = 4,
             device: str | torch.device = "cpu", amp: str = "none", num_workers: int = 0,
             collate_fn: Callable | None = None, results_path: str | os.PathLike | None = None,
             progress: bool = True, should_stop: Callable[[], bool] | None = None,
             evaluator_out: list | None = None, duplicate_iou: float | None = None,
             classes_per_query: int = 1, memo: FeatureMemo | None = None) -> dict[str, Any]:
    """Run `model` over `dataset` (`model_outputs`) and score it -> CocoEvaluator.summarize().
    duplicate_iou, classes_per_query: the post-processing's (ModelConfig's; None and 1: the paper's).

    results_path: also write the result records there. should_stop: as `model_outputs` (a training run
    then saves its last state instead). evaluator_out: a list that receives the CocoEvaluator (for plots
    from the same detections). memo: as `model_outputs` (a frozen backbone evaluated again and again).
    """
    evaluator = CocoEvaluator(coco_gt)
    shared = set(category_ids) & set(evaluator.category_names)
    unknown = [c for c in category_ids if c not in evaluator.category_names]
    if unknown:
        # a model trained on other ids (or a subset of the data's): score the classes both know
        log.warning("the model's category ids %s are not in the ground truth: their detections are left out; "
                    "evaluating the %d shared categories %s", unknown, len(shared), sorted(shared))
        if not shared:
            log.warning("the model and the ground truth share no category id: every AP is -1 or 0, not a score")
    for outputs, targets in model_outputs(model, dataset, batch_size, device, amp, num_workers, collate_fn,
                                          progress, should_stop, memo):
        records = predictions_to_coco_results(outputs, targets, category_ids, duplicate_iou, classes_per_query)
        if unknown:
            records = [r for r in records if r["category_id"] in shared]
        evaluator.add(records, image_ids=[int(t["image_id"]) for t in targets])
    if results_path is not None:
        evaluator.write_results(results_path)
    summary = evaluator.summarize()
    log.info("COCO evaluation:\n%s", evaluator.format_table())
    if evaluator_out is not None:
        evaluator_out.append(evaluator)
    return summary


def evaluate_weights(weights: str | os.PathLike, data, images_dir=None, split=None, batch_size: int = 4,
                     device: str = "cpu", amp: str = "none", num_workers: int = 0,
                     results_path: str | os.PathLike | None = None, evaluator_out: list | None = None,
                     duplicate_iou: float | None | str = "model",
                     classes_per_query: int | str = "model") -> tuple[dict[str, Any], ModelConfig]:
    """Evaluate saved weights (anything `weights.load.load_weights` takes) on a dataset (annotation
    path or DatasetIndex) -> (evaluate()'s dict, the weights' ModelConfig).

    The model runs as `Detector` runs it (its optimised inference copy, bf16 with amp="bf16") on the
    evaluation transforms' images, so `predict` gives the same records on the same files.
    duplicate_iou: "model" (the weights' own ModelConfig.duplicate_iou), None (keep every box) or an IoU;
    classes_per_query: "model" (the weights' own) or a count (1: each query's best class, the paper's)."""
    from ..data.dataset import DetectionDataset
    from ..data.transforms import eval_transforms
    from ..detector import Detector
    from .run_data import as_index, coco_ground_truth

    detector = Detector.from_pretrained(weights, device=device, precision="bf16" if amp == "bf16" else "float32")
    cfg = detector.config
    index = as_index(data, images_dir, split)
    if index.no_box_message():
        log.warning("%s; every AP below is -1 (undefined), not a score", index.no_box_message())
    missing = set(index.category_ids) - set(cfg.category_ids)
    if missing:
        log.warning("%s: categories %s are not known to the model (it knows %s)", index.source,
                    sorted(missing), cfg.category_ids)
    dataset = DetectionDataset(index, eval_transforms(cfg.image_size, cfg.max_image_size), skip_bad=True)
    metrics = evaluate(detector.inference_model, dataset, cfg.category_ids, coco_ground_truth(index),
                       batch_size=batch_size, device=torch.device(device), amp="none", num_workers=num_workers,
                       results_path=results_path, evaluator_out=evaluator_out,
                       duplicate_iou=cfg.duplicate_iou if duplicate_iou == "model" else duplicate_iou,
                       classes_per_query=cfg.classes_per_query if classes_per_query == "model" else classes_per_query)
    return metrics, cfg
