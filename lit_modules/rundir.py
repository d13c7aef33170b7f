"""A run directory is held by one run at a time.

`RunLock` takes an exclusive advisory lock (flock) on `<run_dir>/.lock` and writes the
holder's process id, host and start time into it. The kernel releases the lock when
the process ends, however it ends (kill -9 included), so a dead run never leaves its
directory stuck; a second run on the same directory is refused in one sentence that
names the process holding it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

from arch.registry import RecipeError

LOCK_FILE = ".lock"


def check_run_name(name: Optional[str]) -> None:
    """A run name is one path component: it never leads out of train.run_dir."""
    if name is None:
        return
    bad = (not name or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute()
           or name != name.strip())
    if bad:
        raise RecipeError(f"train.run_name = {name!r} is not a plain name (no '/', '\\\\', '..' or surrounding "
                          f"spaces); give a name such as my-run and choose the folder with train.run_dir.")


class RunLock:
    """with RunLock(run_dir): ... — exclusive use of a run directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not guarded there
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RecipeError(f"run directory {self.path.parent} is in use by {holder}; wait for that run to "
                              f"finish (or stop it), or choose another train.run_name.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
