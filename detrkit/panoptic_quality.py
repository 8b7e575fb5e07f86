"""Panoptic quality (Kirillov et al.), computed as the COCO panoptic API's `pq_compute` defines it.

Per image, a predicted and a ground-truth segment of the same category match when their IoU is
strictly above 0.5 (so matches are unique). The union leaves out the prediction's overlap with void
(id 0 in the ground truth). Unmatched ground-truth segments are false negatives unless crowd
(iscrowd=1: never counted). An unmatched prediction is a false positive unless more than half of it
lies on void or on a crowd region of its own category. Per category:
    PQ = sum(IoU of matches) / (TP + FP/2 + FN/2),  SQ = sum(IoU) / TP,  RQ = TP / (TP + FP/2 + FN/2)
and the overall / things / stuff values are the means over the categories that occur (TP+FP+FN > 0).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

_OFFSET = 256 ** 3  # pairs (gt id, pred id) as one int64: gt * OFFSET + pred


@dataclass
class _ClassStat:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0


@dataclass
class PQStat:
    """Accumulates matches per category over images; `summary` gives PQ/SQ/RQ."""

    per_class: dict[int, _ClassStat] = field(default_factory=lambda: defaultdict(_ClassStat))

    def add_image(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
                  pred_segments: list[dict]) -> None:
        """gt_ids, pred_ids [H,W] int segment ids (0: void / unlabelled); segments: dicts with id,
        category_id and (ground truth) iscrowd. Areas are measured from the maps, not trusted."""
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"PQ: ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
        gt = {int(s["id"]): s for s in gt_segments}
        pred = {int(s["id"]): s for s in pred_segments}
        unknown = set(np.unique(pred_ids).tolist()) - set(pred) - {0}
        if unknown:
            raise ValueError(f"PQ: predicted segment ids {sorted(unknown)[:5]} are not in segments_info")
        pairs, counts = np.unique(gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64), return_counts=True)
        inter: dict[tuple[int, int], int] = {}
        gt_area: dict[int, int] = defaultdict(int)
        pred_area: dict[int, int] = defaultdict(int)
        for p, n in zip(pairs.tolist(), counts.tolist()):
            g, q = divmod(p, _OFFSET)
            inter[(g, q)] = n
            gt_area[g] += n
            pred_area[q] += n

        crowd_by_cat: dict[int, int] = {}  # category -> the crowd segment id (COCO: one per category)
        for g, s in gt.items():
            if s.get("iscrowd", 0):
                crowd_by_cat[int(s["category_id"])] = g
        matched_gt, matched_pred = set(), set()
        for (g, q), n in inter.items():
            if g == 0 or q == 0 or g not in gt or q not in pred:
                continue
            if gt[g].get("iscrowd", 0) or int(gt[g]["category_id"]) != int(pred[q]["category_id"]):
                continue
            union = pred_area[q] + gt_area[g] - n - inter.get((0, q), 0)
            iou = n / union
            if iou > 0.5:
                st = self.per_class[int(gt[g]["category_id"])]
                st.tp += 1
                st.iou += iou
                matched_gt.add(g)
                matched_pred.add(q)
        for g, s in gt.items():
            if g in matched_gt or s.get("iscrowd", 0) or gt_area.get(g, 0) == 0:
                continue
            self.per_class[int(s["category_id"])].fn += 1
        for q, s in pred.items():
            if q in matched_pred or pred_area.get(q, 0) == 0:
                continue
            cat = int(s["category_id"])
            ignored = inter.get((0, q), 0)
            if cat in crowd_by_cat:
                ignored += inter.get((crowd_by_cat[cat], q), 0)
            if ignored / pred_area[q] > 0.5:
                continue
            self.per_class[cat].fp += 1

    def summary(self, categories: dict[int, bool]) -> dict:
        """categories: {category id: isthing}. -> {"all"|"things"|"stuff": {pq, sq, rq, n},
        "per_class": {category id: {pq, sq, rq, tp, fp, fn}}} (values in [0,1])."""
        per = {}
        for cid in categories:
            st = self.per_class.get(cid)
            if st is None or st.tp + st.fp + st.fn == 0:
                continue
            denom = st.tp + 0.5 * st.fp + 0.5 * st.fn
            sq = st.iou / st.tp if st.tp else 0.0
            rq = st.tp / denom
            per[cid] = {"pq": sq * rq, "sq": sq, "rq": rq, "tp": st.tp, "fp": st.fp, "fn": st.fn}
        out = {}
        for name, keep in (("all", lambda t: True), ("things", lambda t: t), ("stuff", lambda t: not t)):
            rows = [per[c] for c, thing in categories.items() if c in per and keep(thing)]
            n = len(rows)
            out[name] = {k: (sum(r[k] for r in rows) / n if n else 0.0) for k in ("pq", "sq", "rq")} | {"n": n}
        out["per_class"] = per
        return out


def format_pq(summary: dict, names: dict[int, str] | None = None) -> str:
    """A table of PQ/SQ/RQ (percent) for all, things, stuff, then per class."""
    lines = [f"{'':<14}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'N':>5}"]
    for k in ("all", "things", "stuff"):
        s = summary[k]
        lines.append(f"{k:<14}{100 * s['pq']:7.1f}{100 * s['sq']:7.1f}{100 * s['rq']:7.1f}{s['n']:5d}")
    for cid, s in sorted(summary["per_class"].items()):
        name = (names or {}).get(cid, str(cid))
        lines.append(f"  {name[:12]:<12}{100 * s['pq']:7.1f}{100 * s['sq']:7.1f}{100 * s['rq']:7.1f}")
    return "\n".join(lines)
