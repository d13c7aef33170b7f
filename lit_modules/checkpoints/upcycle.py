"""Sparse upcycling: a dense moelab model -> an MoE recipe and its weights.

Every MoE layer of the output gets E experts built from the dense FFN of the same
layer; attention, norms, embeddings, the head and the layers that stay dense are
copied unchanged. The dense FFN's d_ff hidden units are cut into G equal parts
(granularity G; G = 1: the whole FFN) and each part is copied R = E / G times:

    dense FFN, d_ff = G x F        experts (e = r * G + g: replica r of part g)
    [ part 0 | part 1 ]   G = 2    e0 = r0.part0  e1 = r0.part1  e2 = r1.part0  e3 = r1.part1 ...

A dense FFN is a sum over its hidden units, so FFN(x) = sum_g part_g(x) exactly, with
down-projection biases split as b / G.

What is promised at initialisation (noise 0, reinit fraction 0, dropless):

  G = 1 (copies): every expert is the dense FFN, so any top-k mix whose weights sum
    to 1 is the dense FFN: the upcycled model's logits equal the dense model's up to
    float rounding, whatever the router picks.
  G > 1 (fine-grained): top_k = G x m and the router's rows are tied across the parts
    of a replica (row e = row of replica e // G), so replica r's G experts share one
    logit: top-k takes the G parts of the m best replicas (ties only inside a block of
    G, which top-k takes whole), each part's renormalised weights sum to 1 / G over the
    m replicas, and router.scale = G restores the sum: equal logits again.

Both need weights that sum to 1 over the chosen experts (router.renormalize = true,
or kind topk_softmax); upcycling refuses other routers. Capacity-limited dispatch
(model.moe.capacity_factor) drops tokens and breaks the equality; it is left to the
user. With --noise or --reinit-fraction the experts differ from the start, on
purpose, and nothing is promised.

Router initialisation: N(0, model.init_std), seeded, the rows tied as above. Not
zeros: with equal logits top-k breaks the ties by index and every token goes to the
same experts, so the other copies would never see a token (nor a gradient) until the
router had learned to leave them; small random rows spread the load from the first
step, and the copies are identical, so the output does not depend on them.

Options beside the copies: --noise STD adds N(0, (STD x std of the dense matrix)^2)
to each expert's copy; --reinit-fraction P redraws, in each expert, a random P of its
hidden units (gate/up rows and down column) from N(mean, std) of the dense matrices
(Drop-Upcycling, Nakamura et al. 2025). Both break the equality at step 0, by design.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from arch import build_model, count, load_recipe, recipe_to_yaml
from arch.config import Recipe
from arch.ffn import GATED
from arch.registry import RecipeError
from arch.resolve import layer_specs

from lit_modules.checkpoints.layout import RECIPE_FILE
from lit_modules.checkpoints.model_dir import ShardWriter, finish_dir, load_model, open_checkpoint, writing_dir


class UpcycleError(RecipeError):
    """A bad upcycling request; the message says what to change."""


# fields upcycling sets itself: an override of one would break the weights or the promise
FIXED = ("model.moe.n_experts", "model.moe.top_k", "model.moe.d_expert", "model.moe.expert_ffn",
         "model.moe.expert_bias", "model.moe.n_shared_experts", "model.moe.d_shared", "model.moe.router.scale",
         "model.moe.kind", "train.init_from")


@dataclass
class UpcycleOptions:
    n_experts: int
    top_k: int
    granularity: int = 1
    noise: float = 0.0
    reinit_fraction: float = 0.0
    seed: int = 0
    overrides: Sequence[str] = field(default_factory=tuple)  # a.b=c for the output recipe


def check_options(opts: UpcycleOptions) -> None:
    E, K, G = opts.n_experts, opts.top_k, opts.granularity
    if G < 1 or E < 1 or K < 1:
        raise UpcycleError(f"--experts ({E}), --top-k ({K}) and --granularity ({G}) must be positive integers.")
    if E % G:
        raise UpcycleError(f"--experts {E} is not a multiple of --granularity {G}; each of the G parts of the "
                           f"FFN is copied E / G times, so choose E = G x replicas.")
    if K % G:
        raise UpcycleError(f"--top-k {K} is not a multiple of --granularity {G}; a token must take all G parts "
                           f"of a replica to compute the whole FFN, so choose top-k = G x m.")
    if K > E:
        raise UpcycleError(f"--top-k {K} exceeds --experts {E}; choose a top-k of at most the expert count.")
    if not (math.isfinite(opts.noise) and opts.noise >= 0):
        raise UpcycleError(f"--noise {opts.noise} must be a finite number >= 0 (a fraction of each dense "
                           f"matrix's standard deviation; 0: exact copies).")
    if not (0.0 <= opts.reinit_fraction <= 1.0):
        raise UpcycleError(f"--reinit-fraction {opts.reinit_fraction} must be between 0 and 1 (the share of "
                           f"each expert's hidden units drawn afresh).")
    for o in opts.overrides:
        key = o.split("=", 1)[0].strip()
        if any(key == f or key.startswith(f + ".") for f in FIXED):
            raise UpcycleError(f"override {o!r} sets a field upcycling derives itself; use --experts, --top-k "
                               f"and --granularity instead.")
        if key.startswith("model.") and not _may_override(key):
            raise UpcycleError(f"override {o!r} would change the dense architecture the weights are copied "
                               f"from; only model.moe.* and implementation fields (attention.impl, "
                               f"fused_ce_chunk, ...) may be set here: change the dense model first.")


def _may_override(key: str) -> bool:
    from lit_modules.checkpoints.training import _may_change

    return key.startswith("model.moe.") or _may_change(key[len("model."):])


def upcycled_recipe(dense: Recipe, opts: UpcycleOptions, out_dir: Optional[Path] = None) -> Recipe:
    """The MoE recipe: the dense one with the experts set (see the module docstring)
    and train.init_from = out_dir, so `moelab train OUT/recipe.yaml` starts from the
    upcycled weights."""
    check_options(opts)
    m = dense.model
    if any(s.moe for s in layer_specs(m)):
        raise UpcycleError(f"the source model ({dense.name}) already has MoE layers; upcycling starts from a "
                           f"dense model (model.moe.n_experts = 0).")
    G = opts.granularity
    if m.ffn.d_ff % G:
        raise UpcycleError(f"the dense FFN width model.ffn.d_ff = {m.ffn.d_ff} is not divisible by "
                           f"--granularity {G}; choose a G that divides it.")
    if m.ffn.kind not in GATED:
        raise UpcycleError(f"model.ffn.kind = {m.ffn.kind} has no expert form; upcycle a swiglu, geglu or "
                           f"gelu model.")
    sets = [f"model.moe.kind=moe", f"model.moe.n_experts={opts.n_experts}", f"model.moe.top_k={opts.top_k}",
            f"model.moe.d_expert={m.ffn.d_ff // G}", f"model.moe.expert_ffn={m.ffn.kind}",
            f"model.moe.expert_bias={str(m.ffn.bias).lower()}", "model.moe.n_shared_experts=0",
            "model.moe.d_shared=null", f"model.moe.router.scale={float(G)}",
            f"name={Path(dense.name).name or 'model'}-upcycled-e{opts.n_experts}k{opts.top_k}"
            + (f"g{G}" if G > 1 else "")]
    # the dense run's own name and resume point would send `moelab train` back to the
    # dense run's directory and checkpoints
    sets += ["train.run_name=null", "train.resume=null"]
    if out_dir is not None:
        sets.append(f"train.init_from={Path(out_dir).resolve()}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / RECIPE_FILE
        src.write_text(recipe_to_yaml(dense))
        recipe = load_recipe(src, sets + list(opts.overrides))
    r = recipe.model.moe.router
    if not (r.renormalize or r.kind == "topk_softmax"):
        raise UpcycleError(f"model.moe.router.kind = {r.kind} without renormalize gives top-k weights that do not "
                           f"sum to 1, so the copies would not add up to the dense FFN; set "
                           f"model.moe.router.renormalize=true (or kind=topk_softmax).")
    if G > 1 and (opts.n_experts // r.n_group) % G:
        raise UpcycleError(f"model.moe.router.n_group = {r.n_group} splits the {opts.n_experts} experts into groups "
                           f"that cut through a replica's {G} parts; choose n_group so that n_experts / n_group "
                           f"is a multiple of --granularity.")
    if not any(s.moe for s in layer_specs(recipe.model)):
        raise UpcycleError("no layer is MoE after the overrides (model.moe.first_k_dense / every / "
                           "layer_overrides); leave at least one layer to upcycle.")
    return recipe


# ------------------------------------------------------------------ weights


def _ffn_matrices(ffn: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """The dense FFN's tensors: gate (absent for gelu), up, down and their biases."""
    gate = getattr(ffn, "gate_proj", None)
    return {"gate": None if gate is None else gate.weight.detach(), "up": ffn.up_proj.weight.detach(),
            "down": ffn.down_proj.weight.detach(),
            "b_gate": None if gate is None or gate.bias is None else gate.bias.detach(),
            "b_up": None if ffn.up_proj.bias is None else ffn.up_proj.bias.detach(),
            "b_down": None if ffn.down_proj.bias is None else ffn.down_proj.bias.detach()}


def _normal_like(t: torch.Tensor, mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=gen) * std + mean


def expert_tensors(ffn: nn.Module, opts: UpcycleOptions, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """w_in (E, n_in F, D), w_out (E, D, F) and, where the dense FFN has biases, b_in
    (E, n_in F) and b_out (E, D) of one layer, in the dense weights' dtype."""
    d = _ffn_matrices(ffn)
    E, G = opts.n_experts, opts.granularity
    d_ff = d["up"].shape[0]
    F_ = d_ff // G
    dtype = d["up"].dtype
    ins = [d["gate"], d["up"]] if d["gate"] is not None else [d["up"]]
    w_in, w_out, b_in, b_out = [], [], [], []
    n_re = round(opts.reinit_fraction * F_)
    for e in range(E):
        rows = slice((e % G) * F_, (e % G + 1) * F_)
        # copies: the redraws below write into them, never into the dense weights
        parts_in = [m[rows].to(torch.float32, copy=True) for m in ins]  # each (F, D)
        part_out = d["down"][:, rows].to(torch.float32, copy=True)  # (D, F)
        if opts.noise > 0:
            parts_in = [p + _normal_like(p, 0.0, opts.noise * m.float().std().item(), gen)
                        for p, m in zip(parts_in, ins)]
            part_out = part_out + _normal_like(part_out, 0.0, opts.noise * d["down"].float().std().item(), gen)
        if n_re:
            units = torch.randperm(F_, generator=gen)[:n_re]
            for p, m in zip(parts_in, ins):
                mf = m.float()
                p[units] = _normal_like(p[units], mf.mean().item(), mf.std().item(), gen)
            df = d["down"].float()
            part_out[:, units] = _normal_like(part_out[:, units], df.mean().item(), df.std().item(), gen)
        w_in.append(torch.cat(parts_in, 0))
        w_out.append(part_out)
        if d["b_up"] is not None:
            b_ins = [d["b_gate"], d["b_up"]] if d["gate"] is not None else [d["b_up"]]
            b_in.append(torch.cat([b[rows].float() for b in b_ins]))
        if d["b_down"] is not None:
            b_out.append(d["b_down"].float() / G)  # each token sums G parts of the bias
    out = {"w_in": torch.stack(w_in).to(dtype), "w_out": torch.stack(w_out).to(dtype)}
    if b_in:
        out["b_in"] = torch.stack(b_in).to(dtype)
    if b_out:
        out["b_out"] = torch.stack(b_out).to(dtype)
    return out


def router_tensors(meta_router: nn.Module, recipe: Recipe, opts: UpcycleOptions, dtype: torch.dtype,
                   gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Router rows N(0, init_std), tied across the G parts of each replica; biases 0."""
    E, G = opts.n_experts, opts.granularity
    D = meta_router.gate.weight.shape[1]
    base = torch.randn(E // G, D, generator=gen) * recipe.model.init_std
    out = {"gate.weight": base.repeat_interleave(G, dim=0).to(dtype)}
    for name, t in meta_router.state_dict().items():
        if name not in out:  # the gate's bias (the weights' dtype), the balancing bias buffer (its own)
            out[name] = torch.zeros(t.shape, dtype=dtype if name.startswith("gate.") else t.dtype)
    return out


def upcycled_tensors(dense_model: nn.Module, recipe: Recipe, opts: UpcycleOptions):
    """(name, tensor) of the MoE model, in its state_dict order, one MoE layer built at
    a time: memory is the dense model plus one layer's experts."""
    gen = torch.Generator().manual_seed(opts.seed)
    meta = build_model(recipe.model, device="meta")
    dense_state = dense_model.state_dict()
    layer_cache: Dict[str, torch.Tensor] = {}
    cached_layer = None
    for name, t_meta in meta.state_dict().items():
        if name in dense_state:
            yield name, dense_state[name]
            continue
        parts = name.split(".")  # layers.i.ffn.<rest>
        if parts[0] != "layers" or parts[2] != "ffn":
            raise UpcycleError(f"the MoE model has a tensor {name} with no counterpart in the dense one; this "
                               f"moelab cannot upcycle that architecture.")
        i = int(parts[1])
        if cached_layer != i:
            ffn = dense_model.layers[i].ffn
            moe = meta.layers[i].ffn
            dtype = ffn.up_proj.weight.dtype
            layer_cache = expert_tensors(ffn, opts, gen)
            layer_cache.update({f"router.{k}": v for k, v in router_tensors(moe.router, recipe, opts, dtype,
                                                                             gen).items()})
            cached_layer = i
        rest = ".".join(parts[3:])
        if rest not in layer_cache:
            raise UpcycleError(f"the MoE layer tensor {name} has no upcycling rule (shared experts and gates are "
                               f"not upcycled); this moelab cannot upcycle that architecture.")
        t = layer_cache.pop(rest)
        if tuple(t.shape) != tuple(t_meta.shape):
            raise UpcycleError(f"upcycled {name} has shape {tuple(t.shape)}, the recipe's model "
                               f"{tuple(t_meta.shape)}; this is a bug in moelab's upcycling.")
        yield name, t


@torch.no_grad()
def max_logit_difference(dense_model: nn.Module, moe_model: nn.Module, vocab: int, n_tokens: int = 64,
                         seed: int = 0) -> float:
    """max |logits(MoE) - logits(dense)| over one random sequence, both in float32."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n_tokens, dense_model.cfg.max_seq_len)
    ids = torch.randint(0, vocab, (1, n), generator=gen)
    a = dense_model.float().eval()(ids).logits
    b = moe_model.float().eval()(ids).logits
    return float((a - b).abs().max())


def upcycle(source, out_dir, opts: UpcycleOptions, check: bool = True,
            max_shard_bytes: Optional[int] = None) -> Dict:
    """Write OUT_DIR (a moelab model directory) from the dense model at `source` (a
    model directory, .ckpt, sharded folder or run directory). Returns what was done;
    with `check`, the largest logit difference from the dense model on random tokens
    (loading the output back)."""
    check_options(opts)
    # every refusal before the weights are read: the recipe alone, then OUT_DIR
    dense_recipe, _, _ = open_checkpoint(source)
    recipe = upcycled_recipe(dense_recipe, opts, out_dir)
    with writing_dir(out_dir) as work:
        dense_recipe, dense_model, tok = load_model(source)
        writer = ShardWriter(work, max_shard_bytes)
        for name, t in upcycled_tensors(dense_model, recipe, opts):
            writer.add(name, t)
        files = writer.close()
        finish_dir(work, out_dir, recipe, tok)
    acc, dense_acc = count(recipe.model), count(dense_recipe.model)
    info = {"recipe": recipe.name, "files": files, "tokenizer": tok is not None,
            "params_total": acc.params_total, "params_active": acc.params_active,
            "dense_params": dense_acc.params_total, "moe_layers": sum(s.moe for s in layer_specs(recipe.model)),
            "max_logit_diff": None}
    if check:
        _, moe_model, _ = load_model(out_dir)
        info["max_logit_diff"] = max_logit_difference(dense_model, moe_model, recipe.model.vocab_size)
    return info


def exact_expected(opts: UpcycleOptions) -> bool:
    """Whether the promise of the module docstring applies (no noise, no redraws)."""
    return opts.noise == 0 and opts.reinit_fraction == 0


__all__: List[str] = ["UpcycleError", "UpcycleOptions", "check_options", "exact_expected", "expert_tensors",
                      "max_logit_difference", "router_tensors", "upcycle", "upcycled_recipe", "upcycled_tensors"]
