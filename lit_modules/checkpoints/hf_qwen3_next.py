"""Hugging Face <-> moelab for the hybrid Qwen families: Qwen3-Next (Qwen3NextForCausalLM)
and the text model of Qwen3.5-MoE (Qwen3_5MoeForConditionalGeneration, and the text-only
Qwen3_5MoeForCausalLM). A FAMILY_MODULES entry of lit_modules/checkpoints/hf_config.py;
everything Qwen3-MoE-like (norms, q/k/v/o, QK-norm, router, experts) goes through
hf.py's rules. Names besides those (HF left, moelab right):

    layers.i.linear_attn.in_proj_qkv / _z / _b / _a         layers.i.attn.in_proj_qkv / _z / _b / _a
    layers.i.linear_attn.in_proj_qkvz, in_proj_ba  (Qwen3-Next: per key head [q, k, v, z] and [b, a];
                                                    split into the four above on import, fused on export)
    layers.i.linear_attn.conv1d.weight, A_log, dt_bias, norm.weight, out_proj.weight   layers.i.attn.*
    layers.i.self_attn.q_proj  (per head [query, gate])     layers.i.attn.q_proj  (output_gate)
    layers.i.mlp.shared_expert.{gate,up,down}_proj          layers.i.ffn.shared.*
    layers.i.mlp.shared_expert_gate                         layers.i.ffn.shared_gate

    mtp.fc / pre_fc_norm_embedding / pre_fc_norm_hidden / norm   mtp.0.eh_proj / enorm / hnorm / norm
    mtp.layers.0.*  (a full-attention decoder layer)            mtp.0.block.*

Qwen3.5 checkpoints keep the text model under model.language_model. beside a vision tower
(model.visual.), which is skipped. Both families' checkpoints carry one multi-token
prediction layer (mtp.*, config.json's mtp_num_hidden_layers) that transformers does not
build; it is moelab's MTP module of depth 1 (arch/mtp.py: vLLM's Qwen3-Next MTP computes
norm(layer(fc([norm_e(embed) ; norm_h(h)]))), DeepSeek-V3's combination), imported when the
checkpoint holds it and exported with model.mtp.depth = 1. Export writes
Qwen3NextForCausalLM (it holds every hybrid model moelab builds, dense layers included),
or Qwen3_5MoeForCausalLM when asked (`moelab export-hf --architecture`).
"""
from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from arch.config import (
    AttentionConfig, BalanceConfig, FFNConfig, LayerKindConfig, LayerOverride, LinearAttentionConfig,
    ModelConfig, MoEConfig, NormConfig, RouterConfig,
)
from arch.resolve import layer_specs
from lit_modules.checkpoints import hf, hf_config
from lit_modules.checkpoints.model_dir import TensorSource

QWEN3_NEXT, QWEN3_5_MOE, QWEN3_5_MOE_TEXT = (
    "Qwen3NextForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")
ARCHS = (QWEN3_NEXT, QWEN3_5_MOE, QWEN3_5_MOE_TEXT)
MOE_ARCHS = ARCHS  # per-expert hub layout, transformers' pooled auxiliary loss
MODEL_TYPES = {"qwen3_next": QWEN3_NEXT, "qwen3_5_moe": QWEN3_5_MOE, "qwen3_5_moe_text": QWEN3_5_MOE_TEXT}
CONFIG_CLASSES = {QWEN3_NEXT: "Qwen3NextConfig", QWEN3_5_MOE_TEXT: "Qwen3_5MoeTextConfig"}
LINEAR, FULL = "linear_attention", "full_attention"

_LINEAR_RULES = [
    ("layers.{i}.linear_attn.{lin}.weight", "layers.{i}.attn.{lin}.weight"),
    ("layers.{i}.linear_attn.{ssm}", "layers.{i}.attn.{ssm}"),
    ("layers.{i}.mlp.shared_expert.{mlp}.weight", "layers.{i}.ffn.shared.{mlp}.weight"),
    ("layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared_gate.weight"),
]
# hf.py reads these two for the family's archs (its _rules / _bodies)
RULES = dict.fromkeys(ARCHS, hf._COMMON + hf._QWEN + hf._MOE + _LINEAR_RULES)
# transformers 5 keeps Qwen3.5's text model under model.language_model. (its text-only class too)
BODY = dict.fromkeys((QWEN3_5_MOE, QWEN3_5_MOE_TEXT), ("model.language_model.", "model."))
_SKIPPED = ("model.visual.", "visual.")
# the MTP layer's own tensors (HF left, moelab's under mtp.0. right); its decoder layer is mtp.layers.0.
_MTP_OWN = {"mtp.fc.weight": "eh_proj.weight", "mtp.pre_fc_norm_embedding.weight": "enorm.weight",
            "mtp.pre_fc_norm_hidden.weight": "hnorm.weight", "mtp.norm.weight": "norm.weight"}
_MTP_OWN_HF = {v: k for k, v in _MTP_OWN.items()}
_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.(.+)$")


def text_config(arch: str, cfg):
    return cfg.get_text_config() if arch == QWEN3_5_MOE else cfg


def ignorable(arch: str, name: str, m: Optional[ModelConfig]) -> bool:
    """The vision tower; the MTP layer where the model has none (model.mtp.depth 0)."""
    return name.startswith(_SKIPPED) or (name.startswith("mtp.") and (m is None or not m.mtp.depth))


def mtp_part(name: str) -> Optional[Tuple[int, str, bool]]:
    """hf.mtp_part for these families: one MTP layer, its own tensors under mtp."""
    if name in _MTP_OWN:
        return 0, _MTP_OWN[name], True
    m = _MTP_LAYER.match(name)
    return (int(m.group(1)), m.group(2), False) if m else None


def mtp_hf_name(k: int, rest: str, own: bool) -> str:
    return _MTP_OWN_HF[rest] if own else f"mtp.layers.{k}.{rest}"


def check_mtp(arch: str, m: ModelConfig, depth: int) -> None:
    """Refuse, in one sentence, MTP modules that these families' one MTP layer cannot hold."""
    if depth != 1:
        raise _cannot(arch, "mtp_num_hidden_layers", depth, "moelab's MTP modules map to this family's one MTP "
                      "layer (mtp.layers.0 with mtp.fc and its norms), as in every released checkpoint; use "
                      "model.mtp.depth 0 or 1")
    if layer_specs(m)[-1].attention == "gated_deltanet":
        raise _cannot(arch, "layer_types", "linear_attention (last layer)", "moelab's MTP block is built like the "
                      "model's last layer, and this family's MTP layer is a full-attention one")


def _cannot(arch, field, value, why):
    return hf_config.cannot(arch, field, value, why)


def model_config(arch: str, text) -> ModelConfig:
    """The transformers text config of either family as a moelab ModelConfig; every field
    that changes the function is mapped or refused (hf_config.model_config_from_hf's contract)."""
    g = lambda name, default=None: getattr(text, name, default)  # noqa: E731
    n_layers, d = g("num_hidden_layers"), g("hidden_size")
    if g("hidden_act") != hf_config.SILU:
        raise _cannot(arch, "hidden_act", g("hidden_act"), "the experts, the DeltaNet convolution and its gate are "
                      "SiLU in moelab, as in every released checkpoint")
    if g("attention_dropout", 0.0):
        raise _cannot(arch, "attention_dropout", g("attention_dropout"), "moelab models have no dropout")
    layer_types = list(g("layer_types") or [])
    if len(layer_types) != n_layers:
        raise _cannot(arch, "layer_types", layer_types, f"it has {len(layer_types)} entries for {n_layers} layers")
    for t in set(layer_types) - {LINEAR, FULL}:
        raise _cannot(arch, "layer_types", t, f"{arch} has {LINEAR} and {FULL} layers only")
    rope = hf_config.layer_ropes(arch, text, [FULL])[0]
    heads = g("num_attention_heads")
    lin = LinearAttentionConfig(n_k_heads=g("linear_num_key_heads"), n_v_heads=g("linear_num_value_heads"),
                                k_head_dim=g("linear_key_head_dim"), v_head_dim=g("linear_value_head_dim"),
                                conv_kernel=g("linear_conv_kernel_dim"))
    attention = AttentionConfig(n_heads=heads, n_kv_heads=g("num_key_value_heads") or heads,
                                head_dim=g("head_dim") or d // heads, qk_norm=True,
                                bias=bool(g("attention_bias")), output_gate=True, linear=lin)
    names = ["linear" if t == LINEAR else "global" for t in layer_types]
    period = next(p for p in range(1, n_layers + 1) if all(names[i] == names[i % p] for i in range(n_layers)))
    kinds = {}
    if "linear" in names:
        kinds["linear"] = LayerKindConfig(attention="gated_deltanet")
    if "global" in names:
        kinds["global"] = LayerKindConfig(rope=rope)

    qwen35 = arch != QWEN3_NEXT
    n_experts, overrides, moe = g("num_experts") or 0, {}, MoEConfig()
    if qwen35 and n_experts <= 0:
        raise _cannot(arch, "num_experts", n_experts, "every Qwen3.5-MoE layer is an MoE layer")
    if n_experts > 0:
        shared = g("shared_expert_intermediate_size") or 0
        if shared <= 0:
            raise _cannot(arch, "shared_expert_intermediate_size", shared, "transformers builds a shared expert of "
                          "this width in every MoE layer; it must be positive")
        step = 1 if qwen35 else g("decoder_sparse_step", 1)
        if step < 1:
            raise _cannot(arch, "decoder_sparse_step", step, "it must be >= 1")
        moe = MoEConfig(
            n_experts=n_experts, top_k=g("num_experts_per_tok"), d_expert=g("moe_intermediate_size"),
            expert_ffn="swiglu",
            # Qwen3.5's router always renormalises the top-k weights (it has no norm_topk_prob)
            router=RouterConfig(kind="softmax_topk", renormalize=True if qwen35 else bool(g("norm_topk_prob"))),
            balance=BalanceConfig(aux_coef=float(g("router_aux_loss_coef", 0.0)), aux_scope="pooled"),
            n_shared_experts=1, d_shared=shared, shared_gate=True, every=step, first_k_dense=step - 1)
        if not qwen35:  # HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0
            overrides = {i: LayerOverride(moe=False) for i in (g("mlp_only_layers") or []) if 0 <= i < n_layers}
    d_ff = 0 if qwen35 else g("intermediate_size")
    return ModelConfig(
        d_model=d, n_layers=n_layers, vocab_size=g("vocab_size"), max_seq_len=g("max_position_embeddings"),
        attention=attention, ffn=FFNConfig(kind="swiglu", d_ff=d_ff), moe=moe,
        norm=NormConfig(eps=float(g("rms_norm_eps")), zero_centered=True, weight_in_float32=True),
        norm_placement="pre", layer_kinds=kinds, layer_pattern=names[:period], layer_overrides=overrides,
        tie_embeddings=bool(g("tie_word_embeddings")), init_std=float(g("initializer_range", 0.02)),
        init_scale_residual=False,
    )


# ------------------------------------------------------------ Qwen3-Next's fused cut


def _sizes(m: ModelConfig) -> Tuple[int, int, int, int, int]:
    lin = m.attention.linear
    return lin.n_k_heads, lin.k_head_dim, lin.n_v_heads // lin.n_k_heads * lin.v_head_dim, lin.n_v_heads, \
        lin.n_v_heads // lin.n_k_heads


_FUSED = re.compile(r"(.*\.linear_attn\.)(in_proj_qkvz|in_proj_ba)\.weight$")


def _split(m: ModelConfig, which: str, t: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """in_proj_qkvz (per key head: q, k, its value heads' v, their z) -> in_proj_qkv
    ([all q; all k; all v]) and in_proj_z; in_proj_ba (per key head: b, a) -> in_proj_b, _a."""
    n_k, dk, group_v, n_v, r = _sizes(m)
    if which == "in_proj_qkvz":
        q, k, v, z = t.reshape(n_k, 2 * dk + 2 * group_v, -1).split([dk, dk, group_v, group_v], dim=1)
        flat = lambda x: x.reshape(-1, t.shape[-1])  # noqa: E731
        return [("in_proj_qkv", torch.cat((flat(q), flat(k), flat(v)))), ("in_proj_z", flat(z).contiguous())]
    b, a = t.reshape(n_k, 2 * r, -1).split([r, r], dim=1)
    return [("in_proj_b", b.reshape(n_v, -1).contiguous()), ("in_proj_a", a.reshape(n_v, -1).contiguous())]


def _fuse(m: ModelConfig, parts: Dict[str, torch.Tensor]) -> Tuple[str, torch.Tensor]:
    """The inverse of `_split` for one pair."""
    n_k, dk, group_v, n_v, r = _sizes(m)
    if "in_proj_qkv" in parts:
        qkv, z = parts["in_proj_qkv"], parts["in_proj_z"]
        D = qkv.shape[-1]
        q, k, v = qkv.split([n_k * dk, n_k * dk, n_k * group_v])
        blocks = (q.reshape(n_k, dk, D), k.reshape(n_k, dk, D), v.reshape(n_k, group_v, D), z.reshape(n_k, group_v, D))
        return "in_proj_qkvz", torch.cat(blocks, dim=1).reshape(-1, D)
    b, a = parts["in_proj_b"], parts["in_proj_a"]
    D = b.shape[-1]
    return "in_proj_ba", torch.cat((b.reshape(n_k, r, D), a.reshape(n_k, r, D)), dim=1).reshape(-1, D)


def adapt_source(arch: str, m: ModelConfig, src: TensorSource) -> TensorSource:
    """Qwen3-Next's fused in_proj_qkvz / in_proj_ba as Qwen3.5's four projections (the
    cut moelab keeps); a wrong size is left whole for the planner to report."""
    if arch != QWEN3_NEXT:
        return src
    n_k, dk, group_v, n_v, r = _sizes(m)
    rows = {"in_proj_qkvz": n_k * (2 * dk + 2 * group_v), "in_proj_ba": 2 * n_v}
    cut = {"in_proj_qkvz": (("in_proj_qkv", 2 * n_k * dk + n_v * m.attention.linear.v_head_dim),
                            ("in_proj_z", n_v * m.attention.linear.v_head_dim)),
           "in_proj_ba": (("in_proj_b", n_v), ("in_proj_a", n_v))}

    def fits(name, shape) -> Optional[re.Match]:
        f = _FUSED.match(name)
        return f if f and len(shape) == 2 and shape[0] == rows[f.group(2)] else None

    def shapes():
        out = {}
        for name, shape in src.shapes().items():
            f = fits(name, shape)
            if f is None:
                out[name] = shape
            else:
                out.update({f"{f.group(1)}{part}.weight": (n, shape[1]) for part, n in cut[f.group(2)]})
        return out

    def tensors():
        for name, t in src.tensors():
            f = fits(name, tuple(t.shape))
            if f is None:
                yield name, t
            else:
                yield from ((f"{f.group(1)}{part}.weight", piece) for part, piece in _split(m, f.group(2), t))

    return TensorSource(shapes, tensors)


def export_pairs(arch: str, m: ModelConfig, pairs: Iterator[Tuple[str, torch.Tensor]]):
    """Qwen3-Next stores each DeltaNet layer's four input projections as two fused ones:
    hold each until its partner arrives, then write the fused tensor."""
    if arch != QWEN3_NEXT:
        yield from pairs
        return
    partner = {"in_proj_qkv": "in_proj_z", "in_proj_z": "in_proj_qkv", "in_proj_b": "in_proj_a",
               "in_proj_a": "in_proj_b"}
    waiting: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in pairs:
        f = re.match(r"(.*\.linear_attn\.)(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a)\.weight$", name)
        if f is None:
            yield name, t
            continue
        key = f.group(1) + ("qkvz" if f.group(2) in ("in_proj_qkv", "in_proj_z") else "ba")
        held = waiting.setdefault(key, {})
        held[f.group(2)] = t
        if partner[f.group(2)] in held:
            del waiting[key]
            fused, tensor = _fuse(m, held)
            yield f"{f.group(1)}{fused}.weight", tensor
    if waiting:
        raise hf_config.ConvertError(f"the checkpoint lacks half of {next(iter(waiting))}'s input projections; it is "
                              "incomplete.")


# ------------------------------------------------------------------------ export


def export_family(m: ModelConfig) -> Optional[str]:
    return QWEN3_NEXT if any(s.attention == "gated_deltanet" for s in layer_specs(m)) else None


def config_kwargs(arch: str, m: ModelConfig) -> dict:
    a, lin, mo, specs = m.attention, m.attention.linear, m.moe, layer_specs(m)
    full = [s for s in specs if s.attention != "gated_deltanet"]
    rope = hf_config.rope_dict(full[0].rope if full else specs[0].rope)
    rope["partial_rotary_factor"] = (full[0].rope if full else specs[0].rope).partial  # HF's default is 0.25
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
              num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm.eps, tie_word_embeddings=m.tie_embeddings,
              attention_bias=a.bias, initializer_range=m.init_std, hidden_act=hf_config.SILU, rope_parameters=rope,
              layer_types=[LINEAR if s.attention == "gated_deltanet" else FULL for s in specs],
              linear_num_key_heads=lin.n_k_heads, linear_num_value_heads=lin.n_v_heads,
              linear_key_head_dim=lin.k_head_dim, linear_value_head_dim=lin.v_head_dim,
              linear_conv_kernel_dim=lin.conv_kernel, num_experts=mo.n_experts, num_experts_per_tok=mo.top_k,
              moe_intermediate_size=mo.d_expert or 1,
              shared_expert_intermediate_size=mo.n_shared_experts * (mo.d_shared or 0) or 1,
              router_aux_loss_coef=mo.balance.aux_coef, output_router_logits=False)
    if m.mtp.depth:  # not a transformers field: the released config.json's, for vLLM and SGLang
        kw["mtp_num_hidden_layers"] = m.mtp.depth
    if arch == QWEN3_NEXT:
        kw.update(intermediate_size=m.ffn.d_ff or mo.d_expert, decoder_sparse_step=1,
                  mlp_only_layers=[s.index for s in specs if not s.moe], norm_topk_prob=mo.router.renormalize)
    return kw


# transformers' own modules of these families (those the installed version has)
_HF_MODULES = ("transformers.models.qwen3_next.modeling_qwen3_next",
               "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
               "transformers.models.qwen3_5.modeling_qwen3_5")
_HF_RULES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


@contextlib.contextmanager
def transformers_pytorch_delta_rule(*models: torch.nn.Module):
    """Within the block, transformers' Qwen3-Next / Qwen3.5 DeltaNet layers run its own
    PyTorch delta rule even where flash-linear-attention is installed. transformers 5.x
    wraps that rule in a dispatcher that calls fla whenever fla imports (CPU tensors
    included, where fla's Triton kernels fail), and 4.57 kept fla's function in each
    layer's `chunk_gated_delta_rule` / `recurrent_gated_delta_rule`. Both are pointed at
    the unwrapped PyTorch functions and restored on exit. Used where moelab compares
    with transformers: on a CPU, and where fla refuses its backward (lit_modules/tools/bench.py)."""
    import importlib
    import inspect
    import sys

    saved = []
    for name in _HF_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for rule in _HF_RULES:
            fn = getattr(module, rule, None)
            if fn is not None:
                saved.append((module, rule, fn))
                setattr(module, rule, inspect.unwrap(fn))
    first = {rule: fn for _, rule, fn in reversed(saved)}  # the first family's, for layers of no family
    for model in models:
        for m in model.modules():
            home = sys.modules.get(type(m).__module__)  # a layer runs its own family's rule
            for attr, rule in (("chunk_gated_delta_rule", _HF_RULES[0]), ("recurrent_gated_delta_rule", _HF_RULES[1])):
                fn, plain = getattr(m, attr, None), getattr(home, rule, first.get(rule))
                if callable(fn) and plain is not None:
                    saved.append((m, attr, fn))
                    setattr(m, attr, inspect.unwrap(plain))
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)
