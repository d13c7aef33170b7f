"""Writes that fail, as one sentence: which path, and why (the disk is full, the file
system is read-only, permission is denied, a file stands where a folder should be),
instead of an OSError traceback.

    check_folder(out, "OUT_DIR", "choose another OUT_DIR")     # before any work
    with writing("the data cache", cache_dir, "set data.cache_dir to a writable folder"):
        ...                                                    # OSError -> DiskError

Every writer that uses these cleans up its own temporary files; the message says
what was kept where that matters (the last good checkpoint).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from arch.registry import RecipeError

REASONS = {
    errno.ENOSPC: "the disk is full (ENOSPC)",
    errno.EDQUOT: "the disk quota is used up (EDQUOT)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission is denied (EACCES)",
    errno.EPERM: "the operation is not permitted (EPERM)",
    errno.ENOTDIR: "a part of the path is a file, not a folder (ENOTDIR)",
}


class DiskError(RecipeError):
    """A write that failed; the message names the path, the reason and what to do.
    A RecipeError, so `moelab` prints it as one line and exits 2."""


def reason(e: OSError) -> str:
    if e.errno in REASONS:
        return REASONS[e.errno]
    code = errno.errorcode.get(e.errno) if e.errno else None
    return f"{e.strerror or type(e).__name__}" + (f" ({code})" if code else "")


def write_error(e: OSError, what: str, path, fix: str) -> DiskError:
    return DiskError(f"cannot write {what} {path}: {reason(e)}; {fix}.")


@contextlib.contextmanager
def writing(what: str, path, fix: str):
    """Turn an OSError raised inside into one DiskError naming `what` and `path`."""
    try:
        yield
    except OSError as e:
        raise write_error(e, what, path, fix) from None


def check_folder(path, what: str, fix: str) -> None:
    """Refuse, before any work, a folder path that is a file or lies below one
    (`/etc/passwd/x`): mkdir would fail there with a bare FileExistsError."""
    p = Path(path).absolute()
    for parent in (p, *p.parents):
        try:
            exists = parent.exists()  # symbolic links followed
        except OSError:  # not even readable: the write itself will say why
            return
        if exists:
            if not parent.is_dir():
                where = "is a file" if parent == p else f"lies below {parent}, which is a file"
                raise DiskError(f"{what} {path} {where}, not a folder; {fix}.")
            return


def fsync_path(path) -> None:
    """Flush a file or folder (its entries: a rename made durable) to the disk; a file
    system that cannot fsync a folder is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
