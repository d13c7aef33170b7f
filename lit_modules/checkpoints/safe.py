"""Reading files that come from someone else: as data, never as code.

A pickle is a program: `load_torch_file` loads tensors and plain data only
(weights_only), so a checkpoint cannot run code on this machine. A name read from a
file (an index's shard names) must not reach files outside the folder it belongs to:
`inside` resolves it, symlinks included, and refuses it otherwise.

Sharded checkpoints (torch.distributed.checkpoint folders) hold one more pickle, the
`.metadata` index, which torch's FileSystemReader reads with a plain pickle.load.
`SafeFileSystemReader` reads it with `RestrictedUnpickler` instead, which builds only
the index's own dataclasses, torch.Size, dtypes, layouts, paths and containers; it
checks that every data file the index names lies inside the folder. The tensor files
are read with weights_only; `SafeLoadPlanner` refuses the one other way
torch.distributed.checkpoint unpickles, a "bytes" entry (torch.load without
weights_only), since moelab writes tensors only.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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


# ------------------------------------------------------------------ sharded checkpoints


# The globals a torch.distributed.checkpoint .metadata pickle names (torch 2.4-2.13):
# the index's dataclasses and what they hold. None of them runs code when built.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and dtypes, memory formats, layouts (find_class)
    "torch.serialization": {"_get_layout"},  # a torch.layout by its name: a dictionary lookup
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "builtins": {"set", "frozenset", "dict", "list", "tuple"},
    "collections": {"OrderedDict"},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes of a torch.distributed.checkpoint
    index (`_DCP_GLOBALS`, plus torch dtypes, memory formats and layouts) and refuses
    any other global, so a hostile .metadata cannot call anything."""

    def find_class(self, module: str, name: str):
        allowed = name in _DCP_GLOBALS.get(module, ())
        if module == "torch" and not allowed:
            allowed = isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout))
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint index")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which a checkpoint index never has")


def load_dcp_metadata(path) -> Metadata:
    """The torch.distributed.checkpoint index at `path` (a .metadata file), read with
    `RestrictedUnpickler`, naming only data files inside its folder; a
    CheckpointError for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}: it is not a sharded checkpoint, or its save "
                              f"did not finish.") from None
    except Exception as e:  # refused global, truncated, not a pickle ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} was refused: {reason}; moelab reads a sharded checkpoint's index as data "
                              f"only (a restricted unpickler), so it cannot be loaded.") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint index (it holds "
                              f"{type(metadata).__name__}).")
    for info in metadata.storage_data.values():  # the data files it names
        inside(path.parent, getattr(info, "relative_path", None), path)
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's FileSystemReader, reading the index with
    `load_dcp_metadata` (restricted unpickling; data files inside the folder). The
    tensor files themselves are read with weights_only."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = load_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """The default load planner, except that a "bytes" entry (a pickled Python
    object, which torch.distributed.checkpoint loads without weights_only) is refused."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"the sharded checkpoint holds a pickled object under "
                              f"'{read_item.dest_index.fqn}' where moelab expects a tensor; it was not written by "
                              f"moelab and is not loaded.")
