"""Backbone features computed once, for a frozen backbone.

With lr_backbone <= 0 the backbone never changes, so running it again on every step only repeats
the same arithmetic; DETR's cost on a CPU is mostly that backbone. `FeatureCache` runs it once on
`views` augmented versions of each training image (view v of image i is exactly the sample
`SeededSamples` would draw in epoch v) and serves, in epoch e, view e mod views. The training step then
only runs projection, transformer and heads: several times more steps in the same time, the same
result per step, with augmentation limited to `views` draws per image.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.dataset import BadSample
from ..model.backbone import feature_mask
from ..model.detr import pad_images
from ..model.fuse import PackedResNetBody, fold_batchnorms, mkldnn_fusion_available

log = logging.getLogger(__name__)

SORT_WINDOW = 8  # loader batches of this many backbone batches are sorted by image size


class FeatureCache(Dataset):
    """Item i (in the current `epoch`) -> (features [C,h,w] bfloat16, target) or the BadSample.

    `samples` is a `SeededSamples` (augmentation seeded by epoch and index); `backbone` a frozen
    `Backbone`. Features are stored at the image's own feature size (no batch padding).
    """

    def __init__(self, samples, backbone: nn.Module, views: int, device: torch.device,
                 amp: bool = True, batch_size: int = 16, num_workers: int = 0, progress: bool = True):
        if views < 1:
            raise ValueError(f"FeatureCache: views must be >= 1, got {views}")
        self.views, self.epoch = views, 0
        self.items: list[list] = []
        backbone.eval()
        extract = _extractor(backbone, device, amp)
        bar = tqdm(total=views * len(samples), desc="cache features", disable=not progress, dynamic_ncols=True,
                   unit="img")
        for view in range(views):
            samples.epoch = view
            # loader batches of several chunks, so each chunk gathers images of similar size
            loader = DataLoader(samples, batch_size=SORT_WINDOW * batch_size, collate_fn=list,
                                num_workers=num_workers)
            items: list = []
            for batch in loader:
                items.extend(_features(batch, extract, device, amp, batch_size))
                bar.update(len(batch))
            self.items.append(items)
        bar.close()
        samples.epoch = 0
        feats = [it[0] for it in self.items[0] if not isinstance(it, BadSample)]
        log.info("cached backbone features of %d view(s) x %d images (%.0f MiB)", views, len(samples),
                 views * sum(f.numel() * f.element_size() for f in feats) / 2**20)

    def __len__(self) -> int:
        return len(self.items[0])

    def __getitem__(self, i: int):
        return self.items[self.epoch % self.views][i]


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
    if amp and device.type == "cpu" and mkldnn_fusion_available() and hasattr(backbone, "body"):
        return _PackedBackbone(backbone)

    def run(images, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return backbone(images, mask)
    return run


@torch.no_grad()
def _features(batch: list, extract, device: torch.device, amp: bool, chunk: int) -> list:
    """Features of a loader batch, run in chunks of `chunk` images of similar size (less padding)."""
    good = [k for k, item in enumerate(batch) if not isinstance(item, BadSample)]
    good.sort(key=lambda k: tuple(batch[k][0].shape[-2:]))
    out: list = list(batch)
    for start in range(0, len(good), chunk):
        _run_chunk(batch, good[start:start + chunk], out, extract, device, amp)
    return out


def _run_chunk(batch: list, ks: list[int], out: list, extract, device: torch.device, amp: bool) -> None:
    images, mask = pad_images([batch[k][0].to(device) for k in ks])
    features, fmask = extract(images, mask)
    for j, k in enumerate(ks):
        valid = ~fmask[j]
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        # targets are cloned out of the loader's shared memory: kept tensors would each hold a file descriptor
        target = {key: (v.clone() if torch.is_tensor(v) else v) for key, v in batch[k][1].items()}
        out[k] = (features[j, :, :h, :w].to(torch.bfloat16 if amp else torch.float32).cpu().contiguous(), target)


def cache_part(samples, backbone: nn.Module, cfg, device: torch.device, progress: bool) -> FeatureCache:
    """The run's caching stage (cfg.cache_views > 0, frozen backbone): the training samples become
    their cached backbone features."""
    # on a CPU the backbone keeps every core busy: a loader worker would only compete with it
    workers = cfg.num_workers if device.type != "cpu" else 0
    return FeatureCache(samples, backbone, cfg.cache_views, device, amp=cfg.amp == "bf16", num_workers=workers,
                        progress=progress)
