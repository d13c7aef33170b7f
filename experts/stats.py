"""Router statistics per MoE layer, from each layer's last forward.

The layers store detached device tensors during forward (no host sync there); the
consumer pays the sync when it converts them to log them. Per layer:

    tokens_per_expert   (E,) int64  slots routed to each expert, before capacity
    load_max_over_mean  max / mean of tokens_per_expert (1 = perfectly balanced)
    dropped_tokens      slots dropped by capacity (a token losing 2 experts counts 2)
    entropy             mean routing entropy per token, nats (log E = uniform)
    aux_loss            unweighted Switch loss of this layer's micro-batch (K = balanced)
    z_loss              unweighted router z-loss
    bias_norm           L2 norm of the aux-loss-free selection bias (its drift)

The weighted losses that reach the optimizer are in LMOutput.aux, not here.
"""
from __future__ import annotations

import re
from typing import Dict, Union

import torch
from torch import nn

from .layers import named_moe_layers

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_key(path: str) -> Union[int, str]:
    """How a MoE layer at module path `path` is named in statistics: its block index
    (the `layers.<i>.` in the path), or the path itself when there is none (a bare MoE
    layer: "moe")."""
    hit = _LAYER_INDEX.search(path + ".")
    return int(hit.group(1)) if hit else (path or "moe")


def router_stats(model: nn.Module) -> Dict[Union[int, str], Dict[str, torch.Tensor]]:
    """{layer: {stat name: detached tensor}} for every MoE layer that has run a forward
    with `track_stats` on, keyed by `layer_key`."""
    out = {}
    for path, layer in named_moe_layers(model):
        if layer.stats:
            out[layer_key(path)] = dict(layer.stats)
    return out


def expert_load(model: nn.Module) -> torch.Tensor:
    """(MoE layers, E) float32: tokens per expert over the mean, one row per layer
    with stats (1 = balanced): the expert-load image."""
    rows = [s["tokens_per_expert"].float() for s in router_stats(model).values()]
    if not rows:
        return torch.zeros(0, 0)
    load = torch.stack(rows)
    return load / load.mean(-1, keepdim=True).clamp_min(1e-20)
