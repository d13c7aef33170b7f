"""The routed-expert path of one MoE layer, fwd + bwd, per expert backend: loop,
grouped_mm (permute -> two grouped GEMMs -> combine) and triton (fused kernels,
experts/triton_backend.py), in bf16 at the W1 shapes.

What is timed: from the token rows x (T, D), fixed routing (ids, weights) and the
stacked expert weights to the combined y (T, D), then backward of sum(y * dy) to x,
the routing weights and the expert weights. The router and the balancing losses
are left out (the same for every backend). Dispatch (the sort) is inside the
timing for every backend. Before timing, triton's output and gradients are checked
against grouped_mm's (max abs diff; both in bf16).

    python benchmarks/expert_kernels.py                      # both W1 shapes, 16384 tokens
    python benchmarks/expert_kernels.py --shapes 30b --tokens 8192 --no-loop --compile

TFLOP/s counts the expert GEMMs only: 6 x (T K) x 3 D F per step (gate, up, down;
forward once, backward twice). On CPU (tiny shapes, --tiny) it only checks that
the script runs, through TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experts  # noqa: E402,F401  (registers the backends)
from arch.registry import EXPERT_BACKEND  # noqa: E402
from experts.dispatch import combine, dispatch, permute  # noqa: E402

# name: (d_model, n_experts, d_expert, top_k)
SHAPES = {"30b": (2048, 128, 768, 8), "235b": (4096, 128, 1536, 8), "tiny": (40, 6, 24, 2)}
LABELS = {"30b": "Qwen3-30B-A3B", "235b": "Qwen3-235B-A22B", "tiny": "tiny (interpreter)"}


def expert_path(backend: str, compiled: bool = False):
    """(x, weights, ids, w_in, w_out) -> y: dispatch, the backend, combine."""
    fn = EXPERT_BACKEND.get(backend)
    E_of = lambda w_in: w_in.shape[0]  # noqa: E731

    def run(x, weights, ids, w_in, w_out):
        d = dispatch(ids, E_of(w_in))
        fused = getattr(fn, "fused", None)
        if fused is not None:
            return fused(x, weights, d, w_in, w_out, "swiglu")
        return combine(fn(permute(x, d), d.counts_E, w_in, w_out, "swiglu"), weights.to(x.dtype), d, x.shape[0])

    return torch.compile(run, fullgraph=backend != "loop") if compiled else run


def make_inputs(shape: str, tokens: int, device, dtype, seed: int = 0):
    D, E, F, K = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, D, generator=g).to(device, dtype)
    # a softmax router's top-k of random logits: uneven loads, like an untrained router
    probs = torch.randn(tokens, E, generator=g).softmax(-1)
    weights, ids = probs.topk(K, dim=-1)
    w_in = (torch.randn(E, 2 * F, D, generator=g) * D ** -0.5).to(device, dtype)
    w_out = (torch.randn(E, D, F, generator=g) * F ** -0.5).to(device, dtype)
    dy = torch.randn(tokens, D, generator=g).to(device, dtype)
    return x, weights.to(device), ids.to(device), w_in, w_out, dy


def fwd_bwd(path, inputs):
    x, weights, ids, w_in, w_out, dy = inputs
    leaves = [t.detach().requires_grad_(True) for t in (x, weights, w_in, w_out)]
    y = path(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def time_ms(path, inputs, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        fwd_bwd(path, inputs)
    if device.type != "cuda":
        import time

        t = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fwd_bwd(path, inputs)
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        fwd_bwd(path, inputs)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["30b", "235b"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-loop", action="store_true", help="skip the loop reference (slow: one matmul pair per expert)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd grouped_mm and triton")
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU through TRITON_INTERPRET=1 (a dry run)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16
    from experts.triton_backend import unavailable

    problem = unavailable(device.type)
    if problem:
        print(problem)
        return 1
    shapes = ["tiny"] if args.tiny else args.shapes
    tokens = 30 if args.tiny else args.tokens
    warmup, steps = (1, 1) if args.tiny else (args.warmup, args.steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; bf16 operands, float32 routing weights; T = {tokens} tokens; "
          f"median of {steps} steps after {warmup} warm-up\n")

    for shape in shapes:
        D, E, F, K = SHAPES[shape]
        inputs = make_inputs(shape, tokens, device, dtype)
        flops = 6 * tokens * K * 3 * D * F
        print(f"### {LABELS[shape]}: d_model {D}, {E} experts of {F}, top {K}, {tokens} tokens\n")

        y_g, grads_g = fwd_bwd(expert_path("grouped_mm"), inputs)
        y_t, grads_t = fwd_bwd(expert_path("triton"), inputs)
        print("triton vs grouped_mm: max abs diff (max |grouped_mm|) of " + ", ".join(
            f"{k} {(a.float() - b.float()).abs().max().item():.3g} ({b.float().abs().max().item():.3g})"
            for k, a, b in zip(("y", "dx", "d weights", "d w_in", "d w_out"), [y_t] + grads_t, [y_g] + grads_g))
            + "\n")
        del y_g, grads_g, y_t, grads_t

        rows = []
        backends = ([] if args.no_loop else ["loop"]) + ["grouped_mm", "triton"]
        for backend in backends:
            for compiled in ([False, True] if args.compile and backend != "loop" else [False]):
                label = backend + (", compiled" if compiled else "")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                n = max(1, steps // 3) if backend == "loop" else steps
                ms = time_ms(expert_path(backend, compiled), inputs, 1 if backend == "loop" else warmup, n, device)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if device.type == "cuda" else float("nan")
                rows.append((label, ms, flops / ms / 1e9, peak))
        ref = next(ms for label, ms, _, _ in rows if label == "grouped_mm")
        print("| backend | ms (fwd+bwd) | TFLOP/s | x grouped_mm | peak extra GiB |")
        print("|---|---:|---:|---:|---:|")
        for label, ms, tflops, peak in rows:
            print(f"| {label} | {ms:.2f} | {tflops:.1f} | {ms / ref:.2f} | {peak:.2f} |")
        print()
        del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
