"""Training-only convergence switches: denoising queries, group queries, an encoder head, guided attention.

DETR learns slowly because each ground-truth box teaches one query per step, and that query changes
from step to step (the Hungarian matching is unstable early on). Two fixes that change only training:

- Denoising queries (DN-DETR): each ground-truth box, noised (centre moved, size scaled, sometimes a
  wrong class), enters the decoder as an extra query that must give back the true box and class. No
  matching: a stable, direct signal for the decoder and heads. An attention mask keeps the matching
  queries from seeing them (they would read the answer) and the denoising groups from seeing each other.
  A DETR decoder has no reference points, so a denoising query's positional part is an embedding of its
  noised box (sine encoding + a small MLP) and its content part an embedding of its noised class; both
  live here, outside the model, and are discarded at export.
- Group queries (Group DETR): K sets of object queries at training time, each matched one-to-one to
  the targets on its own, under a block-diagonal self-attention mask; group 0 is the model's own
  `query_embed`, the others are training-only. K times more positive queries per step.
- Contrastive denoising negatives (DINO), on top of denoising: each ground-truth box also enters as a
  query noised more strongly (between one and two times the box noise) that must answer "no object".
  Beside its positive twin it teaches the decoder that of two queries on one object the worse one
  yields, which is what suppresses duplicate boxes.
- An encoder head (Co-DETR's auxiliary head, one-to-many): every feature cell near an object's centre
  predicts that object's class and box from the encoder memory. Each object teaches up to 3x3 cells
  every step with no matching at all, so the memory the decoder reads learns to say what and where
  from the first step; the head is dropped at export.
- Guided cross-attention: each matched query's cross-attention (mean over heads, every decoder layer)
  is taught to put its mass on the feature cells inside its target box (`attention_guide_loss`). A
  fresh decoder attends almost uniformly, so every query reads the same image average and can only
  learn one fixed box: on BCCD's red cells the queries' boxes moved by 1-3% of the image between
  images for ~700 steps while the class head sat at chance. Guided, they moved 6% by step 600 and
  twice as many boxes overlapped a cell by IoU > 0.5. Nothing is added to the model.

`TrainingQueries` holds the training-only parameters; `training_forward(model, extra, ...)` runs the
model's public blocks (features, encode, the decoder, heads) with the extra queries and the mask, so
`DETR.forward` and the state dict are untouched; `ConvergenceLoss` is the criterion for its output.
With every switch off, `training_forward` computes exactly `model(...)`. `TrainingModel` puts model
and extra queries in one module (what the training step runs, and what DDP wraps).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from ..config import TrainConfig
from ..losses import split_aux
from ..model.detr import MLP, BackboneFeatures



def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of cxcywh boxes in [0,1]: boxes [...,4] -> [...,dim] (dim/4 channels per coordinate,
    sin and cos interleaved, as the model's position embedding encodes a cell's coordinates)."""
    per = dim // 4
    if per * 4 != dim or per % 2:
        raise ValueError(f"box_sine_embedding: dim must be a multiple of 8, got {dim}")
    i = torch.arange(per, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (i // 2) / per)
    x = boxes.float()[..., None] * (2 * math.pi) / dim_t  # [...,4,per]
    x = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
    return x.flatten(-2)


class TrainingQueries(nn.Module):
    """The training-only parameters of the switches (never part of the model's state dict).

    extra_queries [K-1,Q,d]: the query sets of groups 1..K-1 (group 0 is model.query_embed);
    dn_label [C+1,d]: content embedding of a denoising query's (noised) class;
    dn_box: MLP from the sine encoding of a noised box to its positional embedding.
    """

    def __init__(self, cfg: TrainConfig, hidden_dim: int, num_queries: int, num_classes: int):
        super().__init__()
        self.groups = max(1, cfg.query_groups)
        self.dn_groups = max(0, cfg.dn_groups)
        # crowded images get fewer denoising groups (as DN-DETR's dynamic groups): the denoising part
        # stays within dn_query_budget x the model's queries, so a 30-object image costs no more
        # decoder time than a 4-object one
        self.dn_budget = int(cfg.dn_query_budget * num_queries)
        self.box_noise, self.label_noise = cfg.dn_box_noise, cfg.dn_label_noise
        self.per_target = 2 if getattr(cfg, "dn_negatives", False) else 1  # a positive (and a negative) query
        self.num_classes = num_classes
        d = hidden_dim
        self.extra_queries = nn.Parameter(torch.randn(self.groups - 1, num_queries, d)) if self.groups > 1 else None
        if self.dn_groups:
            self.dn_label = nn.Embedding(num_classes + 1, d)
            self.dn_box = MLP(d, d, d, 2)
        else:
            self.dn_label = self.dn_box = None
        self.enc_head = EncoderHead(d, num_classes) if cfg.enc_aux_coef > 0 else None
        self.attn_guide = cfg.attn_guide_coef > 0

    @property
    def active(self) -> bool:
        return self.groups > 1 or self.dn_groups > 0 or self.enc_head is not None or self.attn_guide

    @classmethod
    def from_config(cls, cfg: TrainConfig, model: nn.Module) -> "TrainingQueries":
        return cls(cfg, model.cfg.hidden_dim, model.cfg.num_queries, model.cfg.num_classes)

    def groups_for(self, n_max: int) -> int:
        """Denoising groups for a batch whose largest image has n_max targets: dn_groups, fewer when
        dn_groups * dn_width(n_max) would pass the budget, at least one."""
        return max(1, min(self.dn_groups, self.dn_budget // max(1, self.dn_width(n_max))))

    def dn_width(self, n_max: int) -> int:
        """Queries in one denoising group: n_max positives, and as many negatives when they are on."""
        return self.per_target * n_max

    def noised(self, targets: Sequence[dict], generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The denoising queries' inputs for a batch: each image's targets repeated G = groups_for(n_max)
        times (with negatives: twice per group, the second copy noised more), padded to the batch's
        largest count n_max. -> noised labels [B,D], noised boxes [B,D,4], true labels [B,D] (C, "no
        object", for negatives), true boxes [B,D,4], valid [B,D] bool, with D = G * dn_width(n_max)
        (slot (g*k + s)*n_max + j: group g, copy s of k (0 positive, 1 negative), target j)."""
        device = targets[0]["boxes"].device if len(targets) else torch.device("cpu")
        n_max = max((len(t["labels"]) for t in targets), default=0)
        b, g, k = len(targets), self.groups_for(n_max), self.per_target
        labels = torch.full((b, g, k, n_max), self.num_classes, dtype=torch.int64, device=device)
        boxes = torch.full((b, g, k, n_max, 4), 0.5, device=device)
        valid = torch.zeros((b, g, k, n_max), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            labels[i, :, :, :n] = t["labels"]
            boxes[i, :, :, :n] = t["boxes"].float()
            valid[i, :, :, :n] = True
        true_labels, true_boxes = labels.clone(), boxes.flatten(1, 3)
        true_labels[:, :, 1:] = self.num_classes  # negatives answer "no object"
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731
        flip = (rand(b, g, k, n_max) < self.label_noise) & valid
        random_labels = (rand(b, g, k, n_max) * self.num_classes).long().clamp(max=self.num_classes - 1)
        noisy_labels = torch.where(flip, random_labels, labels)
        # noise in [-1, 1] x box_noise for positives; negatives in [1, 2] x box_noise, either sign
        shift, scale = rand(b, g, k, n_max, 2) * 2 - 1, rand(b, g, k, n_max, 2) * 2 - 1
        if k > 1:
            shift[:, :, 1:] = shift[:, :, 1:].sign() * (1 + shift[:, :, 1:].abs())
            scale[:, :, 1:] = scale[:, :, 1:].sign() * (1 + scale[:, :, 1:].abs())
        wh = boxes[..., 2:]
        centre = boxes[..., :2] + shift * self.box_noise * wh / 2
        size = wh * (1 + scale * self.box_noise)
        noisy_boxes = torch.cat([centre.clamp(0, 1), size.clamp(1e-3, 1)], dim=-1)
        return (noisy_labels.flatten(1, 3), noisy_boxes.flatten(1, 3), true_labels.flatten(1, 3), true_boxes,
                valid.flatten(1, 3))


CENTRE_CELLS = 1.5  # an object's positive cells lie within this many cells of its centre (and in its box)
ENC_FOCAL_WEIGHT = 2.0  # the encoder head's class loss weight (sigmoid focal, as dense detectors weigh it)


class EncoderHead(nn.Module):
    """Dense class and box head on the encoder memory (training-only).

    forward(memory [B,N,d]) -> logits [B,N,C] (sigmoid, one per class), offsets [B,N,4]: the box of
    cell (x, y) of size (cw, ch) is (x + o0 cw, y + o1 ch, cw exp(o2), ch exp(o3)), cxcywh."""

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.class_head = nn.Linear(hidden_dim, num_classes)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 2)
        # the paper-standard focal prior: every cell starts at ~1% object, so the many empty cells
        # do not swamp the first steps
        nn.init.constant_(self.class_head.bias, -math.log(99.0))

    def forward(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.class_head(memory), self.box_head(memory)


def cell_geometry(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Feature mask [B,h,w] (True on padding) -> cell centres [B,N,2] (x, y in [0,1] of each image's own
    unpadded extent) and cell sizes [B,1,2] (1/w_i, 1/h_i), N = h*w row-major."""
    b, h, w = mask.shape
    valid = ~mask
    w_i = valid.any(1).sum(1).clamp(min=1).float()  # [B]
    h_i = valid.any(2).sum(1).clamp(min=1).float()
    xs = (torch.arange(w, device=mask.device).float() + 0.5)[None] / w_i[:, None]  # [B,w]
    ys = (torch.arange(h, device=mask.device).float() + 0.5)[None] / h_i[:, None]  # [B,h]
    centres = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1).flatten(1, 2)
    return centres, torch.stack([1 / w_i, 1 / h_i], dim=-1)[:, None]


def dense_targets(mask: Tensor, targets: Sequence[dict], num_classes: int,
                  geometry: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The encoder head's targets: a cell is positive for an object when its centre lies within
    CENTRE_CELLS cells of the object's centre and inside the box (the cell holding the centre always
    counts, so a box smaller than a cell still gets one); of several, the smallest box wins.
    geometry: `cell_geometry(mask)` when the caller has it already.
    -> labels [B,N] (num_classes = background, -1 = padding), boxes [B,N,4] cxcywh (zeros where none)."""
    b, n = mask.shape[0], mask.shape[1] * mask.shape[2]
    centres, cell = geometry if geometry is not None else cell_geometry(mask)
    m = max((len(t["labels"]) for t in targets), default=0)
    labels = torch.full((b, n), num_classes, dtype=torch.int64, device=mask.device)
    boxes = torch.zeros((b, n, 4), device=mask.device)
    if m > 0:
        gt = torch.zeros((b, m, 4), device=mask.device)
        gl = torch.zeros((b, m), dtype=torch.int64, device=mask.device)
        present = torch.zeros((b, m), dtype=torch.bool, device=mask.device)
        for i, t in enumerate(targets):
            k = len(t["labels"])
            gt[i, :k], gl[i, :k], present[i, :k] = t["boxes"].float(), t["labels"], True
        reach = torch.maximum(torch.minimum(gt[:, None, :, 2:] / 2, CENTRE_CELLS * cell[:, :, None]),
                              cell[:, :, None] / 2)  # [B,1,M,2]
        near = ((centres[:, :, None] - gt[:, None, :, :2]).abs() < reach).all(-1)  # [B,N,M]
        # the cell holding the centre, explicitly (a centre on a cell border is < half a cell from none)
        extent = (1 / cell[:, 0]).round().long()  # [B,2] unpadded cells (w_i, h_i)
        home = (gt[..., :2] * extent[:, None]).long().clamp(min=0)
        home = torch.minimum(home, extent[:, None] - 1)  # [B,M,2]
        home_index = home[..., 1] * mask.shape[2] + home[..., 0]  # row-major in the padded map
        near = (near | (torch.arange(n, device=mask.device)[None, :, None] == home_index[:, None])) & present[:, None]
        area = torch.where(near, (gt[..., 2] * gt[..., 3])[:, None], torch.inf)
        best = area.argmin(-1)  # [B,N]
        hit = near.any(-1)
        labels = torch.where(hit, gl.gather(1, best), labels)
        boxes = torch.where(hit[..., None], gt.gather(1, best[..., None].expand(-1, -1, 4)), boxes)
    labels[mask.flatten(1)] = -1
    return labels, boxes


def encoder_losses(enc: dict, targets: Sequence[dict], num_classes: int) -> dict[str, Tensor]:
    """Sigmoid focal class loss over every unpadded cell, L1 and GIoU over the positive cells, each
    divided by the number of positive cells. enc: {"logits" [B,N,C], "offsets" [B,N,4], "mask" [B,h,w]}."""
    centres, cell = cell_geometry(enc["mask"])
    labels, boxes = dense_targets(enc["mask"], targets, num_classes, (centres, cell))
    valid, positive = labels >= 0, (labels >= 0) & (labels < num_classes)
    n = positive.sum().clamp(min=1).float()
    onehot = F.one_hot(labels.clamp(min=0), num_classes + 1)[..., :num_classes].float()
    focal = sigmoid_focal_loss(enc["logits"][valid].float(), onehot[valid], reduction="sum") / n
    o = enc["offsets"].float()
    pred = torch.cat([centres + o[..., :2] * cell, cell * o[..., 2:].clamp(max=8).exp()], dim=-1)[positive]
    target = boxes[positive]
    l1 = F.l1_loss(pred, target, reduction="sum") / n
    giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"),
                                    reduction="sum") / n
    return {"loss_enc_focal": focal, "loss_enc_bbox": l1, "loss_enc_giou": giou}


def self_attention_mask(num_queries: int, groups: int, dn_groups: int = 0, dn_width: int = 0,
                        device: torch.device | None = None) -> Tensor:
    """Self-attention mask [L,L] (True = blocked) over the decoder's queries, in the order
    [group 0 | ... | group K-1 | denoising part: dn_groups groups of dn_width], L = Q*K + dn_groups*dn_width.

    Matching queries see only their own group; a denoising query sees its own denoising group and
    group 0's matching queries, never another denoising group: no matching query can read the ground
    truth, and no denoising group can copy another's answer. (Padding slots of images with fewer
    targets stay visible inside their group, as in DN-DETR; their outputs are not trained.)"""
    qk, d = num_queries * groups, dn_groups * dn_width
    group_of = torch.cat([torch.arange(qk, device=device) // num_queries,
                          groups + torch.arange(d, device=device) // max(1, dn_width)])
    mask = group_of[:, None] != group_of[None, :]
    mask[qk:, :num_queries] = False  # denoising queries may look at group 0's matching queries
    return mask


def training_forward(model: nn.Module, extra: TrainingQueries | None,
                     inputs: Sequence[Tensor] | Tensor | BackboneFeatures, targets: Sequence[dict] | None = None,
                     *, generator: torch.Generator | None = None) -> dict:
    """The model's training forward with the switches in `extra`, composed of the model's public blocks
    (features, encode, the decoder, heads), so `DETR.forward` and the state dict are untouched.

    inputs: what `DETR.forward` takes (a list of [3,H,W] images, a padded batch, or BackboneFeatures).
    -> {"groups": K dicts like DETR.forward's output (group 0 = the model's own queries),
        "dn": None or {pred_logits [L,B,D,C+1], pred_boxes [L,B,D,4] (every decoder layer), labels [B,D],
              boxes [B,D,4] (the true ones), valid [B,D]},
        "enc": None or {logits [B,N,C], offsets [B,N,4], mask [B,h,w]} (the encoder head's)}.
    """
    feats = inputs if isinstance(inputs, BackboneFeatures) else model.features(inputs)
    enc = model.encode(feats)
    b, d_model = enc.memory.shape[0], enc.memory.shape[-1]
    queries = model.query_embed.weight[None]  # [1,Q,d]
    groups = 1 if extra is None else extra.groups
    if groups > 1:
        queries = torch.cat([queries, extra.extra_queries.to(queries.dtype)], dim=0)  # [K,Q,d]
    query_pos = queries.flatten(0, 1)[None].expand(b, -1, -1)  # [B,K*Q,d]
    at_input = model.transformer.queries_at == "input"
    tgt = query_pos if at_input else torch.zeros_like(query_pos)
    dn = None
    if extra is not None and extra.dn_groups and targets is not None and any(len(t["labels"]) for t in targets):
        noisy_labels, noisy_boxes, labels, boxes, valid = extra.noised(targets, generator)
        content = extra.dn_label(noisy_labels).to(query_pos.dtype)  # [B,D,d]
        where = extra.dn_box(box_sine_embedding(noisy_boxes, d_model).to(query_pos.dtype))  # [B,D,d]
        if at_input:
            tgt = torch.cat([tgt, content + where], dim=1)
        else:  # content as the decoder's start, the noised box as the positional part of every attention
            tgt = torch.cat([tgt, content], dim=1)
            query_pos = torch.cat([query_pos, where], dim=1)
        dn = {"labels": labels, "boxes": boxes, "valid": valid}
    attn_mask = None
    if groups > 1 or dn is not None:
        n_max = max(len(t["labels"]) for t in targets) if dn else 0
        dn_groups = extra.groups_for(n_max) if dn else 0
        attn_mask = self_attention_mask(model.cfg.num_queries, groups, dn_groups,
                                        extra.dn_width(n_max) if dn else 0, enc.memory.device)
    # the decoder itself (not DETR.decode): denoising queries need their own start `tgt`
    guide = extra is not None and extra.attn_guide
    hs, cross = model.transformer.decoder(tgt, enc.memory, enc.pos, None if at_input else query_pos, enc.key_mask,
                                          need_weights=guide, self_attn_mask=attn_mask)
    q = model.cfg.num_queries
    outs = [model.heads(hs[:, :, g * q:(g + 1) * q]) for g in range(groups)]
    if guide:  # each layer's output carries its cross-attention [B,heads,Q,N] for `attention_guide_loss`
        for g, out in enumerate(outs):
            for layer, o in zip(cross, out.get("aux_outputs", []) + [out]):
                o["cross_attention"], o["feature_mask"] = layer[:, :, g * q:(g + 1) * q], enc.mask
    if dn is not None:
        dn["pred_logits"] = model.class_embed(hs[:, :, groups * q:])
        dn["pred_boxes"] = model.bbox_embed(hs[:, :, groups * q:]).sigmoid()
    enc_out = None
    if extra is not None and extra.enc_head is not None:
        logits, offsets = extra.enc_head(enc.memory)
        enc_out = {"logits": logits, "offsets": offsets, "mask": enc.mask}
    return {"groups": outs, "dn": dn, "enc": enc_out}


def attention_guide_loss(out: dict, batch_idx: Tensor, pred_idx: Tensor, boxes: Tensor,
                         num_boxes: float) -> dict[str, Tensor]:
    """-log of the cross-attention mass (mean over heads) a matched query puts on the feature cells
    inside its target box (at least the cell holding the centre), summed over the matched pairs and
    divided by num_boxes. out: a layer's output with cross_attention [B,H,Q,N] and feature_mask
    [B,h,w]; batch_idx, pred_idx [M]; boxes [M,4] cxcywh. {} for a layer without attention."""
    if "cross_attention" not in out:
        return {}
    centres, cell = cell_geometry(out["feature_mask"])  # [B,N,2], [B,1,2]
    attn = out["cross_attention"].float().mean(1)[batch_idx, pred_idx]  # [M,N]
    reach = torch.maximum(boxes[:, None, 2:].float() / 2, cell[batch_idx] / 2)  # [M,1,2]
    inside = ((centres[batch_idx] - boxes[:, None, :2].float()).abs() <= reach).all(-1)  # [M,N]
    mass = (attn * inside).sum(-1).clamp(min=1e-6)
    return {"loss_attn": -mass.log().sum() / num_boxes}


class ConvergenceLoss(nn.Module):
    """The criterion for `training_forward`'s output: the set loss of every query group (summed, as
    Group DETR does) plus, with denoising, each denoising query's class and box loss against the target
    it was made from (every decoder layer, no matching), weighted by dn_loss_coef; a negative denoising
    query has only the class term, towards "no object".

    forward(outputs, targets) -> dict of scalar tensors: group 0's terms under the usual names (so logs
    compare with plain DETR), other groups' under `g{k}_`, the denoising ones as loss_dn_ce / loss_dn_bbox
    / loss_dn_giou. total(losses) -> the trained sum.
    """

    def __init__(self, criterion: nn.Module, dn_loss_coef: float = 1.0, enc_aux_coef: float = 0.0,
                 attn_guide_coef: float = 0.0):
        super().__init__()
        self.criterion = criterion
        self.dn_loss_coef = dn_loss_coef
        self.enc_aux_coef = enc_aux_coef
        self.attn_guide_coef = attn_guide_coef
        if attn_guide_coef > 0:
            criterion.matched_terms = attention_guide_loss

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        losses = dict(self.criterion(outputs["groups"][0], targets))
        for g, out in enumerate(outputs["groups"][1:], start=1):
            losses.update({f"g{g}_{k}": v for k, v in self.criterion(out, targets).items()})
        if outputs.get("dn") is not None:
            losses.update(self._denoising(outputs["dn"]))
        if outputs.get("enc") is not None:
            losses.update(encoder_losses(outputs["enc"], targets, self.criterion.num_classes))
        return losses

    def _denoising(self, dn: dict) -> dict[str, Tensor]:
        valid = dn["valid"]  # [B,D]
        positive = valid & (dn["labels"] < dn["pred_logits"].shape[-1] - 1)  # negatives: class only
        n = positive.sum().clamp(min=1).float()
        labels, boxes = dn["labels"][valid], dn["boxes"][positive].float()  # [M], [P,4]
        ce = l1 = giou = 0.0
        for lg, bx in zip(dn["pred_logits"], dn["pred_boxes"]):  # decoder layers
            ce = ce + F.cross_entropy(lg[valid].float(), labels, reduction="sum") / n
            pb = bx[positive].float()
            l1 = l1 + F.l1_loss(pb, boxes, reduction="sum") / n
            giou = giou + generalized_box_iou_loss(box_convert(pb, "cxcywh", "xyxy"),
                                                   box_convert(boxes, "cxcywh", "xyxy"), reduction="sum") / n
        return {"loss_dn_ce": ce, "loss_dn_bbox": l1, "loss_dn_giou": giou}

    def weight(self, name: str) -> float:
        group_term = name.startswith("g") and "_" in name and name[1:name.index("_")].isdigit()
        base = name[name.index("_") + 1:] if group_term else name
        if split_aux(base)[0] == "loss_attn":
            return self.attn_guide_coef
        if name == "loss_enc_focal":
            return self.enc_aux_coef * ENC_FOCAL_WEIGHT
        if name.startswith("loss_enc_"):
            return self.enc_aux_coef * self.criterion.weight("loss_" + name[len("loss_enc_"):])
        if name.startswith("loss_dn_"):
            return self.dn_loss_coef * self.criterion.weight("loss_" + name[len("loss_dn_"):])
        return self.criterion.weight(base)

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(losses[k] * self.weight(k) for k in losses if self.weight(k) != 0)


class TrainingModel(nn.Module):
    """The model and its training-only queries as one module: forward(inputs, targets) ->
    `training_forward`'s output. DDP wraps this (so the extra parameters' gradients are reduced too);
    checkpoints keep `model` and `extra` apart (the model's state dict stays the paper's)."""

    def __init__(self, model: nn.Module, extra: TrainingQueries):
        super().__init__()
        self.model, self.extra = model, extra

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, inputs, targets: Sequence[dict] | None = None) -> dict:
        return training_forward(self.model, self.extra, inputs, targets)
