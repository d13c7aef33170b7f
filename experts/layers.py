"""Everything that walks a model's MoE layers: list them, and expert parallelism
applied to a model (shard_experts, is_expert_shard, expert_shards,
reduce_expert_grads, check_expert_parallel; the collectives are in
experts/parallel.py). Any wrapper around the layers works (a LightningModule, DDP,
a compiled block).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from arch.registry import RecipeError

from .moe import MoE
from .parallel import ExpertParallel, average_shard_grads, group_rank, group_size


def named_moe_layers(model: nn.Module) -> List[Tuple[str, MoE]]:
    """(module path, layer) for every MoE layer of `model`, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, MoE)]


def moe_layers(model: nn.Module) -> List[MoE]:
    """The MoE layers of `model`, in module order."""
    return [m for _, m in named_moe_layers(model)]


# ------------------------------------------------------------------ expert parallel


def check_expert_parallel(n_experts: int, ep: int) -> None:
    if ep < 1 or n_experts % ep != 0:
        raise RecipeError(f"model.moe.n_experts = {n_experts} is not divisible by train.expert_parallel = {ep}; "
                         f"choose an expert_parallel size that divides the number of experts.")


@torch.no_grad()
def shard_experts(model: nn.Module, group) -> List[str]:
    """Keep only this rank's contiguous slice of every MoE layer's w_in / w_out (the
    full weights must already hold their values: every rank slices the same
    initialisation, so EP starts from the single-process model) and make each
    layer's backend the all-to-all exchange over `group` (None: the world) around
    it. Returns the names (relative to `model`) of the sharded parameters."""
    ep, rank = group_size(group), group_rank(group)
    for layer in moe_layers(model):
        check_expert_parallel(layer.n_experts, ep)
        n = layer.n_experts // ep
        layer.w_in = nn.Parameter(layer.w_in[rank * n:(rank + 1) * n].clone())
        layer.w_out = nn.Parameter(layer.w_out[rank * n:(rank + 1) * n].clone())
        layer.backend = ExpertParallel(layer.backend, group)
    return [name for name, _ in model.named_parameters() if is_expert_shard(model, name)]


def _is_sharded(layer: MoE) -> bool:
    return isinstance(layer.backend, ExpertParallel)


def is_expert_shard(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` of `model` is an expert-parallel shard."""
    module_name, _, leaf = name.rpartition(".")
    if leaf not in ("w_in", "w_out"):
        return False
    layer = model.get_submodule(module_name)
    return isinstance(layer, MoE) and _is_sharded(layer)


def expert_shards(model: nn.Module) -> List[nn.Parameter]:
    """The expert-parallel shards of `model` (w_in, w_out of every sharded layer)."""
    return [p for layer in moe_layers(model) if _is_sharded(layer) for p in (layer.w_in, layer.w_out)]


def reduce_expert_grads(model: nn.Module, world_size: int, group=None) -> None:
    """Average the gradients of `model`'s expert shards over the data-parallel ranks
    (experts.parallel.average_shard_grads: `group` is the expert-data-parallel group,
    None when EP covers the world; `world_size` the number of ranks with own data)."""
    average_shard_grads(expert_shards(model), world_size, group)
