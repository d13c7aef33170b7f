"""The decoder-only language model assembled from a resolved ModelConfig."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import ModelConfig
from .loss import fused_linear_cross_entropy
from .norm import RMSNorm, build_norm
from .quant import read_weight
from .resolve import layer_specs
from .mla import rope_head_dim
from .rope import RoPE


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # (B, T, V); may be None when only the loss is asked
    loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy (ignore_index -100)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)  # weighted balancing losses


class Transformer(nn.Module):
    """Embedding -> blocks (one RoPE table per layer kind) -> final norm -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.specs = layer_specs(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ropes = nn.ModuleDict(
            {kind: RoPE(rope_head_dim(cfg.attention), cfg.layer_kinds[kind].rope)
             for kind in dict.fromkeys(s.kind for s in self.specs)}
        )
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in self.specs)
        self.norm = build_norm(cfg.d_model, cfg.norm)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def moe_layers(self) -> List[nn.Module]:
        return [b.ffn for b in self.layers if b.spec.moe]

    def head_weight(self) -> torch.Tensor:
        return read_weight(self.embed if self.head is None else self.head)  # fake-quantized under QAT

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_logits: bool = True) -> LMOutput:
        """Logits, and the mean next-token loss when `targets` is given.

        With `return_logits=False` and `model.fused_ce_chunk > 0` the head and the loss
        are fused (arch/loss.py) and `logits` is None: the training path. With
        `return_logits=False` and no targets the head is skipped altogether."""
        x = self.embed(input_ids)
        if self.cfg.scale_embeddings:  # Gemma: the scale is rounded to the weight dtype
            x = x * torch.tensor(math.sqrt(self.cfg.d_model), dtype=self.embed.weight.dtype)
        T = input_ids.shape[1]
        ropes = {kind: rope(T, input_ids.device) for kind, rope in self.ropes.items()}
        # flex block masks, once per kind and outside the (compiled) blocks: built
        # inside a compiled block, a mask would be rebuilt on every call
        masks = {}
        for block in self.layers:
            if block.spec.kind not in masks:
                make_mask = getattr(block.attn, "block_mask", None)  # registered kinds may have none
                masks[block.spec.kind] = make_mask(T, input_ids.device) if make_mask else None
        for block in self.layers:
            x = block(x, ropes[block.spec.kind], masks[block.spec.kind])
        h = self.norm(x)
        cap = self.cfg.final_softcap
        logits = loss = None
        if targets is None and not return_logits:
            pass  # the body only (e.g. to count expert selections): no head, no logits
        elif targets is not None and not return_logits and self.cfg.fused_ce_chunk > 0:
            loss = fused_linear_cross_entropy(h.flatten(0, 1), self.head_weight(), targets.flatten(),
                                              self.cfg.fused_ce_chunk, cap, compiled=self.cfg.fused_ce_compile)
        else:
            logits = F.linear(h, self.head_weight())
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            if targets is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        moe = self.moe_layers
        aux = type(moe[0]).gather_aux(moe) if moe else {}
        return LMOutput(logits=logits, loss=loss, aux=aux)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after materialising a meta model."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init_scale_residual else std
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "init_weights") and module is not self:
                module.init_weights(std, out_std)  # MoE layers own their stacked weights
