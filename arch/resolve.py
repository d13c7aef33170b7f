"""Derive and validate at config time, before any tensor exists.

`resolve_model` fills derived fields (kv heads, head_dim) on a copy and checks every
constraint; `layer_specs` turns pattern + overrides + MoE placement into one
`LayerSpec` per layer. All problems are gathered and raised together as one
RecipeError, a sentence each, naming the full key path.
"""
from __future__ import annotations

import copy
from typing import List

from .config import LayerSpec, ModelConfig
from .registry import ATTENTION, EXPERT_BACKEND, FFN, MOE, NORM, ROUTER, RecipeError, nearest

NORM_PLACEMENTS = ("pre", "sandwich", "post")
ROPE_SCALINGS = ("none", "linear")
AUX_SCOPES = ("micro", "pooled", "global")
ATTENTION_IMPLS = ("auto", "sdpa", "flex", "eager")


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    m = cfg.moe
    if m.n_experts <= 0:
        return False
    override = cfg.layer_overrides.get(i)
    if override is not None and override.moe is not None:
        return override.moe
    return i >= m.first_k_dense and (i - m.first_k_dense) % m.every == 0


def layer_specs(cfg: ModelConfig) -> List[LayerSpec]:
    specs = []
    for i in range(cfg.n_layers):
        kind = cfg.layer_pattern[i % len(cfg.layer_pattern)]
        override = cfg.layer_overrides.get(i)
        if override is not None and override.kind is not None:
            kind = override.kind
        lk = cfg.layer_kinds[kind]
        specs.append(LayerSpec(i, kind, lk.window, lk.rope, is_moe_layer(cfg, i)))
    return specs


def _check_key(errors: List[str], registry, key: str, path: str) -> None:
    if key not in registry:
        errors.append(
            f"{path} = '{key}' is not a registered {registry.name}{nearest(key, registry.keys())}; "
            f"choose one of {', '.join(registry.keys())}."
        )


def _check_choice(errors: List[str], value, choices, path: str) -> None:
    if value not in choices:
        errors.append(f"{path} = '{value}' is not valid{nearest(value, choices)}; choose one of {', '.join(choices)}.")


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Return a validated copy of `cfg` with derived fields filled in."""
    cfg = copy.deepcopy(cfg)
    errors: List[str] = []
    overrides = {}
    for key, ov in cfg.layer_overrides.items():
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            overrides[int(key)] = ov
        else:
            errors.append(f"model.layer_overrides key '{key}' is not a layer index; use integers such as 0 or 5.")
    cfg.layer_overrides = overrides
    a, m = cfg.attention, cfg.moe

    for path, value in (("model.d_model", cfg.d_model), ("model.n_layers", cfg.n_layers),
                        ("model.vocab_size", cfg.vocab_size), ("model.max_seq_len", cfg.max_seq_len),
                        ("model.attention.n_heads", a.n_heads)):
        if value <= 0:
            errors.append(f"{path} must be a positive integer, got {value}.")
    if a.n_kv_heads is None:
        a.n_kv_heads = a.n_heads
    if a.head_dim is None and a.n_heads > 0:
        if cfg.d_model % a.n_heads:
            errors.append(
                f"model.d_model ({cfg.d_model}) is not divisible by model.attention.n_heads ({a.n_heads}); "
                "set model.attention.head_dim explicitly or change the head count."
            )
        a.head_dim = cfg.d_model // a.n_heads
    if a.n_kv_heads <= 0:
        errors.append(f"model.attention.n_kv_heads must be a positive integer, got {a.n_kv_heads}.")
    elif a.n_heads > 0 and a.n_heads % a.n_kv_heads:
        errors.append(
            f"model.attention.n_heads ({a.n_heads}) is not divisible by model.attention.n_kv_heads "
            f"({a.n_kv_heads}); every KV head must serve the same number of query heads."
        )
    if a.head_dim is not None and (a.head_dim <= 0 or a.head_dim % 2):
        errors.append(f"model.attention.head_dim must be a positive even integer for RoPE, got {a.head_dim}.")
    if a.query_pre_attn_scalar is not None and a.query_pre_attn_scalar <= 0:
        errors.append(f"model.attention.query_pre_attn_scalar must be positive, got {a.query_pre_attn_scalar}.")
    for path, cap in (("model.attention.softcap", a.softcap), ("model.final_softcap", cfg.final_softcap)):
        if cap is not None and cap <= 0:
            errors.append(f"{path} must be positive or null (off), got {cap}.")
    _check_key(errors, ATTENTION, a.kind, "model.attention.kind")
    _check_choice(errors, a.impl, ATTENTION_IMPLS, "model.attention.impl")
    _check_key(errors, NORM, cfg.norm.kind, "model.norm.kind")
    if cfg.norm.eps <= 0:
        errors.append(f"model.norm.eps must be positive, got {cfg.norm.eps}.")
    _check_choice(errors, cfg.norm_placement, NORM_PLACEMENTS, "model.norm_placement")
    if cfg.fused_ce_chunk < 0:
        errors.append(f"model.fused_ce_chunk must be >= 0 (0 = off), got {cfg.fused_ce_chunk}.")
    if cfg.fused_ce_compile and cfg.fused_ce_chunk <= 0:
        errors.append("model.fused_ce_compile compiles the fused cross-entropy, which is off; "
                      "set model.fused_ce_chunk > 0 (e.g. 4096) or model.fused_ce_compile=false.")
    if cfg.init_std <= 0:
        errors.append(f"model.init_std must be positive, got {cfg.init_std}.")

    # layer kinds and pattern
    if not cfg.layer_pattern:
        errors.append("model.layer_pattern is empty; give at least one key of model.layer_kinds.")
    for j, kind in enumerate(cfg.layer_pattern):
        if kind not in cfg.layer_kinds:
            errors.append(
                f"model.layer_pattern[{j}] = '{kind}' names no entry of model.layer_kinds"
                f"{nearest(kind, cfg.layer_kinds)}; define it there or use one of {', '.join(cfg.layer_kinds)}."
            )
    for name, lk in cfg.layer_kinds.items():
        if lk.window is not None and lk.window <= 0:
            errors.append(f"model.layer_kinds.{name}.window must be a positive number of tokens or null (global), got {lk.window}.")
        _check_choice(errors, lk.rope.scaling, ROPE_SCALINGS, f"model.layer_kinds.{name}.rope.scaling")
        if lk.rope.theta <= 0:
            errors.append(f"model.layer_kinds.{name}.rope.theta must be positive, got {lk.rope.theta}.")
        if lk.rope.factor <= 0:
            errors.append(f"model.layer_kinds.{name}.rope.factor must be positive, got {lk.rope.factor}.")
    for i, ov in cfg.layer_overrides.items():
        if not 0 <= i < max(cfg.n_layers, 0):
            errors.append(f"model.layer_overrides has layer {i}, outside 0..{cfg.n_layers - 1}.")
        if ov.kind is not None and ov.kind not in cfg.layer_kinds:
            errors.append(
                f"model.layer_overrides.{i}.kind = '{ov.kind}' names no entry of model.layer_kinds"
                f"{nearest(ov.kind, cfg.layer_kinds)}."
            )
        if ov.moe and m.n_experts <= 0:
            errors.append(f"model.layer_overrides.{i}.moe is true but model.moe.n_experts is 0.")

    # FFNs
    n_dense = sum(not is_moe_layer(cfg, i) for i in range(max(cfg.n_layers, 0)))
    _check_key(errors, FFN, cfg.ffn.kind, "model.ffn.kind")
    if n_dense and (cfg.ffn.d_ff is None or cfg.ffn.d_ff <= 0):
        errors.append(f"model.ffn.d_ff must be a positive integer ({n_dense} layers are dense), got {cfg.ffn.d_ff}.")
    if m.n_experts < 0:
        errors.append(f"model.moe.n_experts must be >= 0 (0 = no MoE), got {m.n_experts}.")
    if m.n_experts > 0:
        if not 1 <= m.top_k <= m.n_experts:
            errors.append(
                f"model.moe.top_k ({m.top_k}) must be between 1 and model.moe.n_experts ({m.n_experts})."
            )
        if m.d_expert <= 0:
            errors.append(f"model.moe.d_expert must be a positive integer, got {m.d_expert}.")
        if m.every < 1:
            errors.append(f"model.moe.every must be >= 1, got {m.every}.")
        if m.first_k_dense < 0:
            errors.append(f"model.moe.first_k_dense must be >= 0, got {m.first_k_dense}.")
        if m.n_shared_experts < 0:
            errors.append(f"model.moe.n_shared_experts must be >= 0, got {m.n_shared_experts}.")
        if m.d_shared is None:
            m.d_shared = m.d_expert
        elif m.d_shared <= 0:
            errors.append(f"model.moe.d_shared must be positive or null (= d_expert), got {m.d_shared}.")
        if m.capacity_factor is not None and m.capacity_factor <= 0:
            errors.append(f"model.moe.capacity_factor must be positive or null (dropless), got {m.capacity_factor}.")
        if m.router.jitter < 0 or m.router.bias_update_rate < 0:
            errors.append("model.moe.router.jitter and model.moe.router.bias_update_rate must be >= 0.")
        if m.balance.aux_coef < 0 or m.balance.z_coef < 0:
            errors.append("model.moe.balance.aux_coef and model.moe.balance.z_coef must be >= 0.")
        _check_key(errors, MOE, m.kind, "model.moe.kind")
        _check_key(errors, FFN, m.expert_ffn, "model.moe.expert_ffn")
        _check_key(errors, ROUTER, m.router.kind, "model.moe.router.kind")
        _check_key(errors, EXPERT_BACKEND, m.backend, "model.moe.backend")
        _check_choice(errors, m.balance.aux_scope, AUX_SCOPES, "model.moe.balance.aux_scope")
        if m.backend == "grouped_mm":  # its kernels need rows of a multiple of 16 bytes (8 bf16)
            for path, width in (("model.d_model", cfg.d_model), ("model.moe.d_expert", m.d_expert)):
                if width > 0 and width % 8:
                    errors.append(f"{path} ({width}) must be a multiple of 8 for model.moe.backend = "
                                  "'grouped_mm' (16-byte rows in bf16); round it or use the 'loop' backend.")
    elif m.d_shared is None:
        m.d_shared = m.d_expert

    if errors:
        raise RecipeError("\n".join(errors))
    return cfg
