"""Everything that walks a model's MoE layers: list them, the balancing steps of the
training loop, and expert parallelism applied to a model. Any wrapper around the
layers works (a LightningModule, DDP, a compiled block).

Balancing (the per-layer counts live in experts/balance.py, which sketches the step):
  precompute_global_counts / clear_global_counts   f^G of the global-batch loss when
                                                   a step has several micro-batches
  update_router_biases                             aux-loss-free bias step, before
                                                   optimizer.step()
  set_dp_group                                     the group both sum over
Expert parallelism (the collectives are in experts/parallel.py):
  shard_experts, is_expert_shard, expert_shards, reduce_expert_grads,
  check_expert_parallel

The balancing steps are collective under data parallelism: call them on every rank,
at the same point of the step. With grad_accum = 1 no precompute is needed: the
layers all-reduce their counts inside the training forward.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from arch.registry import RecipeError

from .balance import count_row
from .moe import MoE
from .parallel import ExpertParallel, all_reduce_sum, average_shard_grads, group_rank, group_size


# a layer's per-expert tensors (stacked along dim 0), the ones expert parallelism shards
EXPERT_TENSORS = ("w_in", "w_out", "b_in", "b_out")


def named_moe_layers(model: nn.Module) -> List[Tuple[str, MoE]]:
    """(module path, layer) for every MoE layer of `model`, in module order. For a model
    that `freeze_moe_layers` marked, the list found then, without walking its modules."""
    frozen = model.__dict__.get(_FROZEN)
    if frozen is not None:
        return list(frozen)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, MoE)]


_FROZEN = "_moelab_moe_layers"


def freeze_moe_layers(model: nn.Module) -> None:
    """Remember `model`'s MoE layers for `named_moe_layers`, for a model whose modules no
    longer change: the training loop's, once built, sharded and compiled. A walk over
    every module costs about 0.2-0.4 ms of host time, and a training step made several
    (bias updates, count clearing, router statistics), every step."""
    model.__dict__.pop(_FROZEN, None)
    model.__dict__[_FROZEN] = tuple(named_moe_layers(model))  # a plain attribute, not a submodule


def moe_layers(model: nn.Module) -> List[MoE]:
    """The MoE layers of `model`, in module order."""
    return [m for _, m in named_moe_layers(model)]


def set_dp_group(model: nn.Module, group) -> None:
    """The data-parallel group the layers reduce counts over (None: the world)."""
    for layer in moe_layers(model):
        layer.balance.dp_group = group


# ------------------------------------------------------------------ balancing


@torch.no_grad()
def precompute_global_counts(model: nn.Module, micro_batches: Iterable, group=None, one_more: bool = False) -> bool:
    """Count expert selections over one optimizer step's micro-batches (input ids
    (B, T) each, on the model's device, or (input ids, targets) pairs: a model with
    multi-token prediction needs the targets to run its MTP layers; a third item: the
    model's document arguments, train.document_mask), sum them over the
    data-parallel `group`
    (None: each layer's `balance.dp_group`, itself None = the world) and store them
    on the layers, whose training forwards then use them as f^G of the global-batch
    loss.

    Cost: one extra no-grad forward per micro-batch given, paid only when some layer
    has aux_scope global with aux_coef > 0 (otherwise this returns False at once, and
    it is not needed at all with grad_accum = 1). The counts are exact when the
    training forwards route as this one does: router jitter (or anything random
    before the routers) makes them an approximation. Clear them after the optimizer
    step with `clear_global_counts`.

    `one_more`: the step has one micro-batch more than `micro_batches`, whose training
    forward runs first and completes the counts with its own (BalanceState
    .set_other_counts; call `next_micro_batch` after it): the same f^G for one no-grad
    forward fewer (half the pre-pass at grad_accum 2)."""
    layers = [m for m in moe_layers(model) if m.cfg.balance.aux_scope == "global" and m.cfg.balance.aux_coef > 0
              and m.cfg.balance.global_counts == "exact"]  # the running form needs no pre-pass
    if not layers:
        return False
    for layer in layers:
        layer.balance.start_counting()
    try:
        for batch in micro_batches:
            if isinstance(batch, (tuple, list)):  # the heads are not needed to count experts
                model(batch[0], targets=batch[1], return_logits=False, heads=False,
                      **(batch[2] if len(batch) > 2 else {}))
            else:
                model(batch, return_logits=False)
    finally:
        counted = [layer.balance.stop_counting() for layer in layers]
    if counted[0] is None or counted[0][1] == 0:
        raise ValueError("precompute_global_counts got no micro-batches; pass the step's input ids.")
    # one collective for all layers: rows = layers, columns = experts + token count
    rows = [count_row(c, n) for c, n in counted]
    table = all_reduce_sum(torch.stack(rows), group if group is not None else layers[0].balance.dp_group)
    for layer, row in zip(layers, table):
        if one_more:
            layer.balance.set_other_counts(row[:-1], row[-1])
        else:
            layer.balance.set_step_counts(row[:-1], row[-1])
    return True


def clear_global_counts(model: nn.Module) -> None:
    """Forget the step's global counts, precomputed or running (call after the
    optimizer step)."""
    for layer in moe_layers(model):
        layer.balance.clear_step_counts()


def next_micro_batch(model: nn.Module) -> None:
    """Before each micro-batch's forward but the step's first: the running form of
    the global counts closes the previous micro-batch (experts/balance.py)."""
    for layer in moe_layers(model):
        layer.balance.next_micro_batch()


@torch.no_grad()
def update_router_biases(model: nn.Module, group=None, keep: Optional[torch.Tensor] = None
                         ) -> Optional[torch.Tensor]:
    """Aux-loss-free balancing step for every layer whose router has a
    bias_update_rate: sum the selections counted since the last call (training
    forwards only) over the data-parallel `group` (None: each layer's
    `balance.dp_group`), move each bias by rate * sign(mean load - load), and reset
    the counts.

    Call before optimizer.step(), on every rank. Returns the (layers, E) loads used,
    or None when no router has a bias rate. Every rank gets the same summed loads and
    so the same biases. Activation checkpointing re-runs forwards and counts each
    token twice; that scales every load alike, which a sign update ignores.

    `keep`: a boolean scalar on the device; where False (a step whose update is
    skipped without a host read, lit_modules/train/module.py), the loads are zeroed,
    so no bias moves (sign(0) = 0) and the counts are still consumed."""
    layers = [m for m in moe_layers(model) if m.router.bias_update_rate > 0]
    if not layers:
        return None
    loads = [layer.balance.take_loads(layer.router.expert_bias.device) for layer in layers]
    loads_LE = all_reduce_sum(torch.stack(loads), group if group is not None else layers[0].balance.dp_group)
    if keep is not None:
        loads_LE = loads_LE * keep.to(loads_LE.dtype)
    for layer, load_E in zip(layers, loads_LE):
        layer.router.update_bias(load_E)
    return loads_LE


# ------------------------------------------------------------------ expert parallel


def check_expert_parallel(n_experts: int, ep: int) -> None:
    if ep < 1 or n_experts % ep != 0:
        raise RecipeError(f"model.moe.n_experts = {n_experts} is not divisible by train.expert_parallel = {ep}; "
                         f"choose an expert_parallel size that divides the number of experts.")


@torch.no_grad()
def shard_experts(model: nn.Module, group, dispatch: str) -> List[str]:
    """Keep only this rank's contiguous slice of every MoE layer's w_in / w_out (and
    b_in / b_out where the experts have biases; the full weights must already hold
    their values: every rank slices the same initialisation, so EP starts from the
    single-process model) and make each layer's backend the exchange over `group`
    (None: the world) around it (`dispatch`: alltoall or allgather, see
    experts.parallel.ExpertParallel). Returns the names (relative to `model`) of the
    sharded parameters."""
    ep, rank = group_size(group), group_rank(group)
    for layer in moe_layers(model):
        check_expert_parallel(layer.n_experts, ep)
        n = layer.n_experts // ep
        for name in EXPERT_TENSORS:
            full = getattr(layer, name)
            if full is not None:
                setattr(layer, name, nn.Parameter(full[rank * n:(rank + 1) * n].clone()))
        layer.backend = ExpertParallel(layer.backend, group, layer.cfg.capacity_factor, layer.top_k, dispatch)
    return [name for name, _ in model.named_parameters() if is_expert_shard(model, name)]


def _is_sharded(layer: MoE) -> bool:
    return isinstance(layer.backend, ExpertParallel)


def is_expert_shard(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` of `model` is an expert-parallel shard."""
    module_name, _, leaf = name.rpartition(".")
    if leaf not in EXPERT_TENSORS:
        return False
    layer = model.get_submodule(module_name)
    return isinstance(layer, MoE) and _is_sharded(layer)


def expert_shards(model: nn.Module) -> List[nn.Parameter]:
    """The expert-parallel shards of `model` (w_in, w_out, and the biases where they
    exist, of every sharded layer)."""
    return [p for layer in moe_layers(model) if _is_sharded(layer)
            for p in (getattr(layer, name) for name in EXPERT_TENSORS) if p is not None]


def reduce_expert_grads(model: nn.Module, world_size: int, group=None) -> None:
    """Average the gradients of `model`'s expert shards over the data-parallel ranks
    (experts.parallel.average_shard_grads: `group` is the expert-data-parallel group,
    None when EP covers the world; `world_size` the number of ranks with own data)."""
    average_shard_grads(expert_shards(model), world_size, group)
