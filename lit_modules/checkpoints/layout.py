"""Where things live in a run directory, and who may write there.

    <train.run_dir>/<train.run_name, or recipe name + timestamp>/
        recipe.yaml          the resolved recipe (proxy applied)
        tokenizer.json       the tokenizer the run trains with
        train.log            header, a line per logging step, validation, checkpoints
        tb/                  TensorBoard event files
        checkpoints/         stepNNNNNNNN.ckpt (the newest train.keep_checkpoints) + last.ckpt
        summary.json         written at the end
        .lock                held by the running process (RunLock)

A moelab model directory shares the recipe.yaml / tokenizer.json names
(lit_modules.checkpoints.model_dir). Every other module asks this one for these
paths.

A run directory is held by one run at a time. `RunLock` takes an exclusive advisory lock (flock) on `<run_dir>/.lock` and writes the
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


class CheckpointError(RecipeError):
    """A checkpoint that cannot be read as the model its recipe describes."""

RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILE = "tokenizer.json"
LOG_FILE = "train.log"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOCK_FILE = ".lock"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def is_run_dir(path) -> bool:
    return checkpoint_dir(path).is_dir()


def step_name(step: int) -> str:
    return f"step{step:08d}.ckpt"


def step_files(ckpt_dir) -> list:
    """The step files in a checkpoints/ folder, oldest step first."""
    return sorted(Path(ckpt_dir).glob("step[0-9]*.ckpt"))


def last_checkpoint(run_dir) -> Optional[Path]:
    """checkpoints/last.ckpt, else the step file of the highest step, else None."""
    last = checkpoint_dir(run_dir) / LAST_CHECKPOINT
    if last.is_file():
        return last
    steps = step_files(checkpoint_dir(run_dir))
    return steps[-1] if steps else None


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
