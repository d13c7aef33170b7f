"""Multi-head latent attention (DeepSeek-V2/V3), registered as attention kind `mla`.

    q        = W_qb norm(W_qa x)          (or W_q x without q_lora_rank)     (H, nope + rope)
    [c, k_r] = W_kva x                    c: the kv latent (kv_lora_rank), k_r: one rotary key
    [k_n, v] = W_kvb norm(c)              per head: nope + v_head_dim
    key      = [k_n, rope(k_r)]           the rotary part shared by every head
    query    = [q_nope, rope(q_rope)]

Softmax scale: (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 when the
layer's RoPE is YaRN with mscale_all_dim (DeepSeek-V3's long-context correction). With
`rope_interleave` the rotary dimensions come in interleaved pairs (DeepSeek's layout),
rotated pair by pair; the output puts the pairs' first members first, the same for
queries and keys, so every score is unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import Attention
from .config import AttentionConfig, NormConfig, RopeConfig
from .norm import build_norm
from .registry import ATTENTION
from .rope import _yarn_mscale, apply_rope


def rope_head_dim(cfg: AttentionConfig) -> int:
    """The per-head width RoPE tables are built for: MLA rotates qk_rope_head_dim."""
    return cfg.qk_rope_head_dim if cfg.kind == "mla" else cfg.head_dim


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on pairs (x0, x1), (x2, x3), ...: x: (..., T, R); cos/sin: (T, R) as RoPE
    builds them (the two halves equal)."""
    cos, sin = cos[..., : cos.shape[-1] // 2].to(x.dtype), sin[..., : sin.shape[-1] // 2].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def mla_scale(cfg: AttentionConfig, rope: Optional[RopeConfig]) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if rope is not None and rope.scaling == "yarn" and rope.mscale_all_dim:
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


@ATTENTION.register("mla")
class MultiHeadLatentAttention(Attention):
    """MLA with the attention paths of `Attention` (SDPA, flex, the eager reference)."""

    def __init__(self, d_model: int, cfg: AttentionConfig, norm: NormConfig, window: Optional[int],
                 rope: Optional[RopeConfig] = None):
        nn.Module.__init__(self)
        H = cfg.n_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.head_dim = self.nope + self.rope_dim
        self.window, self.softcap, self.impl, self.sinks = window, cfg.softcap, cfg.impl, None
        self.scale = mla_scale(cfg, rope) if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self._cfg = cfg
        self.interleave = cfg.rope_interleave
        latent = dataclasses.replace(norm, eps=cfg.latent_norm_eps)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, H * self.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = build_norm(cfg.q_lora_rank, latent)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, cfg.kv_lora_rank + self.rope_dim, bias=cfg.bias)
        self.kv_a_layernorm = build_norm(cfg.kv_lora_rank, latent)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d_model, bias=cfg.bias)


    def rope_changed(self, rope: RopeConfig) -> None:
        """A new RoPE for this layer (a training stage): YaRN's mscale_all_dim enters the softmax scale."""
        if self._cfg.query_pre_attn_scalar is None:
            self.scale = mla_scale(self._cfg, rope)
    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], block_mask=None,
                cache=None) -> torch.Tensor:
        """`cache`: as for `Attention`; it keeps the per-head keys and values (arch/cache.py)."""
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, T, -1, self.head_dim).transpose(1, 2).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rot = k_rot.view(B, 1, T, self.rope_dim)
        rotate = apply_rope_interleaved if self.interleave else apply_rope
        q_rot, k_rot = rotate(q_rot, *rope), rotate(k_rot, *rope)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        y = self._attend(q, k, v, block_mask) if cache is None else self._attend_cached(q, k, v, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _impl(self, T: int, is_cuda: bool, documents: bool = False) -> str:
        """auto never picks flex for MLA (its value width differs from the query's, which
        flex was not checked with): SDPA, with a mask for a window or documents, or
        eager for a soft-cap. An explicit impl is honoured."""
        impl = super()._impl(T, is_cuda, documents)
        if impl == "flex" and self.impl == "auto":
            return "eager" if self.softcap is not None else "sdpa"
        return impl

    def extra_repr(self) -> str:
        return (f"nope={self.nope}, rope={self.rope_dim}, v={self.v_dim}, kv_lora={self.kv_lora_rank}, "
                f"interleave={self.interleave}, scale={self.scale:.5g}")
