"""Backbone features computed once, for a frozen backbone.

With lr_backbone <= 0 the backbone never changes, so running it again on every step only repeats
the same arithmetic; DETR's cost on a CPU is mostly that backbone. `FeatureCache` runs it once on
`views` augmented versions of each training image (view v of image i is exactly the sample
`SeededSamples` would draw in epoch v) and serves, in epoch e, view e mod views. The training step then
only runs projection, transformer and heads: several times more steps in the same time, the same
result per step, with augmentation limited to `views` draws per image. Under --max-minutes the cache
takes at most its share of the budget (`CacheLimit`): it stops after fewer views when another would not
fit, and `views` is then the number cached.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.dataset import BadSample
from ..device import resolve_amp
from ..model.backbone import feature_mask
from ..model.detr import pad_images
from ..model.fuse import PackedResNetBody, fold_batchnorms, mkldnn_fusion_available
from . import distributed as dist_utils
from .budget import TimeBudget

log = logging.getLogger(__name__)

SORT_WINDOW = 8  # loader batches of this many backbone batches are sorted by image size


class FeatureCache(Dataset):
    """Item i (in the current `epoch`) -> (features [C,h,w] bfloat16, target) or the BadSample.

    `samples` is a `SeededSamples` (augmentation seeded by epoch and index); `backbone` a frozen
    `Backbone`. Features are stored at the image's own feature size (no batch padding).
    """

    def __init__(self, samples, backbone: nn.Module, views: int, device: torch.device,
                 amp: bool = True, batch_size: int = 16, num_workers: int = 0, progress: bool = True,
                 limit: CacheLimit | None = None):
        """limit: the caching stage's share of --max-minutes (None: exactly `views` views)."""
        if views < 1:
            raise ValueError(f"FeatureCache: views must be >= 1, got {views}")
        self.epoch = 0
        backbone.eval()
        extract = _extractor(backbone, device, amp)
        bar = tqdm(total=views * len(samples), desc="cache features", disable=not progress, dynamic_ncols=True,
                   unit="img")
        self.items = cached_views(samples, views, lambda chunk: _features(chunk, extract, device, amp), batch_size,
                                  bar, limit, num_workers)
        bar.close()
        self.views = len(self.items)  # epoch e serves view e mod views: only the views that were cached
        feats = [it[0] for it in self.items[0] if not isinstance(it, BadSample)]
        log.info("cached backbone features of %d view(s) x %d images (%.0f MiB)", self.views, len(samples),
                 self.views * sum(f.numel() * f.element_size() for f in feats) / 2**20)

    def __len__(self) -> int:
        return len(self.items[0])

    def __getitem__(self, i: int):
        return self.items[self.epoch % self.views][i]

    def landscape(self, i: int) -> bool | None:
        """Whether item i's features (this epoch's view) are wider than tall (None: a BadSample)."""
        item = self.items[self.epoch % self.views][i]
        return None if isinstance(item, BadSample) else item[0].shape[-1] >= item[0].shape[-2]


def cached_views(samples, views: int, run: Callable[[list], list], batch_size: int, bar,
                 limit: CacheLimit | None, num_workers: int = 0) -> list[list]:
    """Up to `views` views of every sample (view v: the samples of epoch v), each readable sample
    replaced by what run(chunk) gives for it (run: a list of samples -> one result each, called on chunks
    of `batch_size` samples of similar image size, so little padding); BadSamples stay as they are.
    `limit` watches the first view's pace and ends the caching early when another view would not fit."""
    out: list[list] = []
    for view in range(views):
        samples.epoch = view
        out.append(_view(samples, run, batch_size, num_workers, bar, limit if view == 0 else None))
        if view + 1 < views and limit is not None and not limit.another_view(view + 1, views):
            break
    samples.epoch = 0
    return out


def _view(samples, run: Callable[[list], list], batch_size: int, num_workers: int, bar,
          limit: CacheLimit | None) -> list:
    # loader batches of several chunks, so each chunk gathers images of similar size
    loader = DataLoader(samples, batch_size=SORT_WINDOW * batch_size, collate_fn=list, num_workers=num_workers)
    items: list = []
    for batch in loader:
        good = sorted((k for k, item in enumerate(batch) if not isinstance(item, BadSample)),
                      key=lambda k: tuple(batch[k][0].shape[-2:]))
        for start in range(0, len(good), batch_size):
            ks = good[start:start + batch_size]
            for k, result in zip(ks, run([batch[k] for k in ks])):
                batch[k] = result
        items.extend(batch)
        bar.update(len(batch))
        if limit is not None:
            limit.first_view_pace(len(items), len(samples))
    return items


class CacheLimit:
    """The feature cache's share of --max-minutes on the run's clock: after each complete view, the next
    starts only when it is projected (at the mean time of the views so far) to end within `seconds` of
    the cache's start. The first view always runs; when even it is projected to take longer than the
    whole budget (`budget_seconds`), a warning says so. agree(stop) -> the decision of all ranks.
    name and advice: what is cached and how to make it fit, for that warning."""

    def __init__(self, seconds: float, budget_seconds: float, clock: Callable[[], float],
                 agree: Callable[[bool], bool] = lambda stop: stop, name: str = "the backbone feature cache",
                 advice: str = "lower the input size (--set model.image_size=...) or cache_views=0"):
        self.seconds, self.budget_seconds, self.clock, self.agree = seconds, budget_seconds, clock, agree
        self.name, self.advice = name, advice
        self.start = clock()
        self.warned = False

    def first_view_pace(self, done: int, total: int) -> None:
        """After `done` of the first view's `total` images: the warning, once, when the view will not fit."""
        projected = (self.clock() - self.start) * total / max(1, done)
        if not self.warned and projected > self.budget_seconds:
            self.warned = True
            log.warning("one view of %s is projected to take %.0f s, more than the whole --max-minutes budget "
                        "(%.0f s): the training will get little or no time. Raise --max-minutes, or %s",
                        self.name, projected, self.budget_seconds, self.advice)

    def another_view(self, done: int, views: int) -> bool:
        """After `done` complete views of the `views` wanted: whether to cache one more (logged when not)."""
        spent = self.clock() - self.start
        per_view = spent / done
        stop = self.agree(spent + per_view > self.seconds)
        if stop:
            log.info("cached %d of %d views: view %d would pass the caching share of --max-minutes (%.0f s; "
                     "%.1f s a view so far); training goes on with %d augmented view(s) per image",
                     done, views, done + 1, self.seconds, per_view, done)
        return not stop


class _PackedBackbone:
    """(images, mask) -> (features, mask) like `Backbone`, with the ResNet run as bf16 packed oneDNN
    convolutions (batch norm folded): ~2.5x the img/s of autocast on a CPU. The weights are packed for
    the first batch's size (correct for every size)."""

    def __init__(self, backbone: nn.Module):
        body = copy.deepcopy(backbone.body)  # folding rewrites the modules; the model keeps its own
        fold_batchnorms(body)
        self.body = PackedResNetBody(body, torch.bfloat16, pack_size=None)
        self.packed = False

    def __call__(self, images: torch.Tensor, mask: torch.Tensor):
        if not self.packed:
            self.body.pack(tuple(images.shape[-2:]))
            self.packed = True
        features = self.body(images)
        return features.contiguous(), feature_mask(mask, features)


def _extractor(backbone: nn.Module, device: torch.device, amp: bool):
    """The fastest exact-enough way to run the frozen backbone here: packed bf16 on a CPU with amp,
    the module itself (under autocast when amp) elsewhere."""
    if amp and device.type == "cpu" and mkldnn_fusion_available(torch.bfloat16) and hasattr(backbone, "body"):
        return _PackedBackbone(backbone)

    def run(images, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return backbone(images, mask)
    return run


@torch.no_grad()
def _features(chunk: list, extract, device: torch.device, amp: bool) -> list:
    """(image, target) samples -> (features [C,h,w] at the image's own feature size, target)."""
    images, mask = pad_images([image.to(device) for image, _ in chunk])
    features, fmask = extract(images, mask)
    out = []
    for j, (_, target) in enumerate(chunk):
        valid = ~fmask[j]
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        # targets are cloned out of the loader's shared memory: kept tensors would each hold a file descriptor
        target = {key: (v.clone() if torch.is_tensor(v) else v) for key, v in target.items()}
        out.append((features[j, :, :h, :w].to(torch.bfloat16 if amp else torch.float32).cpu().contiguous(), target))
    return out


MAX_VIEWS = 64  # cache_images' ceiling on the views of a tiny set


def planned_views(cfg, num_images: int) -> int:
    """The views a run caches: cfg.cache_views, more for a small set (cfg.cache_images cached images in
    all, at most MAX_VIEWS views); the caching stage's time share may still cut them."""
    if cfg.cache_views <= 0:
        return 0
    wanted = math.ceil(cfg.cache_images / max(1, num_images)) if cfg.cache_images else 0
    return max(cfg.cache_views, min(MAX_VIEWS, wanted))


def cache_part(samples, backbone: nn.Module, cfg, device: torch.device, progress: bool,
               budget: TimeBudget | None = None, views: int | None = None) -> FeatureCache:
    """The run's caching stage (cfg.cache_views > 0, frozen backbone): the training samples become
    their cached backbone features. budget: the run's --max-minutes, of which caching takes at most its
    share (run_plan.CACHE_SHARE; fewer views when more would not fit). views: exactly this many, whatever
    the time (a resumed run repeats its first part's count); None: the planned count, within the share."""
    # on a CPU the backbone keeps every core busy: a loader worker would only compete with it
    workers = cfg.num_workers if device.type != "cpu" else 0
    amp = resolve_amp(cfg.amp, device) == "bf16"
    if views is not None:
        log.info("caching the %d view(s) the run had before it was resumed", views)
    return FeatureCache(samples, backbone, views or planned_views(cfg, len(samples)), device, amp=amp,
                        num_workers=workers, progress=progress, limit=_limit(cfg, budget, device) if views is None else None)


def _limit(cfg, budget: TimeBudget | None, device: torch.device) -> CacheLimit | None:
    if budget is None or budget.max_seconds is None:
        return None
    from .run_plan import cache_seconds

    def agree(stop: bool) -> bool:  # every rank caches the same number of views: one stopping stops all
        return dist_utils.all_reduce_max([float(stop)], device)[0] > 0

    return CacheLimit(cache_seconds(cfg, budget.elapsed()), budget.max_seconds, budget.clock, agree)
