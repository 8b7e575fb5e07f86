"""A run's data: the datasets from annotation paths (checked first), reproducible per-sample
augmentation, and each epoch's loader in the order a resumed run continues."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ModelConfig, TrainConfig
from ..data.dataset import DetectionDataset, collate
from ..data.index import DatasetIndex
from ..data.transforms import make_transforms
from . import distributed as dist_utils

log = logging.getLogger(__name__)


class SeededSamples(Dataset):
    """Wraps a dataset so that item i of epoch e is drawn with RNGs seeded by (seed, e, i).

    The caller's RNG states are restored afterwards, so reading samples in the main process does not
    disturb dropout or anything else.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2**31 - 1)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s)
                return self.dataset[i]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def landscape(self, i: int) -> bool | None:
        landscape = getattr(self.dataset, "landscape", None)
        return landscape(i) if landscape is not None else None


def as_index(data, images_dir: str | os.PathLike | None = None, split: str | None = None) -> DatasetIndex:
    """A DatasetIndex, or an annotation path loaded with detrkit.data.formats.load_annotations."""
    if isinstance(data, DatasetIndex):
        return data
    from ..data.formats import load_annotations

    return load_annotations(data, split=split, images_dir=images_dir)


def coco_ground_truth(index: DatasetIndex):
    """pycocotools COCO object of a DatasetIndex (the evaluator's ground truth)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = index.to_coco()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        coco.createIndex()
    return coco


def check_or_raise(path, split, images_dir, skip_bad: bool,
                   also_listed: frozenset = frozenset()) -> DatasetIndex | None:
    """Run the dataset checker on an annotation path; errors abort unless skip_bad (then warnings).
    also_listed: resolved image paths of the run's other split (not reported as unannotated files).
    -> the index the checker read (None where it reads none: panoptic sets), so it is not read again."""
    from ..data.check import check_dataset

    report = check_dataset(path, split=split, images_dir=images_dir, decode_images=False, also_listed=also_listed)
    for p in report.warnings[:20]:
        log.warning("%s", p)
    if report.errors:
        text = "\n  ".join(str(p) for p in report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        if not skip_bad:
            raise ValueError(f"{path}: {len(report.errors)} dataset errors:\n  {text}{more}")
        log.warning("%s: %d dataset errors (skip_bad: the unreadable samples will be skipped):\n  %s%s", path,
                    len(report.errors), text, more)
    return report.index


def _listed(index: DatasetIndex | None) -> frozenset:
    """The resolved image paths an index lists (none without one)."""
    from ..data.images import resolved

    return frozenset(resolved(im.file) for im in index.images) if index is not None else frozenset()


def _try_index(data, images_dir, split) -> DatasetIndex | None:
    """The index of a dataset, or None when it is absent or unreadable (its own check reports that)."""
    if data is None:
        return None
    try:
        return as_index(data, images_dir, split)
    except (ValueError, OSError):
        return None


@dataclass
class RunData:
    """train_set: SeededSamples of the augmented training set; val_set: None without validation data;
    model_cfg, train_cfg: the given ones with the training set's classes and, with cfg.fit_to_data, the
    input sizes, query count and no-object weight fitted to it (engine/input_fit.py)."""

    train_index: DatasetIndex
    val_index: DatasetIndex | None
    train_set: SeededSamples
    val_set: DetectionDataset | None
    model_cfg: ModelConfig
    train_cfg: TrainConfig


def load_run_data(train_data, val_data, model_cfg: ModelConfig, cfg: TrainConfig, *, images_dir=None,
                  val_images_dir=None, split=None, val_split=None, check: bool = True, val_fraction: float = 0.0,
                  run_dir=None, fit: bool = True) -> RunData:
    """Index (and, for annotation paths, check) both sets; build their datasets with the run's transforms.

    No val_data and val_fraction > 0: the dataset's own validation split when it has one (training then
    on its train split), else a held-out seeded fraction written to run_dir (data/split.py). fit=False:
    no fitting to the data (fine-tuning keeps its weights' architecture)."""
    from ..data.split import automatic_split, dataset_splits, hold_out

    auto_split = val_data is None and val_fraction > 0
    if auto_split and not isinstance(train_data, DatasetIndex):
        named = dataset_splits(train_data, split)
        if named is not None:
            split, val_split = named
            val_data, val_images_dir, auto_split = train_data, images_dir, False
            log.info("validation: the %r split of %s (training on %r)", val_split, train_data, split)
    checked_train = checked_val = None  # the indexes the checks read, used below instead of a second read
    if check:  # an index in memory was built by the caller, who can check it
        # two annotation files over one image folder: each split's images are not "unannotated" in the other
        # (a named split is not checked for unannotated files at all)
        val_first = _try_index(val_data, val_images_dir, val_split) if split is None else None
        if not isinstance(train_data, DatasetIndex):
            checked_train = check_or_raise(train_data, split, images_dir, cfg.skip_bad, _listed(val_first))
        if val_data is not None and not isinstance(val_data, DatasetIndex):
            other = checked_train if checked_train is not None else _try_index(train_data, images_dir, split)
            checked_val = check_or_raise(val_data, val_split, val_images_dir, cfg.skip_bad,
                                         _listed(other) if val_split is None else frozenset())
    train_index = checked_train if checked_train is not None else as_index(train_data, images_dir, split)
    val_index = checked_val if checked_val is not None else (
        as_index(val_data, val_images_dir, val_split) if val_data is not None else None)
    if not train_index.images:
        raise ValueError(f"{train_index.source}: the training set has no images (check the path"
                         f"{' and --split' if split else ''})")
    train_index.require_boxes()
    if auto_split:
        if run_dir is not None and dist_utils.rank() == 0:
            train_index, val_index = automatic_split(train_index, run_dir, val_fraction, cfg.seed)
        else:  # the same seeded split, without writing it
            train_index, val_index = hold_out(train_index, val_fraction, cfg.seed)
    model_cfg = model_cfg.with_classes(train_index.class_names, train_index.category_ids)
    if fit:
        from .input_fit import fit_to_data

        model_cfg, cfg, fitted = fit_to_data(train_index, model_cfg, cfg)
        if fitted:
            log.info("%s", fitted)
    if val_index is not None and val_index.category_ids != train_index.category_ids:
        log.warning("validation categories %s differ from training categories %s; evaluating on the "
                    "training ones", val_index.category_ids, train_index.category_ids)
    train_set = SeededSamples(
        DetectionDataset(train_index, make_transforms(cfg, model_cfg, True), skip_bad=cfg.skip_bad), cfg.seed)
    val_set = (DetectionDataset(val_index, make_transforms(cfg, model_cfg, False), skip_bad=True)
               if val_index is not None else None)
    return RunData(train_index, val_index, train_set, val_set, model_cfg, cfg)


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def aspect_grouped(order: list[int], landscape: Callable[[int], bool | None], batch_size: int) -> list[int]:
    """`order` rearranged so that each batch of `batch_size` holds images of one orientation: a batch
    is padded to its widest and tallest member, and a mixed batch of 9x13 and 13x9 feature maps runs the
    transformer on 13x13 cells, ~45% more than either. Indices join their orientation's bucket in
    `order`'s sequence and a full bucket becomes the next batch; the rest (unknown sizes, the two
    partial buckets) ends the epoch. The same indices, as many batches, deterministic in `order`."""
    out: list[int] = []
    buckets: dict[bool | None, list[int]] = {True: [], False: [], None: []}
    for i in order:
        bucket = buckets[landscape(i)]
        bucket.append(i)
        if len(bucket) == batch_size:
            out.extend(bucket)
            bucket.clear()
    return out + buckets[True] + buckets[False] + buckets[None]


def epoch_loader(dataset, order: list[int], start_batch: int, cfg: TrainConfig, epoch: int,
                 num_workers: int) -> DataLoader:
    """The batches of an epoch in `order`, from batch `start_batch` on (a resumed epoch)."""
    # its own generator: creating the iterator must not draw from the global RNG (dropout), or a
    # resumed run, which creates one more iterator, would diverge
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    bs = cfg.batch_size
    return DataLoader(dataset, batch_size=bs, sampler=order[start_batch * bs:], generator=generator,
                      collate_fn=collate, num_workers=num_workers,
                      worker_init_fn=_ignore_signals if num_workers else None)
