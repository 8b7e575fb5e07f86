"""Writing a file so that a reader (or a crash) only ever sees the old or the new complete file."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable


class DiskFullError(OSError):
    """The disk filled up while writing a file; the previous file is untouched."""

    def __str__(self) -> str:  # one line naming the file, without the "[Errno 28]" prefix
        return str(self.strerror)


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


def _write(tmp: Path, data: bytes | str | Callable[[Path], object]) -> None:
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], object],
                 keep_previous: str | os.PathLike | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, then renamed into place.

    data: bytes, text (UTF-8), or a function that writes the temporary file it is given (a library's
    save_file). keep_previous: if given and `path` exists, the old file is moved there first. On any
    failure the temporary file is removed and `path` is left as it was; a full disk raises
    DiskFullError naming the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write(tmp, data)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            size = f"{len(data) / 1e6:.1f} MB" if isinstance(data, (bytes, str)) else "the file"
            raise DiskFullError(e.errno, f"{path}: disk full, {size} not written; the previous file is kept") from None
        raise
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path
