"""One transformer block. Variants live in the sub-modules and the config.

norm_placement   attention half                       (the FFN half is alike)
  pre            x + attn(norm(x))                    (Llama, Qwen3)
  sandwich       x + post_norm(attn(norm(x)))         (Gemma 2/3)
  post           x + post_norm(attn(x))               (OLMo 2)
Unused norms are nn.Identity, so forward is the same two lines for all of them.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .config import LayerSpec, ModelConfig
from .norm import build_norm
from .registry import ATTENTION, FFN, MOE


def build_ffn(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    if spec.moe:
        return MOE.get(cfg.moe.kind, "model.moe.kind")(cfg.d_model, cfg.moe)
    return FFN.get(cfg.ffn.kind, "model.ffn.kind")(cfg.d_model, cfg.ffn.d_ff, bias=cfg.ffn.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        pre = cfg.norm_placement in ("pre", "sandwich")
        post = cfg.norm_placement in ("sandwich", "post")

        def norm(on: bool) -> nn.Module:
            return build_norm(cfg.d_model, cfg.norm) if on else nn.Identity()

        self.spec = spec
        self.attn_norm = norm(pre)
        # the layer kind may name its own mixer (gated DeltaNet's linear layers)
        self.attn = ATTENTION.get(spec.attention, f"model.layer_kinds.{spec.kind}.attention")(
            cfg.d_model, cfg.attention, cfg.norm, spec.window, rope=spec.rope
        )
        self.attn_post_norm = norm(post)
        self.ffn_norm = norm(pre)
        self.ffn = build_ffn(cfg, spec)
        self.ffn_post_norm = norm(post)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], block_mask=None,
                cache=None) -> torch.Tensor:
        h = self.attn_norm(x)
        # an attention kind without flex masks keeps the (x, rope) call; `cache`: decoding
        if cache is not None:
            h = self.attn(h, rope, cache=cache)
        else:
            h = self.attn(h, rope) if block_mask is None else self.attn(h, rope, block_mask)
        x = x + self.attn_post_norm(h)
        x = x + self.ffn_post_norm(self.ffn(self.ffn_norm(x)))
        return x
