"""Where things live in a run directory, and who may write there.

    <train.run_dir>/<train.run_name, or recipe name + timestamp>/
        recipe.yaml          the resolved recipe (proxy applied)
        tokenizer.json       the tokenizer the run trains with
        train.log            header, a line per logging step, validation, checkpoints
        tb/                  TensorBoard event files
        checkpoints/         stepNNNNNNNN.ckpt (the newest train.keep_checkpoints) + last.ckpt;
                             with train.checkpoint_format=sharded, folders stepNNNNNNNN.dcp/
                             (lit_modules.checkpoints.sharded) + last.dcp, a symlink
        summary.json         written at the end
        router_loads.jsonl   per MoE layer, tokens per expert, dropped slots and router
                             entropy every train.expert_image_every steps (RouterStats)
        analysis/            what `moelab analyze RUN` writes (PNGs, analysis.json)
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
ROUTER_LOADS_FILE = "router_loads.jsonl"
ANALYSIS_DIR = "analysis"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOCK_FILE = ".lock"

# train.checkpoint_format: "full" writes stepNNNNNNNN.ckpt files, "sharded" folders
CHECKPOINT_FORMATS = ("full", "sharded")
SHARDED_SUFFIX = ".dcp"
LAST_SHARDED = "last.dcp"  # a relative symlink to the newest sharded step folder
# inside a sharded checkpoint folder, besides torch.distributed.checkpoint's own files
SHARDED_TRAINER_FILE = "trainer.pt"  # everything but the tensors (rank 0, plain data)
SHARDED_COMPLETE_FILE = "complete.json"  # written last: a folder without it is not a checkpoint
DCP_INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's index of the tensor chunks


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def is_run_dir(path) -> bool:
    return checkpoint_dir(path).is_dir()


def step_name(step: int, sharded: bool = False) -> str:
    return f"step{step:08d}{SHARDED_SUFFIX if sharded else '.ckpt'}"


def is_sharded_checkpoint(path) -> bool:
    """A complete sharded checkpoint folder: named .dcp and holding its completion
    marker. It is written under another name (`partial_path`) and renamed only after
    the marker, its last file, so neither a partial folder nor one that lacks the
    marker (copied half-way, or not moelab's) is one."""
    path = Path(path)
    return is_sharded_name(path) and path.is_dir() and (path / SHARDED_COMPLETE_FILE).is_file()


def is_sharded_name(path) -> bool:
    """Whether a checkpoint path names a sharded checkpoint (a folder) rather than a file."""
    return Path(path).suffix == SHARDED_SUFFIX


def looks_sharded(path) -> bool:
    """A folder meant as a sharded checkpoint, complete or not: named .dcp, or holding
    a torch.distributed.checkpoint index."""
    path = Path(path)
    return path.is_dir() and (is_sharded_name(path) or (path / DCP_INDEX_FILE).is_file())


def is_checkpoint(path) -> bool:
    """A checkpoint file or a complete sharded checkpoint folder."""
    path = Path(path)
    return path.is_file() or is_sharded_checkpoint(path)


def partial_path(path) -> Path:
    """Where the sharded checkpoint `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def stale_partials(ckpt_dir) -> list:
    """What killed writers leave behind: temporary files and partial folders."""
    ckpt_dir = Path(ckpt_dir)
    return sorted(list(ckpt_dir.glob(".*.tmp-*")) + list(ckpt_dir.glob(f".*{SHARDED_SUFFIX}.partial")))


def _written(path: Path) -> float:
    """When a checkpoint was completed (a folder's marker is its last file)."""
    marker = path / SHARDED_COMPLETE_FILE
    return (marker if marker.is_file() else path).stat().st_mtime


def step_files(ckpt_dir) -> list:
    """The step checkpoints in a checkpoints/ folder, files and complete sharded
    folders alike, oldest step first."""
    found = [p for p in Path(ckpt_dir).glob("step[0-9]*")
             if p.stem[4:].isdigit() and ((p.suffix == ".ckpt" and p.is_file())
                                          or (p.suffix == SHARDED_SUFFIX and is_sharded_checkpoint(p)))]
    return sorted(found, key=lambda p: (int(p.stem[4:]), _written(p)))


def last_checkpoint(run_dir) -> Optional[Path]:
    """checkpoints/last.ckpt or last.dcp (the newer, should a run have changed
    train.checkpoint_format), else the step checkpoint of the highest step, else None."""
    d = checkpoint_dir(run_dir)
    lasts = [p for p in (d / LAST_CHECKPOINT, d / LAST_SHARDED) if is_checkpoint(p)]
    if lasts:
        return max(lasts, key=_written)
    steps = step_files(d)
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
