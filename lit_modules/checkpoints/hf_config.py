"""Hugging Face configs <-> moelab model configs, both ways, for every architecture the
conversion knows (hf.py moves the tensors; this module decides what the model is).

    import   config.json ──(transformers' config class: HF defaults, legacy fields)──>
             model_config_from_hf: every field honoured, or one sentence naming it
    export   ModelConfig ──export_family / hf_config_kwargs──> transformers config
             ──mapped back and compared (`signature`)──> nothing is dropped silently

It also holds what both halves share: the architecture names, ConvertError and the
family modules (FAMILY_MODULES: Qwen3-Next / Qwen3.5-MoE and Gemma 4), each of which
takes over the steps of its own architectures in either file.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from arch.config import (
    AttentionConfig, BalanceConfig, FFNConfig, LayerKindConfig, LayerOverride, ModelConfig,
    MoEConfig, NormConfig, Recipe, RopeConfig, RouterConfig,
)
from arch.recipe import resolve_recipe
from arch.registry import RecipeError
from arch.resolve import layer_specs

QWEN3, QWEN3_MOE, GEMMA3, GEMMA3_MM = (
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
MIXTRAL, OLMOE, GPT_OSS = "MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
SUPPORTED = (QWEN3, QWEN3_MOE, MIXTRAL, OLMOE, GPT_OSS, DEEPSEEK_V3, GEMMA3, GEMMA3_MM)
MOE_ARCHS = (QWEN3_MOE, MIXTRAL, OLMOE, GPT_OSS, DEEPSEEK_V3)
_BY_MODEL_TYPE = {"qwen3": QWEN3, "qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL, "olmoe": OLMOE, "gpt_oss": GPT_OSS,
                  "deepseek_v3": DEEPSEEK_V3,
                  "gemma3_text": GEMMA3, "gemma3": GEMMA3_MM}
SILU, GELU_TANH = "silu", "gelu_pytorch_tanh"

# families kept in modules of their own (hf_<family>.py), in FAMILY_HOOKS by architecture:
# each names its ARCHS, MODEL_TYPES and CONFIG_CLASSES (those it writes), may give its name
# RULES and BODY prefixes by architecture, and defines the steps it takes over from this
# file (text_config, model_config, ignorable, adapt_source, hf_to_ours, ours_to_hf,
# signature, export_family, config_kwargs, export_pairs, and for multi-token prediction
# mtp_part, mtp_hf_name, check_mtp); a step it leaves out runs the code of hf_config.py /
# hf.py. Loaded
# on first use, as arch/registry.py's plugins, so that a family module may import this one.
FAMILY_MODULES = ("lit_modules.checkpoints.hf_qwen3_next", "lit_modules.checkpoints.hf_gemma4")
FAMILY_HOOKS: Dict[str, object] = {}


def family_hooks() -> Dict[str, object]:
    if not FAMILY_HOOKS:
        for name in FAMILY_MODULES:
            module = importlib.import_module(name)
            FAMILY_HOOKS.update(dict.fromkeys(module.ARCHS, module))
    return FAMILY_HOOKS


def family_step(arch: str, step: str):
    """The family module's function for `step` on `arch`; None where moelab's common code runs."""
    return getattr(family_hooks().get(arch), step, None)


def moe_archs() -> Tuple[str, ...]:
    """The MoE classes with transformers' per-expert hub layout and pooled auxiliary loss,
    the families' (their MOE_ARCHS) included."""
    return MOE_ARCHS + tuple(a for h in dict.fromkeys(family_hooks().values()) for a in getattr(h, "MOE_ARCHS", ()))


class ConvertError(RecipeError):
    """A checkpoint or config that cannot be converted exactly; one sentence says why."""


# ------------------------------------------------------- import: config.json -> recipe


def read_hf_config(hf_dir) -> Tuple[str, object, object]:
    """(architecture, top-level config, text config) of a Hugging Face model directory,
    parsed by the installed transformers so its defaults and legacy fields apply."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json; give a Hugging Face model directory "
                           "(config.json + *.safetensors).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConvertError(f"{path} is not valid JSON ({one_line(e)}); repair it or download it again.") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; repair it "
                           "or download it again.")
    by_type = {**_BY_MODEL_TYPE, **{t: a for h in family_hooks().values() for t, a in h.MODEL_TYPES.items()}}
    archs = raw.get("architectures") or [by_type.get(raw.get("model_type"), f"model_type={raw.get('model_type')}")]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConvertError(f"{path} field architectures = {archs!r} is not a list of class names such as "
                           f"[\"{QWEN3}\"]; repair it.")
    arch = archs[0]
    if arch not in SUPPORTED and arch not in family_hooks():
        raise ConvertError(f"{path} declares architecture {arch}; moelab converts only "
                           f"{', '.join(SUPPORTED + tuple(family_hooks()))} (multimodal ones: their text model).")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers' own validation (strict dataclasses)
        raise ConvertError(f"transformers rejects {path}: {one_line(e)}") from None
    own = family_step(arch, "text_config")
    text = own(arch, cfg) if own is not None else cfg.get_text_config() if arch == GEMMA3_MM else cfg
    return arch, cfg, text


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (transformers' validation errors span two)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


# fields that set tensor shapes (with the other names transformers reads them under);
# when one is left out, transformers' default stands in
SIZE_FIELDS = (("vocab_size",), ("hidden_size",), ("intermediate_size",), ("num_hidden_layers",),
               ("num_attention_heads",), ("num_key_value_heads",), ("head_dim",))


MOE_SIZE_FIELDS = {QWEN3_MOE: (("num_experts", "num_local_experts"), ("moe_intermediate_size",)),
                   MIXTRAL: (("num_local_experts",),), OLMOE: (("num_experts",),),
                   GPT_OSS: (("num_local_experts",),), DEEPSEEK_V3: (("n_routed_experts",), ("moe_intermediate_size",))}


def unset_size_fields(hf_dir, arch: str) -> List[str]:
    """The size fields that config.json does not set (for the mismatch message)."""
    try:
        raw = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
        raw = raw.get("text_config", {}) if arch == GEMMA3_MM or "text_config" in raw else raw
        fields = SIZE_FIELDS + MOE_SIZE_FIELDS.get(arch, ())
        return [names[0] for names in fields if not any(n in raw for n in names)]
    except (ValueError, OSError, AttributeError):
        return []


def cannot(arch: str, field: str, value, why: str) -> ConvertError:
    return ConvertError(f"{arch} config field {field} = {value!r} cannot be honoured: {why}.")


def _rope(arch: str, params: Optional[dict], field: str, partial: float = 1.0) -> RopeConfig:
    """`partial`: the config's top-level partial_rotary_factor, where a model keeps it there."""
    params = dict(params or {})
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ("default", "linear", "yarn"):
        raise cannot(arch, f"{field}.rope_type", rtype, "moelab implements plain RoPE, linear scaling "
                      "(positional interpolation) and YaRN; drop the scaling or add that RoPE type to arch/rope.py")
    if params.get("rope_theta") is None:
        raise cannot(arch, f"{field}.rope_theta", None, "a RoPE base is required")
    rope = RopeConfig(theta=float(params["rope_theta"]),
                      partial=float(params.get("partial_rotary_factor") or partial or 1.0))
    if rtype == "linear":
        rope.scaling, rope.factor = "linear", float(params["factor"])
    elif rtype == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise cannot(arch, f"{field}.{key}", None, "moelab's YaRN needs it given")
        rope.scaling, rope.factor = "yarn", float(params["factor"])
        rope.original_max_seq_len = int(params["original_max_position_embeddings"])
        # transformers reads `x or default`, so 0 and None both mean the default
        rope.beta_fast, rope.beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)
        rope.mscale, rope.mscale_all_dim = _opt_float(params.get("mscale")), _opt_float(params.get("mscale_all_dim"))
        rope.attention_factor = _opt_float(params.get("attention_factor"))
        rope.truncate = bool(params.get("truncate", True))
    return rope


def layer_ropes(arch: str, text, layer_types: List[str]) -> List[RopeConfig]:
    """One RopeConfig per layer: transformers 5 keeps one dict, or one per layer type."""
    rp = getattr(text, "rope_parameters", None) or {}
    partial = getattr(text, "partial_rotary_factor", None) or 1.0
    if any(t in rp for t in ("full_attention", "sliding_attention")):
        missing = sorted(set(layer_types) - set(rp))
        if missing:
            raise cannot(arch, "rope_parameters", rp, f"it has no entry for layer type {missing[0]}")
        ropes = {t: _rope(arch, rp[t], f"rope_parameters.{t}", partial) for t in set(layer_types)}
        for r in ropes.values():  # transformers reads YaRN's truncate from the outer dict
            r.truncate = bool(rp.get("truncate", True))
        return [ropes[t] for t in layer_types]
    rope = _rope(arch, rp, "rope_parameters", partial)
    return [rope] * len(layer_types)


def _pattern(per_layer: List[Tuple[Optional[int], RopeConfig]]):
    """Name each distinct (window, rope) pair and find the shortest cycle of names."""
    kinds: Dict[Tuple, str] = {}
    layer_kinds: Dict[str, LayerKindConfig] = {}
    for window, rope in per_layer:
        key = (window, repr(rope))  # RopeConfig is a dataclass: equal fields, equal repr
        if key not in kinds:
            base = "global" if window is None else "local"
            taken = sum(name.split("_")[0] == base for name in kinds.values())
            kinds[key] = base if taken == 0 else f"{base}_{taken}"
            layer_kinds[kinds[key]] = LayerKindConfig(window=window, rope=rope)
    names = [kinds[(w, repr(r))] for w, r in per_layer]
    n = len(names)
    period = next(p for p in range(1, n + 1) if all(names[i] == names[i % p] for i in range(n)))
    return layer_kinds, names[:period]


def model_config_from_hf(arch: str, text) -> ModelConfig:
    """Map a transformers text config onto a moelab ModelConfig, field by field.

    Fields that only concern HF's runtime (use_cache, pad/bos/eos ids, dtype,
    output_router_logits) are ignored: they do not change the function the weights
    compute. Everything else is either mapped or refused."""
    own = family_step(arch, "model_config")
    if own is not None:
        try:
            return own(arch, text)
        except RecipeError as e:  # a family module's refusal (hf_gemma4's own class) as a ConvertError
            raise ConvertError(str(e)) from None
    g = lambda name, default=None: getattr(text, name, default)  # noqa: E731
    n_layers, d = g("num_hidden_layers"), g("hidden_size")
    heads = g("num_attention_heads")
    kv = g("num_key_value_heads") or heads
    head_dim = g("head_dim") or d // heads
    if g("attention_dropout", 0.0):
        raise cannot(arch, "attention_dropout", g("attention_dropout"), "moelab models have no dropout")
    gemma = arch in (GEMMA3, GEMMA3_MM)

    if gemma:
        act_field, act = "hidden_activation", g("hidden_activation")
        if act != GELU_TANH:
            raise cannot(arch, act_field, act, f"Gemma 3's FFN is GeGLU with {GELU_TANH}, the only activation "
                          "moelab's geglu implements")
        if g("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 attention never passes it on (Gemma 2's does), so the
            # checkpoint has been run without it; honouring either reading would be a guess
            raise cannot(arch, "attn_logit_softcapping", g("attn_logit_softcapping"),
                          "transformers' Gemma 3 stores it but does not apply it, so what the checkpoint "
                          "computes is ambiguous; set it to null (every released Gemma 3 has null)")
        if g("use_bidirectional_attention"):
            raise cannot(arch, "use_bidirectional_attention", True, "moelab language models are causal")
        layer_types = list(g("layer_types"))
        window = g("sliding_window")
        norm = NormConfig(eps=float(g("rms_norm_eps")), zero_centered=True, weight_in_float32=True)
        attention = AttentionConfig(n_heads=heads, n_kv_heads=kv, head_dim=head_dim, qk_norm=True,
                                    bias=bool(g("attention_bias")),
                                    query_pre_attn_scalar=float(g("query_pre_attn_scalar")))
        ffn = FFNConfig(kind="geglu", d_ff=g("intermediate_size"))
        final_softcap = _opt_float(g("final_logit_softcapping"))
        placement, scale_emb = "sandwich", True
    else:
        if g("hidden_act") != SILU:
            raise cannot(arch, "hidden_act", g("hidden_act"), f"{arch}'s FFN and experts are SwiGLU (silu)")
        if arch == DEEPSEEK_V3:
            if kv != heads:
                raise cannot(arch, "num_key_value_heads", kv, f"multi-head latent attention expands a key and a "
                              f"value per head: it must equal num_attention_heads ({heads})")
            layer_types, window = ["full_attention"] * n_layers, None
        elif arch == GPT_OSS:
            quant = getattr(text, "quantization_config", None) or {}
            method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            if quant and method != "mxfp4":
                raise cannot(arch, "quantization_config.quant_method", method, "moelab dequantizes gpt-oss's MXFP4 "
                              "experts (exactly) and nothing else; give an unquantized or MXFP4 checkpoint")
            for field, want in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
                value = g(field)
                if value is None:
                    value = want  # older transformers (5.17) have neither field: their gpt-oss hard-codes both
                if value != want:
                    raise cannot(arch, field, g(field), f"moelab's swiglu_clamped has {field} {want} "
                                  "(every released gpt-oss)")
            layer_types = list(g("layer_types") or ["full_attention"] * n_layers)
            window = g("sliding_window")
        elif arch == MIXTRAL:  # a window, when set, applies to every layer
            window = g("sliding_window")
            layer_types = ["full_attention" if window is None else "sliding_attention"] * n_layers
        elif arch == OLMOE:
            if g("clip_qkv") is not None:
                raise cannot(arch, "clip_qkv", g("clip_qkv"), "moelab does not clamp q, k and v (no released "
                              "OLMoE does); set it to null")
            if head_dim != d // heads:  # transformers sizes OLMoE's q_norm by hidden_size
                raise cannot(arch, "head_dim", head_dim, f"OLMoE's QK-norm spans hidden_size ({d}) channels, "
                              f"so head_dim must be hidden_size / num_attention_heads = {d // heads}")
            layer_types, window = ["full_attention"] * n_layers, None
        elif arch == QWEN3_MOE:
            if g("use_sliding_window"):
                raise cannot(arch, "use_sliding_window", True, "no released Qwen3-MoE checkpoint uses a sliding "
                              "window and moelab does not map it; set it to false")
            layer_types, window = ["full_attention"] * n_layers, None
        else:
            layer_types = list(g("layer_types") or ["full_attention"] * n_layers)
            window = g("sliding_window")  # transformers sets it to None unless use_sliding_window
        # gpt-oss multiplies by the norm weight in float32, then casts
        norm = NormConfig(eps=float(g("rms_norm_eps")), weight_in_float32=arch == GPT_OSS)
        # Mixtral has neither QK-norm nor attention biases (it ignores an attention_bias
        # field); OLMoE normalises the whole q and k projections; gpt-oss has sinks
        attention = AttentionConfig(n_heads=heads, n_kv_heads=kv, head_dim=head_dim,
                                    qk_norm=arch not in (MIXTRAL, GPT_OSS),
                                    qk_norm_scope="all_heads" if arch == OLMOE else "head",
                                    bias=arch != MIXTRAL and bool(g("attention_bias")), sinks=arch == GPT_OSS)
        if arch == DEEPSEEK_V3:  # transformers' latent norms keep their default eps 1e-6
            attention = AttentionConfig(kind="mla", n_heads=heads, q_lora_rank=g("q_lora_rank"),
                                        kv_lora_rank=g("kv_lora_rank"), qk_nope_head_dim=g("qk_nope_head_dim"),
                                        qk_rope_head_dim=g("qk_rope_head_dim"), v_head_dim=g("v_head_dim"),
                                        rope_interleave=bool(g("rope_interleave")), bias=bool(g("attention_bias")),
                                        latent_norm_eps=1e-6)
        ffn = FFNConfig(kind="swiglu", d_ff=g("intermediate_size"))
        final_softcap, placement, scale_emb = None, "pre", False

    if len(layer_types) != n_layers:
        raise cannot(arch, "layer_types", layer_types, f"it has {len(layer_types)} entries for {n_layers} layers")
    for t in set(layer_types) - {"full_attention", "sliding_attention"}:
        raise cannot(arch, "layer_types", t, "moelab maps full_attention and sliding_attention layers only")
    ropes = layer_ropes(arch, text, layer_types)
    for r in ropes:
        if r.partial != 1.0:
            raise cannot(arch, "partial_rotary_factor", r.partial, f"transformers' {arch} rotates the whole "
                          "head_dim")
    per_layer = [(window if t == "sliding_attention" else None, r) for t, r in zip(layer_types, ropes)]
    layer_kinds, pattern = _pattern(per_layer)

    moe, overrides = MoEConfig(), {}
    if arch == QWEN3_MOE and g("num_experts", 0) > 0:
        step = g("decoder_sparse_step", 1)
        if step < 1:
            raise cannot(arch, "decoder_sparse_step", step, "it must be >= 1")
        # HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0
        moe = MoEConfig(
            n_experts=g("num_experts"), top_k=g("num_experts_per_tok"), d_expert=g("moe_intermediate_size"),
            expert_ffn="swiglu", router=RouterConfig(kind="softmax_topk", renormalize=bool(g("norm_topk_prob"))),
            # HF Qwen3-MoE's loss: Switch loss pooled over all layers, times router_aux_loss_coef
            balance=BalanceConfig(aux_coef=float(g("router_aux_loss_coef", 0.0)), aux_scope="pooled"),
            every=step, first_k_dense=step - 1,
        )
        overrides = {i: LayerOverride(moe=False) for i in (g("mlp_only_layers") or []) if 0 <= i < n_layers}
    elif arch == DEEPSEEK_V3 and g("n_routed_experts"):
        # sigmoid scores, group-limited top-k with the correction bias (imported into
        # router.expert_bias), renormalised and scaled; one shared FFN of n x the width
        moe = MoEConfig(
            n_experts=g("n_routed_experts"), top_k=g("num_experts_per_tok"), d_expert=g("moe_intermediate_size"),
            expert_ffn="swiglu", n_shared_experts=g("n_shared_experts") or 0, d_shared=g("moe_intermediate_size"),
            router=RouterConfig(kind="sigmoid_topk", renormalize=bool(g("norm_topk_prob")),
                                scale=float(g("routed_scaling_factor")), n_group=g("n_group") or 1,
                                topk_group=g("topk_group") or 1),
            first_k_dense=g("first_k_dense_replace") or 0,
        )
    elif arch == GPT_OSS:  # every layer MoE: biased clamped-SwiGLU experts, top-k then softmax
        moe = MoEConfig(
            n_experts=g("num_local_experts"), top_k=g("num_experts_per_tok"), d_expert=g("intermediate_size"),
            expert_ffn="swiglu_clamped", expert_bias=True,
            router=RouterConfig(kind="topk_softmax", renormalize=False, bias=True),
            balance=BalanceConfig(aux_coef=float(g("router_aux_loss_coef", 0.0)), aux_scope="pooled"),
        )
    elif arch in (MIXTRAL, OLMOE):  # every layer MoE, experts as wide as intermediate_size
        if g("router_jitter_noise", 0.0):
            raise cannot(arch, "router_jitter_noise", g("router_jitter_noise"), "transformers' Mixtral jitters "
                          "the experts' input too, moelab's router.jitter the router's only; set it to 0.0 "
                          "(released Mixtral has 0.0)")
        moe = MoEConfig(
            n_experts=g("num_local_experts") if arch == MIXTRAL else g("num_experts"),
            top_k=g("num_experts_per_tok"), d_expert=g("intermediate_size"), expert_ffn="swiglu",
            # Mixtral always renormalises the top-k weights; OLMoE as norm_topk_prob says
            router=RouterConfig(kind="softmax_topk", renormalize=arch == MIXTRAL or bool(g("norm_topk_prob"))),
            balance=BalanceConfig(aux_coef=float(g("router_aux_loss_coef", 0.0)), aux_scope="pooled"),
        )

    return ModelConfig(
        d_model=d, n_layers=n_layers, vocab_size=g("vocab_size"), max_seq_len=g("max_position_embeddings"),
        attention=attention, ffn=ffn, moe=moe, norm=norm, norm_placement=placement,
        layer_kinds=layer_kinds, layer_pattern=pattern, layer_overrides=overrides,
        tie_embeddings=bool(g("tie_word_embeddings")), scale_embeddings=scale_emb, final_softcap=final_softcap,
        init_std=float(g("initializer_range", 0.02)), init_scale_residual=False,
    )


def _opt_float(v) -> Optional[float]:
    return None if v is None else float(v)


def signature(m: ModelConfig) -> Dict[str, object]:
    """Everything about a model config that changes the function its weights compute,
    keyed by the recipe path a user would edit. Two configs with equal signatures
    compute the same logits from the same tensors."""
    a, specs = m.attention, layer_specs(m)
    sig: Dict[str, object] = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.vocab_size": m.vocab_size,
        "model.attention.kind": a.kind, "model.attention.n_heads": a.n_heads,
        "model.attention.n_kv_heads": a.n_kv_heads, "model.attention.head_dim": a.head_dim,
        "model.attention.qk_norm": a.qk_norm, "model.attention.bias": a.bias,
        "model.attention.qk_norm_scope": a.qk_norm_scope if a.qk_norm else None,
        "model.attention (mla)": (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
                                  a.v_head_dim, a.rope_interleave, a.latent_norm_eps) if a.kind == "mla" else None,
        "model.attention.query_pre_attn_scalar": float(a.query_pre_attn_scalar or a.head_dim),
        "model.attention.softcap": a.softcap, "model.attention.sinks": a.sinks,
        "model.attention.output_gate": a.output_gate,
        "model.norm.kind": m.norm.kind, "model.norm.eps": m.norm.eps,
        "model.norm.zero_centered": m.norm.zero_centered, "model.norm.weight_in_float32": m.norm.weight_in_float32,
        "model.norm_placement": m.norm_placement, "model.tie_embeddings": m.tie_embeddings,
        "model.scale_embeddings": m.scale_embeddings, "model.final_softcap": m.final_softcap,
    }
    for hook in dict.fromkeys(family_hooks().values()):  # fields a family has of its own (Gemma 4's)
        if hasattr(hook, "signature"):
            sig.update(hook.signature(m))
    for s in specs:
        rope = s.rope
        # by index, not kind name: the names are free, the per-layer facts are not
        sig[f"layer {s.index} window"] = s.window
        sig[f"layer {s.index} rope theta"] = rope.theta
        sig[f"layer {s.index} rope"] = _rope_signature(rope, m.max_seq_len)
        sig[f"layer {s.index} MoE"] = s.moe
        sig[f"layer {s.index} attention"] = s.attention
    if any(s.attention == "gated_deltanet" for s in specs):
        lin = a.linear
        sig["model.attention.linear"] = (lin.n_k_heads, lin.n_v_heads, lin.k_head_dim, lin.v_head_dim, lin.conv_kernel)
    if any(not s.moe for s in specs):
        sig.update({"model.ffn.kind": m.ffn.kind, "model.ffn.d_ff": m.ffn.d_ff, "model.ffn.bias": m.ffn.bias})
    if any(s.moe for s in specs):
        mo, r = m.moe, m.moe.router
        sig.update({
            "model.moe.kind": mo.kind, "model.moe.n_experts": mo.n_experts, "model.moe.top_k": mo.top_k,
            "model.moe.d_expert": mo.d_expert, "model.moe.expert_ffn": mo.expert_ffn,
            "model.moe.expert_bias": mo.expert_bias,
            # topk_softmax's weights sum to 1 already: renormalizing them changes nothing
            "model.moe.router.kind": r.kind,
            "model.moe.router.renormalize": r.renormalize if r.kind != "topk_softmax" else None,
            "model.moe.router.bias": r.bias, "model.moe.router.scale": r.scale,
            "model.moe.router groups": (r.n_group, r.topk_group) if r.n_group > 1 else None,
            # a learned selection bias changes which experts run at inference
            "model.moe.router.bias_update_rate > 0": r.bias_update_rate > 0,
            "model.moe.n_shared_experts": mo.n_shared_experts, "model.moe.capacity_factor": mo.capacity_factor,
            "model.moe shared width, gate": (mo.d_shared, mo.shared_gate) if mo.n_shared_experts else None,
        })
    return sig


def _rope_signature(rope: RopeConfig, max_seq_len: int) -> tuple:
    """What a layer kind's RoPE computes: its scaling and the fields that scaling reads."""
    if rope.scaling == "none" or rope.factor == 1.0 and rope.scaling == "linear":
        return ("none", rope.partial)
    if rope.scaling == "linear":
        return ("linear", rope.factor, rope.partial)
    from arch.rope import yarn_attention_factor

    return ("yarn", rope.factor, rope.original_max_seq_len or max_seq_len, rope.beta_fast, rope.beta_slow,
            rope.truncate, round(yarn_attention_factor(rope), 12), rope.partial)


# ------------------------------------------------------- export: recipe -> config.json


def export_family(m: ModelConfig) -> str:
    """The transformers class that can hold `m`, judged by what tells the families
    apart (the signature comparison then refuses anything else that differs)."""
    for hook in dict.fromkeys(family_hooks().values()):
        family = getattr(hook, "export_family", lambda m: None)(m)
        if family:
            return family
    if any(s.moe for s in layer_specs(m)):
        a = m.attention
        if a.kind == "mla":
            return DEEPSEEK_V3
        if a.sinks or m.moe.expert_bias:
            return GPT_OSS
        if not a.qk_norm:
            return MIXTRAL
        return OLMOE if a.qk_norm_scope == "all_heads" else QWEN3_MOE
    return GEMMA3 if m.norm_placement == "sandwich" else QWEN3


def rope_dict(rope: RopeConfig) -> dict:
    out = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling == "linear":
        out.update(rope_type="linear", factor=rope.factor)
    elif rope.scaling == "yarn":
        out.update(rope_type="yarn", factor=rope.factor, original_max_position_embeddings=rope.original_max_seq_len)
        # only what differs from transformers' defaults (beta_fast 32, beta_slow 1, truncate)
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("truncate", True), ("mscale", None),
                             ("mscale_all_dim", None), ("attention_factor", None)):
            if getattr(rope, key) != default:
                out[key] = getattr(rope, key)
    if rope.partial != 1.0:
        out["partial_rotary_factor"] = rope.partial
    return out


def hf_config_kwargs(arch: str, m: ModelConfig) -> dict:
    """Keyword arguments of the transformers config class for `arch`. Whatever this
    cannot carry is caught afterwards by comparing signatures, not here."""
    own = family_step(arch, "config_kwargs")
    if own is not None:
        return own(arch, m)
    a, specs = m.attention, layer_specs(m)
    windows = [s.window for s in specs if s.window is not None]
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn.d_ff,
              num_hidden_layers=m.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
              head_dim=a.head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm.eps,
              tie_word_embeddings=m.tie_embeddings, attention_bias=a.bias, initializer_range=m.init_std)
    layer_types = ["sliding_attention" if s.window is not None else "full_attention" for s in specs]
    if arch == GEMMA3:
        by_type = {}
        for s, t in zip(specs, layer_types):
            by_type.setdefault(t, rope_dict(s.rope))
        by_type.setdefault("full_attention", {"rope_type": "default", "rope_theta": 1_000_000.0})
        by_type.setdefault("sliding_attention", {"rope_type": "default", "rope_theta": 10_000.0})
        qpas = a.query_pre_attn_scalar or a.head_dim
        kw.update(hidden_activation=GELU_TANH, rope_parameters=by_type, layer_types=layer_types,
                  sliding_window=windows[0] if windows else kw["max_position_embeddings"],
                  # transformers types it as int; a fractional value fails the signature check
                  query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
                  final_logit_softcapping=m.final_softcap)
        return kw
    kw.update(hidden_act=SILU, rope_parameters=rope_dict(specs[0].rope))
    mo = m.moe
    if arch == DEEPSEEK_V3:
        dense = [s.index for s in specs if not s.moe]
        kw.update(moe_intermediate_size=mo.d_expert, n_routed_experts=mo.n_experts, num_experts_per_tok=mo.top_k,
                  n_shared_experts=mo.n_shared_experts, routed_scaling_factor=mo.router.scale,
                  n_group=mo.router.n_group, topk_group=mo.router.topk_group, norm_topk_prob=mo.router.renormalize,
                  first_k_dense_replace=len(dense), q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                  qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                  v_head_dim=a.v_head_dim, rope_interleave=a.rope_interleave)
        if m.mtp.depth:  # the MTP modules' tensors follow as layers n_layers, n_layers + 1, ...
            kw["num_nextn_predict_layers"] = m.mtp.depth
        del kw["head_dim"]  # transformers sets it to qk_rope_head_dim itself
        return kw
    if arch == GPT_OSS:
        kw.update(intermediate_size=mo.d_expert, num_local_experts=mo.n_experts, num_experts_per_tok=mo.top_k,
                  router_aux_loss_coef=mo.balance.aux_coef, output_router_logits=False, layer_types=layer_types,
                  sliding_window=windows[0] if windows else 128, swiglu_alpha=1.702, swiglu_limit=7.0)
        return kw
    if arch in (MIXTRAL, OLMOE):
        kw.update(intermediate_size=mo.d_expert, num_experts_per_tok=mo.top_k,
                  router_aux_loss_coef=mo.balance.aux_coef, output_router_logits=False)
        if arch == MIXTRAL:
            del kw["attention_bias"]  # Mixtral has none; the signature check refuses biases
            kw.update(num_local_experts=mo.n_experts, sliding_window=windows[0] if windows else None)
        else:
            del kw["head_dim"]  # OLMoE's is hidden_size / heads; the signature check refuses others
            kw.update(num_experts=mo.n_experts, norm_topk_prob=mo.router.renormalize, clip_qkv=None)
        return kw
    if arch == QWEN3:
        kw.update(layer_types=layer_types, use_sliding_window=bool(windows),
                  sliding_window=windows[0] if windows else None,
                  max_window_layers=layer_types.index("sliding_attention") if windows else m.n_layers)
        return kw
    kw.update(num_experts=mo.n_experts, num_experts_per_tok=mo.top_k, moe_intermediate_size=mo.d_expert,
              norm_topk_prob=mo.router.renormalize, decoder_sparse_step=1,
              mlp_only_layers=[s.index for s in specs if not s.moe],
              router_aux_loss_coef=mo.balance.aux_coef, output_router_logits=False)
    if kw["intermediate_size"] is None or kw["intermediate_size"] <= 0:
        kw["intermediate_size"] = mo.d_expert
    return kw


def hf_config_for(m: ModelConfig, arch: Optional[str] = None):
    """(architecture, transformers config, notes) for a moelab model config; raises
    ConvertError naming each field Hugging Face would lose. `arch`: the class to write
    (null: the family `export_family` picks)."""
    import transformers

    family = export_family(m)
    hook = family_hooks().get(family)
    allowed = [family] + [a for a in (hook.CONFIG_CLASSES if hook else ()) if a != family]
    if arch is not None and arch not in allowed:
        raise ConvertError(f"this model is written as {' or '.join(allowed)}, not {arch}; leave the architecture "
                           "out or name one of those.")
    arch = arch or family
    own_mtp = family_step(arch, "check_mtp")
    if m.mtp.depth and own_mtp is not None:
        own_mtp(arch, m, m.mtp.depth)
    elif m.mtp.depth and arch != DEEPSEEK_V3:
        raise ConvertError(f"model.mtp.depth = {m.mtp.depth}: {arch} has no multi-token prediction modules; set "
                           "model.mtp.depth=0 to export the next-token model alone.")
    classes = {QWEN3: transformers.Qwen3Config, QWEN3_MOE: transformers.Qwen3MoeConfig,
               MIXTRAL: transformers.MixtralConfig, OLMOE: transformers.OlmoeConfig,
               GPT_OSS: transformers.GptOssConfig, DEEPSEEK_V3: transformers.DeepseekV3Config,
               GEMMA3: transformers.Gemma3TextConfig}
    classes.update({a: getattr(transformers, h.CONFIG_CLASSES[a]) for a, h in family_hooks().items()
                    if a in h.CONFIG_CLASSES})
    if arch not in classes:
        raise ConvertError(f"moelab writes Hugging Face models as {', '.join(classes)}, not {arch}.")
    cls = classes[arch]
    try:
        cfg = cls(**hf_config_kwargs(arch, m))
    except Exception as e:
        raise ConvertError(f"transformers' {cls.__name__} rejects this model: {str(e).splitlines()[0]}") from None
    cfg.architectures = [arch]
    try:
        back = resolve_recipe(Recipe(model=model_config_from_hf(arch, cfg))).model
    except ConvertError as e:
        raise ConvertError(f"this model cannot be written as {arch}: {e}") from None
    ours, theirs = signature(m), signature(back)
    if arch == DEEPSEEK_V3:  # the selection bias travels as e_score_correction_bias; its update rate is training-only
        ours.pop("model.moe.router.bias_update_rate > 0", None)
        theirs.pop("model.moe.router.bias_update_rate > 0", None)
    diffs = [f"{k} is {ours.get(k)!r} here but would be {theirs.get(k)!r}"
             for k in list(ours) + [k for k in theirs if k not in ours] if ours.get(k) != theirs.get(k)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConvertError(f"this model cannot be written as {arch} without changing what it computes: {shown}.")
    notes = []
    b = m.moe.balance
    if arch == DEEPSEEK_V3 and (b.aux_coef > 0 or b.z_coef > 0 or m.moe.router.bias_update_rate > 0):
        notes.append(f"training-only settings that {arch} has no field for were not written (aux_coef={b.aux_coef}, "
                     f"z_coef={b.z_coef}, bias_update_rate={m.moe.router.bias_update_rate}); transformers' "
                     "DeepSeek-V3 trains with no balancing of its own")
    elif arch in moe_archs() and (b.aux_scope != "pooled" or b.z_coef > 0 or m.moe.router.jitter > 0):
        notes.append(f"training-only settings that {arch} has no field for were not written "
                     f"(aux_scope={b.aux_scope}, z_coef={b.z_coef}, jitter={m.moe.router.jitter}); "
                     "transformers trains with its pooled auxiliary loss")
    return arch, cfg, notes
