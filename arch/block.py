"""One transformer block. Variants live in the sub-modules and the config.

norm_placement   attention half                       (the FFN half is alike)
  pre            x + attn(norm(x))                    (Llama, Qwen3)
  sandwich       x + post_norm(attn(norm(x)))         (Gemma 2/3/4)
  post           x + post_norm(attn(x))               (OLMo 2)
Unused norms are nn.Identity, so forward is the same two lines for all of them.

Gemma 4 adds, each off unless its recipe field says so: a per-layer input after the
FFN (arch/per_layer.py), a fixed scalar on the block's output (model.layer_scalar), and
KV sharing: a layer that stores its keys and values for later ones (`kv` maps a layer
index to them) or attends over an earlier layer's.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .config import LayerSpec, ModelConfig
from .norm import build_norm
from .per_layer import PerLayerInput
from .registry import ATTENTION, FFN, MOE


def build_ffn(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    d_ff = spec.d_ff if spec.d_ff is not None else cfg.ffn.d_ff
    if spec.moe:
        cls = MOE.get(cfg.moe.kind, "model.moe.kind")
        # a layer that runs the dense FFN beside its experts needs the model's FFN and norms
        if getattr(cls, "takes_model_config", False):
            return cls(cfg.d_model, cfg.moe, model=cfg, d_ff=d_ff)
        return cls(cfg.d_model, cfg.moe)
    return FFN.get(cfg.ffn.kind, "model.ffn.kind")(cfg.d_model, d_ff, bias=cfg.ffn.bias)


def build_attention(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    a = cfg.attention
    per_layer = {}
    if spec.head_dim not in (None, a.head_dim) or spec.n_kv_heads not in (None, a.n_kv_heads):
        a = dataclasses.replace(a, head_dim=spec.head_dim, n_kv_heads=spec.n_kv_heads)
    if spec.k_eq_v:
        per_layer["k_eq_v"] = True
    if spec.kv_source is not None:
        per_layer["kv_shared"] = True
    # the layer kind may name its own mixer (gated DeltaNet's linear layers)
    return ATTENTION.get(spec.attention, f"model.layer_kinds.{spec.kind}.attention")(
        cfg.d_model, a, cfg.norm, spec.window, rope=spec.rope, **per_layer)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        pre = cfg.norm_placement in ("pre", "sandwich")
        post = cfg.norm_placement in ("sandwich", "post")

        def norm(on: bool) -> nn.Module:
            return build_norm(cfg.d_model, cfg.norm) if on else nn.Identity()

        self.spec = spec
        self.attn_norm = norm(pre)
        self.attn = build_attention(cfg, spec)
        self.attn_post_norm = norm(post)
        # an FFN that normalises its own input(s) (parallel_dense) takes the residual
        own_norms = spec.moe and getattr(MOE.get(cfg.moe.kind, "model.moe.kind"), "takes_model_config", False)
        self.ffn_norm = norm(pre and not own_norms)
        self.ffn = build_ffn(cfg, spec)
        self.ffn_post_norm = norm(post)
        dim = cfg.per_layer_input.dim
        self.per_layer = PerLayerInput(cfg.d_model, dim, cfg.ffn.kind, cfg.norm) if dim else None
        if cfg.layer_scalar:  # a buffer, as in Gemma 4 checkpoints: loaded, never trained
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def init_weights(self, std: float, out_std: float) -> None:
        if self.layer_scalar is not None:
            nn.init.ones_(self.layer_scalar)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], block_mask=None,
                cache=None, kv: Optional[Dict[int, tuple]] = None,
                per_layer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`kv`: the keys and values stored by earlier layers, for KV sharing;
        `per_layer`: this layer's per-layer input (B, T, dim)."""
        h = self.attn_norm(x)
        extra = {}
        if self.spec.kv_source is not None:
            extra["shared_kv"] = kv[self.spec.kv_source]
        if self.spec.kv_store:
            extra["return_kv"] = True
        # an attention kind without flex masks keeps the (x, rope) call; `cache`: decoding
        if cache is not None:
            h = self.attn(h, rope, cache=cache, **extra)
        else:
            h = self.attn(h, rope, **extra) if block_mask is None else self.attn(h, rope, block_mask, **extra)
        if self.spec.kv_store:
            h, kv[self.spec.index] = h
        x = x + self.attn_post_norm(h)
        x = x + self.ffn_post_norm(self.ffn(self.ffn_norm(x)))
        if self.per_layer is not None:
            x = self.per_layer(x, per_layer)
        return x if self.layer_scalar is None else x * self.layer_scalar
