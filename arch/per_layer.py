"""Per-layer input embeddings (Gemma 4's PLE; model.per_layer_input).

Every layer l gets an input p_l of its own, dim wide, made once per forward from the
token ids and the model's (scaled) input embedding e:

    p = (norm(view(proj(e) / sqrt(d_model), L, dim)) + view(table[ids] x sqrt(dim), L, dim)) / sqrt(2)

and after its FFN the layer adds  norm(up(act(gate(x)) * p_l))  to its residual.
The table is n_layers x dim wide, one row per token: it counts as embedding
parameters (arch/accounting.py), and a forward reads one row of it per token.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, NormConfig
from .ffn import ACTIVATIONS
from .norm import build_norm


class PerLayerEmbedding(nn.Module):
    """The model's side: (B, T) ids and (B, T, D) input embedding -> (B, T, L, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.per_layer_input
        self.n_layers, self.dim, self.d_model = cfg.n_layers, p.dim, cfg.d_model
        self.embed = nn.Embedding(p.vocab_size or cfg.vocab_size, cfg.n_layers * p.dim)
        self.proj = nn.Linear(cfg.d_model, cfg.n_layers * p.dim, bias=False)
        self.norm = build_norm(p.dim, cfg.norm)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = (*ids.shape, self.n_layers, self.dim)
        ctx = self.norm((self.proj(x) * self.d_model ** -0.5).view(shape))
        # the scale rounded to the table's dtype, as the input embedding's (Gemma)
        tok = self.embed(ids) * torch.tensor(math.sqrt(self.dim), dtype=self.embed.weight.dtype)
        return (ctx + tok.view(shape)) * 2 ** -0.5


class PerLayerInput(nn.Module):
    """The layer's side: x + norm(proj(act(gate(x)) * p_l)), act the dense FFN's."""

    def __init__(self, d_model: int, dim: int, ffn_kind: str, norm: NormConfig):
        super().__init__()
        self.act = ACTIVATIONS[ffn_kind]
        self.gate = nn.Linear(d_model, dim, bias=False)
        self.proj = nn.Linear(dim, d_model, bias=False)
        self.norm = build_norm(d_model, norm)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.proj(self.act(self.gate(x)) * p))
