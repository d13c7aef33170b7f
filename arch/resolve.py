"""Derive and validate at config time, before any tensor exists.

`resolve_model` fills derived fields (kv heads, head_dim) on a copy and checks every
constraint: each number on its own against arch/ranges.py's table (finite, in its
field's range, sizes capped), then the rules between fields here; `layer_specs` turns
pattern + overrides + MoE placement into one `LayerSpec` per layer. All problems are
gathered and raised together as one RecipeError, a sentence each, naming the full
key path.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

from .config import LayerSpec, ModelConfig
from .ffn import ACTIVATIONS
from .ranges import check_numbers
from .registry import ATTENTION, EXPERT_BACKEND, FFN, MOE, NORM, ROUTER, RecipeError, choice_error, nearest

NORM_PLACEMENTS = ("pre", "sandwich", "post")
ROPE_SCALINGS = ("none", "linear", "yarn")
AUX_SCOPES = ("micro", "pooled", "global")
ATTENTION_IMPLS = ("auto", "sdpa", "flex", "eager")
QK_NORM_SCOPES = ("head", "all_heads")


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    m = cfg.moe
    if m.n_experts <= 0:
        return False
    override = cfg.layer_overrides.get(i)
    if override is not None and override.moe is not None:
        return override.moe
    return i >= m.first_k_dense and (i - m.first_k_dense) % m.every == 0


def layer_kind_names(cfg: ModelConfig) -> List[str]:
    """The kind of each layer: the pattern cycled, then the overrides."""
    kinds = []
    for i in range(cfg.n_layers):
        kind = cfg.layer_pattern[i % len(cfg.layer_pattern)]
        override = cfg.layer_overrides.get(i)
        kinds.append(override.kind if override is not None and override.kind is not None else kind)
    return kinds


def kv_sources(cfg: ModelConfig, kinds: List[str]) -> List[Optional[int]]:
    """Per layer, the layer whose keys and values it attends over when it computes none
    (model.kv_shared_layers): the last earlier layer of its kind that computes its own;
    None for a layer with its own (or, for a refused recipe, with no such layer)."""
    first = cfg.n_layers - cfg.kv_shared_layers
    last_own: Dict[str, int] = {}
    out: List[Optional[int]] = []
    for i, kind in enumerate(kinds):
        if i < first:
            last_own[kind] = i
            out.append(None)
        else:
            out.append(last_own.get(kind))
    return out


def layer_specs(cfg: ModelConfig) -> List[LayerSpec]:
    kinds = layer_kind_names(cfg)
    sources = kv_sources(cfg, kinds) if cfg.kv_shared_layers else [None] * cfg.n_layers
    stored = {s for s in sources if s is not None}
    first_shared = cfg.n_layers - cfg.kv_shared_layers
    a, specs = cfg.attention, []
    for i, kind in enumerate(kinds):
        lk = cfg.layer_kinds[kind]
        d_ff = cfg.ffn.d_ff * (cfg.kv_shared_ffn_mult if i >= first_shared else 1)
        specs.append(LayerSpec(i, kind, lk.window, lk.rope, is_moe_layer(cfg, i),
                               attention=lk.attention or a.kind,
                               head_dim=lk.head_dim or a.head_dim, n_kv_heads=lk.n_kv_heads or a.n_kv_heads,
                               k_eq_v=lk.k_eq_v, kv_source=sources[i], kv_store=i in stored, d_ff=d_ff))
    return specs


def _check_key(errors: List[str], registry, key: str, path: str) -> None:
    if key not in registry:
        errors.append(
            f"{path} = '{key}' is not a registered {registry.name}{nearest(key, registry.keys())}; "
            f"choose one of {', '.join(registry.keys())}."
        )


def _check_choice(errors: List[str], value, choices, path: str) -> None:
    if value not in choices:
        errors.append(choice_error(path, value, choices))


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Return a validated copy of `cfg` with derived fields filled in. Every number on
    its own first (arch/ranges.py); then the rules between fields, each of which runs
    only when its fields passed, so a field refused there is not reported twice."""
    cfg = copy.deepcopy(cfg)
    bad = check_numbers(cfg, "model")
    errors: List[str] = list(bad.values())

    def sane(*paths: str) -> bool:
        return not any(p in bad for p in paths)

    _layer_override_keys(cfg, errors)
    _attention(cfg, errors, sane)
    _layers(cfg, errors, sane)
    _ffn_and_experts(cfg, errors, sane)
    _per_layer_fields(cfg, errors, sane)
    if errors:
        raise RecipeError("\n".join(errors))
    return cfg


def _layer_override_keys(cfg: ModelConfig, errors: List[str]) -> None:
    """YAML may give layer_overrides keys as strings: keep them as layer indices."""
    overrides = {}
    for key, ov in cfg.layer_overrides.items():
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            overrides[int(key)] = ov
        else:
            errors.append(f"model.layer_overrides key '{key}' is not a layer index; use integers such as 0 or 5.")
    cfg.layer_overrides = overrides


def _attention(cfg: ModelConfig, errors: List[str], sane) -> None:
    """Derive n_kv_heads and head_dim; check heads against KV heads, RoPE's even head
    size, the registry keys of attention and norm, and the fused cross-entropy."""
    a = cfg.attention
    if a.kind == "mla":
        missing = [f for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
                   if getattr(a, f) is None]
        if missing:
            errors.append(f"model.attention.kind = 'mla' needs model.attention.{missing[0]} (and "
                          f"{', '.join(missing[1:]) or 'nothing else'}); give the latent and per-head widths.")
        elif sane("model.attention.qk_nope_head_dim", "model.attention.qk_rope_head_dim"):
            a.head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim  # the query/key width, for the scale
            if a.qk_rope_head_dim % 2:
                errors.append(f"model.attention.qk_rope_head_dim must be even for RoPE, got {a.qk_rope_head_dim}.")
        if a.n_kv_heads not in (None, a.n_heads):
            errors.append(f"model.attention.n_kv_heads ({a.n_kv_heads}) must equal n_heads ({a.n_heads}) or be "
                          "null with MLA: every head expands its own key and value from the shared latent.")
        a.n_kv_heads = a.n_heads
    if a.n_kv_heads is None:
        a.n_kv_heads = a.n_heads
    if a.head_dim is None and sane("model.d_model", "model.attention.n_heads"):
        if cfg.d_model % a.n_heads:
            errors.append(
                f"model.d_model ({cfg.d_model}) is not divisible by model.attention.n_heads ({a.n_heads}); "
                "set model.attention.head_dim explicitly or change the head count."
            )
        a.head_dim = cfg.d_model // a.n_heads
    if sane("model.attention.n_heads", "model.attention.n_kv_heads") and a.n_heads % a.n_kv_heads:
        errors.append(
            f"model.attention.n_heads ({a.n_heads}) is not divisible by model.attention.n_kv_heads "
            f"({a.n_kv_heads}); every KV head must serve the same number of query heads."
        )
    if sane("model.attention.head_dim") and a.head_dim is not None and (a.head_dim <= 0 or a.head_dim % 2):
        errors.append(f"model.attention.head_dim must be a positive even integer for RoPE, got {a.head_dim}.")
    _check_key(errors, ATTENTION, a.kind, "model.attention.kind")
    _linear_attention(cfg, errors, sane)
    _check_choice(errors, a.impl, ATTENTION_IMPLS, "model.attention.impl")
    if a.sinks and a.impl == "sdpa":  # SDPA has no softmax term without a key (arch/attention.py _impl)
        errors.append("model.attention.impl = 'sdpa' cannot add attention sinks; use impl 'auto', 'flex' or "
                      "'eager' with model.attention.sinks.")
    _check_choice(errors, a.qk_norm_scope, QK_NORM_SCOPES, "model.attention.qk_norm_scope")
    _check_key(errors, NORM, cfg.norm.kind, "model.norm.kind")
    _check_choice(errors, cfg.norm_placement, NORM_PLACEMENTS, "model.norm_placement")
    if cfg.fused_ce_compile and sane("model.fused_ce_chunk") and cfg.fused_ce_chunk == 0:
        errors.append("model.fused_ce_compile compiles the fused cross-entropy, which is off; "
                      "set model.fused_ce_chunk > 0 (e.g. 4096) or model.fused_ce_compile=false.")


LINEAR_BACKENDS = ("auto", "torch", "fla")


def _linear_attention(cfg: ModelConfig, errors: List[str], sane) -> None:
    """Per-kind attention keys are registered; gated DeltaNet's value heads come in
    whole groups per key head, and a gated output needs the plain gqa layout."""
    for name, lk in cfg.layer_kinds.items():
        if lk.attention is not None:
            _check_key(errors, ATTENTION, lk.attention, f"model.layer_kinds.{name}.attention")
    a, lin = cfg.attention, cfg.attention.linear
    _check_choice(errors, lin.backend, LINEAR_BACKENDS, "model.attention.linear.backend")
    if sane("model.attention.linear.n_k_heads", "model.attention.linear.n_v_heads") and lin.n_v_heads % lin.n_k_heads:
        errors.append(f"model.attention.linear.n_v_heads ({lin.n_v_heads}) is not divisible by n_k_heads "
                      f"({lin.n_k_heads}); every key head must serve the same number of value heads.")
    if a.output_gate and a.kind != "gqa":
        errors.append(f"model.attention.output_gate is built for kind 'gqa', not '{a.kind}'; turn it off or use gqa.")


def _layers(cfg: ModelConfig, errors: List[str], sane) -> None:
    """The layer pattern and the per-layer overrides name defined kinds and layers."""
    if not cfg.layer_pattern:
        errors.append("model.layer_pattern is empty; give at least one key of model.layer_kinds.")
    for j, kind in enumerate(cfg.layer_pattern):
        if kind not in cfg.layer_kinds:
            errors.append(
                f"model.layer_pattern[{j}] = '{kind}' names no entry of model.layer_kinds"
                f"{nearest(kind, cfg.layer_kinds)}; define it there or use one of {', '.join(cfg.layer_kinds)}."
            )
    for name, lk in cfg.layer_kinds.items():
        rope, where = lk.rope, f"model.layer_kinds.{name}.rope"
        _check_choice(errors, rope.scaling, ROPE_SCALINGS, f"{where}.scaling")
        if rope.scaling == "yarn" and rope.original_max_seq_len is None and sane("model.max_seq_len"):
            rope.original_max_seq_len = cfg.max_seq_len  # as transformers fills it
        hd = lk.head_dim or cfg.attention.head_dim
        if rope.proportional:  # pairs (i, i + hd/2) rotate, for the first partial x hd / 2 of i
            if sane(f"{where}.partial") and hd and int(rope.partial * hd // 2) < 1:
                errors.append(f"{where}.partial = {rope.partial} rotates no pair of head_dim {hd} with "
                              "proportional RoPE; raise it to at least 2 / head_dim.")
            if rope.scaling == "yarn":
                errors.append(f"{where}.proportional takes scaling 'none' or 'linear', not 'yarn'; "
                              "transformers' proportional RoPE has no YaRN ramp.")
            continue
        rotated = int(hd * rope.partial) if rope.partial != 1.0 and sane(f"{where}.partial") and hd else 2
        if rotated < 2 or rotated % 2:
            errors.append(f"{where}.partial = {rope.partial} rotates {rotated} of head_dim {hd} "
                          "dimensions; RoPE needs a positive even number of them.")
    for i, ov in cfg.layer_overrides.items():
        if sane("model.n_layers") and not 0 <= i < cfg.n_layers:
            errors.append(f"model.layer_overrides has layer {i}, outside 0..{cfg.n_layers - 1}.")
        if ov.kind is not None and ov.kind not in cfg.layer_kinds:
            errors.append(
                f"model.layer_overrides.{i}.kind = '{ov.kind}' names no entry of model.layer_kinds"
                f"{nearest(ov.kind, cfg.layer_kinds)}."
            )
        if ov.moe and cfg.moe.n_experts <= 0:
            errors.append(f"model.layer_overrides.{i}.moe is true but model.moe.n_experts is 0.")


def _ffn_and_experts(cfg: ModelConfig, errors: List[str], sane) -> None:
    """The dense FFN where some layer is dense; top-k, widths and registry keys of the
    experts; d_shared derived (null = d_expert)."""
    m = cfg.moe
    # the layer loop only once its length and spacing are known to be sane
    sized = sane("model.n_layers", "model.moe.n_experts", "model.moe.every", "model.moe.first_k_dense")
    n_dense = sum(not is_moe_layer(cfg, i) or m.kind == "parallel_dense" for i in range(cfg.n_layers)) if sized else 0
    _check_key(errors, FFN, cfg.ffn.kind, "model.ffn.kind")
    if n_dense and sane("model.ffn.d_ff") and not cfg.ffn.d_ff:
        errors.append(f"model.ffn.d_ff must be a positive integer ({n_dense} layers run the dense FFN"
                      f"{', beside their experts (moe.kind parallel_dense)' if m.kind == 'parallel_dense' else ''}), "
                      f"got {cfg.ffn.d_ff}.")
    if m.n_experts <= 0:
        if m.d_shared is None:
            m.d_shared = m.d_expert
        return
    if sane("model.moe.top_k", "model.moe.n_experts") and m.top_k > m.n_experts:
        errors.append(f"model.moe.top_k ({m.top_k}) must be between 1 and model.moe.n_experts ({m.n_experts}).")
    if m.d_expert == 0:
        errors.append("model.moe.d_expert must be a positive integer when model.moe.n_experts > 0, got 0.")
    if m.d_shared is None:
        m.d_shared = m.d_expert
    elif m.d_shared == 0:
        errors.append("model.moe.d_shared must be a positive integer or null (= d_expert) when "
                      "model.moe.n_experts > 0, got 0.")
    _check_key(errors, MOE, m.kind, "model.moe.kind")
    _check_key(errors, FFN, m.expert_ffn, "model.moe.expert_ffn")
    _check_key(errors, ROUTER, m.router.kind, "model.moe.router.kind")
    _check_key(errors, EXPERT_BACKEND, m.backend, "model.moe.backend")
    _check_choice(errors, m.balance.aux_scope, AUX_SCOPES, "model.moe.balance.aux_scope")
    _check_choice(errors, m.balance.global_counts, ("exact", "running"), "model.moe.balance.global_counts")
    r = m.router
    # n_group 1 is no grouping; topk_group must then be 1 too (transformers' DeepSeek-V3
    # indexes groups with it and fails)
    if sane("model.moe.router.n_group", "model.moe.router.topk_group", "model.moe.n_experts", "model.moe.top_k"):
        if m.n_experts % r.n_group:
            errors.append(f"model.moe.router.n_group ({r.n_group}) must divide model.moe.n_experts ({m.n_experts}).")
        elif r.topk_group > r.n_group or (r.n_group > 1 and r.topk_group * (m.n_experts // r.n_group) < m.top_k):
            errors.append(f"model.moe.router.topk_group ({r.topk_group}) must be at most n_group ({r.n_group}) and "
                          f"leave at least top_k ({m.top_k}) experts: topk_group x n_experts / n_group >= top_k.")
    backend = EXPERT_BACKEND.get(m.backend) if m.backend in EXPERT_BACKEND else None
    # a backend may refuse a recipe it cannot compute (triton: an expert FFN without a
    # fused kernel); where it runs (device, triton installed) is checked at setup
    problem = getattr(backend, "unsupported_kind", lambda kind: None)(m.expert_ffn)
    if problem and m.expert_ffn in FFN:
        errors.append(problem)
    if m.backend == "grouped_mm":  # its kernels need rows of a multiple of 16 bytes (8 bf16)
        for path, width in (("model.d_model", cfg.d_model), ("model.moe.d_expert", m.d_expert)):
            if sane(path) and width > 0 and width % 8:
                errors.append(f"{path} ({width}) must be a multiple of 8 for model.moe.backend = "
                              "'grouped_mm' (16-byte rows in bf16); round it or use the 'loop' backend.")


def _per_layer_fields(cfg: ModelConfig, errors: List[str], sane) -> None:
    """Per-kind head widths and KV heads, keys equal to values, KV sharing across
    layers, per-layer inputs: each on its own is free, these combinations are not."""
    a = cfg.attention
    mla = a.kind == "mla"
    for name, lk in cfg.layer_kinds.items():
        where = f"model.layer_kinds.{name}"
        if mla and (lk.head_dim is not None or lk.n_kv_heads is not None or lk.k_eq_v):
            errors.append(f"{where} sets head_dim, n_kv_heads or k_eq_v, which MLA attention does not take; "
                          "leave them null/false with model.attention.kind = 'mla'.")
            continue
        if (lk.attention or a.kind) == "gated_deltanet" and (lk.head_dim is not None or lk.n_kv_heads is not None
                                                              or lk.k_eq_v):
            errors.append(f"{where} sets head_dim, n_kv_heads or k_eq_v, which its gated DeltaNet layers do not "
                          "take (model.attention.linear sizes them); leave them null/false.")
            continue
        if lk.head_dim is not None and sane(f"{where}.head_dim") and lk.head_dim % 2:
            errors.append(f"{where}.head_dim must be even for RoPE, got {lk.head_dim}.")
        kv = lk.n_kv_heads
        if kv is not None and sane(f"{where}.n_kv_heads", "model.attention.n_heads") and a.n_heads % kv:
            errors.append(f"{where}.n_kv_heads ({kv}) does not divide model.attention.n_heads ({a.n_heads}); "
                          "every KV head must serve the same number of query heads.")
    if mla and a.v_norm:
        errors.append("model.attention.v_norm normalises value heads, which MLA attention does not have; "
                      "set it to false with model.attention.kind = 'mla'.")
    n, shared = cfg.n_layers, cfg.kv_shared_layers
    if not sane("model.n_layers", "model.kv_shared_layers", "model.kv_shared_ffn_mult"):
        return
    if shared and mla:
        errors.append("model.kv_shared_layers needs model.attention.kind = 'gqa'; MLA layers cannot share "
                      "keys and values yet.")
    elif shared >= n:
        errors.append(f"model.kv_shared_layers ({shared}) must be below model.n_layers ({n}): at least the first "
                      "layer computes the keys and values the others reuse.")
    elif shared and all(k in cfg.layer_kinds for k in cfg.layer_pattern):
        kinds = layer_kind_names(cfg)
        linear = [k for k in dict.fromkeys(kinds[n - shared:]) if k in cfg.layer_kinds
                  and (cfg.layer_kinds[k].attention or a.kind) == "gated_deltanet"]
        if linear:
            errors.append(f"model.kv_shared_layers ({shared}) covers layers of kind '{linear[0]}', gated DeltaNet "
                          "layers with no keys and values to share; share only the last attention layers.")
        else:
            for i, src in enumerate(kv_sources(cfg, kinds)):
                if i >= n - shared and src is None:
                    errors.append(f"layer {i} (kind '{kinds[i]}') shares keys and values (model.kv_shared_layers = "
                                  f"{shared}) but no layer before {n - shared} is of its kind; share fewer layers.")
                    break
    if cfg.kv_shared_ffn_mult != 1 and not shared:
        errors.append(f"model.kv_shared_ffn_mult = {cfg.kv_shared_ffn_mult} widens the FFN of the KV-sharing "
                      "layers, but model.kv_shared_layers is 0; set it to 1 or share layers.")
    if cfg.per_layer_input.dim and cfg.ffn.kind not in ACTIVATIONS:
        errors.append(f"model.per_layer_input gates its input with model.ffn.kind's activation, and "
                      f"'{cfg.ffn.kind}' has none of its own; use an ffn kind of {', '.join(ACTIVATIONS)}, or set "
                      f"model.per_layer_input.dim=0.")
    if cfg.mtp.depth and (shared or cfg.per_layer_input.dim):
        errors.append("model.mtp.depth > 0 cannot go with model.kv_shared_layers or model.per_layer_input "
                      "(an MTP block has no per-layer input and no earlier layer to share with); turn one off.")
