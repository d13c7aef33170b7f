"""Sharded checkpoints (train.checkpoint_format=sharded): every rank writes its own
shards with torch.distributed.checkpoint (DCP), and any layout reads them back.

    checkpoints/step00000300.dcp/
        __R_0.distcp     rank R's tensor chunks, written by rank R
        .metadata        DCP's index of the chunks (a pickle: read only through
                         safe.SafeFileSystemReader's restricted unpickler)
        trainer.pt       everything but the tensors, written by rank 0 with torch.save and
                         read with weights_only: loops, callbacks, LR schedulers, step,
                         moelab_recipe, moelab_records, the optimizers' param_groups (by name)
        complete.json    written last: format, step, world size, expert-parallel size
    checkpoints/last.dcp -> step00000300.dcp

Tensors, by DCP key (LightningModule keys, so "model." leads):

    state_dict.<key>              the LightningModule's state_dict
    optimizer.<i>.<key>.<state>   optimizer i's state of parameter <key> (AdamW: exp_avg,
                                  exp_avg_sq, step)

Each tensor is saved as the global tensor it is a piece of, so DCP reshards it on load
to whatever layout the resuming run has (another world size, EP size, strategy, or one
process):

    FSDP2 weights and moments    DTensors already (Shard(0) over all ranks)
    expert-parallel shards and   plain tensors that differ per rank, saved as DTensors on
    their moments                the (data_parallel x expert) mesh with placements
                                 (Replicate, Shard(0)): rank (d, e) holds experts
                                 [e * E/EP, (e + 1) * E/EP); DCP writes one copy per e
    everything else              plain tensors, equal on every rank (DCP writes one copy)

Saving (every rank): CausalLM.on_save_checkpoint calls `prepare_for_saving`, which puts
the tensors in that form (nothing is gathered), then the strategy calls `save_sharded`:
rank 0 clears `layout.partial_path(path)`; every rank writes its chunks there (DCP's
rank 0 writes .metadata once all are done); rank 0 writes trainer.pt, then
complete.json, syncs, and renames the folder into place. A kill at any moment before
the rename leaves only the hidden partial folder, which the next run removes.

Loading (every rank): the strategy reads trainer.pt (`read_header`), then
CausalLM.on_load_checkpoint calls `load_shards`: empty tensors shaped like this rank's
own (DTensors for FSDP2 and expert shards, whole tensors on one process) are filled by
DCP, which reads only the chunks each rank needs, and handed to Lightning as an
ordinary checkpoint: "state_dict" and integer-keyed "optimizer_states".

Consolidation (`tensor_shapes`, `read_tensors`; model_dir.open_checkpoint uses them for
eval / export-hf / convert) reads whole tensors on one process, without a process
group, a group of tensors at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from lit_modules.checkpoints import layout
from lit_modules.checkpoints.layout import CheckpointError
from lit_modules.checkpoints.safe import SafeFileSystemReader, SafeLoadPlanner, load_dcp_metadata, load_torch_file
from lit_modules.disk import fsync_path

FORMAT = "moelab-sharded-1"
SHARDED_KEY = "moelab_sharded"  # in a loaded checkpoint dict: the folder its tensors come from
LAYOUT_KEY = "moelab_layout"  # in a saved one: the layout that wrote it


def _plan(module):
    """The LightningModule's ScalePlan (lit_modules/train/strategy.py): its expert
    shards and mesh. The one place this module reaches into the module's layout."""
    return module.scale_plan


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextmanager
def _one_process():
    """DCP warns on every save or load without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _global(t: torch.Tensor, plan) -> DTensor:
    """An expert shard (this rank's E/EP experts) as the DTensor of all E experts."""
    return DTensor.from_local(t, plan.mesh, (Replicate(), Shard(0)), run_check=False)


# ------------------------------------------------------------------ saving


def prepare_for_saving(checkpoint: Dict, module, optimizers: List[torch.optim.Optimizer]) -> None:
    """Put a checkpoint's tensors in the form `save_sharded` writes (module
    docstring): expert shards of the model and of the optimizers' state become
    DTensors on the expert mesh; optimizer state is keyed by parameter name. Reads
    the live optimizers (the strategy's optimizer_state may be rank 0's only). Every
    rank; nothing is copied or communicated."""
    plan = _plan(module)
    experts = {f"model.{n}" for n in plan.expert_names}

    def wrap(key: str, t):
        return _global(t, plan) if key in experts else t

    checkpoint["state_dict"] = {k: wrap(k, v) for k, v in checkpoint["state_dict"].items()}
    name_of = {id(p): n for n, p in module.named_parameters()}
    states = []
    for opt in optimizers:
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
                  for g in opt.param_groups]
        state = {}
        for p, s in opt.state.items():
            name = name_of[id(p)]
            bad = [k for k, v in s.items() if not torch.is_tensor(v)]
            if bad:
                raise CheckpointError(f"the optimizer state of {name} holds non-tensor entries ({', '.join(bad)}); "
                                      f"sharded checkpoints hold tensors only: use train.checkpoint_format=full.")
            state[name] = {k: wrap(name, v) if v.ndim else v for k, v in s.items()}
        states.append({"state": state, "param_groups": groups})
    checkpoint["optimizer_states"] = states
    checkpoint[LAYOUT_KEY] = {"world_size": dist.get_world_size() if _distributed() else 1,
                              "expert_parallel": plan.ep, "fsdp": plan.fsdp}


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _rename_into_place(work: Path, path: Path) -> None:
    """work -> path; an existing path (the same step saved again) is moved aside first,
    since a folder cannot be replaced in one rename."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        work.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(path)
    fsync_path(path.parent)


def save_sharded(checkpoint: Dict, path) -> None:
    """Write `checkpoint` (prepared by `prepare_for_saving`) as the sharded checkpoint
    folder `path`. Collective: every rank calls it; see the module docstring for the
    order that keeps a half-written checkpoint from ever looking complete."""
    if LAYOUT_KEY not in checkpoint:
        raise CheckpointError(f"{path}: this checkpoint was not prepared for a sharded save; set "
                              f"train.checkpoint_format=sharded (CausalLM.on_save_checkpoint prepares it).")
    path = Path(path)
    work = layout.partial_path(path)
    if _rank() == 0:
        shutil.rmtree(work, ignore_errors=True)  # a killed save of the same step
        work.mkdir(parents=True)
    if _distributed():
        dist.barrier()
    opt_states = checkpoint.get("optimizer_states", [])
    tensors = {"state_dict": checkpoint["state_dict"],
               "optimizer": {str(i): o["state"] for i, o in enumerate(opt_states)}}
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    rest["optimizer_states"] = [{"param_groups": o["param_groups"]} for o in opt_states]
    with _one_process():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(work, sync_files=True), no_dist=not _distributed())
    if _rank() == 0:  # DCP's save returns once every rank's chunks and the index are written
        _write(work / layout.SHARDED_TRAINER_FILE, lambda f: torch.save(rest, f))
        marker = {"format": FORMAT, "step": int(checkpoint.get("global_step", 0)), **checkpoint[LAYOUT_KEY]}
        _write(work / layout.SHARDED_COMPLETE_FILE, lambda f: f.write((json.dumps(marker) + "\n").encode()))
        fsync_path(work)
        _rename_into_place(work, path)


# ------------------------------------------------------------------ loading


def read_header(path) -> Dict:
    """Everything of a sharded checkpoint but its tensors (trainer.pt, plain data),
    with checkpoint[SHARDED_KEY] naming the folder the tensors are to be read from."""
    path = Path(path)
    if not layout.is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (a sharded checkpoint folder has "
                              f"{layout.SHARDED_COMPLETE_FILE}, written last: its save did not finish, or "
                              f"`moelab train` did not write it); give another checkpoint.")
    header = load_torch_file(path / layout.SHARDED_TRAINER_FILE)
    if not isinstance(header, dict) or "moelab_recipe" not in header:
        raise CheckpointError(f"{path / layout.SHARDED_TRAINER_FILE} has no moelab_recipe entry; the folder was "
                              f"not written by `moelab train`.")
    header[SHARDED_KEY] = str(path)
    return header


def _load(targets: Dict, path: Path, distributed: bool) -> None:
    """dcp.load into `targets` through the safe reader and planner; its failures
    (DCP wraps them per rank in a CheckpointException, a BaseException) come out as
    one CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process():
            dcp.load(targets, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                     no_dist=not distributed)
    except CheckpointError:
        raise
    except (CheckpointException, Exception) as e:  # a missing key or another shape: another model
        errors = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        ours = next((x for x in errors if isinstance(x, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        reason = (str(errors[0]).strip().splitlines() or [type(errors[0]).__name__])[0] if errors else "unknown"
        raise CheckpointError(f"{path} does not fit this model ({reason}); load it with the recipe it was "
                              f"trained with.") from None


def _entries(path: Path) -> Iterator[Tuple[tuple, object]]:
    """(key path, tensor metadata) of every tensor in the checkpoint's index; a key
    path is ("state_dict", key) or ("optimizer", i, key, state)."""
    metadata = load_dcp_metadata(path / layout.DCP_INDEX_FILE)
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys = planner_data.get(fqn)
        if not (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys) and hasattr(md, "size")):
            raise CheckpointError(f"{path}: the index entry '{fqn}' is not a tensor of a moelab sharded checkpoint; "
                                  f"it was not written by `moelab train`.")
        yield keys, md


def _optimizer_groups(module) -> List[List[str]]:
    """Parameter names (relative to module.model) per optimizer group, in the order
    lit_modules/train/optim.py builds them."""
    from lit_modules.train.optim import param_groups

    name_of = {id(p): n for n, p in module.model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups(module.model, 0.0)]


def _global_shape(t: torch.Tensor, key: str, experts, plan) -> tuple:
    if key in experts:
        return (t.shape[0] * plan.ep,) + tuple(t.shape[1:])
    return tuple(t.shape)  # a DTensor's shape is already the global one


def load_shards(checkpoint: Dict, module) -> None:
    """Fill checkpoint["state_dict"] and checkpoint["optimizer_states"] from the
    sharded checkpoint named by checkpoint[SHARDED_KEY], each tensor shaped as this
    rank's own (module docstring). Collective: every rank calls it, after the model
    is built and sharded; the optimizers need not exist yet."""
    path = Path(checkpoint[SHARDED_KEY])
    plan = _plan(module)
    experts = {f"model.{n}" for n in plan.expert_names}
    local: Dict[int, torch.Tensor] = {}  # id(target) -> this rank's tensor, for expert shards

    def target(key: str, like: torch.Tensor):
        t = torch.empty_like(like)
        if key not in experts:
            return t
        g = _global(t, plan)
        local[id(g)] = t
        return g

    state_dict = {k: target(k, v.detach()) for k, v in module.state_dict().items()}
    params = {n: p.detach() for n, p in module.named_parameters()}
    groups = [o["param_groups"] for o in checkpoint.get("optimizer_states", [])]
    opt_targets: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {str(i): {} for i in range(len(groups))}
    for keys, md in _entries(path):
        if keys[0] != "optimizer" or len(keys) != 4 or keys[1] not in opt_targets:
            continue
        _, i, name, k = keys
        if name not in params:
            raise CheckpointError(f"{path} holds optimizer state for {name}, which this model does not have; "
                                  f"resume it with the recipe it was trained with.")
        p = params[name]
        if tuple(md.size) == _global_shape(p, name, experts, plan):
            opt_targets[i].setdefault(name, {})[k] = target(name, p)
        else:  # a scalar such as AdamW's step, the same on every rank
            opt_targets[i].setdefault(name, {})[k] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    _load({"state_dict": state_dict, "optimizer": opt_targets}, path, distributed=_distributed())

    def mine(t):
        return local.get(id(t), t)

    checkpoint["state_dict"] = {k: mine(v) for k, v in state_dict.items()}
    # Optimizer.load_state_dict matches parameters by position in the groups, so the
    # saved groups must list this model's parameters in the order its optimizer will
    ours = [[f"model.{n}" for n in g] for g in _optimizer_groups(module)]
    states = []
    for i, saved in enumerate(groups):
        if [list(g["params"]) for g in saved] != ours:
            raise CheckpointError(f"{path}: its optimizer's parameter groups are not this model's; resume it "
                                  f"with the recipe it was trained with.")
        index = {n: j for j, n in enumerate(n for g in saved for n in g["params"])}
        states.append({"state": {index[n]: {k: mine(v) for k, v in s.items()} for n, s in opt_targets[str(i)].items()},
                       "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved]})
    checkpoint["optimizer_states"] = states


# ------------------------------------------------------------------ consolidation


def tensor_shapes(path) -> Dict[str, tuple]:
    """The LightningModule keys and whole shapes of a sharded checkpoint's weights,
    from its index (no tensor data read)."""
    return {keys[1]: tuple(md.size) for keys, md in _entries(Path(path)) if keys[0] == "state_dict" and len(keys) == 2}


def read_tensors(path, batch_bytes: int = 1 << 30) -> Iterator[Tuple[str, torch.Tensor]]:
    """(LightningModule key, whole tensor) for every weight of a sharded checkpoint, on
    this process alone (no process group): DCP assembles each tensor from the chunks
    of every rank that wrote it, `batch_bytes` of tensors per read."""
    path = Path(path)
    entries = [(keys[1], md) for keys, md in _entries(path) if keys[0] == "state_dict" and len(keys) == 2]
    for batch in _batches(entries, batch_bytes):
        targets = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in batch}
        _load({"state_dict": targets}, path, distributed=False)
        yield from targets.items()


def _batches(entries: List[tuple], batch_bytes: int) -> Iterable[List[tuple]]:
    batch, size = [], 0
    for key, md in entries:
        n = md.properties.dtype.itemsize * int(torch.Size(md.size).numel())
        if batch and size + n > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append((key, md))
        size += n
    if batch:
        yield batch
