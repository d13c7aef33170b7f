"""W1 (../shared/reference/performance.md): one MoE layer at Qwen3-30B-A3B shape.

d_model 2048, 128 experts, top-8, d_expert 768, SwiGLU experts, 16,384 tokens, bf16
weights and activations, forward + backward of loss = mean(y^2), router included
(float32 softmax top-8, renormalised). Rows, all timed in this one run:

    dense SwiGLU, d_ff = 8 x 768     the same active FLOPs with no routing: the floor
    MoE grouped_mm                   moelab's default backend, dropless
    MoE grouped_mm + aux + z loss    the same with the micro-batch balancing losses
    MoE grouped_mm, capacity 1.25    token dropping
    MoE loop                         the per-expert reference

Before timing it checks grouped_mm against loop (outputs and every gradient) on a
small shape on the same device, and that the grouped forward does not synchronise
with the host (CUDA sync debug mode). The table comes last.

    python benchmarks/w1_moe_layer.py            # GPU, the W1 shape
    python benchmarks/w1_moe_layer.py --small    # CPU smoke test (tests run this)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import experts  # noqa: E402,F401  (registers the MoE layer and backends)
from arch.config import BalanceConfig, MoEConfig, RouterConfig  # noqa: E402
from arch.ffn import GatedMLP  # noqa: E402
from experts.moe import MoE  # noqa: E402

W1 = dict(d_model=2048, n_experts=128, top_k=8, d_expert=768, tokens=16384)
SMALL = dict(d_model=64, n_experts=8, top_k=2, d_expert=32, tokens=256)


def moe_layer(d_model, n_experts, top_k, d_expert, backend="grouped_mm", capacity_factor=None,
              aux_coef=0.0, z_coef=0.0) -> MoE:
    cfg = MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=d_expert, expert_ffn="swiglu",
                    router=RouterConfig(kind="softmax_topk", renormalize=True),
                    balance=BalanceConfig(aux_coef=aux_coef, aux_scope="micro", z_coef=z_coef),
                    d_shared=d_expert, backend=backend, capacity_factor=capacity_factor)
    return MoE(d_model, cfg)


def fwd_bwd(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    loss = y.float().square().mean()
    if isinstance(layer, MoE):
        loss = loss + sum(MoE.gather_aux([layer]).values())
    loss.backward()
    return y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_grouped_vs_loop(device, dtype) -> List[str]:
    """grouped_mm against loop on a small shape: output and every gradient."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    lines, ok = [], True
    for cf in (None, 1.0):
        torch.manual_seed(0)
        ref = moe_layer(128, 8, 2, 64, backend="loop", capacity_factor=cf, aux_coef=0.01, z_coef=1e-3)
        with torch.no_grad():
            ref.router.gate.weight.normal_(std=0.2)
        grouped = moe_layer(128, 8, 2, 64, backend="grouped_mm", capacity_factor=cf, aux_coef=0.01, z_coef=1e-3)
        grouped.load_state_dict(ref.state_dict())
        x0 = torch.randn(512, 128, device=device, dtype=dtype)
        out = {}
        for name, layer in (("loop", ref), ("grouped_mm", grouped)):
            layer.to(device=device, dtype=dtype).train()
            x = x0.clone().requires_grad_(True)
            y = fwd_bwd(layer, x)
            out[name] = [y] + [x.grad] + [p.grad for p in layer.parameters()]
        errs = [rel_err(g, r) for g, r in zip(out["grouped_mm"], out["loop"])]
        worst = max(errs)
        ok &= worst < tol
        lines.append(f"grouped_mm vs loop ({'dropless' if cf is None else f'capacity {cf}'}, {dtype}): "
                     f"worst relative error over output and {len(errs) - 1} gradients {worst:.1e} "
                     f"(tolerance {tol:g}) {'PASS' if worst < tol else 'FAIL'}")
    if not ok:
        raise SystemExit("\n".join(lines) + "\ngrouped_mm disagrees with loop; not timing.")
    return lines


def check_no_host_sync(layer: MoE, x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "host-sync check: CUDA only (tests/experts cover the CPU path)"
    layer(x)  # first call: lazy CUDA/cuBLAS initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "grouped_mm forward under torch.cuda.set_sync_debug_mode('error'): no host sync PASS"


def time_it(fn: Callable[[], None], device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shape on CPU in float32 (smoke test)")
    p.add_argument("--tokens", type=int, default=None, help="override the token count")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--loop-iters", type=int, default=None, help="iterations for the (slow) loop backend")
    args = p.parse_args(argv)

    shape = dict(SMALL if args.small else W1)
    if args.tokens:
        shape["tokens"] = args.tokens
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if not args.small and device.type == "cpu":
        print("no CUDA device: running the W1 shape on CPU will be very slow; use --small for a smoke test")
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    iters = args.iters if args.iters is not None else (3 if args.small else 50)
    loop_iters = args.loop_iters if args.loop_iters is not None else (2 if args.small else 5)

    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"grouped_mm: {'torch.nn.functional.grouped_mm' if hasattr(F, 'grouped_mm') else 'torch._grouped_mm'}")
    for line in check_grouped_vs_loop(device, dtype):
        print(line)

    D, E, K, Fd, T = shape["d_model"], shape["n_experts"], shape["top_k"], shape["d_expert"], shape["tokens"]
    torch.manual_seed(0)
    base = moe_layer(D, E, K, Fd)  # every MoE row runs these same weights
    variants = {
        "MoE grouped_mm": dict(),
        "MoE grouped_mm + aux + z loss": dict(aux_coef=1e-3, z_coef=1e-3),
        "MoE grouped_mm, capacity 1.25": dict(capacity_factor=1.25),
        "MoE loop": dict(backend="loop"),
    }
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)

    rows = []  # (name, ms, peak GiB above the resident weights, or None)
    dense = GatedMLP(D, K * Fd, "swiglu").to(device=device, dtype=dtype)
    layers: Dict[str, nn.Module] = {"dense SwiGLU, d_ff = top_k x d_expert": dense}
    for name, kw in variants.items():
        layer = moe_layer(D, E, K, Fd, **kw)
        layer.load_state_dict(base.state_dict())
        layers[name] = layer.to(device=device, dtype=dtype).train()
    print(check_no_host_sync(layers["MoE grouped_mm"], x.detach()))

    for name, layer in layers.items():
        def step(layer=layer):
            x.grad = None
            for q in layer.parameters():
                q.grad = None
            fwd_bwd(layer, x)

        n = loop_iters if "loop" in name else iters
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        ms = time_it(step, device, min(warmup, n), n)
        peak = (torch.cuda.max_memory_allocated() - resident) / 2**30 if device.type == "cuda" else None
        rows.append((name, ms, peak))
        x.grad = None
        for q in layer.parameters():  # free this row's gradients before the next row
            q.grad = None
        if isinstance(layer, MoE) and "capacity" in name:
            dropped = layer.stats["dropped_tokens"].item()
            print(f"{name}: {dropped} of {T * K} routed slots dropped in the last step")

    dense_ms = rows[0][1]
    print(f"\nW1: {T} tokens x d_model {D}, {E} experts top-{K}, d_expert {Fd}, SwiGLU, {dtype}, fwd+bwd, "
          f"median of {iters} ({loop_iters} for loop) after {warmup} warmup, {device}")
    print("| implementation | ms | x dense | step GiB (peak above weights) |")
    print("|---|---|---|---|")
    for name, ms, peak in rows:
        print(f"| {name} | {ms:.2f} | {ms / dense_ms:.2f} | {'-' if peak is None else f'{peak:.2f}'} |")
    return {name: ms for name, ms, _ in rows}


if __name__ == "__main__":
    main()
