"""The README's main-job picture: the first validation images of a main-job run, enlarged, with the
ground truth in grey and the detections (score > 0.5) as `detrkit predict` finds them.

    python scripts/main_job_figure.py RUN_DIR [OUT] [--scale 2.5] [--count 6]

RUN_DIR: a `detrkit main-job` folder (final/ weights, data/val/annotations.json). OUT defaults to
docs/images/main_job_predictions.jpg.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from detrkit.data.coco import load_coco
from detrkit.data.images import load_image
from detrkit.detector import Detector
from detrkit.viz.draw import draw_detections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/images/main_job_predictions.jpg"))
    ap.add_argument("--scale", type=float, default=2.5, help="enlargement, so labels stay readable")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()

    detector = Detector.from_pretrained(args.run / "final", precision="float32")
    index = load_coco(args.run / "data" / "val" / "annotations.json")
    by_image = index.annotations_by_image()
    tiles = []
    for rec in index.images[:args.count]:
        image = load_image(rec.file)
        det = detector.predict([image], threshold=args.threshold)[0]
        big = image.resize((round(image.width * args.scale), round(image.height * args.scale)), Image.BICUBIC)
        pen = ImageDraw.Draw(big)
        for a in by_image.get(rec.id, []):
            x, y, w, h = (v * args.scale for v in a.bbox)
            pen.rectangle([x, y, x + w, y + h], outline=(170, 170, 170), width=2)
        tiles.append(draw_detections(big, det.boxes.numpy() * args.scale, det.labels.numpy(), det.scores.numpy(),
                                     list(detector.config.class_names)))
    cols = 3
    rows = -(-len(tiles) // cols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * cw, rows * ch), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % cols) * cw, (k // cols) * ch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=88)
    print(f"wrote {args.out} ({len(tiles)} images, duplicate_iou {detector.config.duplicate_iou})")


if __name__ == "__main__":
    main()
