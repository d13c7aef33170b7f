"""Load balancing that needs the training loop: global-batch counts and the
auxiliary-loss-free bias. Every function here is collective under data
parallelism: call it on every rank, at the same point of the step.

One optimizer step with gradient accumulation, aux_scope: global and a bias rate:

    precompute_global_counts(model, micro_batches)   # only when grad_accum > 1
    for ids, targets in micro_batches:
        out = model(ids, targets)
        ((out.loss + sum(out.aux.values())) / len(micro_batches)).backward()
    update_router_biases(model)                      # before optimizer.step()
    optimizer.step(); optimizer.zero_grad()
    clear_global_counts(model)

With grad_accum = 1 no precompute is needed: the layers all-reduce their counts
inside the training forward.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .layers import moe_layers
from .parallel import all_reduce_sum


def set_dp_group(model: nn.Module, group) -> None:
    """The data-parallel group the layers reduce counts over (None: the world)."""
    for layer in moe_layers(model):
        layer.dp_group = group


@torch.no_grad()
def precompute_global_counts(model: nn.Module, micro_batches: Iterable[torch.Tensor], group=None) -> bool:
    """Count expert selections over one optimizer step's micro-batches (input ids
    (B, T) each, on the model's device), sum them over the data-parallel `group`
    (None: each layer's `dp_group`, itself None = the world) and store them on the
    layers, whose training forwards then use them as f^G of the global-batch loss.

    Cost: one extra no-grad forward over the step's tokens, paid only when some layer
    has aux_scope global with aux_coef > 0 (otherwise this returns False at once, and
    it is not needed at all with grad_accum = 1). The counts are exact when the
    training forwards route as this one does: router jitter (or anything random
    before the routers) makes them an approximation. Clear them after the optimizer
    step with `clear_global_counts`."""
    layers = [m for m in moe_layers(model)
              if m.cfg.balance.aux_scope == "global" and m.cfg.balance.aux_coef > 0]
    if not layers:
        return False
    for layer in layers:
        layer.global_counts_E = layer.global_tokens = None
        layer._collect = [torch.zeros(layer.n_experts, dtype=torch.long, device=layer.w_in.device), 0]
    try:
        for ids in micro_batches:
            model(ids, return_logits=False)  # the head is not needed to count experts
        collected = [layer._collect for layer in layers]
    finally:
        for layer in layers:
            layer._collect = None
    if collected[0][1] == 0:
        raise ValueError("precompute_global_counts got no micro-batches; pass the step's input ids.")
    # one collective for all layers: rows = layers, columns = experts + token count
    rows = [torch.cat([c, torch.full((1,), n, dtype=torch.long, device=c.device)]) for c, n in collected]
    table = all_reduce_sum(torch.stack(rows), group if group is not None else layers[0].dp_group)
    for layer, row in zip(layers, table):
        layer.global_counts_E, layer.global_tokens = row[:-1], row[-1]
    return True


def clear_global_counts(model: nn.Module) -> None:
    """Forget the counts of `precompute_global_counts` (call after the optimizer step)."""
    for layer in moe_layers(model):
        layer.global_counts_E = layer.global_tokens = None


@torch.no_grad()
def update_router_biases(model: nn.Module, group=None) -> Optional[torch.Tensor]:
    """Aux-loss-free balancing step for every layer whose router has a
    bias_update_rate: sum the selections counted since the last call (training
    forwards only) over the data-parallel `group` (None: each layer's `dp_group`),
    move each bias by rate * sign(mean load - load), and reset the counts.

    Call before optimizer.step(), on every rank. Returns the (layers, E) loads used,
    or None when no router has a bias rate. Every rank gets the same summed loads and
    so the same biases. Activation checkpointing re-runs forwards and counts each
    token twice; that scales every load alike, which a sign update ignores."""
    layers = [m for m in moe_layers(model) if m.router.bias_update_rate > 0]
    if not layers:
        return None
    loads = []
    for layer in layers:
        load = layer._load_E
        if load is None:  # no training forward since the last update
            load = torch.zeros(layer.n_experts, dtype=torch.long, device=layer.router.expert_bias.device)
        loads.append(load)
        layer._load_E = None
    loads_LE = all_reduce_sum(torch.stack(loads), group if group is not None else layers[0].dp_group)
    for layer, load_E in zip(layers, loads_LE):
        layer.router.update_bias(load_E)
    return loads_LE
