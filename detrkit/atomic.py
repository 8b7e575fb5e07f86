"""Writing a file so that a reader (or a crash) only ever sees the old or the new complete file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], object],
                 keep_previous: str | os.PathLike | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, then renamed into place.

    data: bytes, text (UTF-8), or a function that writes the temporary file it is given (a library's
    save_file). keep_previous: if given and `path` exists, the old file is moved there first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path
