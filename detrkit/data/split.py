"""The validation set of a run when the user names none.

`detrkit train` without `--val`:
  * when the dataset defines a validation split (VOC `ImageSets/Main/val.txt`, a YOLO data.yaml `val:` or
    `images/val/`, a COCO folder's `annotations/instances_val*.json`) the run trains on its train split and
    validates on that one;
  * otherwise it holds out a seeded random fraction of the images (`--val-fraction`, default 0.1) and
    writes the split to the run folder: `split.json` (which image files went where, the seed and the
    fraction) and `val.json` (the held-out images as COCO JSON), so `detrkit eval --data RUN/val.json`
    scores exactly the images the run never trained on, and `--resume` keeps the same split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path

from .index import DatasetIndex

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
VAL_FILE = "val.json"
VAL_NAMES = ("val", "valid", "validation")


def named_splits(path: str | os.PathLike) -> list[str]:
    """The split names a dataset path defines (empty for a single COCO JSON file or a flat folder)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return []
            return [k for k in ("train", "val", "test") if isinstance(data, dict) and data.get(k)]
        return []
    if not path.is_dir():
        return []
    for yaml_name in ("data.yaml", "data.yml"):
        if (path / yaml_name).is_file():
            return named_splits(path / yaml_name)
    if (path / "ImageSets" / "Main").is_dir():
        return sorted(p.stem for p in (path / "ImageSets" / "Main").glob("*.txt"))
    if (path / "annotations").is_dir() and any((path / "annotations").glob("*.json")):
        return sorted(p.stem.removeprefix("instances_") for p in (path / "annotations").glob("*.json"))
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return sorted(p.name for p in (path / "images").iterdir() if p.is_dir())
    return []


def dataset_splits(path: str | os.PathLike, split: str | None = None) -> tuple[str | None, str] | None:
    """(train split, val split) when the dataset at `path` has a validation split, else None.

    split: the training split the user asked for (kept); otherwise "train" when the dataset has one.
    """
    names = named_splits(path)
    val = next((n for n in names if n in VAL_NAMES or n.startswith("val")), None)
    if val is None or val == split:
        return None
    train = split if split is not None else next((n for n in names if n == "train" or n.startswith("train")), None)
    if train is None:
        return None  # no named training split: training on everything would include the val images
    return train, val


def subset(index: DatasetIndex, image_ids: set[int]) -> DatasetIndex:
    """The images of `index` with these ids and their boxes; the category list is kept whole."""
    return dataclasses.replace(
        index,
        images=[im for im in index.images if im.id in image_ids],
        annotations=[a for a in index.annotations if a.image_id in image_ids],
        problems=list(index.problems),
    )


def hold_out(index: DatasetIndex, fraction: float = 0.1, seed: int = 0) -> tuple[DatasetIndex, DatasetIndex]:
    """(train, val): a seeded random `fraction` of the images (at least one, and at least one left to train)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(index.images)
    if n < 2:
        raise ValueError(f"{index.source}: {n} image(s); a validation split needs at least 2 "
                         "(pass --val, or --val-fraction 0 to train without validation)")
    ids = sorted(im.id for im in index.images)
    random.Random(seed).shuffle(ids)
    n_val = min(n - 1, max(1, math.floor(n * fraction + 0.5)))
    val_ids = set(ids[:n_val])
    return subset(index, set(ids) - val_ids), subset(index, val_ids)


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def save_split(run_dir: str | os.PathLike, train: DatasetIndex, val: DatasetIndex, fraction: float,
               seed: int) -> Path:
    """Write RUN/split.json (image files of each part) and RUN/val.json (COCO JSON of the val part)."""
    from .coco import save_coco

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"source": str(Path(train.source).resolve()), "fraction": fraction, "seed": seed,
              "train": sorted(_key(im.file) for im in train.images),
              "val": sorted(_key(im.file) for im in val.images)}
    tmp = run_dir / (SPLIT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, run_dir / SPLIT_FILE)
    save_coco(val, run_dir / VAL_FILE)
    return run_dir / SPLIT_FILE


def load_split(run_dir: str | os.PathLike, index: DatasetIndex) -> tuple[DatasetIndex, DatasetIndex]:
    """Apply RUN/split.json to `index` (the same dataset): (train, val). Images added to the dataset since
    the split was written go to training; the val part stays the images it was."""
    path = Path(run_dir) / SPLIT_FILE
    try:
        record = json.loads(path.read_text())
        val_files = set(record["val"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable split file ({e}); delete it to draw a new split") from None
    val_ids = {im.id for im in index.images if _key(im.file) in val_files}
    if not val_ids:
        raise ValueError(f"{path}: none of its validation images is in {index.source}; "
                         "delete it to draw a new split, or pass --val")
    if len(val_ids) < len(val_files):
        log.warning("%s: %d of its %d validation images are no longer in %s", path,
                    len(val_files) - len(val_ids), len(val_files), index.source)
    all_ids = {im.id for im in index.images}
    return subset(index, all_ids - val_ids), subset(index, val_ids)


def automatic_split(index: DatasetIndex, run_dir: str | os.PathLike, fraction: float = 0.1, seed: int = 0
                    ) -> tuple[DatasetIndex, DatasetIndex]:
    """The run's held-out split: the one in RUN/split.json when there is one, else a new one (written there)."""
    run_dir = Path(run_dir)
    if (run_dir / SPLIT_FILE).exists():
        train, val = load_split(run_dir, index)
        log.info("validation: the %d images held out in %s", len(val.images), run_dir / SPLIT_FILE)
        return train, val
    train, val = hold_out(index, fraction, seed)
    save_split(run_dir, train, val, fraction, seed)
    log.info("validation: no --val and no validation split in %s; holding out %d of %d images (%.0f%%, seed "
             "%d), written to %s and %s", index.source, len(val.images), len(index.images), 100 * fraction, seed,
             run_dir / SPLIT_FILE, run_dir / VAL_FILE)
    return train, val
