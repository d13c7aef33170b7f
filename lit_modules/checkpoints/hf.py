"""Hugging Face <-> moelab checkpoints: tensor-name mapping and streaming conversion;
the config mapping both ways is hf_config.py's.

    import   config.json ──hf_config.model_config_from_hf──> recipe_from_hf
             *.safetensors ──safe_open, one tensor at a time──> rename / stack experts
             ──> each moelab tensor handed on as soon as it is complete

    export   moelab checkpoint ──> hf_config.hf_config_for (mapped back and compared:
             nothing is dropped silently) ──> HF shards, hub layout

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from arch import build_model
from arch.config import ModelConfig, Recipe
from arch.recipe import resolve_recipe
from arch.registry import RecipeError

from lit_modules.checkpoints.hf_config import (
    DEEPSEEK_V3, GEMMA3, GEMMA3_MM, GPT_OSS, MIXTRAL, OLMOE, QWEN3, QWEN3_MOE, ConvertError, family_step, family_hooks,
    unset_size_fields, moe_archs, one_line, hf_config_for, model_config_from_hf, read_hf_config,
)
from lit_modules.checkpoints.hf_names import rename as _rename
from lit_modules.checkpoints.model_dir import (
    ShardWriter, TensorSource, check_tensors, finish_dir, load_into, open_checkpoint,
    safetensors_source, writing_dir,
)


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
    own = getattr(family_hooks().get(arch), "RULES", None)
    return own[arch] if own and arch in own else RULES[arch]


def _bodies(arch: str) -> Tuple[str, ...]:
    """The prefixes under which `arch` keeps its decoder (the first is written on export)."""
    own = getattr(family_hooks().get(arch), "BODY", None)
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
    own_way = family_step(arch, "mtp_part")
    if own_way is not None:
        return own_way(name)
    found = _mtp_depth(name, n_layers) if arch == DEEPSEEK_V3 else None
    if found is None:
        return None
    k, rest = found
    return (k, _MTP_OWN[rest], True) if rest in _MTP_OWN else (k, rest, False)


def mtp_hf_name(arch: str, k: int, rest: str, own: bool, n_layers: int) -> str:
    """The inverse of `mtp_part`: the HF name of module k's tensor `rest`."""
    own_way = family_step(arch, "mtp_hf_name")
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
    own = family_step(arch, "hf_to_ours")
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
    if arch in moe_archs():
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
    own = family_step(arch, "ours_to_hf")
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


def recipe_from_hf(hf_dir) -> Tuple[str, Recipe, bool]:
    """(architecture, resolved recipe, tied) for a Hugging Face directory."""
    arch, top, text = read_hf_config(hf_dir)
    try:
        mc = model_config_from_hf(arch, text)
    except RecipeError:  # a ValueError too: already one sentence
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a value of a type transformers let through
        raise ConvertError(f"{Path(hf_dir) / 'config.json'} has a field moelab cannot map ({one_line(e)}); "
                           "check its types against the model's documented config.") from None
    if arch == GEMMA3_MM or arch in family_hooks() and top is not text:  # the multimodal wrapper owns the tying flag
        mc.tie_embeddings = bool(getattr(top, "tie_word_embeddings", mc.tie_embeddings))
    if arch == DEEPSEEK_V3 or family_step(arch, "mtp_part") is not None:  # MTP modules: as many as the tensors hold
        parts = (mtp_part(arch, name, mc.n_layers) for name in safetensors_source(hf_dir).shapes())
        mc.mtp.depth = len({p[0] for p in parts if p is not None})  # transformers builds none of them
        check = family_step(arch, "check_mtp")
        if mc.mtp.depth and check is not None:
            check(arch, mc, mc.mtp.depth)
    recipe = Recipe(name=Path(hf_dir).resolve().name, model=mc)
    recipe.train.seq_len = min(recipe.train.seq_len, mc.max_seq_len)
    try:
        recipe = resolve_recipe(recipe)
    except RecipeError as e:
        raise ConvertError(f"{arch} config in {hf_dir} maps to an invalid moelab recipe: {e}") from None
    return arch, recipe, mc.tie_embeddings


def _ignorable(arch: str, name: str, tied: bool, n_layers: Optional[int] = None,
               model: Optional[ModelConfig] = None) -> bool:
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports saved
        return True
    if arch == DEEPSEEK_V3 and (_mtp_depth(name, n_layers) or (0, ""))[1] in _MTP_SHARED:
        return True
    if arch == GEMMA3_MM and name.startswith(_IGNORED):
        return True
    own = family_step(arch, "ignorable")
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
        left_out = unset_size_fields(hf_dir, arch)
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
    adapt = family_step(arch, "adapt_source")
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
    own = family_step(arch, "export_pairs")
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
