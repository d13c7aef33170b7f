"""Full (single-file) checkpoints of expert-parallel runs hold whole experts, so a checkpoint written
at one EP size (or world size) resumes at any other, and the interop code
(lit_modules/checkpoints/model_dir.py, `moelab export-hf`) reads it like a single-process one.

Saving (CausalLM.on_save_checkpoint, on every rank): each expert shard of the model
state and of the optimizer state (AdamW's exp_avg / exp_avg_sq) is all-gathered over
its expert group and written whole by rank 0. Memory: every rank briefly holds the
full expert weights and their two AdamW moments (3 x the expert parameters in
float32) besides its own shard; a model whose experts do not fit one device takes
train.checkpoint_format=sharded (lit_modules/checkpoints/sharded.py) instead.

Loading (CausalLM.on_load_checkpoint): each rank keeps its slice, E / EP experts
from expert (rank in the expert group) x E / EP.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from experts.parallel import gather_expert_shard

from lit_modules.checkpoints.training import read_checkpoint


def optimizer_param_names(model: nn.Module) -> List[str]:
    """Parameter names in the order the optimizer numbers them (lit_modules/train/optim.py's
    groups), which is what an optimizer state_dict's integer keys refer to."""
    from lit_modules.train.optim import param_groups

    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]


def _expert_states(checkpoint: Dict, model: nn.Module, names) -> List[tuple]:
    """(parameter name, its per-parameter state) for each expert shard in the
    checkpoint's optimizer states. The integer keys are labels whose meaning is their
    position in param_groups (DDP numbers by optimizer order, FSDP's full state dict
    by model order), so they are matched to names by position, as
    Optimizer.load_state_dict does.

    Each per-parameter state is replaced by a copy first: Optimizer.state_dict()
    (what DDP's checkpoint holds) returns the live optimizer's own dicts, and writing
    whole experts into those would leave the running optimizer with moments of the
    wrong shape after a mid-run checkpoint."""
    order = optimizer_param_names(model)
    out = []
    for opt_state in checkpoint.get("optimizer_states", []):
        state = opt_state.get("state", {})
        saved = [i for g in opt_state.get("param_groups", []) for i in g["params"]]
        if not state or len(saved) != len(order):
            continue
        for key, n in zip(saved, order):
            if n in names and key in state:
                state[key] = dict(state[key])
                out.append((n, state[key]))
    return out


def _moment_keys(state: Dict) -> List[str]:
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.ndim >= 1)


def gather_experts(checkpoint: Dict, model: nn.Module, plan, optimizer=None) -> None:
    """Replace the expert shards in `checkpoint` (model and optimizer state) by the
    whole experts. Collective: call on every rank. The gathers read the live
    parameters and optimizer state, which every rank has (the checkpoint dict may be
    empty off rank 0), so every rank joins the same collectives."""
    names = set(plan.expert_names)
    params = dict(model.named_parameters())
    full = {n: gather_expert_shard(params[n].detach(), plan.ep_group) for n in plan.expert_names}
    moments = {}
    if optimizer is not None:
        for n in plan.expert_names:
            state = optimizer.state.get(params[n], {})
            for k in _moment_keys(state):
                moments[n, k] = gather_expert_shard(state[k], plan.ep_group)
    sd = checkpoint.get("state_dict", {})
    for n, t in full.items():
        if f"model.{n}" in sd:
            sd[f"model.{n}"] = t.to(sd[f"model.{n}"].device)
    for n, state in _expert_states(checkpoint, model, names):
        for k in _moment_keys(state):
            state[k] = moments[n, k].to(state[k].device)
    checkpoint["moelab_expert_parallel"] = plan.ep


def slice_experts(checkpoint: Dict, model: nn.Module, plan) -> None:
    """Keep this rank's slice of the whole experts in `checkpoint`."""
    rank = dist.get_rank(plan.ep_group)
    names = set(plan.expert_names)
    sd = checkpoint.get("state_dict", {})
    params = dict(model.named_parameters())
    n_local = params[plan.expert_names[0]].shape[0]

    def local(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != n_local * plan.ep:
            raise ValueError(f"the checkpoint's experts have {t.shape[0]} rows, not {n_local * plan.ep}; it holds "
                             f"expert shards, not whole experts, so it cannot be resumed at another layout.")
        return t[rank * n_local:(rank + 1) * n_local].clone()

    for n in plan.expert_names:
        if f"model.{n}" in sd:
            sd[f"model.{n}"] = local(sd[f"model.{n}"])
    for _, state in _expert_states(checkpoint, model, names):
        for k in _moment_keys(state):
            state[k] = local(state[k])


def optimizer_state_by_name(opt_state: Dict, model: nn.Module, prefix: str = "model.") -> Dict:
    """An optimizer state dict with integer keys -> the same keyed by parameter name
    (what torch.distributed.checkpoint's set_optimizer_state_dict takes), matching
    keys to parameters by position in param_groups (see `_expert_states`)."""
    order = [prefix + n for n in optimizer_param_names(model)]
    saved = [i for g in opt_state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameters, the model {len(order)}; "
                         f"resume it with the recipe it was trained with.")
    name_of = dict(zip(saved, order))
    groups = [{**g, "params": [name_of[i] for i in g["params"]]} for g in opt_state["param_groups"]]
    return {"state": {name_of[k]: v for k, v in opt_state["state"].items()}, "param_groups": groups}


def load_full_checkpoint(strategy, path) -> Dict:
    """Load a full (single-file) checkpoint into an FSDP2 / expert-parallel model:
    every rank reads the file (memory-mapped), keeps its expert slice, and lets
    torch.distributed.checkpoint shard the rest. Unlike Lightning's own loader it
    neither broadcasts rank 0's state (expert shards differ per rank) nor assumes
    that the optimizer numbered its parameters in model order (ours groups them)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    module = strategy.lightning_module
    checkpoint = read_checkpoint(path)
    if module.scale_plan.ep > 1:
        slice_experts(checkpoint, module.model, module.scale_plan)
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(strategy.model, checkpoint.pop("state_dict"), options=options)
    for optimizer, opt_state in zip(strategy.optimizers, checkpoint.get("optimizer_states", [])):
        set_optimizer_state_dict(strategy.model, optimizer, optimizer_state_by_name(opt_state, module.model),
                                 options=options)
    checkpoint.pop("optimizer_states", None)
    return checkpoint
