"""Gemma 4 (text) <-> moelab: the family-specific half of lit_modules/checkpoints/hf.py and
hf_config.py.

They hand Gemma4ForCausalLM and the text model of Gemma4ForConditionalGeneration
over to this module (a FAMILY_MODULES entry) for the config (text_config, model_config),
the tensor names (hf_to_ours, ours_to_hf, ignorable) and the export (export_family,
config_kwargs, signature). It imports neither. Names on both
sides (HF left, under model. or model.language_model.; moelab right):

    embed_tokens_per_layer / per_layer_model_projection    per_layer.embed / per_layer.proj
    per_layer_projection_norm                              per_layer.norm
    layers.i.layer_scalar                                  layers.i.layer_scalar
    layers.i.per_layer_input_gate / per_layer_projection   layers.i.per_layer.gate / .proj
    layers.i.post_per_layer_input_norm                     layers.i.per_layer.norm
    layers.i.pre_feedforward_layernorm   dense layer       layers.i.ffn_norm
                                         MoE layer         layers.i.ffn.dense_norm
    layers.i.mlp.{gate,up,down}_proj     MoE layer         layers.i.ffn.dense.*
    layers.i.post_feedforward_layernorm_1 / _2             layers.i.ffn.dense_post_norm / experts_post_norm
    layers.i.pre_feedforward_layernorm_2                   layers.i.ffn.experts_norm
    layers.i.router.{proj.weight, scale, per_expert_scale} layers.i.ffn.router.{gate.weight, ...}
    layers.i.experts.gate_up_proj (E, 2F, D) / down_proj   layers.i.ffn.w_in / w_out

Gemma 4's RMSNorm multiplies by w (not 1 + w) in float32; every attention has QK-norm,
a scale-free value norm and softmax scale 1; global layers have their own head_dim,
KV heads (with attention_k_eq_v), keys equal to values and proportional partial RoPE.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from arch.config import (
    AttentionConfig, FFNConfig, LayerKindConfig, ModelConfig, MoEConfig, NormConfig, PerLayerInputConfig,
    RopeConfig, RouterConfig,
)
from arch.registry import RecipeError
from lit_modules.checkpoints.hf_names import rename as _rename

GEMMA4, GEMMA4_MM = "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"
ARCHS = (GEMMA4, GEMMA4_MM)
MODEL_TYPES = {"gemma4_text": GEMMA4, "gemma4": GEMMA4_MM}
CONFIG_CLASSES = {GEMMA4: "Gemma4TextConfig"}  # export writes the text model
GELU_TANH = "gelu_pytorch_tanh"
BODY = {GEMMA4: ("model.",), GEMMA4_MM: ("model.language_model.",)}
HEAD = {GEMMA4: "lm_head.weight", GEMMA4_MM: "lm_head.weight"}
# the multimodal model's towers and their projections: not part of the text model
IGNORED = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
           "model.multi_modal_projector.")


class Refused(RecipeError):
    """A Gemma 4 config field moelab cannot honour (hf_config.py raises it as a ConvertError)."""


def _cannot(arch: str, field: str, value, why: str) -> Refused:
    return Refused(f"{arch} config field {field} = {value!r} cannot be honoured: {why}.")


# ----------------------------------------------------------------------- config


def text_config(arch: str, cfg):
    return cfg.get_text_config() if arch == GEMMA4_MM else cfg


def _rope(arch: str, params: Optional[dict], field: str) -> RopeConfig:
    params = dict(params or {})
    rtype = params.get("rope_type", "default")
    if rtype not in ("default", "proportional"):
        raise _cannot(arch, f"{field}.rope_type", rtype, "moelab maps Gemma 4's default and proportional RoPE")
    rope = RopeConfig(theta=float(params["rope_theta"]), partial=float(params.get("partial_rotary_factor") or 1.0),
                      proportional=rtype == "proportional")
    if rtype == "default" and rope.partial != 1.0:
        raise _cannot(arch, f"{field}.partial_rotary_factor", rope.partial, "Gemma 4's default RoPE rotates "
                      "the whole head")
    factor = float(params.get("factor") or 1.0)
    if factor != 1.0:
        if rtype != "proportional":
            raise _cannot(arch, f"{field}.factor", factor, "only proportional RoPE reads a factor")
        rope.scaling, rope.factor = "linear", factor  # inv_freq / factor = positions / factor
    return rope


def model_config(arch: str, text) -> ModelConfig:
    """A transformers Gemma4TextConfig as a moelab ModelConfig, every field honoured or
    refused in one sentence."""
    g = lambda name, default=None: getattr(text, name, default)  # noqa: E731
    n, d, heads = g("num_hidden_layers"), g("hidden_size"), g("num_attention_heads")
    if g("hidden_activation") != GELU_TANH:
        raise _cannot(arch, "hidden_activation", g("hidden_activation"), f"Gemma 4's FFN and experts are GeGLU "
                      f"with {GELU_TANH}, the only activation moelab's geglu implements")
    if g("attention_dropout", 0.0):
        raise _cannot(arch, "attention_dropout", g("attention_dropout"), "moelab models have no dropout")
    if g("use_bidirectional_attention") == "all":
        raise _cannot(arch, "use_bidirectional_attention", "all", "moelab language models are causal")
    layer_types = list(g("layer_types"))
    if len(layer_types) != n or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise _cannot(arch, "layer_types", layer_types, f"give {n} entries of full_attention / sliding_attention")
    rp = g("rope_parameters") or {}
    kinds: Dict[str, LayerKindConfig] = {}
    # head_dim and KV heads are per layer in transformers (its heterogeneous config):
    # layer 0's are the model's, a kind that differs says so
    per_layer = g("per_layer_config")
    base_hd, base_kv = per_layer[0].head_dim, per_layer[0].num_key_value_heads
    for t, name in (("sliding_attention", "local"), ("full_attention", "global")):
        if t not in layer_types:
            continue
        if t not in rp:
            raise _cannot(arch, "rope_parameters", rp, f"it has no entry for layer type {t}")
        lc = per_layer[layer_types.index(t)]  # transformers' resolved per-layer view
        hd, kv = lc.head_dim, lc.num_key_value_heads
        k_eq_v = bool(g("attention_k_eq_v")) and t == "full_attention"  # transformers: global layers only
        kinds[name] = LayerKindConfig(
            window=g("sliding_window") if t == "sliding_attention" else None,
            rope=_rope(arch, rp[t], f"rope_parameters.{t}"),
            head_dim=hd if hd != base_hd else None, n_kv_heads=kv if kv != base_kv else None,
            k_eq_v=k_eq_v)
    names = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    period = next(p for p in range(1, n + 1) if all(names[i] == names[i % p] for i in range(n)))
    shared = g("num_kv_shared_layers") or 0
    moe = MoEConfig()
    if g("enable_moe_block"):
        moe = MoEConfig(kind="parallel_dense", n_experts=g("num_experts"), top_k=g("top_k_experts"),
                        d_expert=g("moe_intermediate_size"), expert_ffn="geglu",
                        router=RouterConfig(kind="normed_softmax_topk", renormalize=True))
    return ModelConfig(
        d_model=d, n_layers=n, vocab_size=g("vocab_size"), max_seq_len=g("max_position_embeddings"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=base_kv, head_dim=base_hd,
                                  qk_norm=True, v_norm=True, bias=bool(g("attention_bias")),
                                  query_pre_attn_scalar=1.0),  # transformers' scaling = 1.0
        ffn=FFNConfig(kind="geglu", d_ff=g("intermediate_size")), moe=moe,
        norm=NormConfig(eps=float(g("rms_norm_eps")), zero_centered=False, weight_in_float32=True),
        norm_placement="sandwich", layer_kinds=kinds, layer_pattern=names[:period],
        kv_shared_layers=shared, kv_shared_ffn_mult=2 if g("use_double_wide_mlp") and shared else 1,
        per_layer_input=PerLayerInputConfig(dim=g("hidden_size_per_layer_input") or 0,
                                            vocab_size=g("vocab_size_per_layer_input")),
        layer_scalar=True, tie_embeddings=bool(g("tie_word_embeddings")), scale_embeddings=True,
        final_softcap=None if g("final_logit_softcapping") is None else float(g("final_logit_softcapping")),
        init_std=float(g("initializer_range", 0.02)), init_scale_residual=False,
    )


def export_family(m: ModelConfig) -> Optional[str]:
    return GEMMA4 if m.layer_scalar or m.attention.v_norm else None  # fields only Gemma 4 has


def config_kwargs(arch: str, m: ModelConfig) -> dict:
    """Keyword arguments of transformers.Gemma4TextConfig for `m` (hf_config.py compares the
    signatures of `m` and of what these map back to, so nothing is lost silently)."""
    from arch.resolve import layer_specs

    specs = layer_specs(m)
    a = m.attention
    layer_types = ["sliding_attention" if s.window is not None else "full_attention" for s in specs]
    rope: Dict[str, dict] = {}
    glob: Dict[str, object] = {}
    for s, t in zip(specs, layer_types):
        r = s.rope
        d = {"rope_type": "proportional" if r.proportional else "default", "rope_theta": r.theta}
        if r.proportional:
            d["partial_rotary_factor"] = r.partial
        if r.scaling == "linear" and r.factor != 1.0:
            d["factor"] = r.factor
        rope.setdefault(t, d)
        if t == "full_attention":
            glob.setdefault("head_dim", s.head_dim)
            glob.setdefault("kv", s.n_kv_heads)
            glob.setdefault("k_eq_v", s.k_eq_v)
    windows = [s.window for s in specs if s.window is not None]
    mo = m.moe
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn.d_ff,
              num_hidden_layers=m.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
              head_dim=a.head_dim, global_head_dim=glob.get("head_dim", a.head_dim),
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm.eps, tie_word_embeddings=m.tie_embeddings,
              attention_bias=a.bias, initializer_range=m.init_std, hidden_activation=GELU_TANH,
              layer_types=layer_types, rope_parameters=rope, sliding_window=windows[0] if windows else 512,
              final_logit_softcapping=m.final_softcap, attention_k_eq_v=bool(glob.get("k_eq_v", False)),
              num_kv_shared_layers=m.kv_shared_layers, use_double_wide_mlp=m.kv_shared_ffn_mult == 2,
              hidden_size_per_layer_input=m.per_layer_input.dim,
              vocab_size_per_layer_input=m.per_layer_input.vocab_size or m.vocab_size,
              enable_moe_block=mo.n_experts > 0)
    if glob.get("k_eq_v") and glob.get("kv") != a.n_kv_heads:
        kw["num_global_key_value_heads"] = glob["kv"]
    if mo.n_experts > 0:
        kw.update(num_experts=mo.n_experts, top_k_experts=mo.top_k, moe_intermediate_size=mo.d_expert)
    return kw


def signature(m: ModelConfig) -> Dict[str, object]:
    """What hf_config.signature leaves out and Gemma 4 computes with: per-layer head widths,
    KV heads, keys = values, KV sharing, per-layer inputs, the MoE kind (nothing for a
    model that uses none of Gemma 4's own fields)."""
    from arch.resolve import layer_specs

    if not (m.layer_scalar or m.attention.v_norm or m.kv_shared_layers or m.per_layer_input.dim):
        return {}
    sig: Dict[str, object] = {
        "model.attention.v_norm": m.attention.v_norm, "model.layer_scalar": m.layer_scalar,
        "model.per_layer_input": (m.per_layer_input.dim, m.per_layer_input.vocab_size or m.vocab_size)
        if m.per_layer_input.dim else None,
        "model.moe.kind": m.moe.kind if m.moe.n_experts else None,
    }
    for s in layer_specs(m):
        sig[f"layer {s.index} head_dim, kv heads, k_eq_v"] = (s.head_dim, s.n_kv_heads, s.k_eq_v)
        sig[f"layer {s.index} kv source, d_ff"] = (s.kv_source, s.d_ff)
        sig[f"layer {s.index} rope proportional"] = s.rope.proportional
    return sig


# ------------------------------------------------------------------ tensor names

_COMMON = [
    ("embed_tokens.weight", "embed.weight"),
    ("norm.weight", "norm.weight"),
    ("embed_tokens_per_layer.weight", "per_layer.embed.weight"),
    ("per_layer_model_projection.weight", "per_layer.proj.weight"),
    ("per_layer_projection_norm.weight", "per_layer.norm.weight"),
    ("layers.{i}.layer_scalar", "layers.{i}.layer_scalar"),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_post_norm.weight"),
    ("layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.ffn_post_norm.weight"),
    ("layers.{i}.self_attn.{proj}.{wb}", "layers.{i}.attn.{proj}.{wb}"),
    ("layers.{i}.self_attn.{qk}.weight", "layers.{i}.attn.{qk}.weight"),
    ("layers.{i}.per_layer_input_gate.weight", "layers.{i}.per_layer.gate.weight"),
    ("layers.{i}.per_layer_projection.weight", "layers.{i}.per_layer.proj.weight"),
    ("layers.{i}.post_per_layer_input_norm.weight", "layers.{i}.per_layer.norm.weight"),
]
_DENSE = [
    ("layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.{mlp}.weight", "layers.{i}.ffn.{mlp}.weight"),
]
_MOE = [
    ("layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.ffn.dense_norm.weight"),
    ("layers.{i}.mlp.{mlp}.weight", "layers.{i}.ffn.dense.{mlp}.weight"),
    ("layers.{i}.post_feedforward_layernorm_1.weight", "layers.{i}.ffn.dense_post_norm.weight"),
    ("layers.{i}.pre_feedforward_layernorm_2.weight", "layers.{i}.ffn.experts_norm.weight"),
    ("layers.{i}.post_feedforward_layernorm_2.weight", "layers.{i}.ffn.experts_post_norm.weight"),
    ("layers.{i}.router.proj.weight", "layers.{i}.ffn.router.gate.weight"),
    ("layers.{i}.router.{rs}", "layers.{i}.ffn.router.{rs}"),
    ("layers.{i}.experts.gate_up_proj", "layers.{i}.ffn.w_in"),
    ("layers.{i}.experts.down_proj", "layers.{i}.ffn.w_out"),
]
def hf_to_ours(arch: str, name: str, d_expert: int) -> Optional[str]:
    """The moelab name of HF tensor `name`, or None. `d_expert` > 0: the model's layers
    are MoE (Gemma 4's are all MoE or all dense), which decides where the dense FFN goes."""
    moe = d_expert > 0
    if name == HEAD[arch]:
        return "head.weight"
    for prefix in BODY[arch]:
        if name.startswith(prefix):
            return _rename(_COMMON + (_MOE if moe else _DENSE), name[len(prefix):], forward=True)
    return None


def ours_to_hf(arch: str, name: str, tensor: torch.Tensor) -> Optional[List[Tuple[str, torch.Tensor]]]:
    """HF (name, tensor) pairs for one moelab tensor; None when it has no counterpart."""
    if name == "head.weight":
        return [(HEAD[arch], tensor)]
    if name.endswith("ffn.router.expert_bias"):
        return []  # the selection bias: zero unless bias_update_rate > 0, which the signature refuses
    hf = _rename(_COMMON + _MOE + _DENSE, name, forward=False)
    return None if hf is None else [(BODY[arch][0] + hf, tensor)]


_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


def ignorable(arch: str, name: str, m: Optional[ModelConfig]) -> bool:
    """The multimodal towers, and the key/value weights some checkpoints keep for
    KV-sharing layers (transformers ignores them too: those layers compute none)."""
    if arch == GEMMA4_MM and name.startswith(IGNORED):
        return True
    hit = _SHARED_KV.search(name)
    return bool(hit and m is not None and int(hit.group(1)) >= m.n_layers - m.kv_shared_layers)
