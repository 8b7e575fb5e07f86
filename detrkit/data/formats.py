"""One entry point for every annotation format, and conversion to COCO JSON.

`load_annotations` looks at the path to decide the format:
  * a `*.json` file, or a folder with `annotations/*.json`      -> COCO  (`detrkit.data.coco`)
  * a `*.yaml`/`*.yml` file, a folder with `data.yaml` or `labels/` -> YOLO (`detrkit.data.yolo`)
  * a folder with `Annotations/`, `annotations/*.xml` or `*.xml`  -> Pascal VOC (`detrkit.data.voc`)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from detrkit.data.coco import load_coco, save_coco
from detrkit.data.index import DatasetIndex
from detrkit.data.voc import load_voc
from detrkit.data.yolo import load_yolo

log = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "voc")


def _coco_json_in(folder: Path, split: str | None) -> Path:
    """The COCO JSON of a dataset folder: annotations/instances_<split>.json, <split>.json, or the only one."""
    ann = folder / "annotations"
    jsons = sorted(ann.glob("*.json"))
    if split is not None:
        for name in (f"instances_{split}.json", f"{split}.json"):
            if (ann / name).is_file():
                return ann / name
        raise ValueError(f"{folder}: no annotations/instances_{split}.json or annotations/{split}.json "
                         f"(found: {', '.join(p.name for p in jsons)})")
    if len(jsons) == 1:
        return jsons[0]
    raise ValueError(f"{folder}: {len(jsons)} JSON files in annotations/ "
                     f"({', '.join(p.name for p in jsons[:8])}); pass --split or the JSON file itself")


def detect_format(path: str | os.PathLike) -> str:
    """"coco", "yolo" or "voc" for a dataset path; `ValueError` naming the path when unrecognised."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise ValueError(f"{path}: unrecognised annotation file (expected a COCO .json or a YOLO data.yaml)")
    if (path / "data.yaml").is_file() or (path / "data.yml").is_file():
        return "yolo"
    if (path / "Annotations").is_dir():
        return "voc"
    ann = path / "annotations"
    if ann.is_dir():
        if any(ann.glob("*.json")):
            return "coco"
        if any(ann.rglob("*.xml")):
            return "voc"
    if (path / "labels").is_dir() and (path / "images").is_dir():
        return "yolo"
    if any(path.glob("*.xml")):
        return "voc"
    raise ValueError(
        f"{path}: cannot tell the dataset format. Expected a COCO .json file or a folder with "
        f"annotations/*.json; a YOLO data.yaml or a folder with images/ and labels/; or a Pascal VOC "
        f"folder with Annotations/ (or annotations/*.xml, or *.xml beside the images)")


def load_annotations(path: str | os.PathLike, split: str | None = None,
                     images_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """Read any supported dataset into a `DatasetIndex`, detecting the format from `path`.

    `split` picks a part of the dataset (COCO folder: `annotations/instances_<split>.json`; YOLO: a
    data.yaml key or `images/<split>`; VOC: `ImageSets/Main/<split>.txt`). `images_dir` is where COCO
    images live when not beside the JSON; the YOLO and VOC layouts fix their image folders themselves.
    """
    path = Path(path)
    fmt = detect_format(path)
    if images_dir is not None and fmt != "coco":
        log.warning("%s: --images is only used for COCO JSON; the %s layout defines its image folder",
                    path, fmt.upper())
    if fmt == "coco":
        json_path = path if path.is_file() else _coco_json_in(path, split)
        if path.is_file() and split is not None:
            log.warning("%s: split %r ignored, a COCO JSON file is one split", path, split)
        return load_coco(json_path, images_dir)
    if fmt == "yolo":
        return load_yolo(path, split)
    return load_voc(path, split)


def convert(path: str | os.PathLike, out_json: str | os.PathLike, split: str | None = None,
            images_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """Read a dataset in any supported format and write it as COCO instances JSON.

    Image `file_name`s are written relative to the JSON's folder when the images lie under it, else
    as absolute paths, so that `load_coco(out_json)` finds them either way. Annotations that the
    reader rejected (its `problems`) are not written. Returns the index that was written.
    """
    index = load_annotations(path, split, images_dir)
    index.require_boxes()  # an empty conversion is a wrong answer, not a result
    out = save_coco(index, out_json)
    n_err = sum(p.severity == "error" for p in index.problems)
    log.info("wrote %s: %d images, %d annotations, %d categories%s", out, len(index.images),
             len(index.annotations), len(index.categories),
             f" ({n_err} error(s) in the source, offending entries left out)" if n_err else "")
    return index


def dataset_images(data: str, images_dir: str | None, split: str | None) -> list[Path]:
    """Image files of a dataset (any supported format), or of a plain folder of images."""
    from .images import find_images

    path = Path(data)
    try:
        detect_format(path)
    except ValueError:
        if path.is_dir():  # no annotations: just the images of the folder
            files, problems = find_images([path], recursive=True)
            if files:
                return files
        raise
    index = load_annotations(path, split=split, images_dir=images_dir)
    return [im.file for im in index.images]
