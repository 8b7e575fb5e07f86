"""A format-neutral description of a detection dataset: images, boxes, categories.

Every format reader (COCO JSON, YOLO, Pascal VOC) produces a `DatasetIndex`; the training dataset,
the checker, the converter and the evaluator consume it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageRecord:
    id: int
    file: Path  # absolute path of the image file
    width: int | None = None  # as declared by the annotations (None when the format has no size)
    height: int | None = None


@dataclass
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: list[float]  # xywh in pixels of the upright image
    iscrowd: int = 0
    area: float | None = None


@dataclass
class Problem:
    """Something wrong in a dataset. severity: "error" (unusable) or "warning"."""

    severity: str
    where: str  # the file (and line / id) it concerns
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass
class DatasetIndex:
    images: list[ImageRecord]
    annotations: list[Annotation]
    categories: list[tuple[int, str]]  # (dataset category id, name), sorted by id
    source: Path
    problems: list[Problem] = field(default_factory=list)
    # category ids of stuff (COCO panoptic's isthing 0: regions such as sky, not countable objects)
    stuff_ids: frozenset[int] = frozenset()

    @property
    def category_ids(self) -> list[int]:
        return [cid for cid, _ in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [name for _, name in self.categories]

    @property
    def category_to_index(self) -> dict[int, int]:
        """Dataset category id -> contiguous class index 0..C-1 (sorted by id)."""
        return {cid: i for i, (cid, _) in enumerate(self.categories)}

    @property
    def num_boxes(self) -> int:
        """Boxes that can be learnt or scored: not crowd regions, on a listed image."""
        ids = {im.id for im in self.images}
        return sum(1 for a in self.annotations if not a.iscrowd and a.image_id in ids)

    def no_box_message(self) -> str | None:
        """None when some image has a box; else why the set has nothing to learn or score."""
        if not self.images or self.num_boxes:
            return None
        crowd = sum(1 for a in self.annotations if a.iscrowd)
        return (f"{self.source}: no image has a box ({len(self.images)} images, 0 boxes"
                f"{f', {crowd} crowd regions only' if crowd else ''}): there is nothing to learn or score. "
                "Are the labels where the reader looks for them? (`detrkit data check` lists them)")

    def require_boxes(self) -> None:
        """Raise ValueError when no image has a box (training on it would learn "no object" only)."""
        message = self.no_box_message()
        if message:
            raise ValueError(message)

    def annotations_by_image(self) -> dict[int, list[Annotation]]:
        by_image: dict[int, list[Annotation]] = {im.id: [] for im in self.images}
        for ann in self.annotations:
            by_image.setdefault(ann.image_id, []).append(ann)
        return by_image

    def to_coco(self, relative_to: Path | None = None) -> dict:
        """COCO instances JSON (file_name relative to `relative_to` when given, with ../ where the image
        lies outside it, so a dataset folder moved or copied whole keeps working)."""
        from .images import resolved

        def name(p: Path) -> str:
            if relative_to is not None:
                try:
                    return os.path.relpath(resolved(p), resolved(relative_to))
                except ValueError:  # another drive (Windows): no relative path exists
                    pass
            return str(p)

        return {
            "images": [
                {"id": im.id, "file_name": name(im.file), "width": im.width, "height": im.height}
                for im in self.images
            ],
            "annotations": [
                {
                    "id": a.id, "image_id": a.image_id, "category_id": a.category_id,
                    "bbox": [float(v) for v in a.bbox], "iscrowd": int(a.iscrowd),
                    "area": float(a.area if a.area is not None else a.bbox[2] * a.bbox[3]),
                }
                for a in self.annotations
            ],
            "categories": [{"id": cid, "name": n} for cid, n in self.categories],
        }
