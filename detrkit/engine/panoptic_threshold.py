"""The panoptic keep threshold, chosen on held-out images.

The paper's post-processing keeps the queries whose best class scores above 0.85: a threshold set for
models trained 500 epochs on COCO, whose scores on a found object are close to 1. A model trained for
minutes is right about where and what long before it is that sure: on the panoptic main job's data
(20 CPU minutes) most things it finds score 0.2-0.6, so at 0.85 none is kept and their pixels go to
the stuff around them. The threshold is a post-processing setting, not a weight, so it is chosen the
way any setting is: on images neither the training nor the reported evaluation uses (a calibration
split), as the one that maximises PQ there. It is stored in the model's config
(`ModelConfig.panoptic_threshold`; the authors' and the paper presets' models keep 0.85).
"""
from __future__ import annotations

import logging
import os

from ..config import ModelConfig
from ..data.panoptic import PanopticIndex, load_panoptic
from ..model.segmentation import DETRSegmentation
from ..panoptic_postprocess import PANOPTIC_THRESHOLD
from ..panoptic_quality import PQStat

log = logging.getLogger(__name__)

# from a generous keep (many duplicates and false positives) up to the paper's, every 0.05. The main job's
# 20-minute models score best at 0.2-0.35 on their calibration images (0.1 keeps too many strays)
CANDIDATES = tuple(round(0.1 + 0.05 * i, 2) for i in range(15)) + (PANOPTIC_THRESHOLD,)


def pq_per_threshold(model: DETRSegmentation, cfg: ModelConfig, data: str | os.PathLike | PanopticIndex,
                     thresholds: tuple[float, ...] = CANDIDATES, *, device: str = "cpu",
                     progress: bool = True) -> dict[float, float]:
    """{threshold: PQ on `data`} for each threshold; the model runs once per image."""
    from .panoptic import gt_maps, gt_segments, panoptic_outputs, postprocess_one

    index = data if isinstance(data, PanopticIndex) else load_panoptic(data)
    stats = {t: PQStat() for t in thresholds}
    for item in panoptic_outputs(model, cfg, index, gt_maps(index), device=device, progress=progress):
        for t, stat in stats.items():
            res = postprocess_one(item.out, cfg, item.proc_size, item.orig_size, t)
            stat.add_image(item.gt_ids, gt_segments(item.rec), res.ids, res.segments)
    categories = {cid: thing for cid, _, thing in index.categories}
    return {t: stat.summary(categories)["all"]["pq"] for t, stat in stats.items()}


def fit_panoptic_threshold(model: DETRSegmentation, cfg: ModelConfig, data: str | os.PathLike | PanopticIndex,
                           thresholds: tuple[float, ...] = CANDIDATES, *, device: str = "cpu",
                           progress: bool = True) -> tuple[float, dict[float, float]]:
    """(the threshold with the highest PQ on the held-out `data`, {threshold: PQ}); of equal PQs the
    highest threshold (the paper's side). The caller stores it in cfg.panoptic_threshold."""
    pq = pq_per_threshold(model, cfg, data, thresholds, device=device, progress=progress)
    best = max(pq, key=lambda t: (round(pq[t], 6), t))
    log.info("panoptic threshold %.2f: PQ %.3f on the calibration images (%.3f at the paper's %.2f)",
             best, pq[best], pq.get(PANOPTIC_THRESHOLD, float("nan")), PANOPTIC_THRESHOLD)
    return best, pq
