"""Do the frozen backbone's features say where the objects are and what they are? A linear probe.

DETR on a frozen backbone can only learn what the features at its cells carry. A backbone can name
the objects of box crops well and still not name them at the cells of a whole image (a crop shows
an object large and alone; a feature cell of a small object mixes it with its surroundings): on the
hard synthetic set the crop classifier scored 0.94 on held-out crops while DETR stayed at AP50 0.003.
The probe finds this in seconds, before the DETR steps are spent: on the features of some training
images (after the crop phase, where `pretrain_dense_when: weak` lets it decide whether the dense phase
runs, and again on the feature cache, where the run log reports it) it fits one linear layer that
tells, per feature cell, "no object centre here" from "the centre of an object of class k", and
scores it on other images:

  * objectness AUC: how well the cells with an object's centre rank above the rest (0.5: chance);
  * class accuracy at the centre cells, against chance: always naming the commonest class.

Measured on detr-tiny's crop-pretrained ResNet-18 (300 training images at the inference size, 4 folds):
the main job's data AUC 0.90, classes 0.52 at chance 0.23 (the run reaches AP50 0.44-0.65); BCCD AUC
0.84, classes 0.92 at chance 0.85 (AP50 0.37-0.50); hard AUC 0.81, classes 0.30 at chance 0.26 (AP50
0.003). The objectness AUC hardly separates them (crowded cells lower it on BCCD); the class gain does.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

log = logging.getLogger(__name__)

PROBE_IMAGES = 300
FOLDS = 4  # each image's cells are scored by a probe fitted on the other three quarters
PROBE_STEPS = 200
NEGATIVES_PER_POSITIVE = 4  # background cells kept per centre cell (AUC does not depend on the ratio)
# below either, DETR on these features has little to go on. Class gain: main 0.38 (0.55 on an AMX CPU, whose
# bf16 crop phase runs all its steps), BCCD 0.49 (0.6), hard 0.04 (0.19 on the AMX CPU, where the dense phase still
# doubled its AP50 in the same 15 minutes: 0.322 against 0.171). AUC: 0.81-0.90 on all three, so only a much
# lower one (features blind to where objects are) counts
WEAK_AUC = 0.7
WEAK_CLASSES = 0.25  # class accuracy above chance, as a share of what is above chance: (acc - c) / (1 - c)


@dataclass
class FeatureProbe:
    """objectness_auc: centre cells against the rest, held-out images; class_accuracy: at held-out centre
    cells (nan with one class); chance: the commonest class's share of them; images / cells: what the
    probe saw."""

    objectness_auc: float
    class_accuracy: float
    chance: float
    images: int
    cells: int

    @property
    def class_gain(self) -> float:
        """(accuracy - chance) / (1 - chance): 0 at chance, 1 when every centre is named (nan: one class)."""
        return (self.class_accuracy - self.chance) / (1 - self.chance) if self.chance < 1 else float("nan")

    @property
    def weak(self) -> bool:
        return self.objectness_auc < WEAK_AUC or self.class_gain < WEAK_CLASSES  # nan (one class): False

    def text(self) -> str:
        named = ("" if self.chance >= 1 else
                 f", names their class at {self.class_accuracy:.0%} of them (chance {self.chance:.0%})")
        return (f"a linear probe of the frozen features ({self.images} training images) finds the cells of "
                f"object centres with AUC {self.objectness_auc:.2f}{named}")

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureProbe":
        """From to_dict's output, or a record that holds it among other keys."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def better_starts(dense_done: bool) -> str:
    """What to do about weak features, in words (the run log's warning and the diagnosis say the same)."""
    dense = "more dense pretraining (a longer --max-minutes)" if dense_done else \
        "dense pretraining (--set pretrain_dense_steps=400)"
    return f"--backbone-weights imagenet (or a file), {dense}, or a trainable backbone (lr_backbone > 0)"


def centre_cells(feature_hw: tuple[int, int], target: dict) -> Tensor:
    """Per cell of one image's feature map, 0 or 1 + the class of an object whose box centre lies in it
    (the later object wins a shared cell). target: labels [n], boxes [n,4] cxcywh in [0,1]. -> [h*w]."""
    h, w = feature_hw
    cells = torch.zeros(h, w, dtype=torch.long)
    boxes, labels = target["boxes"], target["labels"]
    if len(boxes):
        cx = (boxes[:, 0] * w).long().clamp(0, w - 1)
        cy = (boxes[:, 1] * h).long().clamp(0, h - 1)
        cells[cy, cx] = labels.long() + 1
    return cells.flatten()


def _auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: the chance a positive outranks a negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = torch.from_numpy(rankdata(scores.numpy()))  # tied scores share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_features(items: list, num_classes: int, max_images: int = PROBE_IMAGES, steps: int = PROBE_STEPS,
                   seed: int = 0) -> FeatureProbe | None:
    """items: (features [C,h,w], target) pairs, e.g. one view of the feature cache (other entries, such as
    unreadable samples, are skipped). None when too few objects to say anything."""
    pairs = [it for it in items if isinstance(it, tuple) and torch.is_tensor(it[0])][:max_images]
    g = torch.Generator().manual_seed(seed)
    feats, cells, image_of = [], [], []
    for i, (f, target) in enumerate(pairs):
        y = centre_cells(f.shape[-2:], target)
        x = f.flatten(1).T.float()  # [h*w, C]
        keep = y > 0
        negatives = (~keep).nonzero().flatten()
        take = negatives[torch.randperm(len(negatives), generator=g)[:max(1, NEGATIVES_PER_POSITIVE * int(keep.sum()))]]
        keep[take] = True
        feats.append(x[keep]); cells.append(y[keep]); image_of.append(torch.full((int(keep.sum()),), i))
    if not feats:
        return None
    x, y, image_of = torch.cat(feats), torch.cat(cells), torch.cat(image_of)
    if int((y > 0).sum()) < 20:
        return None
    # each image scored by a probe fitted on the other folds: every image counts, none is scored by a fit on it
    fold = image_of % FOLDS
    p = torch.empty(len(y), num_classes + 1)
    for k in range(FOLDS):
        held = fold == k
        p[held] = _fit_and_score(x[~held], y[~held], x[held], num_classes + 1, steps, seed)
    centre = y > 0
    named = y[centre]
    accuracy = float((p[centre, 1:].argmax(1) + 1 == named).float().mean()) if num_classes > 1 else float("nan")
    chance = float(named.bincount().max()) / len(named)
    return FeatureProbe(_auc(1 - p[:, 0], centre), accuracy, chance, len(pairs), len(y))


def _fit_and_score(x_fit: Tensor, y_fit: Tensor, x_score: Tensor, outputs: int, steps: int, seed: int) -> Tensor:
    """One linear layer fitted (full-batch Adam) on standardised x_fit -> class probabilities of x_score."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):  # a diagnostic: the run's own random stream stays as it was
        torch.manual_seed(seed)
        head = torch.nn.Linear(x_fit.shape[1], outputs)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    x_fit = (x_fit - mean) / std
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(x_fit), y_fit).backward()
        opt.step()
    with torch.no_grad():
        return head((x_score - mean) / std).softmax(1)


def check_cached_features(cache, num_classes: int, dense_done: bool = False) -> dict | None:
    """Probe the first cached view of a `FeatureCache`, log what it found (a warning when the features are
    weak) -> FeatureProbe.to_dict() with "weak", or None when there were too few objects. Never raises:
    a diagnostic must not stop a run. dense_done: the dense phase ran (advise more of it, not to add it)."""
    try:
        probe = probe_features(cache.items[0], num_classes)
    except Exception as e:  # noqa: BLE001
        log.warning("feature check skipped: %s", e)
        return None
    if probe is None:
        return None
    if probe.weak:
        log.warning("feature check: %s. DETR on these frozen features has little to go on: expect a low AP. "
                    "Better starts: %s.", probe.text(), better_starts(dense_done))
    else:
        log.info("feature check: %s", probe.text())
    return {**probe.to_dict(), "weak": probe.weak, "dense_done": dense_done}


BACKBONE_PROBE_IMAGES = 300  # whole training images at the inference size: ~30 s on 2 cores at 288 px


def probe_backbone(body: torch.nn.Module, dataset, model_cfg, device: torch.device,
                   images: int = BACKBONE_PROBE_IMAGES) -> FeatureProbe | None:
    """Probe `body` (a ResNetBody) on the first `images` readable training images of `dataset` (a
    DetectionDataset), resized as the detector's evaluation resizes them."""
    from ..data.dataset import DetectionDataset
    from ..data.transforms import eval_transforms

    samples = DetectionDataset(dataset.index, eval_transforms(model_cfg.image_size, model_cfg.max_image_size),
                               skip_bad=True)
    was_training = body.training
    body.eval()
    items = []
    for i in range(len(samples)):
        if len(items) >= images:
            break
        item = samples[i]
        if isinstance(item, tuple):
            with torch.no_grad():
                items.append((body(item[0][None].to(device))[0].float().cpu(), item[1]))
    body.train(was_training)
    return probe_features(items, model_cfg.num_classes, max_images=images)
