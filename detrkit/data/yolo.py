"""YOLO-format datasets: a `data.yaml`, or a folder with `images/` and `labels/`.

Each image `.../images/<sub>/<stem>.<ext>` has a label file `.../labels/<sub>/<stem>.txt` with one
object per line, `class cx cy w h`, all four coordinates normalised to [0,1] by the upright image
size. Category ids in the resulting `DatasetIndex` are the YOLO class indices themselves.

Problems that only spoil one line (bad field count, non-numeric or out-of-range values, unknown
class) are recorded as `Problem`s naming `file:line`, and that line is skipped; a `data.yaml` that
cannot be used at all raises `ValueError` naming the file.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import yaml
from tqdm import tqdm

from detrkit.data.images import IMAGE_SUFFIXES, ImageError, image_size, resolved
from detrkit.data.index import Annotation, DatasetIndex, ImageRecord, Problem

log = logging.getLogger(__name__)

_SPLIT_KEYS = ("train", "val", "test")
_CLASS_LIST_FILES = ("classes.txt", "obj.names")  # written by common labelling tools


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def label_path_for(image: Path) -> Path:
    """`.../images/a/b.jpg` -> `.../labels/a/b.txt` (the last `images` folder on the path is swapped)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    # images and labels side by side in one folder
    return image.with_suffix(".txt")


def _parse_names(raw, nc, yaml_path: Path, problems: list[Problem]) -> dict[int, str] | None:
    """`names` as a list or a {index: name} map -> {index: name}; None when neither names nor nc."""
    if raw is None:
        if nc is None:
            return None
        return {i: f"class_{i}" for i in range(int(nc))}
    if isinstance(raw, (list, tuple)):
        names = {i: str(n) for i, n in enumerate(raw)}
    elif isinstance(raw, dict):
        try:
            names = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{yaml_path}: 'names' map keys must be class indices, got {list(raw)[:5]}")
    else:
        raise ValueError(f"{yaml_path}: 'names' must be a list or a {{index: name}} map, "
                         f"got {type(raw).__name__}")
    if nc is not None and int(nc) != len(names):
        problems.append(Problem("warning", str(yaml_path),
                                f"nc = {nc} but 'names' lists {len(names)} classes; using 'names'"))
    return names


def _images_in(entry: Path, problems: list[Problem], where: str) -> list[Path]:
    """A split entry of data.yaml: a folder of images (searched recursively) or a .txt list of paths."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if is_image_file(p))
    if entry.is_file() and entry.suffix.lower() == ".txt":
        out = []
        for line in entry.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                p = Path(line)
                out.append(p if p.is_absolute() else (entry.parent / p))
        return out
    problems.append(Problem("error", where, f"split entry {entry} is neither a folder nor a .txt list"))
    return []


def _read_yaml(yaml_path: Path) -> dict:
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{yaml_path}: expected a mapping with keys path/train/val/names, "
                         f"got {type(data).__name__}")
    return data


def _from_yaml(yaml_path: Path, split: str | None, problems: list[Problem]):
    data = _read_yaml(yaml_path)
    names = _parse_names(data.get("names"), data.get("nc"), yaml_path, problems)
    root = yaml_path.parent
    if data.get("path"):
        p = Path(str(data["path"])).expanduser()
        candidate = p if p.is_absolute() else root / p
        if candidate.is_dir():
            root = candidate
        else:
            # data.yaml files often carry the author's machine path; the folder of the yaml is
            # the best guess on this one
            problems.append(Problem("warning", str(yaml_path),
                                    f"path: {data['path']} does not exist; using {root}"))
    splits = [k for k in _SPLIT_KEYS if data.get(k)]
    if split is not None:
        if not data.get(split):
            raise ValueError(f"{yaml_path}: no split '{split}' (it has: {', '.join(splits) or 'none'})")
        splits = [split]
    if not splits:
        raise ValueError(f"{yaml_path}: none of the keys {', '.join(_SPLIT_KEYS)} is set")
    images: list[Path] = []
    label_dirs: list[Path] = []
    for key in splits:
        entries = data[key] if isinstance(data[key], list) else [data[key]]
        for e in entries:
            p = Path(str(e)).expanduser()
            p = p if p.is_absolute() else root / p
            images += _images_in(p, problems, f"{yaml_path} ({key})")
            if p.is_dir():
                label_dirs.append(label_path_for(p / "_.jpg").parent)
    return images, names, label_dirs


def _from_folder(folder: Path, split: str | None, problems: list[Problem]):
    img_dir = folder / "images"
    if not img_dir.is_dir():
        raise ValueError(f"{folder}: not a YOLO dataset folder (no data.yaml and no images/ folder)")
    subdirs = sorted(d.name for d in img_dir.iterdir() if d.is_dir())
    if split is not None:
        if split not in subdirs:
            raise ValueError(f"{folder}: no split folder images/{split} (found: {', '.join(subdirs) or 'none'})")
        img_dir = img_dir / split
    images = sorted(p for p in img_dir.rglob("*") if is_image_file(p))
    label_dirs = [folder / "labels" / split] if split is not None else [folder / "labels"]
    names = None
    for fname in _CLASS_LIST_FILES:
        for cand in (folder / fname, folder / "labels" / fname):
            if cand.is_file():
                lines = [ln.strip() for ln in cand.read_text(encoding="utf-8").splitlines()]
                names = {i: n for i, n in enumerate(ln for ln in lines if ln)}
                break
        if names is not None:
            break
    if names is None:
        # name classes from every split's labels, so that train and val get the same category list
        top = _max_class(folder / "labels")
        if top is not None:
            names = {i: f"class_{i}" for i in range(top + 1)}
    return images, names, label_dirs


def _max_class(label_root: Path) -> int | None:
    top = None
    for t in label_root.rglob("*.txt"):
        if t.name in _CLASS_LIST_FILES:
            continue
        try:
            lines = t.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue  # reported when the file is parsed for its image
        for line in lines:
            fields = line.split()
            try:
                c = float(fields[0]) if fields else -1.0
            except ValueError:
                continue
            if c >= 0 and c.is_integer():
                top = int(c) if top is None else max(top, int(c))
    return top


def _parse_label_file(label: Path, width: int, height: int, names: dict[int, str] | None,
                      problems: list[Problem]) -> list[tuple[int, list[float]]]:
    """Lines `class cx cy w h` -> [(class, xywh pixels)]; bad lines become Problems and are skipped."""
    out = []
    try:
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem("error", str(label), f"cannot read label file: {e}"))
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{n}"
        if len(fields) != 5:
            problems.append(Problem("error", where, f"expected 5 fields 'class cx cy w h', got {len(fields)}"))
            continue
        try:
            cls_f = float(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            problems.append(Problem("error", where, f"non-numeric value in {line.strip()!r}"))
            continue
        if not cls_f.is_integer() or cls_f < 0:
            problems.append(Problem("error", where, f"class index {fields[0]!r} is not a non-negative integer"))
            continue
        cls = int(cls_f)
        if names is not None and cls not in names:
            problems.append(Problem("error", where, f"class index {cls} not in names (0..{len(names) - 1})"))
            continue
        vals = (cx, cy, w, h)
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
            problems.append(Problem("error", where, f"values must be normalised to [0,1], got "
                                                    f"cx={cx:g} cy={cy:g} w={w:g} h={h:g}"))
            continue
        if w <= 0 or h <= 0:
            problems.append(Problem("error", where, f"zero-size box (w={w:g}, h={h:g}); dropped"))
            continue
        out.append((cls, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]))
    return out


def _orphan_labels(images: list[Path], label_dirs: list[Path]) -> list[Path]:
    """Label files under `label_dirs` (and beside the images) that no image refers to."""
    wanted = {resolved(label_path_for(p)) for p in images}
    found: set[Path] = set()
    for d in label_dirs:
        if d.is_dir():
            found.update(resolved(t) for t in d.rglob("*.txt"))
    for p in images:
        d = label_path_for(p).parent
        if d.is_dir():
            found.update(resolved(t) for t in d.glob("*.txt"))
    return sorted(t for t in found if t.name not in _CLASS_LIST_FILES and t not in wanted)


def load_yolo(path: str | Path, split: str | None = None) -> DatasetIndex:
    """Read a YOLO dataset into a `DatasetIndex`.

    `path`: a `data.yaml` (keys `path`, `train`/`val`/`test` as folders or .txt lists, `names` as a
    list or {index: name} map, `nc`), a folder holding one, or a folder with `images/` and `labels/`
    (optionally split into `images/<split>` + `labels/<split>`; class names from `classes.txt` if
    present). `split=None` takes every split. Image sizes are read from the file headers (upright).
    Category ids are the YOLO class indices; without names they are called `class_<i>`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    problems: list[Problem] = []
    if path.is_dir():
        yamls = [path / n for n in ("data.yaml", "data.yml") if (path / n).is_file()]
        if yamls:
            path = yamls[0]
    if path.is_file():
        image_files, names, label_dirs = _from_yaml(path, split, problems)
    else:
        image_files, names, label_dirs = _from_folder(path, split, problems)

    # the same file may be listed by two splits; keep the first. Paths stay as the user wrote them
    # (symlinks unresolved): the label of images/x.jpg is labels/x.txt beside the link, not beside
    # wherever the link points
    seen: set[Path] = set()
    unique = []
    for p in image_files:
        r = resolved(p)
        if r not in seen:
            seen.add(r)
            unique.append(Path(os.path.abspath(p)))

    images: list[ImageRecord] = []
    anns: list[Annotation] = []
    used_classes: set[int] = set()
    for image_id, img in enumerate(tqdm(unique, desc="reading YOLO labels", unit="img", disable=None), start=1):
        label = label_path_for(img)
        try:
            width, height = image_size(img)
        except (ImageError, OSError) as e:
            problems.append(Problem("error", str(img), f"image left out: {e}"))
            continue
        images.append(ImageRecord(id=image_id, file=img, width=width, height=height))
        if not label.is_file():
            problems.append(Problem("warning", str(img),
                                    f"no label file {label.name}; treated as an image without objects"))
            continue
        for cls, box in _parse_label_file(label, width, height, names, problems):
            used_classes.add(cls)
            anns.append(Annotation(id=len(anns) + 1, image_id=image_id, category_id=cls, bbox=box,
                                   area=box[2] * box[3]))
    labelled = sum(1 for img in unique if label_path_for(img).is_file())
    if unique and not labelled:
        where = sorted({str(label_path_for(img).parent) for img in unique})
        problems.append(Problem("error", str(path),
                                f"no label files: none of the {len(unique)} images has a .txt label in "
                                f"{', '.join(where[:3])}{' ...' if len(where) > 3 else ''} (labels are looked "
                                f"for by replacing the last 'images' folder of the image path with 'labels')"))
    for orphan in _orphan_labels(unique, label_dirs):
        problems.append(Problem("warning", str(orphan), "label file without a matching image"))

    if names is None:
        names = {i: f"class_{i}" for i in range(max(used_classes) + 1 if used_classes else 0)}
    categories = sorted(names.items())
    log.info("YOLO %s: %d images, %d boxes, %d classes, %d problems", path, len(images), len(anns),
             len(categories), len(problems))
    return DatasetIndex(images=images, annotations=anns, categories=categories, source=path,
                        problems=problems)
