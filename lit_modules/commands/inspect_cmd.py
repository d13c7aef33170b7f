"""`moelab inspect` and `moelab recipes`: size and cost of a recipe, nothing allocated."""
from __future__ import annotations

import json
from collections import Counter
from itertools import groupby

from arch import available_recipes, count, load_recipe
from arch.accounting import MEMORY_CONTEXT, Accounting, memory_table
from arch.config import Recipe
from arch.registry import RecipeError


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs/token, KV cache and layer pattern of a recipe")
    p.add_argument("recipe", help="a recipe path or a name under recipes/ (e.g. qwen3/30b_a3b)")
    p.add_argument("overrides", nargs="*", default=[], help="a.b=c overrides, e.g. proxy.d_model=768")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for FLOPs/token (default: the recipe's train.seq_len)")
    p.add_argument("--context", type=int, default=None,
                   help="context length for the KV cache total (default: model.max_seq_len) and for the "
                        f"memory table by weight format (default: {MEMORY_CONTEXT})")
    p.set_defaults(func=run_inspect)
    r = sub.add_parser("recipes", help="list the recipes under recipes/")
    r.set_defaults(func=run_recipes)


def run_recipes(args) -> int:
    for name in available_recipes():
        if not name.split("/")[-1].startswith("_"):
            print(name)
    return 0


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def shortest_period(tags) -> int:
    """The smallest p with tags[i] == tags[i % p] for every i: the length minus the
    longest proper prefix that is also a suffix (KMP's failure function), in linear
    time; trying each p in turn is quadratic in the layers (seconds at 10,000)."""
    border = [0] * len(tags)
    k = 0
    for i in range(1, len(tags)):
        while k and tags[i] != tags[k]:
            k = border[k - 1]
        if tags[i] == tags[k]:
            k += 1
        border[i] = k
    return len(tags) - border[-1]


def pattern_summary(kinds, moe) -> str:
    """The shortest cycle of (kind, MoE?) that generates the layers, run-length coded,
    plus the count of each kind: '[local x5, global] cycled: 52 local, 10 global'."""
    tags = [k + ("+moe" if m else "") for k, m in zip(kinds, moe)]
    n = len(tags)
    period = shortest_period(tags)
    cycle = ", ".join(f"{k} x{len(list(g))}" if len(tags) > 1 else k for k, g in groupby(tags[:period]))
    counts = ", ".join(f"{c} {k}" for k, c in Counter(tags).items())
    if period == n and n > 12:  # no short cycle (overrides): just the counts
        return counts
    return f"[{cycle}] cycled: {counts}"


def kind_extras(lk) -> str:
    """A layer kind's own head width, KV heads, keys = values and proportional RoPE
    (Gemma 4), as ', head_dim 512, 2 kv, k = v, 25% proportional'."""
    parts = [f"head_dim {lk.head_dim}"] if lk.head_dim else []
    parts += [f"{lk.n_kv_heads} kv"] if lk.n_kv_heads else []
    parts += ["k = v"] if lk.k_eq_v else []
    if lk.rope.proportional:
        parts.append(f"{lk.rope.partial:.0%} proportional")
    elif lk.rope.partial != 1.0:
        parts.append(f"{lk.rope.partial:.0%} rotated")
    return "".join(", " + p for p in parts)


def kv_sharing_summary(recipe: Recipe) -> str:
    from arch.resolve import layer_specs

    specs = layer_specs(recipe.model)
    shared = [s for s in specs if s.kv_source is not None]
    sources = ", ".join(f"{i} ({specs[i].kind})" for i in sorted({s.kv_source for s in shared}))
    return (f"layers {shared[0].index}-{shared[-1].index} attend over the keys and values of layers {sources}; "
            "they hold no cache")


def inspect_dict(recipe: Recipe, acc: Accounting) -> dict:
    from lit_modules.train.memory import layout_rows

    m = recipe.model
    out = {"recipe": recipe.name}
    out.update(acc.to_dict())
    out.update({
        "d_model": m.d_model, "n_heads": m.attention.n_heads, "n_kv_heads": m.attention.n_kv_heads,
        "head_dim": m.attention.head_dim, "vocab_size": m.vocab_size, "d_ff": m.ffn.d_ff,
        "n_experts": m.moe.n_experts, "top_k": m.moe.top_k, "d_expert": m.moe.d_expert,
        "n_shared_experts": m.moe.n_shared_experts, "tie_embeddings": m.tie_embeddings,
        "windows": {k: v.window for k, v in m.layer_kinds.items()},
        "train_state_bytes_per_device": dict(layout_rows(recipe, acc)),
    })
    return out


def decimal_bytes(n: float) -> str:
    """GB / MB in powers of 10, the units of the Gemma 3 report's memory table."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def memory_rows(table: dict, context: int) -> list:
    """The memory table by weight format (1 GB = 1e9 bytes)."""
    rows = [("memory", f"weights / + bf16 KV of one {context}-token sequence, windows honoured / "
                       f"+ KV with every layer global")]
    for fmt, r in table.items():
        rows.append((f"  {fmt}", " / ".join(decimal_bytes(r[k]) for k in ("weights", "with_kv", "with_kv_all_global"))))
    return rows


def format_table(recipe: Recipe, acc: Accounting, proxy_changes=(), memory=None) -> str:
    m, a = recipe.model, recipe.model.attention
    rows = [
        ("recipe", recipe.name),
        ("width", f"d_model {m.d_model}, heads {a.n_heads} q / {a.n_kv_heads} kv x head_dim {a.head_dim}, "
                  f"vocab {m.vocab_size}"),
    ]
    if acc.n_linear_layers:
        lin, gate = a.linear, ", output gate on full attention" if a.output_gate else ""
        rows.append(("linear attn", f"gated DeltaNet in {acc.n_linear_layers} of {acc.n_layers} layers: "
                                    f"{lin.n_k_heads} q/k x {lin.k_head_dim}, {lin.n_v_heads} v x {lin.v_head_dim}, "
                                    f"conv {lin.conv_kernel}{gate}"))
    if m.moe.n_experts:
        shared = f", {m.moe.n_shared_experts} shared x {m.moe.d_shared}" if m.moe.n_shared_experts else ""
        rows.append(("experts", f"{m.moe.n_experts} x d_expert {m.moe.d_expert}, top-{m.moe.top_k}{shared}, "
                                f"{acc.n_moe_layers} of {acc.n_layers} layers MoE"))
    if acc.n_moe_layers < acc.n_layers or m.moe.kind == "parallel_dense":
        beside = " (beside the experts in every MoE layer)" if m.moe.kind == "parallel_dense" else ""
        rows.append(("dense FFN", f"{m.ffn.kind}, d_ff {m.ffn.d_ff}{beside}"))
    windows = ", ".join(f"{k}: {v.attention}" if v.attention not in (None, a.kind) else
                        f"{k}: {'window ' + str(v.window) if v.window else 'global'} "
                        f"(rope {v.rope.theta:g}{', x' + format(v.rope.factor, 'g') if v.rope.scaling != 'none' else ''}"
                        f"{kind_extras(v)})"
                        for k, v in m.layer_kinds.items() if k in acc.layer_kinds)
    rows += [
        ("layers", f"{acc.n_layers}: {pattern_summary(acc.layer_kinds, acc.layer_moe)}"),
        ("layer kinds", windows),
        ("params total", f"{human(acc.params_total)} ({acc.params_total:,})"),
        ("  embedding", f"{human(acc.params_embedding)}" + ("" if acc.params_head else " (tied head)")),
    ]
    if acc.params_per_layer_embedding:
        rows.append(("    per-layer", f"{human(acc.params_per_layer_embedding)} (the per-layer input table, "
                                     f"{m.n_layers} x {m.per_layer_input.dim} per token)"))
    if acc.params_head:
        rows.append(("  head", human(acc.params_head)))
    rows += [
        ("  non-embedding", human(acc.params_non_embedding)),
        ("params active", f"{human(acc.params_active)} ({acc.params_active:,})"),
    ]
    if acc.params_mtp:
        rows.append(("MTP modules", f"{m.mtp.depth} x {human(acc.params_mtp // m.mtp.depth)} (training only, in "
                                    f"no figure above; loss weight {m.mtp.loss_weight:g})"))
    mtp = " + the MTP modules" if acc.params_mtp else ""
    rows += [
        ("FLOPs/token", f"{human(acc.flops_per_token)} train (6 x {human(acc.matmul_params_active)} matmul params "
                        f"+ {human(acc.attention_flops_per_token)} attention at seq {acc.seq_len}{mtp})"),
        ("KV cache", f"{human_bytes(acc.kv_bytes_per_token)}/token (bf16), "
                     f"{human_bytes(acc.kv_bytes_at_context)} for one {acc.context}-token sequence"
                     + (" (DeltaNet state included)" if acc.n_linear_layers else "")),
    ]
    if acc.n_linear_layers:
        rows.append(("DeltaNet state", f"{human_bytes(acc.linear_state_bytes)} per sequence at any length "
                                       "(fp32 recurrent state + bf16 conv inputs)"))
    if m.kv_shared_layers:
        rows.append(("KV sharing", kv_sharing_summary(recipe)))
    rows += stage_rows(recipe)
    from lit_modules.train.memory import layout_rows

    layouts = layout_rows(recipe, acc)
    rows.append(("train memory", "model state per device (fp32 weights + grads + AdamW moments; activations "
                                 "extra):"))
    rows += [(f"  {name}", human_bytes(n)) for name, n in layouts]
    if memory is not None:
        rows += memory_rows(*memory)
    if proxy_changes:
        rows.append(("proxy", "derived from the reference: " + "; ".join(proxy_changes)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def stage_rows(recipe: Recipe) -> list:
    """train.stages, one row each: steps, tokens per step, RoPE, FLOPs/token at its seq_len."""
    if not recipe.train.stages:
        return []
    from arch import count
    from arch.stages import stage_plan

    plan = stage_plan(recipe)
    rows = [("stages", f"{len(plan)}, {recipe.train.max_steps} steps")]
    for st in plan:
        rope = ", ".join(f"{k} {r.theta:g}" + (f" {r.scaling} x{r.factor:g}" if r.scaling != "none" else "")
                         for k, r in st.ropes)
        flops = count(recipe.model, seq_len=st.seq_len).flops_per_token
        mix = ""
        if st.mix:
            total = sum(w for _, w in st.mix)
            mix = ", data " + " ".join(f"{n} {w / total:.0%}" for n, w in st.mix)
        rows.append((f"  {st.name}", f"steps {st.start + 1}-{st.end}: {st.grad_accum} x {st.micro_batch_size} x "
                                     f"{st.seq_len} tokens per rank, rope {rope}, {human(flops)} FLOPs/token{mix}"))
    return rows


def run_inspect(args) -> int:
    for flag, value in (("--seq-len", args.seq_len), ("--context", args.context)):
        if value is not None and value < 1:
            raise RecipeError(f"{flag} must be a positive number of tokens, got {value}.")
    recipe = load_recipe(args.recipe, args.overrides)
    seq_len = args.seq_len if args.seq_len is not None else recipe.train.seq_len
    acc = count(recipe.model, seq_len=seq_len, context=args.context)
    changes = proxy_derivation(args.recipe, args.overrides, recipe)
    import experts  # noqa: F401  (registers the MoE layer the meta-device build needs)

    mem_context = args.context if args.context is not None else MEMORY_CONTEXT
    memory = memory_table(recipe.model, mem_context)
    if args.json:
        print(json.dumps({**inspect_dict(recipe, acc), "proxy_changes": changes,
                          "memory_bytes": {"context": mem_context, **memory}}, indent=2))
    else:
        print(format_table(recipe, acc, changes, (memory, mem_context)))
    return 0


def proxy_derivation(name, overrides, recipe: Recipe) -> list:
    """What `proxy.*` changed in the reference (empty without a proxy)."""
    import dataclasses

    from arch.proxy import is_active, proxy_changes

    if not is_active(recipe.proxy):
        return []
    unset = [f"proxy.{f.name}=null" for f in dataclasses.fields(recipe.proxy) if f.name != "multiple_of"]
    ref = load_recipe(name, [*overrides, *unset])
    return proxy_changes(ref.model, recipe.model)
