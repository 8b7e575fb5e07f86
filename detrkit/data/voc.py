"""Pascal VOC datasets: one XML file per image.

Layouts understood (checked in this order):
  * `root/Annotations/*.xml` + `root/JPEGImages/` (+ `root/ImageSets/Main/<split>.txt`), the VOC devkit;
  * `root/annotations/*.xml` + `root/images/`;
  * XML files beside the images in one folder (optionally `root/<split>/`).

Box convention: VOC stores integer corner pixels `xmin ymin xmax ymax` (1-based, inclusive, in the
devkit). We read them as continuous corner coordinates and store
`xywh = (xmin, ymin, xmax - xmin, ymax - ymin)` without a -1 shift. This is what most converters
do; the at most one-pixel offset against the strict 1-based reading is below annotation noise, a box
touching the right edge (`xmax == width`) stays inside the image, and `xmin == xmax` is a zero-size box.

Objects marked `<difficult>1</difficult>` are kept with `iscrowd=1`: COCO evaluation then ignores
them, as VOC evaluation ignores difficult objects, and training skips them as it skips crowd regions.

Category ids: the sorted class names of all annotation files in the folder -> 1..K, so that every
split of one dataset gets the same ids. Broken XML and unusable boxes become `Problem`s; an image
whose XML cannot be parsed is left out, a box with zero or negative size is dropped.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from detrkit.data.images import ImageError, image_size, resolved
from detrkit.data.index import Annotation, DatasetIndex, ImageRecord, Problem
from detrkit.data.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class _Object:
    name: str
    box: list[float] | None  # xmin ymin xmax ymax, None when unusable
    difficult: bool
    problem: str | None = None


@dataclass
class _Parsed:
    xml: Path
    filename: str | None
    width: int | None
    height: int | None
    objects: list[_Object] = field(default_factory=list)


def _text(node: ET.Element | None, tag: str) -> str | None:
    if node is None:
        return None
    child = node.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _int_or_none(s: str | None) -> int | None:
    try:
        v = int(float(s)) if s is not None else None
    except ValueError:
        return None
    return v if v is not None and v > 0 else None


def parse_voc_xml(xml_path: Path) -> _Parsed:
    """Parse one annotation file. Raises `ValueError` naming the file when it is not usable XML."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: broken XML ({e})") from None
    except OSError as e:
        raise ValueError(f"{xml_path}: cannot read ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    parsed = _Parsed(xml=xml_path, filename=_text(root, "filename"),
                     width=_int_or_none(_text(size, "width")), height=_int_or_none(_text(size, "height")))
    for obj in root.findall("object"):
        name = _text(obj, "name") or ""
        difficult = _text(obj, "difficult") in ("1", "true", "True")
        bnd = obj.find("bndbox")
        if not name:
            parsed.objects.append(_Object(name, None, difficult, "object without a <name>"))
            continue
        if bnd is None:
            parsed.objects.append(_Object(name, None, difficult, f"object '{name}' has no <bndbox>"))
            continue
        raw = [_text(bnd, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        try:
            box = [float(v) for v in raw]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            parsed.objects.append(_Object(name, None, difficult,
                                          f"object '{name}': bndbox needs numeric xmin ymin xmax ymax, got {raw}"))
            continue
        parsed.objects.append(_Object(name, box, difficult))
    return parsed


def _layout(root: Path, split: str | None) -> tuple[Path, Path, Path | None]:
    """-> (annotation folder, image folder, split list file or None)."""
    if (root / "Annotations").is_dir():
        ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
        if split is None:
            return ann_dir, img_dir, None
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt")) \
                if (root / "ImageSets" / "Main").is_dir() else []
            raise ValueError(f"{root}: no split list ImageSets/Main/{split}.txt "
                             f"(found: {', '.join(have[:10]) or 'none'})")
        return ann_dir, img_dir, listing
    if (root / "annotations").is_dir() and any((root / "annotations").glob("*.xml")):
        img_dir = root / "images"
        if split is not None:
            if (root / "annotations" / split).is_dir():
                return root / "annotations" / split, img_dir / split, None
            raise ValueError(f"{root}: no split folder annotations/{split}")
        return root / "annotations", img_dir, None
    if split is not None:
        if (root / split).is_dir():
            return root / split, root / split, None
        raise ValueError(f"{root}: no split folder {split}/")
    if any(root.glob("*.xml")):
        return root, root, None
    raise ValueError(f"{root}: not a Pascal VOC dataset (no Annotations/, annotations/ or *.xml files)")


def _find_image(img_dir: Path, xml: Path, filename: str | None) -> Path:
    """The image an XML file describes: its <filename> in img_dir, else the XML's stem with any
    image suffix (tools often write a wrong or missing extension)."""
    if filename:
        p = img_dir / Path(filename).name
        if p.is_file():
            return p
    for stem in ([Path(filename).stem] if filename else []) + [xml.stem]:
        for suffix in IMAGE_SUFFIXES:
            for s in (suffix, suffix.upper()):
                p = img_dir / f"{stem}{s}"
                if p.is_file():
                    return p
    # missing: keep the expected path so that the checker and the loader report it by name
    return img_dir / (Path(filename).name if filename else f"{xml.stem}.jpg")


def load_voc(path: str | Path, split: str | None = None) -> DatasetIndex:
    """Read a Pascal VOC dataset into a `DatasetIndex` (see the module docstring for the layouts,
    the box convention and the handling of difficult objects). `split` selects
    `ImageSets/Main/<split>.txt` (or a `<split>/` sub-folder); None takes every annotation file."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if root.is_file():
        raise ValueError(f"{root}: expected a Pascal VOC dataset folder, got a file")
    ann_dir, img_dir, listing = _layout(root, split)
    all_xml = sorted(ann_dir.glob("*.xml"))
    problems: list[Problem] = []

    if listing is not None:
        ids = [ln.split()[0] for ln in listing.read_text(encoding="utf-8").splitlines() if ln.strip()]
        by_stem = {p.stem: p for p in all_xml}
        selected = []
        for i in dict.fromkeys(ids):  # keep order, drop repeats
            if i in by_stem:
                selected.append(by_stem[i])
            else:
                problems.append(Problem("error", f"{listing}", f"'{i}' is listed but {ann_dir / (i + '.xml')} "
                                                                f"does not exist"))
    else:
        selected = all_xml

    parsed: dict[Path, _Parsed] = {}
    class_names: set[str] = set()
    chosen = set(selected)
    for xml in tqdm(all_xml, desc="reading VOC XML", unit="file", disable=None):
        try:
            p = parse_voc_xml(xml)
        except ValueError as e:
            if xml in chosen:
                problems.append(Problem("error", str(xml), f"{str(e).removeprefix(f'{xml}: ')}; image left out"))
            continue
        parsed[xml] = p
        class_names.update(o.name for o in p.objects if o.name)
    cat_ids = {name: i for i, name in enumerate(sorted(class_names), start=1)}

    images: list[ImageRecord] = []
    anns: list[Annotation] = []
    n_difficult = 0
    for xml in selected:
        p = parsed.get(xml)
        if p is None:
            continue
        image_id = len(images) + 1
        img = resolved(_find_image(img_dir, xml, p.filename))
        width, height = p.width, p.height
        if width is None or height is None:
            try:  # <size> absent or zero (some tools write 0): take it from the image file
                width, height = image_size(img)
            except (ImageError, OSError):
                width = height = None
        images.append(ImageRecord(id=image_id, file=img, width=width, height=height))
        for k, obj in enumerate(p.objects, start=1):
            where = f"{xml} (object {k})"
            if obj.box is None:
                problems.append(Problem("error", where, f"{obj.problem}; dropped"))
                continue
            x0, y0, x1, y1 = obj.box
            if x1 <= x0 or y1 <= y0:
                problems.append(Problem("error", where, f"{'zero' if (x1 == x0 or y1 == y0) else 'negative'}"
                                                        f"-size box '{obj.name}' xmin={x0:g} ymin={y0:g} "
                                                        f"xmax={x1:g} ymax={y1:g}; dropped"))
                continue
            n_difficult += obj.difficult
            box = [x0, y0, x1 - x0, y1 - y0]
            anns.append(Annotation(id=len(anns) + 1, image_id=image_id, category_id=cat_ids[obj.name],
                                   bbox=box, iscrowd=int(obj.difficult), area=box[2] * box[3]))
    if n_difficult:
        log.info("VOC %s: %d difficult objects kept as iscrowd=1 (ignored by training and evaluation)",
                 root, n_difficult)
    log.info("VOC %s: %d images, %d boxes, %d classes, %d problems", root, len(images), len(anns),
             len(cat_ids), len(problems))
    return DatasetIndex(images=images, annotations=anns,
                        categories=[(i, n) for n, i in cat_ids.items()], source=root, problems=problems)
