"""DETR's set loss: match, then classify every slot and regress the matched ones."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from .matching import HungarianMatcher

PAPER_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> dict of scalar tensors.

    outputs: pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh, optional aux_outputs (list of the same).
    targets: B dicts {labels [N_b] int64 in [0,C), boxes [N_b,4] cxcywh in [0,1]} on the outputs' device.
    Keys: loss_ce, loss_bbox, loss_giou, class_error, cardinality_error (the last two are logs without
    gradient), and loss_ce_i, loss_bbox_i, loss_giou_i, cardinality_error_i for aux output i.
    `total(losses)` is the weighted sum that is trained.
    iou_aware (training-only switch): a matched query's class target is its box's IoU with the target on
    the class and the rest on "no object" instead of all on the class, so a query's score learns to rank
    its box's quality (what AP rewards); the weighted mean stays the paper's.
    one_to_many (training-only switch, H-DETR's hybrid layers): every decoder layer but the last is
    matched to each target this many times (fewer where the queries run short), so the early layers and
    the shared class head learn "a box on an object" from several queries at once; the last layer, the
    one inference reads, keeps one-to-one matching and learns to keep one box per object.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, eos_coef: float = 0.1,
                 weight_dict: dict[str, float] | None = None, iou_aware: bool = False, one_to_many: int = 1):
        super().__init__()
        self.iou_aware = iou_aware
        self.one_to_many = one_to_many
        # training-only terms on each layer's matched pairs: f(layer output, batch_idx [M], pred_idx [M],
        # target boxes [M,4], num_boxes) -> {name: scalar}; weighed by the caller (engine/convergence.py)
        self.matched_terms = None
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.eos_coef = eos_coef
        self.weight_dict = dict(PAPER_WEIGHTS if weight_dict is None else weight_dict)
        unknown = set(self.weight_dict) - set(PAPER_WEIGHTS)
        if unknown:
            raise ValueError(f"SetCriterion: unknown loss names in weight_dict: {sorted(unknown)}")
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef  # "no object" is 10x down-weighted: most slots are empty
        self.register_buffer("class_weight", class_weight)

    @classmethod
    def from_config(cls, train_cfg, num_classes: int) -> "SetCriterion":
        """From a TrainConfig's set_cost_*, *_loss_coef and eos_coef."""
        matcher = HungarianMatcher(train_cfg.set_cost_class, train_cfg.set_cost_bbox, train_cfg.set_cost_giou)
        weights = {"loss_ce": train_cfg.ce_loss_coef, "loss_bbox": train_cfg.bbox_loss_coef,
                   "loss_giou": train_cfg.giou_loss_coef}
        return cls(num_classes, matcher, train_cfg.eos_coef, weights, getattr(train_cfg, "iou_aware", False),
                   getattr(train_cfg, "one_to_many", 1))

    def _layer_losses(self, out: dict, targets: list[dict], num_boxes: float, final: bool) -> dict[str, Tensor]:
        logits = out["pred_logits"].float()  # [B,Q,C+1]
        indices = self.matcher(out, targets)
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)]).to(logits.device)
        pred_idx = torch.cat([p for p, _ in indices]).to(logits.device)
        tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])

        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, pred_idx] = tgt_labels.to(logits.device)
        src_boxes = out["pred_boxes"][batch_idx, pred_idx].float()
        tgt_boxes = tgt_boxes.to(src_boxes)
        if self.iou_aware:
            with torch.no_grad():
                iou = box_iou(box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")).diagonal()
            soft = F.one_hot(classes, self.num_classes + 1).float()  # [B,Q,C+1]
            soft[batch_idx, pred_idx] *= iou[:, None]
            soft[batch_idx, pred_idx, self.num_classes] = 1 - iou
            w = self.class_weight[classes]  # per-slot weight of its hard class, as cross_entropy weighs
            nll = -(soft * logits.log_softmax(-1)).sum(-1)
            losses = {"loss_ce": (w * nll).sum() / w.sum()}
        else:
            losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, self.class_weight)}
        losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        # eps=0: the exact GIoU of the paper (target boxes never have zero area)
        losses["loss_giou"] = generalized_box_iou_loss(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"),
            reduction="sum", eps=0.0) / num_boxes

        if self.matched_terms is not None:
            losses.update(self.matched_terms(out, batch_idx, pred_idx, tgt_boxes, num_boxes))

        with torch.no_grad():
            n_pred = (logits.argmax(-1) != self.num_classes).sum(1).float()
            n_true = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
            losses["cardinality_error"] = (n_pred - n_true).abs().mean()
            if final:
                matched = logits[batch_idx, pred_idx]
                correct = (matched.argmax(-1) == classes[batch_idx, pred_idx]).float()
                # no matched pairs: nothing was misclassified
                losses["class_error"] = 100.0 * (1.0 - correct.mean()) if len(correct) else logits.new_zeros(())
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        # num_boxes: average target count per process, so every process divides by the same number
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        num_boxes = num_boxes.clamp(min=1).item()

        losses = self._layer_losses(outputs, targets, num_boxes, final=True)
        aux_targets, aux_boxes = targets, num_boxes
        if self.one_to_many > 1:
            aux_targets = repeat_targets(targets, self.one_to_many, outputs["pred_logits"].shape[1])
            repeated, original = (sum(len(t["labels"]) for t in ts) for ts in (aux_targets, targets))
            aux_boxes = num_boxes * repeated / max(1, original)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_losses = self._layer_losses(aux, aux_targets, aux_boxes, final=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def weight(self, name: str) -> float:
        """The weight of a loss term in the total, aux suffix `_i` included; 0 for logged-only terms."""
        return self.weight_dict.get(split_aux(name)[0], 0.0)

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum that is back-propagated."""
        return sum(losses[k] * self.weight(k) for k in losses if self.weight(k) != 0)


def repeat_targets(targets: list[dict], k: int, num_queries: int) -> list[dict]:
    """Each image's targets repeated k times (one-to-many matching), or as often as its queries allow
    (at least once): [N_b] -> [N_b * min(k, num_queries // N_b)]."""
    out = []
    for t in targets:
        times = max(1, min(k, num_queries // max(1, len(t["labels"]))))
        out.append({**t, "labels": t["labels"].repeat(times), "boxes": t["boxes"].repeat(times, 1)})
    return out


def split_aux(name: str) -> tuple[str, int | None]:
    """A loss term's name -> (base name, decoder layer of an auxiliary term or None):
    "loss_ce_3" -> ("loss_ce", 3), "loss_ce" -> ("loss_ce", None)."""
    base, _, suffix = name.rpartition("_")
    return (base, int(suffix)) if base and suffix.isdigit() else (name, None)
