"""Say what happened: a run that learned nothing says so in plain words, with its likely causes.

"AP stays 0 on my dataset" is DETR's most common complaint, and the numbers alone do not say why.
`diagnose` looks at the end of a run for the failure signs -- AP50 below 0.05; query slots that put the
same box on every image (or many slots on the same box of one image: the model has not left DETR's
symmetric start); a class head still at chance (most matched queries called "no object" in the last
training steps: the boxes learn, the scores do not) -- and names the causes it can check: too few
steps, a random backbone, features that do not name the objects, objects smaller than a feature cell
at the input size the model sees.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

LOW_AP50 = 0.05
STILL_SLOT = 0.03  # mean L1 distance (normalised cxcywh) of a slot's boxes to their mean: "the same box"
DUPLICATE_IOU = 0.9  # within one image, boxes this close count as one box
FEW_STEPS = 3000  # DETR's set prediction needs thousands of steps before it leaves the symmetric start
SMALL_SHARE = 0.25  # warn when this share of the training objects is smaller than a feature cell
# matched queries called "no object", % (the training log's class_error): BCCD-RBC runs stuck at chance sat
# at 85-99% for 2000 steps; runs that learn fall under 50% once out of the plateau (BCCD: 37% at the end)
AT_CHANCE = 80.0


@dataclass
class Diagnosis:
    problems: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        if self.ok:
            return "the run learned (no failure signs)"
        lines = ["This run did not learn to detect: " + "; ".join(self.problems) + "."]
        if self.causes:
            lines.append("Likely causes:")
            lines += [f"  - {c}" for c in self.causes]
        else:
            lines.append("No known cause found: check the data (`detrkit data check`) and the learning rate.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "causes": self.causes, **self.facts}


def still_slots(pred_boxes: Tensor) -> float:
    """Share of query slots whose box is (nearly) the same on every image.
    pred_boxes [N_images,Q,4] cxcywh in [0,1]."""
    if pred_boxes.shape[0] < 2:
        return 0.0
    spread = (pred_boxes - pred_boxes.mean(0, keepdim=True)).abs().sum(-1).mean(0)  # [Q]
    return float((spread < STILL_SLOT).float().mean())


def duplicate_share(pred_boxes: Tensor) -> float:
    """Mean over images of the share of slots that predict the image's most repeated box.
    pred_boxes [N_images,Q,4] cxcywh."""
    from torchvision.ops import box_convert, box_iou

    shares = []
    for boxes in pred_boxes:
        xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
        same = box_iou(xyxy, xyxy) > DUPLICATE_IOU  # [Q,Q]
        shares.append(float(same.sum(1).max()) / len(boxes))
    return sum(shares) / max(1, len(shares))


def feature_stride(model_cfg) -> int:
    return 16 if model_cfg.dilation else 32


def small_object_share(boxes_wh: Tensor, image_wh: Tensor, model_cfg) -> float:
    """Share of objects whose shorter side, at the model's inference resize, is below one feature cell.
    boxes_wh [N,2] pixels of the original image, image_wh [N,2] that image's size."""
    if len(boxes_wh) == 0:
        return 0.0
    short, long = image_wh.min(1).values.float(), image_wh.max(1).values.float()
    scale = torch.minimum(model_cfg.image_size / short, model_cfg.max_image_size / long)
    side = boxes_wh.min(1).values.float() * scale
    return float((side < feature_stride(model_cfg)).float().mean())


def diagnose(metrics: dict, steps: int, backbone_kind: str | None, model_cfg, pred_boxes: Tensor | None = None,
             boxes_wh: Tensor | None = None, image_wh: Tensor | None = None, frozen_backbone: bool = True,
             feature_probe: dict | None = None, class_error: float | None = None) -> Diagnosis:
    """metrics: the last evaluation (AP50 may be absent: no validation set); pred_boxes [N,Q,4] the final
    model's boxes on some validation images; boxes_wh / image_wh: the training objects' sizes;
    feature_probe: the cached features' probe (engine/feature_probe.py), as check_cached_features gives it;
    class_error: % of the matched queries misclassified over the last logged training steps."""
    d = Diagnosis()
    ap50 = metrics.get("AP50")
    if ap50 is not None and ap50 < LOW_AP50:
        d.problems.append(f"AP50 is {ap50:.3f} on the validation set (below {LOW_AP50})")
    if pred_boxes is not None and len(pred_boxes) >= 2:
        still, dup = still_slots(pred_boxes), duplicate_share(pred_boxes)
        d.facts.update(still_slots=round(still, 3), duplicate_share=round(dup, 3))
        if still > 0.5:
            d.problems.append(f"{still:.0%} of the query slots predict the same box on every image")
        elif dup > 0.5:
            d.problems.append(f"on a typical image {dup:.0%} of the query slots predict one and the same box")
    if class_error is not None:
        d.facts["class_error"] = round(class_error, 1)
        if class_error >= AT_CHANCE:
            d.problems.append(f"the class head is still at chance: in the last training steps {class_error:.0f}% "
                              "of the queries matched to an object were scored \"no object\" (the boxes learn, "
                              "the scores do not)")
    if not d.problems:
        return d
    if steps < FEW_STEPS:
        d.causes.append(f"too few steps: {steps} optimizer steps; DETR usually needs several thousand before "
                        "its queries specialise, and on crowded images of one class its class head leaves chance "
                        "only after ~1000. Give it more time, or the convergence switches dn_groups / query_groups / "
                        "attn_guide_coef")
    if backbone_kind == "random":
        d.causes.append("a random backbone" + (" that stays frozen, so its features never improve" if frozen_backbone
                                                else "") + ": use --backbone-weights imagenet (or a file), "
                        "or pretrain_steps for self-pretraining on the training set")
    if feature_probe is not None and feature_probe.get("weak"):
        from .feature_probe import FeatureProbe, better_starts

        probe = FeatureProbe.from_dict(feature_probe)
        d.causes.append(f"features that do not name the objects where DETR reads them: {probe.text()}; better "
                        f"starts: {better_starts(feature_probe.get('dense_done', False))}")
    if boxes_wh is not None and image_wh is not None:
        share = small_object_share(boxes_wh, image_wh, model_cfg)
        d.facts["small_object_share"] = round(share, 3)
        if share >= SMALL_SHARE:
            d.causes.append(
                f"objects smaller than a feature cell: {share:.0%} of the training objects are narrower than "
                f"{feature_stride(model_cfg)} px at the input size the model sees (shorter side "
                f"{model_cfg.image_size} px); use "
                + ("a larger image_size" if model_cfg.dilation else
                   "a stride-16 feature map (dilation: true, e.g. preset detr-tiny-s16) or a larger image_size"))
    return d


@torch.no_grad()
def predicted_boxes(model, dataset, count: int = 50, device: torch.device | str = "cpu") -> Tensor:
    """The model's boxes [N,Q,4] on the first `count` readable items of an evaluation dataset
    ((image, target) pairs)."""
    model.eval()
    out = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        if not isinstance(item, tuple):
            continue  # an unreadable sample
        image = item[0].to(device)
        out.append(model([image])["pred_boxes"][0].float().cpu())
    return torch.stack(out) if out else torch.empty(0, 0, 4)


def object_sizes(index) -> tuple[Tensor, Tensor]:
    """(boxes_wh [N,2], image_wh [N,2]) of a DatasetIndex's annotations, for images with a known size."""
    sizes = {r.id: (r.width, r.height) for r in index.images if r.width and r.height}
    wh, im = [], []
    for a in index.annotations:
        if a.image_id in sizes and not a.iscrowd:
            wh.append(a.bbox[2:4])
            im.append(sizes[a.image_id])
    return torch.tensor(wh, dtype=torch.float32).reshape(-1, 2), torch.tensor(im, dtype=torch.float32).reshape(-1, 2)
