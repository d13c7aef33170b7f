"""Checkpoints of expert-parallel runs hold whole experts, so a checkpoint written
at one EP size (or world size) resumes at any other, and the interop code
(lit_modules/checkpoint.py, `moelab export-hf`) reads it like a single-process one.

Saving (CausalLM.on_save_checkpoint, on every rank): each expert shard of the model
state and of the optimizer state (AdamW's exp_avg / exp_avg_sq) is all-gathered over
its expert group and written whole by rank 0. Memory: every rank briefly holds the
full expert weights and their two AdamW moments (3 x the expert parameters in
float32) besides its own shard; for a model whose experts do not fit one device, a
distributed checkpoint (torch.distributed.checkpoint) would be the next step.

Loading (CausalLM.on_load_checkpoint): each rank keeps its slice, E / EP experts
from expert (rank in the expert group) x E / EP.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from experts.parallel import gather_expert_shard


def optimizer_param_names(model: nn.Module) -> List[str]:
    """Parameter names in the order the optimizer numbers them (lit_modules/optim.py's
    groups), which is what an optimizer state_dict's integer keys refer to."""
    from .optim import param_groups

    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]


def _optimizer_expert_states(checkpoint: Dict, model: nn.Module, names) -> List[Dict]:
    """The per-parameter state dicts of the expert shards, in expert_names order."""
    order = optimizer_param_names(model)
    out = []
    for opt_state in checkpoint.get("optimizer_states", []):
        state = opt_state.get("state", {})
        for i, n in enumerate(order):
            if n in names and i in state:
                out.append(state[i])
    return out


def _moment_keys(state: Dict) -> List[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.ndim >= 1]


def gather_experts(checkpoint: Dict, model: nn.Module, plan) -> None:
    """Replace the expert shards in `checkpoint` (model and optimizer state) by the
    whole experts. Collective: call on every rank, in the same order."""
    names = set(plan.expert_names)
    sd = checkpoint.get("state_dict", {})
    params = dict(model.named_parameters())
    for n in plan.expert_names:  # from the live parameters: every rank has them
        full = gather_expert_shard(params[n].detach(), plan.ep_group)
        if f"model.{n}" in sd:
            sd[f"model.{n}"] = full.to(sd[f"model.{n}"].device)
    for state in _optimizer_expert_states(checkpoint, model, names):
        for k in _moment_keys(state):
            state[k] = gather_expert_shard(state[k], plan.ep_group)
    checkpoint["moelab_expert_parallel"] = plan.ep


def slice_experts(checkpoint: Dict, model: nn.Module, plan) -> None:
    """Keep this rank's slice of the whole experts in `checkpoint`."""
    rank = dist.get_rank(plan.ep_group)
    names = set(plan.expert_names)
    sd = checkpoint.get("state_dict", {})
    params = dict(model.named_parameters())

    def local(t: torch.Tensor, n_local: int) -> torch.Tensor:
        if t.shape[0] == n_local:  # already a shard (not a file written by gather_experts)
            raise ValueError("the checkpoint holds expert shards, not whole experts; it was not written by "
                             "moelab train's expert-parallel checkpointing.")
        return t[rank * n_local:(rank + 1) * n_local].clone()

    for n in plan.expert_names:
        key = f"model.{n}"
        if key in sd:
            sd[key] = local(sd[key], params[n].shape[0])
    n_local = next(iter(params[n] for n in plan.expert_names)).shape[0]
    for state in _optimizer_expert_states(checkpoint, model, names):
        for k in _moment_keys(state):
            state[k] = local(state[k], n_local)
