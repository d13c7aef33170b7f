"""Multi-token prediction (DeepSeek-V3 section 2.2; transformers' MtpLayer): `depth`
modules after the model, chained. Module k (1-based) sees at position i the previous
depth's hidden state and the embedding of token i + k, and predicts token i + k + 1
through the model's own head:

    h^0 = the model's final-normed hidden states
    h^k_i = norm_k(block_k(eh_proj_k([enorm_k(embed(t_{i+k})) ; hnorm_k(h^{k-1}_i)])))
    logits^k_i = head(h^k_i)                 (the final soft-cap too, as the model's)
    loss = loss_weight / depth x sum_k mean_i CE(logits^k_i, t_{i+k+1})

Each block is built like the model's last layer (its kind, window, RoPE, MoE or not),
and the embedding and head are shared with the model. Sequences keep their length at
every depth (as Megatron-LM does): the inputs are the targets shifted left and padded,
and the positions whose embedded token or target falls past the end (or is ignored,
-100) are left out of the loss. Causal attention keeps the padding out of every kept
position, so every block sees one shape, one RoPE table and one mask.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import LayerSpec, ModelConfig
from .norm import build_norm


def mtp_specs(cfg: ModelConfig, last: LayerSpec) -> List[LayerSpec]:
    """The blocks of the MTP modules: copies of the last layer's spec, numbered on."""
    return [replace(last, index=cfg.n_layers + k) for k in range(cfg.mtp.depth)]


def shift_left(t: torch.Tensor, k: int, fill: int = -100) -> torch.Tensor:
    """t[:, k:] padded at the end with `fill` back to t's length."""
    return F.pad(t[:, k:], (0, k), value=fill) if k else t


class MTPModule(nn.Module):
    """One depth: combine, one block, the module's own final norm."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        d = cfg.d_model
        self.enorm = build_norm(d, cfg.norm)
        self.hnorm = build_norm(d, cfg.norm)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)  # [embedding ; hidden], DeepSeek's order
        self.block = Block(cfg, spec)
        self.norm = build_norm(d, cfg.norm)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope, block_mask=None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, rope, block_mask))
