"""Published weights by name: download once into a cache, checking the SHA-256 prefix."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.hub import download_url_to_file

log = logging.getLogger(__name__)

_BASE = "https://dl.fbaipublicfiles.com/detr/"
# name -> (file, sha256 prefix: the 8 hex digits in the authors' file name)
PUBLISHED: dict[str, tuple[str, str]] = {
    "detr-r50": ("detr-r50-e632da11.pth", "e632da11"),
    "detr-r50-dc5": ("detr-r50-dc5-f0fb7ef5.pth", "f0fb7ef5"),
    "detr-r101": ("detr-r101-2c7b67e5.pth", "2c7b67e5"),
    "detr-r101-dc5": ("detr-r101-dc5-a2e86def.pth", "a2e86def"),
    # panoptic (detector + mask head; 250 classes + no-object)
    "detr-r50-panoptic": ("detr-r50-panoptic-00ce5173.pth", "00ce5173"),
    "detr-r50-dc5-panoptic": ("detr-r50-dc5-panoptic-da08f1b1.pth", "da08f1b1"),
    "detr-r101-panoptic": ("detr-r101-panoptic-40021d53.pth", "40021d53"),
}


class DownloadError(OSError):
    """A published checkpoint could not be downloaded; says which file to place where instead."""


def cache_dir() -> Path:
    return Path(os.environ.get("DETRKIT_CACHE", Path.home() / ".cache" / "detrkit"))


def published_path(name: str, download: bool = True) -> Path:
    """Local path of a published checkpoint, downloading it (hash-checked) if it is not cached."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(sorted(PUBLISHED))}")
    file, prefix = PUBLISHED[name]
    path = cache_dir() / file
    if path.exists():
        return path
    if not download:
        raise FileNotFoundError(f"{path} is not cached and downloading is off")
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", _BASE + file, path)
    # checks that the SHA-256 of the download starts with `prefix` and removes the file otherwise
    try:
        download_url_to_file(_BASE + file, str(path), hash_prefix=prefix, progress=True)
    except OSError as e:  # URLError, socket errors (a hash mismatch is a RuntimeError and stays one)
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {name} from {_BASE + file} ({reason}). Offline? Fetch that file "
                            f"elsewhere and place it at {path} (the cache folder is $DETRKIT_CACHE, "
                            f"default ~/.cache/detrkit)") from e
    return path
