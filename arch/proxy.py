"""Shrink a reference recipe into a proxy that keeps its structure.

Give any of `proxy.d_model`, `proxy.n_layers`, `proxy.n_experts` (and optionally
heads, head_dim, vocab, context); everything else follows from the reference:

- width: head_dim is kept (unless given); n_heads scales with d_model and is rounded
  to a multiple of the GQA group size, so n_heads / n_kv_heads is unchanged;
- FFN, expert and shared-expert widths keep their ratio to d_model (rounded to
  `multiple_of`); query_pre_attn_scalar keeps its ratio to head_dim;
- depth: rounded to a whole number of `layer_pattern` periods (Gemma 3 keeps its 5:1
  local/global cycle); first_k_dense scales with depth but a dense prefix keeps at least
  one layer (and leaves at least one MoE layer); per-layer overrides are kept only where
  the layer still exists;
- experts: top_k is kept (clamped to the expert count);
- windows keep their fraction of the context (`proxy.max_seq_len`);
- gated DeltaNet heads (`model.attention.linear`) scale with d_model like query heads,
  keeping their widths and the value heads per key head;
- Gemma 4: a layer kind's own head_dim keeps its ratio to head_dim and its KV heads
  their GQA group; KV-sharing layers keep their share of the depth in whole periods
  (leaving at least one period that computes its own); per-layer inputs keep their
  ratio to d_model; a softmax scale of 1 (query_pre_attn_scalar 1: QK-norm without
  the head width) stays 1.

    moelab inspect qwen3/30b_a3b proxy.d_model=768 proxy.n_layers=8 proxy.n_experts=32
"""
from __future__ import annotations

import copy
import dataclasses

from .config import ModelConfig, ProxyConfig


def is_active(proxy: ProxyConfig) -> bool:
    return any(
        getattr(proxy, f.name) is not None for f in dataclasses.fields(proxy) if f.name != "multiple_of"
    )


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def derive_proxy(ref: ModelConfig, proxy: ProxyConfig) -> ModelConfig:
    """`ref` must be resolved (head_dim and n_kv_heads filled) and `proxy`'s numbers
    checked (arch/ranges.py; arch.recipe.resolve_recipe does both)."""
    cfg = copy.deepcopy(ref)
    a, m = cfg.attention, cfg.moe
    width = (proxy.d_model or ref.d_model) / ref.d_model
    cfg.d_model = proxy.d_model or ref.d_model

    group = ref.attention.n_heads // ref.attention.n_kv_heads
    a.head_dim = proxy.head_dim or ref.attention.head_dim
    if proxy.n_heads is not None:
        a.n_heads = proxy.n_heads
    elif proxy.d_model is not None or proxy.head_dim is not None:
        # keep the ratio (n_heads * head_dim) / d_model of the reference
        q_width = ref.attention.n_heads * ref.attention.head_dim / ref.d_model
        a.n_heads = _round_to(q_width * cfg.d_model / a.head_dim, group)
    a.n_kv_heads = proxy.n_kv_heads or max(1, a.n_heads // group)
    for name, lk in cfg.layer_kinds.items():
        ref_lk = ref.layer_kinds[name]
        if ref_lk.head_dim is not None:
            lk.head_dim = max(2, int(round(ref_lk.head_dim * a.head_dim / ref.attention.head_dim / 2)) * 2)
        if ref_lk.n_kv_heads is not None:
            lk.n_kv_heads = max(1, a.n_heads // (ref.attention.n_heads // ref_lk.n_kv_heads))
    if ref.attention.query_pre_attn_scalar not in (None, 1.0):
        a.query_pre_attn_scalar = ref.attention.query_pre_attn_scalar * a.head_dim / ref.attention.head_dim

    if proxy.d_model is not None:  # gated DeltaNet: head counts scale with d_model, head widths and groups kept
        lin, ref_lin = a.linear, ref.attention.linear
        v_group = ref_lin.n_v_heads // ref_lin.n_k_heads
        lin.n_k_heads = max(1, int(round(ref_lin.n_k_heads * width)))
        lin.n_v_heads = lin.n_k_heads * v_group

    mult = proxy.multiple_of
    if ref.ffn.d_ff and ref.ffn.d_ff > 0:
        cfg.ffn.d_ff = _round_to(ref.ffn.d_ff * width, mult)
    if m.n_experts > 0:
        m.d_expert = _round_to(ref.moe.d_expert * width, mult)
        if ref.moe.d_shared:
            m.d_shared = _round_to(ref.moe.d_shared * width, mult)
        if proxy.n_experts is not None:
            m.n_experts = proxy.n_experts
            m.top_k = min(ref.moe.top_k, m.n_experts)

    if proxy.n_layers is not None:
        period = len(ref.layer_pattern)
        cfg.n_layers = max(period, int(round(proxy.n_layers / period)) * period) if period > 1 else proxy.n_layers
        depth = cfg.n_layers / ref.n_layers
        m.first_k_dense = int(round(ref.moe.first_k_dense * depth))
        if ref.moe.first_k_dense > 0 and m.n_experts > 0:
            # a dense prefix stays (DeepSeek-V3's first dense layers would otherwise round
            # away), and so does at least one MoE layer
            m.first_k_dense = min(max(1, m.first_k_dense), cfg.n_layers - 1)
        cfg.layer_overrides = {i: o for i, o in ref.layer_overrides.items() if i < cfg.n_layers}
        if ref.kv_shared_layers:
            periods = int(round(ref.kv_shared_layers / ref.n_layers * cfg.n_layers / period))
            cfg.kv_shared_layers = max(0, min(periods * period, cfg.n_layers - period))
            if not cfg.kv_shared_layers:
                cfg.kv_shared_ffn_mult = 1  # nothing left to widen
    if ref.per_layer_input.dim and proxy.d_model is not None:
        cfg.per_layer_input.dim = _round_to(ref.per_layer_input.dim * width, 8)

    if proxy.vocab_size is not None:
        cfg.vocab_size = proxy.vocab_size
    if proxy.max_seq_len is not None:
        ctx = proxy.max_seq_len / ref.max_seq_len
        cfg.max_seq_len = proxy.max_seq_len
        for lk in cfg.layer_kinds.values():
            if lk.window is not None:
                lk.window = max(1, int(round(lk.window * ctx)))
    return cfg


def proxy_changes(ref: ModelConfig, derived: ModelConfig) -> list:
    """What the derivation changed, as 'field ref -> proxy' strings (what `moelab
    inspect` prints under the proxy)."""
    fields = [("d_model", lambda c: c.d_model), ("n_layers", lambda c: c.n_layers),
              ("n_heads", lambda c: c.attention.n_heads), ("n_kv_heads", lambda c: c.attention.n_kv_heads),
              ("head_dim", lambda c: c.attention.head_dim), ("d_ff", lambda c: c.ffn.d_ff),
              ("n_experts", lambda c: c.moe.n_experts), ("top_k", lambda c: c.moe.top_k),
              ("d_expert", lambda c: c.moe.d_expert), ("d_shared", lambda c: c.moe.d_shared),
              ("first_k_dense", lambda c: c.moe.first_k_dense), ("vocab_size", lambda c: c.vocab_size),
              ("max_seq_len", lambda c: c.max_seq_len), ("kv_shared_layers", lambda c: c.kv_shared_layers),
              ("per_layer_input.dim", lambda c: c.per_layer_input.dim),
              ("query_pre_attn_scalar", lambda c: c.attention.query_pre_attn_scalar)]
    if any(lk.attention == "gated_deltanet" for lk in ref.layer_kinds.values()):
        fields += [("linear n_k_heads", lambda c: c.attention.linear.n_k_heads),
                   ("linear n_v_heads", lambda c: c.attention.linear.n_v_heads)]
    out = [f"{name} {get(ref):g} -> {get(derived):g}" for name, get in fields
           if get(ref) is not None and get(ref) != get(derived)]
    for kind, lk in derived.layer_kinds.items():
        before = ref.layer_kinds[kind].window
        if before is not None and lk.window != before:
            out.append(f"{kind} window {before} -> {lk.window}")
        for field in ("head_dim", "n_kv_heads"):
            was, now = getattr(ref.layer_kinds[kind], field), getattr(lk, field)
            if was is not None and now != was:
                out.append(f"{kind} {field} {was} -> {now}")
    dropped = sorted(set(ref.layer_overrides) - set(derived.layer_overrides))
    if dropped:
        out.append(f"layer overrides of layers {dropped} dropped (past the new depth)")
    return out
