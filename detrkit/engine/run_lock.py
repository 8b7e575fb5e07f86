"""One training process per run folder: RUN_DIR/train.lock holds the owner's pid.

Two trainings writing into one folder would interleave their checkpoints and metrics. The lock file is
created atomically (O_EXCL); a second run finds it, sees its owner alive and stops with a message naming
the folder and the pid. A lock whose process is gone (killed, machine rebooted) is stale: it is taken
over with a warning. The lock is released when training returns and, failing that, when the process
exits; only SIGKILL leaves a stale one behind.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process is training into the same run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """`RunLock.acquire(run_dir)` -> the held lock; `.release()` frees it (idempotent)."""

    def __init__(self, path: Path):
        self.path = path
        self._held = True
        atexit.register(self.release)

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> "RunLock":
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # create; or judge the existing lock and replace a stale one, then re-check
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(path)
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and pid != os.getpid() and (host not in (None, me["host"]) or _alive(pid)):
                    raise RunLockedError(
                        f"{run_dir} is in use by another training run (pid {pid}"
                        f"{f' on {host}' if host and host != me['host'] else ''}, since {owner.get('started', '?')}):"
                        f" wait for it to finish, or train into another --out") from None
                if pid != os.getpid():
                    log.warning("%s: taking over a stale lock (its process %s is gone)", path, pid)
                tmp = path.with_name(f".{LOCK_NAME}.{os.getpid()}")
                tmp.write_text(json.dumps(me))
                os.replace(tmp, path)
                if _read(path).get("pid") == os.getpid():
                    return cls(path)
                continue  # another process took it over at the same moment: judge its lock
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            return cls(path)
        raise RunLockedError(f"{run_dir}: could not take the run lock {path} (contended)")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        atexit.unregister(self.release)
        if _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
