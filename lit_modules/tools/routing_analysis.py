"""Routing analysis of a MoE model, for `moelab analyze` (lit_modules/commands/analyze_cmd.py).

Two halves, each a dict ready for JSON, then drawn with matplotlib (optional):

  history   what the run recorded while training: router_loads.jsonl (tokens per
            expert, dropped slots, entropy per layer, summed over each window of
            train.expert_image_every steps; lit_modules.train.callbacks.RouterStats)
            and the TensorBoard scalars router/layer{i}/* (every train.log_every
            steps, the step's last micro-batch on rank 0).
  final     the model run on a few batches, with a forward hook on every MoE layer's
            router (its Routing: expert ids, router probabilities; the model's math is
            untouched) and on the layer (its dropped slots). Per layer, over the N
            analysed tokens (each choosing K experts):

    router entropy     mean over tokens of H(p_t) (p_t: the router's distribution over
                       the E experts, as the balancing losses see it), nats; log E is
                       uniform. load entropy: H of the selection frequencies.
    co-selection       C[i, j] = tokens whose top-k holds both i and j (C[i, i] = the
                       load of i); lift[i, j] = C[i, j] N / (C[i, i] C[j, j]): 1 when i
                       and j are chosen together as often as independent choices
                       would be.
    transitions        T[i, j] between consecutive MoE layers a, b: over every token and
                       every pair (expert i in its top-k at a, expert j in its top-k at
                       b), counts (each token adds K_a x K_b).
    NMI                normalised mutual information I(X; Y) / sqrt(H(X) H(Y)) of the
                       first-choice experts X at a and Y at b (0: independent, 1: one
                       determines the other), and the same with the tokens of b shuffled
                       (fixed seed): the value finite samples give by chance.
    top tokens         per expert e, the input tokens v at the positions it takes,
                       ranked by lift = P(e | v) / P(e): the share of v's occurrences
                       routed to e over the share of all tokens routed to e, so a
                       frequent token ranks high only if e takes it more often than
                       average; only tokens seen at least `min_count` times qualify.

Shapes: N analysed tokens, K top-k, E experts, R records of the history.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
from torch import nn

Key = Union[int, str]

# ================================================================== pure functions


def multi_hot(ids_NK: np.ndarray, n_experts: int) -> np.ndarray:
    """(N, E) float32 0/1 matrix: which experts each token chose. float32 so that the
    count matrices below are BLAS products; sums of 0/1 are exact in float32 up to
    2^24 (16.7M) tokens."""
    out = np.zeros((ids_NK.shape[0], n_experts), dtype=np.float32)
    np.put_along_axis(out, ids_NK.astype(np.int64), 1.0, axis=1)
    return out


def _counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.rint(a.T @ b).astype(np.int64)


def coselection(ids_NK: np.ndarray, n_experts: int) -> np.ndarray:
    """(E, E) int64: C[i, j] = tokens that chose both i and j; C[i, i] = tokens that chose i."""
    h = multi_hot(ids_NK, n_experts)
    return _counts(h, h)


def coselection_lift(c_EE: np.ndarray, n_tokens: int) -> np.ndarray:
    """C[i, j] N / (C[i, i] C[j, j]) off the diagonal (NaN where an expert got no token
    and on the diagonal)."""
    load = np.diag(c_EE).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = c_EE * float(n_tokens) / np.outer(load, load)
    lift[~np.isfinite(lift)] = np.nan
    np.fill_diagonal(lift, np.nan)
    return lift


def transitions(a_NK: np.ndarray, b_NK: np.ndarray, e_a: int, e_b: int) -> np.ndarray:
    """(E_a, E_b) int64: over tokens, pairs (i chosen at a, j chosen at b)."""
    return _counts(multi_hot(a_NK, e_a), multi_hot(b_NK, e_b))


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of counts or probabilities (normalised here)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    s = p.sum()
    if s <= 0:
        return 0.0
    p = p[p > 0] / s
    return float(-(p * np.log(p)).sum())


def nmi(x: np.ndarray, y: np.ndarray, n_x: int, n_y: int) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) of two label arrays (0 when either is constant)."""
    joint = np.zeros((n_x, n_y), dtype=np.float64)
    np.add.at(joint, (x.astype(np.int64), y.astype(np.int64)), 1.0)
    h_x, h_y = entropy(joint.sum(1)), entropy(joint.sum(0))
    if h_x <= 0 or h_y <= 0:
        return 0.0
    mi = h_x + h_y - entropy(joint)
    return float(max(0.0, mi) / math.sqrt(h_x * h_y))


def top_tokens(ids_NK: np.ndarray, tokens_N: np.ndarray, n_experts: int, n: int = 8, min_count: int = 5,
               decode: Optional[Callable[[int], str]] = None) -> List[List[Dict]]:
    """Per expert, its `n` input tokens of highest lift (module docstring), each
    {"token", "id", "count" (routed to e), "token_count" (seen), "share" (count /
    token_count), "lift"}; ties by count, then id."""
    tokens_N = tokens_N.astype(np.int64)
    vocab, inverse = np.unique(tokens_N, return_inverse=True)
    seen = np.bincount(inverse, minlength=len(vocab))  # (V,)
    counts = np.zeros((n_experts, len(vocab)), dtype=np.int64)  # (E, V)
    for k in range(ids_NK.shape[1]):
        np.add.at(counts, (ids_NK[:, k].astype(np.int64), inverse), 1)
    p_e = counts.sum(1) / max(1, len(tokens_N))  # share of tokens routed to each expert
    out = []
    for e in range(n_experts):
        rows = []
        if p_e[e] > 0:
            ok = np.nonzero((seen >= min_count) & (counts[e] > 0))[0]
            share = counts[e, ok] / seen[ok]
            lift = share / p_e[e]
            order = np.lexsort((vocab[ok], -counts[e, ok], -lift))[:n]  # last key sorts first
            for i in order:
                v = int(vocab[ok[i]])
                rows.append({"token": decode(v) if decode else str(v), "id": v, "count": int(counts[e, ok[i]]),
                             "token_count": int(seen[ok[i]]), "share": float(share[i]), "lift": float(lift[i])})
        out.append(rows)
    return out


# ================================================================== final model


def text_batches(ids: List[int], seq_len: int, batch_size: int, n: int) -> Iterator:
    """Up to `n` batches of consecutive windows of `seq_len` tokens; a shorter last
    window goes in a batch of its own."""
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    full = [w for w in windows if len(w) == seq_len]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if len(windows[-1]) < seq_len:
        batches.append([windows[-1]])
    for b in batches[:n]:
        yield torch.tensor(b, dtype=torch.long)


def val_batches(recipe, tokenizer_path: Optional[Path], batch_size: int, seq_len: int, n: int) -> Iterator:
    """Up to `n` batches of the run's validation split (the data its recipe names, read
    as `moelab train` read it, tokenized with the run's tokenizer.json)."""
    import dataclasses

    from lit_modules.data.datamodule import TokenDataModule

    data = recipe.data if tokenizer_path is None else dataclasses.replace(recipe.data,
                                                                          tokenizer=str(tokenizer_path))
    train = dataclasses.replace(recipe.train, micro_batch_size=batch_size, seq_len=seq_len, val_batches=n)
    dm = TokenDataModule(dataclasses.replace(recipe, data=data, train=train), verbose=False, rank=0, world_size=1)
    loader = dm.val_dataloader()
    if not loader:
        from arch.registry import RecipeError

        raise RecipeError("the run's recipe has no validation split (data.val_fraction = 0); pass --data FILE.")
    if isinstance(loader, list):  # a data mixture: one loader per source, taken in turn
        import itertools

        loader = itertools.chain.from_iterable(loader)
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch[:, :-1]  # the extra token is the last target


class RoutingCapture:
    """with RoutingCapture(model) as cap: model(x) ... -- per MoE layer (keyed as in
    experts.stats), the expert ids each token chose, the summed router entropy and
    probabilities, and the slots dropped by capacity, from forward hooks on the
    routers and the layers (removed on exit)."""

    def __init__(self, model: nn.Module):
        from experts.layers import named_moe_layers
        from experts.stats import layer_key

        self.layers = [(layer_key(path), layer) for path, layer in named_moe_layers(model)]
        self.ids: Dict[Key, List[np.ndarray]] = {k: [] for k, _ in self.layers}
        self.entropy_sum: Dict[Key, float] = {k: 0.0 for k, _ in self.layers}
        self.probs_sum: Dict[Key, np.ndarray] = {k: np.zeros(m.n_experts) for k, m in self.layers}
        self.dropped: Dict[Key, int] = {k: 0 for k, _ in self.layers}
        self._handles = []

    def __enter__(self) -> "RoutingCapture":
        from experts.losses import router_entropy

        def on_router(key):
            def hook(module, args, r):
                T = r.ids_TK.shape[0]
                self.ids[key].append(r.ids_TK.to("cpu", torch.int32).numpy())
                self.entropy_sum[key] += float(router_entropy(r.probs_TE)) * T
                self.probs_sum[key] += r.probs_TE.sum(0).double().cpu().numpy()
            return hook

        def on_layer(key):
            def hook(module, args, out):
                if "dropped_tokens" in module.stats:
                    self.dropped[key] += int(module.stats["dropped_tokens"])
            return hook

        for key, layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(on_router(key)))
            self._handles.append(layer.register_forward_hook(on_layer(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def run_batches(model: nn.Module, batches: Iterable[torch.Tensor], device) -> tuple:
    """Forward every (B, S) batch of input ids under a RoutingCapture; returns
    (capture, the input tokens flattened in routing order)."""
    tokens = []
    with RoutingCapture(model) as cap, torch.inference_mode():
        for x in batches:
            x = x.to(device)
            model(x, return_logits=False)
            tokens.append(x.reshape(-1).cpu().numpy())
    return cap, (np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64))


def analyze_routing(ids: Dict[Key, np.ndarray], n_experts: Dict[Key, int], tokens_N: np.ndarray,
                    entropy_sum: Optional[Dict[Key, float]] = None, probs_sum: Optional[Dict[Key, np.ndarray]] = None,
                    dropped: Optional[Dict[Key, int]] = None, decode: Optional[Callable[[int], str]] = None,
                    n_top: int = 8, min_count: int = 5, seed: int = 0) -> Dict:
    """The `final` half of analysis.json from each layer's (N, K) expert ids (layers in
    model order, all over the same N tokens)."""
    keys = list(ids)
    N = len(tokens_N)
    layers = []
    for key in keys:
        a, E = ids[key], n_experts[key]
        K = a.shape[1]
        c = coselection(a, E)
        load = np.diag(c)
        lift = coselection_lift(c, N)
        row = {"layer": key, "n_experts": E, "top_k": K, "tokens_per_expert": load.tolist(),
               "load_max_over_mean": float(load.max() / load.mean()) if load.sum() else None,
               "load_entropy": entropy(load), "log_n_experts": math.log(E)}
        if entropy_sum is not None:
            row["router_entropy"] = entropy_sum[key] / N if N else None
        if probs_sum is not None:
            row["mean_router_prob"] = (probs_sum[key] / max(1, N)).tolist()
        if dropped is not None:
            row["dropped_slots"] = int(dropped[key])
            row["dropped_fraction"] = dropped[key] / (N * K) if N else None
        row["coselection"] = c.tolist()
        row["coselection_lift"] = [[None if np.isnan(v) else float(v) for v in r] for r in lift]
        row["top_tokens"] = top_tokens(a, tokens_N, E, n_top, min_count, decode)
        layers.append(row)
    rng = np.random.default_rng(seed)
    adjacent = []
    for ka, kb in zip(keys, keys[1:]):
        a, b, ea, eb = ids[ka], ids[kb], n_experts[ka], n_experts[kb]
        adjacent.append({
            "from": ka, "to": kb,
            "transitions": transitions(a, b, ea, eb).tolist(),
            "nmi_first_choice": nmi(a[:, 0], b[:, 0], ea, eb),
            "nmi_first_choice_shuffled": nmi(a[:, 0], rng.permutation(b[:, 0]), ea, eb),
        })
    return {"tokens": N, "layers": layers, "adjacent": adjacent}


# ================================================================== history


def read_router_loads(path: Path) -> Dict[str, Dict[str, list]]:
    """router_loads.jsonl as {layer: {"step", "steps", "tokens_per_expert", "dropped",
    "entropy"}: lists over the records}; for a step written twice (a resumed run that
    crashed before trimming) the later line wins. A line that is not JSON is skipped
    (a run killed mid-write)."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
            if all(isinstance(s["tokens_per_expert"], list) for s in rec["layers"].values()):
                by_step[step] = rec
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    out: Dict[str, Dict[str, list]] = {}
    for step in sorted(by_step):
        rec = by_step[step]
        for key, s in rec.get("layers", {}).items():
            d = out.setdefault(key, {"step": [], "steps": [], "tokens_per_expert": [], "dropped": [], "entropy": []})
            d["step"].append(step)
            d["steps"].append(rec.get("steps"))
            d["tokens_per_expert"].append(s["tokens_per_expert"])
            d["dropped"].append(s.get("dropped"))
            d["entropy"].append(s.get("entropy"))
    return out


def read_tb_router_scalars(tb_dir: Path) -> Dict[str, Dict[str, Dict[str, list]]]:
    """TensorBoard's router/layer{i}/{name} scalars as {layer: {name: {"step", "value"}}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 1, "histograms": 1,
                                                       "tensors": 1, "compressedHistograms": 1})
    acc.Reload()
    out: Dict[str, Dict[str, Dict[str, list]]] = {}
    for tag in acc.Tags().get("scalars", []):
        parts = tag.split("/")
        if len(parts) != 3 or parts[0] != "router" or not parts[1].startswith("layer"):
            continue
        events = acc.Scalars(tag)
        last = {e.step: e.value for e in events}  # a resumed run's rewritten steps: the last value
        steps = sorted(last)
        out.setdefault(parts[1][len("layer"):], {})[parts[2]] = {"step": steps, "value": [last[s] for s in steps]}
    return out


def history(run_dir: Path, slots_per_step: Optional[int]) -> Dict:
    """The `history` half of analysis.json: per layer, the recorded loads and, per
    record, max/mean load and dropped fraction; the TensorBoard scalars with the
    dropped slots also as a fraction of the `slots_per_step` (rank 0's micro-batch
    tokens x top-k)."""
    from lit_modules.checkpoints import layout

    loads_path, tb_dir = Path(run_dir) / layout.ROUTER_LOADS_FILE, Path(run_dir) / layout.TB_DIR
    records = read_router_loads(loads_path) if loads_path.is_file() else {}
    scalars = read_tb_router_scalars(tb_dir) if tb_dir.is_dir() else {}
    layers = {}
    for key in sorted(set(records) | set(scalars), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k)):
        d: Dict = {}
        if key in records:
            r = dict(records[key])
            loads = np.asarray(r["tokens_per_expert"], dtype=np.float64)  # (R, E)
            r["load_max_over_mean"] = [float(row.max() / row.mean()) if row.sum() > 0 else None for row in loads]
            total = loads.sum(1)
            r["dropped_fraction"] = [float(x) / t if (x is not None and t > 0) else None
                                     for x, t in zip(r["dropped"], total)]
            d["records"] = r
        if key in scalars:
            s = scalars[key]
            if "dropped" in s and slots_per_step:
                s["dropped_fraction"] = {"step": s["dropped"]["step"],
                                         "value": [v / slots_per_step for v in s["dropped"]["value"]]}
            d["scalars"] = s
        layers[key] = d
    return {"router_loads_file": str(loads_path) if records else None,
            "tensorboard_dir": str(tb_dir) if scalars else None, "layers": layers}


# ================================================================== plots


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, cell=(3.6, 3.0)):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    # constrained layout: room for the suptitle and one colour bar shared by the grid
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols + 1, cell[1] * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, path: Path, written: List[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)


def _log2_ratio(loads: np.ndarray, axis: int) -> np.ndarray:
    mean = loads.mean(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log2(loads / mean)
    return np.clip(np.nan_to_num(r, nan=0.0, neginf=-2.0, posinf=2.0), -2, 2)


def plot_history(hist: Dict, out: Path) -> List[Path]:
    """load_over_steps.png (per layer: experts x records, log2 of load / mean load of
    the record) and balance_over_steps.png (max/mean load, dropped fraction, entropy
    against the step, a line per layer)."""
    plt = _pyplot()
    written: List[Path] = []
    layers = {k: d for k, d in hist["layers"].items() if "records" in d}
    if layers:
        fig, axes = _grid(plt, len(layers))
        for ax, (key, d) in zip(axes, layers.items()):
            r = d["records"]
            loads = np.asarray(r["tokens_per_expert"], dtype=np.float64).T  # (E, R)
            im = ax.imshow(_log2_ratio(loads, 0), aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2,
                           interpolation="nearest")
            steps = r["step"]
            ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
            ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
            ax.set_title(f"layer {key}")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes, label="log2(load / mean load)", shrink=0.8)
        fig.suptitle("expert load over training")
        fig.savefig(out / "load_over_steps.png", dpi=110)
        written.append(out / "load_over_steps.png")
        plt.close(fig)

    panels = [("load max / mean", "max_over_mean_load", "load_max_over_mean"),
              ("dropped fraction of slots", "dropped_fraction", "dropped_fraction"),
              ("router entropy (nats)", "entropy", "entropy")]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    drawn = False
    for ax, (label, tb_name, rec_name) in zip(axes, panels):
        for key, d in hist["layers"].items():
            s = d.get("scalars", {}).get(tb_name)
            if s:  # the finer series: every log_every steps
                ax.plot(s["step"], s["value"], label=f"layer {key}", lw=1)
                drawn = True
            elif "records" in d:
                r = d["records"]
                pts = [(st, v) for st, v in zip(r["step"], r[rec_name]) if v is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=f"layer {key}", lw=1)
                    drawn = True
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if drawn:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles and len(handles) <= 24:
            axes[0].legend(fontsize=7, ncol=max(1, len(handles) // 8))
        fig.suptitle("routing balance over training")
        _save(fig, out / "balance_over_steps.png", written)
    plt.close(fig)
    return written


def plot_final(final: Dict, out: Path) -> List[Path]:
    """load_final.png, router_entropy.png, coselection.png, layer_agreement.png and
    top_tokens_layer{i}.png (module docstring for what each shows)."""
    plt = _pyplot()
    written: List[Path] = []
    layers = final["layers"]
    if not layers:
        return written
    names = [str(r["layer"]) for r in layers]

    # expert load per layer on the analysed tokens
    E = max(r["n_experts"] for r in layers)
    loads = np.full((len(layers), E), np.nan)
    for i, r in enumerate(layers):
        loads[i, :r["n_experts"]] = r["tokens_per_expert"]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * E + 2), max(2.5, 0.35 * len(layers) + 1.5)))
    im = ax.imshow(_log2_ratio(loads, 1), aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(layers)), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load on {final['tokens']:,} tokens")
    fig.colorbar(im, ax=ax, label="log2(load / mean load)")
    _save(fig, out / "load_final.png", written)
    plt.close(fig)

    # router entropy
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 2), 3.5))
    x = np.arange(len(layers))
    if all("router_entropy" in r for r in layers):
        ax.bar(x - 0.2, [r["router_entropy"] for r in layers], 0.4, label="router entropy per token")
    ax.bar(x + 0.2, [r["load_entropy"] for r in layers], 0.4, label="entropy of the load")
    ax.plot(x, [r["log_n_experts"] for r in layers], "k_", ms=20, label="log E (uniform)")
    ax.set_xticks(x, names)
    ax.set_xlabel("layer")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)
    _save(fig, out / "router_entropy.png", written)
    plt.close(fig)

    # co-selection lift
    if layers[0]["top_k"] > 1:
        fig, axes = _grid(plt, len(layers))
        for ax, r in zip(axes, layers):
            lift = np.array([[np.nan if v is None else v for v in row] for row in r["coselection_lift"]])
            with np.errstate(divide="ignore", invalid="ignore"):
                im = ax.imshow(np.clip(np.log2(lift), -3, 3), cmap="PuOr_r", vmin=-3, vmax=3,
                               interpolation="nearest")
            ax.set_title(f"layer {r['layer']}")
            ax.set_xlabel("expert")
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes, label="log2 lift: chosen together vs independent", shrink=0.8)
        fig.suptitle("co-selection within a token")
        fig.savefig(out / "coselection.png", dpi=110)
        written.append(out / "coselection.png")
        plt.close(fig)

    # adjacent layers
    if final["adjacent"]:
        fig, axes = _grid(plt, len(final["adjacent"]))
        for ax, a in zip(axes, final["adjacent"]):
            t = np.asarray(a["transitions"], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                rows = t / t.sum(1, keepdims=True)
            im = ax.imshow(rows, cmap="viridis", interpolation="nearest", vmin=0)
            ax.set_title(f"{a['from']} -> {a['to']}: NMI {a['nmi_first_choice']:.3f} "
                         f"(chance {a['nmi_first_choice_shuffled']:.3f})", fontsize=9)
            ax.set_xlabel(f"expert at layer {a['to']}")
            ax.set_ylabel(f"expert at layer {a['from']}")
        fig.colorbar(im, ax=axes, label="P(expert at next layer | expert here)", shrink=0.8)
        fig.suptitle("routing from one MoE layer to the next")
        fig.savefig(out / "layer_agreement.png", dpi=110)
        written.append(out / "layer_agreement.png")
        plt.close(fig)

    # top tokens per expert, one table per layer
    for r in layers:
        tops = r["top_tokens"]
        n = max((len(t) for t in tops), default=0)
        if n == 0:
            continue
        cells = [[f"{t['token']!r} x{t['lift']:.1f}" for t in row] + [""] * (n - len(row)) for row in tops]
        fig, ax = plt.subplots(figsize=(min(1.5 * n + 1, 20), 0.22 * len(tops) + 0.8), layout="constrained")
        ax.axis("off")
        table = ax.table(cellText=cells, rowLabels=[f"expert {e}" for e in range(len(tops))], loc="center",
                         cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        ax.set_title(f"layer {r['layer']}: tokens each expert takes most, by lift P(e|token)/P(e)", fontsize=9)
        fig.savefig(out / f"top_tokens_layer{r['layer']}.png", dpi=110)
        written.append(out / f"top_tokens_layer{r['layer']}.png")
        plt.close(fig)
    return written


# ================================================================== text


def summary_lines(result: Dict, n_experts_shown: int = 4) -> List[str]:
    """A short text summary of analysis.json's contents."""
    lines = []
    final = result.get("final")
    if final and final["layers"]:
        lines.append(f"final model on {final['tokens']:,} tokens ({result.get('batches')} batches):")
        lines.append("  layer  router entropy (log E)  load max/mean  dropped  NMI with next (chance)")
        nmis = {a["from"]: a for a in final["adjacent"]}
        for r in final["layers"]:
            a = nmis.get(r["layer"])
            ent = r.get("router_entropy")
            drop = r.get("dropped_fraction")
            lines.append(f"  {str(r['layer']):>5}  {ent if ent is not None else float('nan'):>8.3f} "
                         f"({r['log_n_experts']:.3f})      {r['load_max_over_mean'] or float('nan'):>8.2f}  "
                         f"{100 * (drop or 0):>6.2f}%  "
                         + (f"{a['nmi_first_choice']:.3f} ({a['nmi_first_choice_shuffled']:.3f})" if a else "-"))
        first = final["layers"][0]
        shown = [(e, t) for e, t in enumerate(first["top_tokens"]) if t][:n_experts_shown]
        if shown:
            lines.append(f"  top tokens of layer {first['layer']} (by lift):")
            for e, t in shown:
                lines.append(f"    expert {e}: " + " ".join(f"{x['token']!r}" for x in t[:6]))
    hist = result.get("history")
    if hist and hist["layers"]:
        parts = []
        for key, d in list(hist["layers"].items())[:4]:
            s = d.get("scalars", {}).get("max_over_mean_load")
            if s and s["value"]:
                parts.append(f"layer {key} {s['value'][0]:.2f} -> {s['value'][-1]:.2f}")
            elif "records" in d and d["records"]["load_max_over_mean"]:
                v = [x for x in d["records"]["load_max_over_mean"] if x is not None]
                if v:
                    parts.append(f"layer {key} {v[0]:.2f} -> {v[-1]:.2f}")
        n_rec = max((len(d["records"]["step"]) for d in hist["layers"].values() if "records" in d), default=0)
        lines.append(f"training history: {n_rec} load records; load max/mean over training: "
                     + ("; ".join(parts) if parts else "not recorded"))
    return lines
