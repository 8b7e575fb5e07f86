"""Reading image files the way the rest of detrkit expects them: 8-bit RGB, upright.

Whatever the file holds (grayscale, alpha, palette with transparency, CMYK, 16-bit, EXIF-rotated),
`load_image` returns an RGB `PIL.Image` whose pixels match the boxes annotated on the upright picture.
Every failure is an `ImageError` that names the file and says what is wrong with it.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Pillow refuses images above ~179 Mpx as decompression bombs; real datasets (aerial, slide scans)
# have such images, so we load them with a warning up to MAX_PIXELS and refuse larger ones from the
# header, before any pixel is decoded: a small PNG can declare billions of pixels, and decoding one
# of 1 Gpx takes several GB. DETRKIT_MAX_IMAGE_PIXELS raises (or lowers) the limit.
# file endings taken for images wherever a folder is searched (datasets, predict)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})
MAX_PIXELS = int(float(os.environ.get("DETRKIT_MAX_IMAGE_PIXELS", 256_000_000)))
_PILLOW_WARN_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# EXIF orientations 5..8 swap width and height
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

_open_lock = threading.Lock()


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def resolved(path: str | os.PathLike) -> Path:
    """`path.resolve()`, or the absolute path when a symlink loop makes it unresolvable."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return Path(os.path.abspath(path))


def missing_reason(path: str | os.PathLike) -> str:
    """Why an existing-looking name cannot be opened: a symlink loop, a broken link, or not found."""
    path = Path(path)
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symlink loop (too many levels of symbolic links)"
            return f"broken symlink to {os.readlink(path)}"
    return "file not found"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(path, missing_reason(path))
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) with Pillow's bomb limit lifted; enforce our own cap instead."""
    with _open_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(path, "not an image file (or a format Pillow cannot read)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(path, f"cannot read image header: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageError(path, f"invalid image size {w}x{h}")
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageError(path, f"refused as a possible decompression bomb: its header declares {w}x{h} = "
                               f"{w * h / 1e6:.0f} Mpx, above the {MAX_PIXELS / 1e6:.0f} Mpx limit (not decoded; "
                               f"set DETRKIT_MAX_IMAGE_PIXELS to allow larger images)")
    if w * h > _PILLOW_WARN_PIXELS:
        log.warning("%s: very large image (%dx%d = %.0f Mpx); loading it anyway", path, w, h, w * h / 1e6)
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # broken EXIF must not make an otherwise good image unusable
        return 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header only (no pixel decode)."""
    path = Path(path)
    _check_file(path)
    im = _open(path)
    try:
        w, h = im.size
        if _orientation(im) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        return w, h
    finally:
        im.close()


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale to 0..255 (Pillow's convert would clip at 255)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PNG", "TIFF") and a.max(initial=0) <= 65535
                                      and a.min(initial=0) >= 0 and a.max(initial=0) > 255):
        a = a.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    elif im.mode == "F" or a.min(initial=0) < 0 or a.max(initial=0) > 255:
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        lo, hi = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 1.0)
        if lo >= 0 and hi <= 1.0:
            lo, hi = 0.0, 1.0  # float images in [0, 1]
        a = (np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # transparent pixels become black: a fixed, neutral choice independent of what the file stored there
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        return _to_8bit_gray(im).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...
    except ValueError:
        return im.convert("RGBA").convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into an upright 8-bit RGB `PIL.Image`.

    Raises `ImageError` for a missing, empty, unreadable, truncated or absurdly large file.
    """
    path = Path(path)
    _check_file(path)
    im = _open(path)
    try:
        im.load()  # force the full decode here so corrupt data fails now, with the file's name
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        im.close()
        raise ImageError(path, f"corrupt or truncated image data ({e})") from e
    except MemoryError as e:
        im.close()
        raise ImageError(path, "not enough memory to decode the image") from e
    try:
        orientation = _orientation(im)
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
    except (OSError, ValueError) as e:
        raise ImageError(path, f"cannot convert image (mode {im.mode}) to RGB: {e}") from e
    except MemoryError as e:
        raise ImageError(path, f"not enough memory to convert the {im.width}x{im.height} image to RGB") from e
    return rgb


_GLOB_CHARS = set("*?[")


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their image files, sorted) and glob patterns.

    -> (image paths in order, without duplicates; problems: inputs that matched nothing or do not exist).
    A file named explicitly is kept whatever its suffix (the loader decides whether it is an image).
    """
    found: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{text}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in files:
                add(p)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                problems.append(f"{text}: pattern matches no image files")
            for p in files:
                add(p)
        else:
            problems.append(f"{text}: no such file or folder")
    return found, problems
