"""Reading files that come from someone else: as data, never as code.

A pickle is a program: `load_torch_file` loads tensors and plain data only
(weights_only), so a checkpoint cannot run code on this machine. A name read from a
file (an index's shard names) must not reach files outside the folder it belongs to:
`inside` resolves it, symlinks included, and refuses it otherwise.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lit_modules.checkpoints.layout import CheckpointError


def load_torch_file(path, mmap: bool = True) -> object:
    """torch.load restricted to tensors and plain data (weights_only=True), memory-mapped.

    Every checkpoint moelab reads goes through here: a pickle is a program, and a
    checkpoint from someone else must never run code on this machine. moelab's own
    checkpoints hold only tensors, numbers, strings and containers of them."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else "it is not a PyTorch file"
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds Python objects other than tensors and plain data, which would run code to load"
        raise CheckpointError(f"{path} was refused: {reason}; moelab loads only tensors and plain data "
                              f"(weights_only), so re-save it with plain state dicts.") from None
    except Exception as e:  # truncated, not a zip archive, unreadable ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({reason}); give another "
                              f"checkpoint.") from None


def inside(folder, name, what: str) -> Path:
    """`folder / name`, refused unless it resolves (after symlinks) inside `folder`.
    `what` is the file the name was read from (for the message)."""
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if not isinstance(name, str) or not name or Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{what} names {name!r}, which lies outside {folder}; files it names must lie "
                              f"inside that folder.")
    return path
