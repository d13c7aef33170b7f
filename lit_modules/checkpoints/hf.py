"""Hugging Face <-> moelab: config mapping, tensor-name mapping, streaming conversion.

    import   config.json ──(transformers' config class: HF defaults, legacy fields)──>
             model_config_from_hf: every field honoured, or one sentence naming it
             *.safetensors ──safe_open, one tensor at a time──> rename / stack experts
             ──> each moelab tensor handed on as soon as it is complete

    export   moelab checkpoint ──> hf_config_from_model ──> mapped back and compared
             (`signature`), so nothing is dropped silently ──> HF shards, hub layout

Supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM,
Gemma3ForCausalLM and the text part of Gemma3ForConditionalGeneration; Qwen3-Next and
Qwen3.5-MoE (hf_qwen3_next.py) and Gemma 4 (hf_gemma4.py) through modules of their own
(FAMILY_MODULES). Names on both sides (HF left, moelab right):

    model.embed_tokens / model.norm / lm_head          embed / norm / head
    layers.i.input_layernorm                           layers.i.attn_norm
    layers.i.post_attention_layernorm   Qwen3          layers.i.ffn_norm   (pre-FFN)
                                        Gemma 3        layers.i.attn_post_norm
    layers.i.pre_feedforward_layernorm  Gemma 3        layers.i.ffn_norm
    layers.i.post_feedforward_layernorm Gemma 3        layers.i.ffn_post_norm
    layers.i.self_attn.{q,k,v,o}_proj, {q,k}_norm      layers.i.attn.*
    layers.i.mlp.{gate,up,down}_proj                   layers.i.ffn.*      (dense)
    layers.i.mlp.gate                                  layers.i.ffn.router.gate
    layers.i.mlp.experts.gate_up_proj (E, 2F, D)       layers.i.ffn.w_in   [gate; up]
    layers.i.mlp.experts.down_proj    (E, D, F)        layers.i.ffn.w_out
    layers.i.mlp.experts.e.{gate,up,down}_proj         rows of w_in[e] / w_out[e]
    layers.i.block_sparse_moe.*         Mixtral hub    layers.i.mlp.*  (w1 gate, w3 up, w2 down)

Import reads both expert layouts (the hub's per-expert tensors and transformers 5's
fused 3-D ones); export writes the per-expert layout: what transformers 5's own
save_pretrained writes, and what its from_pretrained loads with no missing or
unexpected keys (tested on 5.23 here and 5.17 on the GPU box).
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from arch import build_model
from arch.config import (
    AttentionConfig, BalanceConfig, FFNConfig, LayerKindConfig, LayerOverride, ModelConfig,
    MoEConfig, NormConfig, Recipe, RopeConfig, RouterConfig,
)
from arch.recipe import resolve_recipe
from arch.registry import RecipeError
from arch.resolve import layer_specs

from lit_modules.checkpoints.hf_names import rename as _rename
from lit_modules.checkpoints.model_dir import (
    ShardWriter, TensorSource, check_tensors, finish_dir, load_into, open_checkpoint,
    safetensors_source, writing_dir,
)

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
# mtp_part, mtp_hf_name, check_mtp); a step it leaves out runs this file's code. Loaded
# on first use, as arch/registry.py's plugins, so that a family module may import this one.
FAMILY_MODULES = ("lit_modules.checkpoints.hf_qwen3_next", "lit_modules.checkpoints.hf_gemma4")
FAMILY_HOOKS: Dict[str, object] = {}


def _hooks() -> Dict[str, object]:
    if not FAMILY_HOOKS:
        for name in FAMILY_MODULES:
            module = importlib.import_module(name)
            FAMILY_HOOKS.update(dict.fromkeys(module.ARCHS, module))
    return FAMILY_HOOKS


def _hook(arch: str, step: str):
    """The family module's function for `step` on `arch`; None where this file's code runs."""
    return getattr(_hooks().get(arch), step, None)


def _moe_archs() -> Tuple[str, ...]:
    """The MoE classes with transformers' per-expert hub layout and pooled auxiliary loss,
    the families' (their MOE_ARCHS) included."""
    return MOE_ARCHS + tuple(a for h in dict.fromkeys(_hooks().values()) for a in getattr(h, "MOE_ARCHS", ()))


class ConvertError(RecipeError):
    """A checkpoint or config that cannot be converted exactly; one sentence says why."""


# ----------------------------------------------------------------------- config


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
        raise ConvertError(f"{path} is not valid JSON ({_one_line(e)}); repair it or download it again.") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; repair it "
                           "or download it again.")
    by_type = {**_BY_MODEL_TYPE, **{t: a for h in _hooks().values() for t, a in h.MODEL_TYPES.items()}}
    archs = raw.get("architectures") or [by_type.get(raw.get("model_type"), f"model_type={raw.get('model_type')}")]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConvertError(f"{path} field architectures = {archs!r} is not a list of class names such as "
                           f"[\"{QWEN3}\"]; repair it.")
    arch = archs[0]
    if arch not in SUPPORTED and arch not in _hooks():
        raise ConvertError(f"{path} declares architecture {arch}; moelab converts only "
                           f"{', '.join(SUPPORTED + tuple(_hooks()))} (multimodal ones: their text model).")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers' own validation (strict dataclasses)
        raise ConvertError(f"transformers rejects {path}: {_one_line(e)}") from None
    own = _hook(arch, "text_config")
    text = own(arch, cfg) if own is not None else cfg.get_text_config() if arch == GEMMA3_MM else cfg
    return arch, cfg, text


def _one_line(e: BaseException, limit: int = 400) -> str:
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


def _left_out(hf_dir, arch: str) -> List[str]:
    """The size fields that config.json does not set (for the mismatch message)."""
    try:
        raw = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
        raw = raw.get("text_config", {}) if arch == GEMMA3_MM or "text_config" in raw else raw
        fields = SIZE_FIELDS + MOE_SIZE_FIELDS.get(arch, ())
        return [names[0] for names in fields if not any(n in raw for n in names)]
    except (ValueError, OSError, AttributeError):
        return []


def _cannot(arch: str, field: str, value, why: str) -> ConvertError:
    return ConvertError(f"{arch} config field {field} = {value!r} cannot be honoured: {why}.")


def _rope(arch: str, params: Optional[dict], field: str, partial: float = 1.0) -> RopeConfig:
    """`partial`: the config's top-level partial_rotary_factor, where a model keeps it there."""
    params = dict(params or {})
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ("default", "linear", "yarn"):
        raise _cannot(arch, f"{field}.rope_type", rtype, "moelab implements plain RoPE, linear scaling "
                      "(positional interpolation) and YaRN; drop the scaling or add that RoPE type to arch/rope.py")
    if params.get("rope_theta") is None:
        raise _cannot(arch, f"{field}.rope_theta", None, "a RoPE base is required")
    rope = RopeConfig(theta=float(params["rope_theta"]),
                      partial=float(params.get("partial_rotary_factor") or partial or 1.0))
    if rtype == "linear":
        rope.scaling, rope.factor = "linear", float(params["factor"])
    elif rtype == "yarn":
        for key in ("factor", "original_max_position_embeddings"):
            if params.get(key) is None:
                raise _cannot(arch, f"{field}.{key}", None, "moelab's YaRN needs it given")
        rope.scaling, rope.factor = "yarn", float(params["factor"])
        rope.original_max_seq_len = int(params["original_max_position_embeddings"])
        # transformers reads `x or default`, so 0 and None both mean the default
        rope.beta_fast, rope.beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)
        rope.mscale, rope.mscale_all_dim = _opt_float(params.get("mscale")), _opt_float(params.get("mscale_all_dim"))
        rope.attention_factor = _opt_float(params.get("attention_factor"))
        rope.truncate = bool(params.get("truncate", True))
    return rope


def _layer_ropes(arch: str, text, layer_types: List[str]) -> List[RopeConfig]:
    """One RopeConfig per layer: transformers 5 keeps one dict, or one per layer type."""
    rp = getattr(text, "rope_parameters", None) or {}
    partial = getattr(text, "partial_rotary_factor", None) or 1.0
    if any(t in rp for t in ("full_attention", "sliding_attention")):
        missing = sorted(set(layer_types) - set(rp))
        if missing:
            raise _cannot(arch, "rope_parameters", rp, f"it has no entry for layer type {missing[0]}")
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
    own = _hook(arch, "model_config")
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
        raise _cannot(arch, "attention_dropout", g("attention_dropout"), "moelab models have no dropout")
    gemma = arch in (GEMMA3, GEMMA3_MM)

    if gemma:
        act_field, act = "hidden_activation", g("hidden_activation")
        if act != GELU_TANH:
            raise _cannot(arch, act_field, act, f"Gemma 3's FFN is GeGLU with {GELU_TANH}, the only activation "
                          "moelab's geglu implements")
        if g("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 attention never passes it on (Gemma 2's does), so the
            # checkpoint has been run without it; honouring either reading would be a guess
            raise _cannot(arch, "attn_logit_softcapping", g("attn_logit_softcapping"),
                          "transformers' Gemma 3 stores it but does not apply it, so what the checkpoint "
                          "computes is ambiguous; set it to null (every released Gemma 3 has null)")
        if g("use_bidirectional_attention"):
            raise _cannot(arch, "use_bidirectional_attention", True, "moelab language models are causal")
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
            raise _cannot(arch, "hidden_act", g("hidden_act"), f"{arch}'s FFN and experts are SwiGLU (silu)")
        if arch == DEEPSEEK_V3:
            if kv != heads:
                raise _cannot(arch, "num_key_value_heads", kv, f"multi-head latent attention expands a key and a "
                              f"value per head: it must equal num_attention_heads ({heads})")
            layer_types, window = ["full_attention"] * n_layers, None
        elif arch == GPT_OSS:
            quant = getattr(text, "quantization_config", None) or {}
            method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            if quant and method != "mxfp4":
                raise _cannot(arch, "quantization_config.quant_method", method, "moelab dequantizes gpt-oss's MXFP4 "
                              "experts (exactly) and nothing else; give an unquantized or MXFP4 checkpoint")
            for field, want in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
                value = g(field)
                if value is None:
                    value = want  # older transformers (5.17) have neither field: their gpt-oss hard-codes both
                if value != want:
                    raise _cannot(arch, field, g(field), f"moelab's swiglu_clamped has {field} {want} "
                                  "(every released gpt-oss)")
            layer_types = list(g("layer_types") or ["full_attention"] * n_layers)
            window = g("sliding_window")
        elif arch == MIXTRAL:  # a window, when set, applies to every layer
            window = g("sliding_window")
            layer_types = ["full_attention" if window is None else "sliding_attention"] * n_layers
        elif arch == OLMOE:
            if g("clip_qkv") is not None:
                raise _cannot(arch, "clip_qkv", g("clip_qkv"), "moelab does not clamp q, k and v (no released "
                              "OLMoE does); set it to null")
            if head_dim != d // heads:  # transformers sizes OLMoE's q_norm by hidden_size
                raise _cannot(arch, "head_dim", head_dim, f"OLMoE's QK-norm spans hidden_size ({d}) channels, "
                              f"so head_dim must be hidden_size / num_attention_heads = {d // heads}")
            layer_types, window = ["full_attention"] * n_layers, None
        elif arch == QWEN3_MOE:
            if g("use_sliding_window"):
                raise _cannot(arch, "use_sliding_window", True, "no released Qwen3-MoE checkpoint uses a sliding "
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
        raise _cannot(arch, "layer_types", layer_types, f"it has {len(layer_types)} entries for {n_layers} layers")
    for t in set(layer_types) - {"full_attention", "sliding_attention"}:
        raise _cannot(arch, "layer_types", t, "moelab maps full_attention and sliding_attention layers only")
    ropes = _layer_ropes(arch, text, layer_types)
    for r in ropes:
        if r.partial != 1.0:
            raise _cannot(arch, "partial_rotary_factor", r.partial, f"transformers' {arch} rotates the whole "
                          "head_dim")
    per_layer = [(window if t == "sliding_attention" else None, r) for t, r in zip(layer_types, ropes)]
    layer_kinds, pattern = _pattern(per_layer)

    moe, overrides = MoEConfig(), {}
    if arch == QWEN3_MOE and g("num_experts", 0) > 0:
        step = g("decoder_sparse_step", 1)
        if step < 1:
            raise _cannot(arch, "decoder_sparse_step", step, "it must be >= 1")
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
            raise _cannot(arch, "router_jitter_noise", g("router_jitter_noise"), "transformers' Mixtral jitters "
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


def recipe_from_hf(hf_dir) -> Tuple[str, Recipe, bool]:
    """(architecture, resolved recipe, tied) for a Hugging Face directory."""
    arch, top, text = read_hf_config(hf_dir)
    try:
        mc = model_config_from_hf(arch, text)
    except RecipeError:  # a ValueError too: already one sentence
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a value of a type transformers let through
        raise ConvertError(f"{Path(hf_dir) / 'config.json'} has a field moelab cannot map ({_one_line(e)}); "
                           "check its types against the model's documented config.") from None
    if arch == GEMMA3_MM or arch in _hooks() and top is not text:  # the multimodal wrapper owns the tying flag
        mc.tie_embeddings = bool(getattr(top, "tie_word_embeddings", mc.tie_embeddings))
    if arch == DEEPSEEK_V3 or _hook(arch, "mtp_part") is not None:  # MTP modules: as many as the tensors hold
        parts = (mtp_part(arch, name, mc.n_layers) for name in safetensors_source(hf_dir).shapes())
        mc.mtp.depth = len({p[0] for p in parts if p is not None})  # transformers builds none of them
        check = _hook(arch, "check_mtp")
        if mc.mtp.depth and check is not None:
            check(arch, mc, mc.mtp.depth)
    recipe = Recipe(name=Path(hf_dir).resolve().name, model=mc)
    recipe.train.seq_len = min(recipe.train.seq_len, mc.max_seq_len)
    try:
        recipe = resolve_recipe(recipe)
    except RecipeError as e:
        raise ConvertError(f"{arch} config in {hf_dir} maps to an invalid moelab recipe: {e}") from None
    return arch, recipe, mc.tie_embeddings


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
    for hook in dict.fromkeys(_hooks().values()):  # fields a family has of its own (Gemma 4's)
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
            "model.moe.router.kind": r.kind, "model.moe.router.renormalize": r.renormalize,
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


# ------------------------------------------------------------------ tensor names

_COMMON = [
    ("embed_tokens.weight", "embed.weight"),
    ("norm.weight", "norm.weight"),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("layers.{i}.self_attn.{proj}.{wb}", "layers.{i}.attn.{proj}.{wb}"),
    ("layers.{i}.self_attn.{qk}.weight", "layers.{i}.attn.{qk}.weight"),
    ("layers.{i}.mlp.{mlp}.weight", "layers.{i}.ffn.{mlp}.weight"),
]
_QWEN = [("layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight")]
_MOE = [
    ("layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight"),
    ("layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.ffn.w_in"),
    ("layers.{i}.mlp.experts.down_proj", "layers.{i}.ffn.w_out"),
]
_GEMMA = [
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_post_norm.weight"),
    ("layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.ffn_post_norm.weight"),
]
_GPT_OSS = [
    ("layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks"),
    ("layers.{i}.mlp.router.{wb}", "layers.{i}.ffn.router.gate.{wb}"),
    ("layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.ffn.w_in"),  # (E, D, 2F), gate / up interleaved
    ("layers.{i}.mlp.experts.gate_up_proj_bias", "layers.{i}.ffn.b_in"),  # (E, 2F), interleaved
    ("layers.{i}.mlp.experts.down_proj", "layers.{i}.ffn.w_out"),  # (E, F, D)
    ("layers.{i}.mlp.experts.down_proj_bias", "layers.{i}.ffn.b_out"),
]
_DEEPSEEK = [
    ("layers.{i}.self_attn.{mla}.{wb}", "layers.{i}.attn.{mla}.{wb}"),
    ("layers.{i}.self_attn.{mlanorm}.weight", "layers.{i}.attn.{mlanorm}.weight"),
    ("layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.ffn.router.expert_bias"),
    ("layers.{i}.mlp.shared_experts.{mlp}.weight", "layers.{i}.ffn.shared.{mlp}.weight"),
]
RULES = {QWEN3: _COMMON + _QWEN, QWEN3_MOE: _COMMON + _QWEN + _MOE, MIXTRAL: _COMMON + _QWEN + _MOE,
         DEEPSEEK_V3: _COMMON + _QWEN + _MOE + _DEEPSEEK,
         OLMOE: _COMMON + _QWEN + _MOE, GPT_OSS: _COMMON + _QWEN + _GPT_OSS, GEMMA3: _COMMON + _GEMMA,
         GEMMA3_MM: _COMMON + _GEMMA}
_PER_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
# Mixtral's hub names: block_sparse_moe for mlp, w1 / w3 / w2 for gate / up / down
_MIXTRAL_HUB = (".block_sparse_moe.", ".mlp.")
_EXPERT_NAMES = {MIXTRAL: ("w1", "w3", "w2")}  # gate, up, down; others: gate_proj, up_proj, down_proj
# where the text model's tensors live, per architecture (transformers 5 and hub layouts)
_BODY = {GEMMA3_MM: ("model.language_model.", "language_model.model.")}
_HEAD = {GEMMA3_MM: ("lm_head.weight", "language_model.lm_head.weight")}
_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _rules(arch: str) -> list:
    """The (HF, moelab) name rules of `arch`: this file's, or its family module's RULES."""
    own = getattr(_hooks().get(arch), "RULES", None)
    return own[arch] if own and arch in own else RULES[arch]


def _bodies(arch: str) -> Tuple[str, ...]:
    """The prefixes under which `arch` keeps its decoder (the first is written on export)."""
    own = getattr(_hooks().get(arch), "BODY", None)
    return own[arch] if own and arch in own else _BODY.get(arch, ("model.",))


@dataclass
class Part:
    """One HF tensor's place in a moelab tensor: the whole of it, or an index into it."""

    ours: str
    index: Optional[tuple] = None  # None: the whole tensor
    layout: Optional[str] = None  # gpt-oss's expert layouts, turned into moelab's by `to_ours`


def _interleaved_to_halves(t: torch.Tensor) -> torch.Tensor:
    """[g0, u0, g1, u1, ...] on the last dimension -> [g0, g1, ...; u0, u1, ...]."""
    return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)


def _halves_to_interleaved(t: torch.Tensor) -> torch.Tensor:
    gate, up = t.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


# MXFP4 (gpt-oss's released expert weights): per row, blocks of 32 FP4 (e2m1) values packed
# two to a byte (the low nibble first), each block scaled by 2^(scale - 127)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, R, G, 16) uint8 blocks and (E, R, G) uint8 scales -> (E, R, G x 32) values,
    exact in bf16 and float32 (an FP4 value times a power of two)."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8).long()
    vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # (E, R, G, 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127)[..., None].float())
    return vals.flatten(-2).to(dtype)


# gpt-oss's expert tensors: moelab name -> the layout `to_ours` / `from_ours` convert
_GPT_OSS_LAYOUTS = {"w_in": "gate_up", "b_in": "gate_up_bias", "w_out": "transpose"}


def to_ours(part: Part, t: torch.Tensor) -> torch.Tensor:
    """An HF tensor in moelab's layout: gpt-oss keeps experts as (E, in, out) with gate
    and up interleaved; moelab as (E, out, in) with [gate; up] halves."""
    if part.layout == "gate_up":  # (E, D, 2F) -> (E, 2F, D)
        return _interleaved_to_halves(t).transpose(1, 2).contiguous()
    if part.layout == "gate_up_bias":
        return _interleaved_to_halves(t).contiguous()
    if part.layout == "transpose":  # down_proj (E, F, D) -> w_out (E, D, F)
        return t.transpose(1, 2).contiguous()
    return t


def from_ours(layout: Optional[str], t: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_ours` for a layout."""
    if layout == "gate_up":  # (E, 2F, D) -> (E, D, 2F)
        return _halves_to_interleaved(t.transpose(1, 2)).contiguous()
    if layout == "gate_up_bias":
        return _halves_to_interleaved(t).contiguous()
    if layout == "transpose":
        return t.transpose(1, 2).contiguous()
    return t


def _hf_shape(part: Part, shape: tuple, target: tuple) -> tuple:
    """The moelab shape an HF tensor of `shape` takes under `part`'s layout (MXFP4
    scales: the target's shape when their shape fits its blocks of 32)."""
    if part.layout in ("gate_up", "transpose"):
        return (shape[0], shape[2], shape[1])
    if part.layout and part.layout.startswith("mxfp4_blocks"):
        return tuple(shape[:-2]) + (shape[-2] * shape[-1] * 2,) if len(shape) == 4 else tuple(shape)
    if part.layout and part.layout.startswith("mxfp4_scales"):
        fits = len(shape) == 3 and len(target) == 3 and tuple(shape) == (target[0], target[1], target[2] // 32)
        return tuple(target) if fits else tuple(shape)
    return tuple(shape)


# DeepSeek-V3's multi-token prediction modules are stored as layers after the model's
# (model.layers.{n_layers + k}.*): a decoder layer's tensors plus these of its own, and
# copies of the shared embedding and head (which transformers ignores, and so does moelab)
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "shared_head.norm.weight": "norm.weight"}
_MTP_OWN_HF = {v: k for k, v in _MTP_OWN.items()}
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_LAYER = re.compile(r"(model\.)?layers\.(\d+)\.(.+)$")


def _mtp_depth(name: str, n_layers: Optional[int]) -> Optional[Tuple[int, str]]:
    """(k, the rest of the name) for a tensor of DeepSeek-V3's MTP module k, else None."""
    m = _LAYER.match(name)
    if n_layers is None or m is None or int(m.group(2)) < n_layers:
        return None
    return int(m.group(2)) - n_layers, m.group(3)


def mtp_part(arch: str, name: str, n_layers: Optional[int]) -> Optional[Tuple[int, str, bool]]:
    """(k, rest, own) when HF tensor `name` belongs to multi-token prediction module k:
    `own`: rest is the moelab name of one of the module's own tensors (its norms and
    projection, under mtp.{k}.); else rest is the tensor's HF name within a decoder
    layer, for the module's block. None for the rest of the model. A family stores
    these its own way (its `mtp_part` hook); DeepSeek-V3 as the layers after the model's."""
    own_way = _hook(arch, "mtp_part")
    if own_way is not None:
        return own_way(name)
    found = _mtp_depth(name, n_layers) if arch == DEEPSEEK_V3 else None
    if found is None:
        return None
    k, rest = found
    return (k, _MTP_OWN[rest], True) if rest in _MTP_OWN else (k, rest, False)


def mtp_hf_name(arch: str, k: int, rest: str, own: bool, n_layers: int) -> str:
    """The inverse of `mtp_part`: the HF name of module k's tensor `rest`."""
    own_way = _hook(arch, "mtp_hf_name")
    if own_way is not None:
        return own_way(k, rest, own)
    if arch != DEEPSEEK_V3:
        raise ConvertError(f"{arch} cannot store multi-token prediction modules; set model.mtp.depth=0 to "
                           "export the next-token model alone.")
    return f"model.layers.{n_layers + k}.{_MTP_OWN_HF[rest] if own else rest}"


def hf_to_ours(arch: str, name: str, d_expert: int, n_layers: Optional[int] = None) -> Optional[Part]:
    """Where HF tensor `name` goes in the moelab state dict; None if it belongs to no
    moelab tensor (the caller decides whether that is an error). With `n_layers`, the
    tensors of the multi-token prediction modules (`mtp_part`) go to model.mtp.*."""
    own = _hook(arch, "hf_to_ours")
    if own is not None:  # a family with a naming of its own (the others give RULES)
        ours = own(arch, name, d_expert)
        return None if ours is None else Part(ours)
    mtp = mtp_part(arch, name, n_layers)
    if mtp is not None and n_layers is not None:
        k, rest, own_tensor = mtp
        if own_tensor:
            return Part(f"mtp.{k}.{rest}")
        body = _bodies(arch)[0]
        part = hf_to_ours(arch, f"{body}layers.{n_layers}.{rest}", d_expert)  # as the block of a layer
        if part is None:
            return None
        return Part(part.ours.replace(f"layers.{n_layers}.", f"mtp.{k}.block.", 1), part.index, part.layout)
    if name in _HEAD.get(arch, ("lm_head.weight",)):
        return Part("head.weight")
    for prefix in _bodies(arch):
        if name.startswith(prefix):
            body = name[len(prefix):]
            break
    else:
        return None
    if arch == MIXTRAL:
        body = body.replace(*_MIXTRAL_HUB)
    if arch in _moe_archs():
        m = _PER_EXPERT.match(body)
        if m:
            layer, e, which = m.group(1), int(m.group(2)), m.group(3)
            if which in ("down_proj", "w2"):
                return Part(f"layers.{layer}.ffn.w_out", (e,))
            rows = slice(0, d_expert) if which in ("gate_proj", "w1") else slice(d_expert, 2 * d_expert)
            return Part(f"layers.{layer}.ffn.w_in", (e, rows))
    m = re.match(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$", body)
    if m and arch == GPT_OSS:  # MXFP4: both halves of one moelab tensor, dequantized once both arrive
        ours = f"layers.{m.group(1)}.ffn.{'w_in' if m.group(2) == 'gate_up_proj' else 'w_out'}"
        return Part(ours, layout=f"mxfp4_{m.group(3)}_{m.group(2)}")
    ours = _rename(_rules(arch), body, forward=True)
    if ours is not None and arch == GPT_OSS:
        layout = _GPT_OSS_LAYOUTS.get(ours.rsplit(".", 1)[-1])
        return Part(ours, layout=layout)
    return None if ours is None else Part(ours)


def ours_to_hf(arch: str, name: str, tensor: torch.Tensor,
               n_layers: Optional[int] = None) -> List[Tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one moelab tensor, in the per-expert hub layout.
    Multi-token prediction modules need `n_layers`: their blocks are named as layer
    `n_layers`, then where the family keeps them (`mtp_hf_name`)."""
    own = _hook(arch, "ours_to_hf")
    if own is not None:
        pairs = own(arch, name, tensor)
        if pairs is None:
            raise ConvertError(f"moelab tensor {name} has no counterpart in {arch}; the model uses a component "
                               "Hugging Face cannot express.")
        return pairs
    m = re.match(r"mtp\.(\d+)\.(.+)$", name)
    if m:
        if n_layers is None:
            raise ValueError("ours_to_hf needs n_layers for a multi-token prediction tensor")
        k, rest = int(m.group(1)), m.group(2)
        if not rest.startswith("block."):
            return [(mtp_hf_name(arch, k, rest, True, n_layers), tensor)]
        layer = re.compile(rf"(.*\.)?layers\.{n_layers}\.")  # the block as layer n_layers, then renamed
        return [(mtp_hf_name(arch, k, layer.sub("", hf_name, count=1), False, n_layers), t)
                for hf_name, t in ours_to_hf(arch, f"layers.{n_layers}.{rest[len('block.'):]}", tensor)]
    if name == "head.weight":
        return [("lm_head.weight", tensor)]
    if name.endswith("ffn.router.expert_bias") and arch != DEEPSEEK_V3:
        return []  # selection bias: zero unless bias_update_rate > 0, which export refuses
    prefix = "model."
    hub = (lambda n: n.replace(_MIXTRAL_HUB[1], _MIXTRAL_HUB[0])) if arch == MIXTRAL else (lambda n: n)
    m = re.match(r"layers\.(\d+)\.ffn\.(w_in|w_out|b_in|b_out)$", name)
    if m and arch == GPT_OSS:  # gpt-oss's fused layouts: (E, in, out), gate / up interleaved
        t = from_ours(_GPT_OSS_LAYOUTS.get(m.group(2)), tensor)
        return [(prefix + _rename(_rules(arch), name, forward=False), t)]
    if m:
        base = hub(f"{prefix}layers.{m.group(1)}.mlp.experts")
        g_name, u_name, d_name = _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))
        out = []
        for e in range(tensor.shape[0]):
            if m.group(2) == "w_in":
                gate, up = tensor[e].chunk(2, dim=0)
                out += [(f"{base}.{e}.{g_name}.weight", gate), (f"{base}.{e}.{u_name}.weight", up)]
            else:
                out.append((f"{base}.{e}.{d_name}.weight", tensor[e]))
        return out
    hf = _rename(_rules(arch), name, forward=False)
    if hf is None:
        raise ConvertError(f"moelab tensor {name} has no counterpart in {arch}; the model uses a component "
                           "Hugging Face cannot express.")
    return [(hub(prefix + hf), tensor)]


# ------------------------------------------------------------------------ import


def _ignorable(arch: str, name: str, tied: bool, n_layers: Optional[int] = None,
               model: Optional[ModelConfig] = None) -> bool:
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports saved
        return True
    if arch == DEEPSEEK_V3 and (_mtp_depth(name, n_layers) or (0, ""))[1] in _MTP_SHARED:
        return True
    if arch == GEMMA3_MM and name.startswith(_IGNORED):
        return True
    own = _hook(arch, "ignorable")
    if own is not None and own(arch, name, model):
        return True
    return tied and name in _HEAD.get(arch, ("lm_head.weight",))  # tied: HF ignores a stored head too


def _plan(arch: str, recipe: Recipe, tied: bool, src: TensorSource, hf_dir, meta: dict) -> Dict[str, Part]:
    """Map every HF tensor, then check names and shapes against `meta` (the moelab
    model's state_dict on the meta device) before a byte of tensor data is read."""
    plan: Dict[str, Part] = {}
    unexpected, bad_shape = [], []
    parts_of: Dict[str, Dict[object, str]] = {}  # moelab name -> {part index: HF name}
    covered: Dict[str, int] = {}  # moelab name -> elements supplied
    for name, shape in src.shapes().items():
        if _ignorable(arch, name, tied, recipe.model.n_layers, recipe.model):
            continue
        part = hf_to_ours(arch, name, recipe.model.moe.d_expert, recipe.model.n_layers)
        if part is None or part.ours not in meta:
            unexpected.append(name)
            continue
        target = meta[part.ours]
        if part.index is not None:
            if part.index[0] >= target.shape[0]:  # an expert the config does not have
                unexpected.append(name)
                continue
            target = target[part.index]
        shape = _hf_shape(part, tuple(shape), tuple(target.shape))
        if tuple(shape) != tuple(target.shape):
            bad_shape.append(f"{name} {tuple(shape)} (expected {tuple(target.shape)})")
            continue
        key = part.layout if (part.layout or "").startswith("mxfp4") else (
            "whole" if part.index is None else repr(part.index))
        seen = parts_of.setdefault(part.ours, {})
        if key in seen or (seen and (key == "whole") != ("whole" in seen)):
            other = seen.get(key) or next(iter(seen.values()))
            raise ConvertError(f"{hf_dir} supplies {part.ours} twice ({other} and {name}); keep one layout "
                               "of the expert weights (fused or per-expert), not both.")
        seen[key] = name
        if not (part.layout or "").startswith("mxfp4_scales"):  # the blocks cover the tensor
            covered[part.ours] = covered.get(part.ours, 0) + target.numel()
        plan[name] = part
    # parts are disjoint (distinct experts / row halves), so a full count means full coverage
    missing = [ours for ours, t in meta.items()
               if not ours.endswith("router.expert_bias") and covered.get(ours, 0) != t.numel()]
    if unexpected or missing or bad_shape:
        left_out = _left_out(hf_dir, arch)
        why = (f"; config.json leaves out {', '.join(left_out)}, so transformers' defaults stood in"
               if left_out else "")
        raise ConvertError(f"the tensors in {hf_dir} do not match its config.json ({arch}): "
                           + _listing(missing=missing, unexpected=unexpected, shape=bad_shape) + why + ".")
    return plan


def _listing(**groups: List[str]) -> str:
    words = {"missing": "missing", "unexpected": "unexpected", "shape": "with another shape"}
    out = []
    for kind, names in groups.items():
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            out.append(f"{len(names)} {words[kind]} ({shown})")
    return "; ".join(out)


def iter_hf_as_ours(hf_dir, dtype: Optional[torch.dtype] = None
                    ) -> Tuple[str, Recipe, Iterator[Tuple[str, torch.Tensor]], Dict[str, int]]:
    """Stream a Hugging Face checkpoint as complete moelab tensors.

    Returns (architecture, recipe, iterator, stats). HF tensors are read one at a time
    in file order; a moelab tensor is yielded as soon as all its parts have arrived,
    so only partly stacked expert tensors wait in memory (stats["peak_pending_bytes"])."""
    arch, recipe, tied = recipe_from_hf(hf_dir)
    src = safetensors_source(hf_dir)
    adapt = _hook(arch, "adapt_source")
    if adapt is not None:  # a family may present its tensors in moelab's cut (split fused projections)
        src = adapt(arch, recipe.model, src)
    meta = build_model(recipe.model, device="meta").state_dict()
    plan = _plan(arch, recipe, tied, src, hf_dir, meta)
    stats = {"peak_pending_bytes": 0}

    def stream():
        supplied = {part.ours for part in plan.values()}
        for ours, t in meta.items():  # HF has no selection bias (but DeepSeek-V3)
            if ours.endswith("router.expert_bias") and ours not in supplied:
                yield ours, torch.zeros(t.shape, dtype=torch.float32)
        pending: Dict[str, Tuple[torch.Tensor, int]] = {}
        need = {}
        for name, part in plan.items():
            need[part.ours] = need.get(part.ours, 0) + 1
        mxfp4: Dict[str, Dict[str, torch.Tensor]] = {}  # moelab name -> {"blocks": .., "scales": ..}
        for name, tensor in src.tensors():
            part = plan.get(name)
            if part is None:
                continue
            if (part.layout or "").startswith("mxfp4"):
                halves = mxfp4.setdefault(part.ours, {})
                halves[part.layout.split("_")[1]] = tensor
                if len(halves) == 2:
                    del mxfp4[part.ours]
                    t = dequantize_mxfp4(halves["blocks"], halves["scales"], dtype or torch.bfloat16)
                    # rows: gate_up's interleave gate and up; down_proj's are already (E, D, F)
                    # dequantized (E, out, in), gate_up's rows interleaved: through (E, in, out)
                    yield part.ours, (to_ours(Part(part.ours, layout="gate_up"), t.transpose(1, 2))
                                      if part.layout.endswith("gate_up_proj") else t)
                continue
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if part.index is None:
                yield part.ours, to_ours(part, tensor)
                continue
            buf, n = pending.get(part.ours, (None, 0))
            if buf is None:
                buf = torch.empty(meta[part.ours].shape, dtype=tensor.dtype)
            buf[part.index].copy_(tensor)
            pending[part.ours] = (buf, n + 1)
            stats["peak_pending_bytes"] = max(stats["peak_pending_bytes"],
                                              sum(b.numel() * b.element_size() for b, _ in pending.values()))
            if n + 1 == need[part.ours]:
                del pending[part.ours]
                yield part.ours, buf

    return arch, recipe, stream(), stats


def import_hf(hf_dir, out_dir, dtype: Optional[torch.dtype] = None, max_shard_bytes: Optional[int] = None) -> dict:
    """Write a moelab model directory (recipe.yaml, safetensors shards, tokenizer.json)
    from a Hugging Face one, streaming: tensors are read one at a time and written to
    disk at once, so the memory held is the expert tensors still being stacked (a
    layer's at most) plus one tensor, never the model."""
    hf_dir = Path(hf_dir)
    arch, recipe, stream, stats = iter_hf_as_ours(hf_dir, dtype)
    tok = hf_dir / "tokenizer.json"
    with writing_dir(out_dir) as work:
        if tok.is_file():
            recipe.data.tokenizer = str((Path(out_dir) / "tokenizer.json").resolve())
        writer = ShardWriter(work, max_shard_bytes=max_shard_bytes)
        for name, tensor in stream:
            writer.add(name, tensor)
        files = writer.close()
        finish_dir(work, out_dir, recipe, tokenizer_path=tok if tok.is_file() else None)
    n_params = sum(p.numel() for p in build_model(recipe.model, device="meta").parameters())
    return {"architecture": arch, "recipe": recipe, "files": files, "params": n_params,
            "tokenizer": tok.is_file(), "peak_pending_bytes": stats["peak_pending_bytes"]}


def load_hf(hf_dir, device="cpu", dtype: Optional[torch.dtype] = None):
    """(recipe, model) straight from a Hugging Face directory, without writing anything."""
    _, recipe, stream, _ = iter_hf_as_ours(hf_dir, dtype)
    model = build_model(recipe.model, device="meta")
    load_into(model, stream, device)
    return recipe, model.eval()


def is_hf_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "recipe.yaml").is_file()


# ------------------------------------------------------------------------ export


def export_family(m: ModelConfig) -> str:
    """The transformers class that can hold `m`, judged by what tells the families
    apart (the signature comparison then refuses anything else that differs)."""
    for hook in dict.fromkeys(_hooks().values()):
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


def _rope_dict(rope: RopeConfig) -> dict:
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
    own = _hook(arch, "config_kwargs")
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
            by_type.setdefault(t, _rope_dict(s.rope))
        by_type.setdefault("full_attention", {"rope_type": "default", "rope_theta": 1_000_000.0})
        by_type.setdefault("sliding_attention", {"rope_type": "default", "rope_theta": 10_000.0})
        qpas = a.query_pre_attn_scalar or a.head_dim
        kw.update(hidden_activation=GELU_TANH, rope_parameters=by_type, layer_types=layer_types,
                  sliding_window=windows[0] if windows else kw["max_position_embeddings"],
                  # transformers types it as int; a fractional value fails the signature check
                  query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
                  final_logit_softcapping=m.final_softcap)
        return kw
    kw.update(hidden_act=SILU, rope_parameters=_rope_dict(specs[0].rope))
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
    hook = _hooks().get(family)
    allowed = [family] + [a for a in (hook.CONFIG_CLASSES if hook else ()) if a != family]
    if arch is not None and arch not in allowed:
        raise ConvertError(f"this model is written as {' or '.join(allowed)}, not {arch}; leave the architecture "
                           "out or name one of those.")
    arch = arch or family
    own_mtp = _hook(arch, "check_mtp")
    if m.mtp.depth and own_mtp is not None:
        own_mtp(arch, m, m.mtp.depth)
    elif m.mtp.depth and arch != DEEPSEEK_V3:
        raise ConvertError(f"model.mtp.depth = {m.mtp.depth}: {arch} has no multi-token prediction modules; set "
                           "model.mtp.depth=0 to export the next-token model alone.")
    classes = {QWEN3: transformers.Qwen3Config, QWEN3_MOE: transformers.Qwen3MoeConfig,
               MIXTRAL: transformers.MixtralConfig, OLMOE: transformers.OlmoeConfig,
               GPT_OSS: transformers.GptOssConfig, DEEPSEEK_V3: transformers.DeepseekV3Config,
               GEMMA3: transformers.Gemma3TextConfig}
    classes.update({a: getattr(transformers, h.CONFIG_CLASSES[a]) for a, h in _hooks().items()
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
    elif arch in _moe_archs() and (b.aux_scope != "pooled" or b.z_coef > 0 or m.moe.router.jitter > 0):
        notes.append(f"training-only settings that {arch} has no field for were not written "
                     f"(aux_scope={b.aux_scope}, z_coef={b.z_coef}, jitter={m.moe.router.jitter}); "
                     "transformers trains with its pooled auxiliary loss")
    return arch, cfg, notes


def export_hf(source, out_dir, dtype: Optional[torch.dtype] = None, max_shard_bytes: Optional[int] = None,
              architecture: Optional[str] = None) -> dict:
    """Write a transformers-loadable directory (config.json, safetensors shards,
    tokenizer.json if the source has one) from a moelab checkpoint, streaming.
    `architecture`: the transformers class to write (null: the one `export_family` picks)."""
    recipe, src, tok = open_checkpoint(source)
    arch, cfg, notes = hf_config_for(recipe.model, architecture)
    check_tensors(recipe, src.shapes(), source)
    with writing_dir(out_dir) as work:
        writer = ShardWriter(work, max_shard_bytes=max_shard_bytes)
        first_dtype = None
        def pairs():
            nonlocal first_dtype
            for name, tensor in src.tensors():
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if name == "embed.weight":
                    first_dtype = tensor.dtype
                yield from ours_to_hf(arch, name, tensor, recipe.model.n_layers)

        for hf_name, t in export_pairs(arch, recipe.model, pairs()):
            writer.add(hf_name, t)
        files = writer.close()
        if first_dtype is not None:
            cfg.dtype = str(first_dtype).removeprefix("torch.")
        cfg.save_pretrained(str(work))
        finish_dir(work, out_dir, None, tokenizer_path=tok)
    return {"architecture": arch, "files": files, "notes": notes, "tokenizer": tok is not None}


def export_pairs(arch: str, m: ModelConfig, pairs):
    """The (HF name, tensor) pairs of `ours_to_hf` as `arch` stores them: a family may fuse
    several into one (Qwen3-Next's in_proj_qkvz); the others pass through."""
    own = _hook(arch, "export_pairs")
    return pairs if own is None else own(arch, m, pairs)


def parse_size(text: Optional[str]) -> Optional[int]:
    """'2GB', '500MB', '1GiB' or a number of bytes -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"shard size '{text}' is not a size; write it like 2GB, 500MB or 1000000.")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


DTYPES: Dict[str, Optional[torch.dtype]] = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                            "float16": torch.float16}
