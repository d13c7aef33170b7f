"""Where the `triton` expert backend's time goes, kernel by kernel, and which launch
configs suit each kernel on this GPU.

1. A kernel profile (torch.profiler, CUDA time per kernel name) of one fwd + bwd of
   the routed-expert path (benchmarks/expert_kernels.py's `expert_path`) for
   grouped_mm and triton, both compiled: which kernels the two spend their time in.
2. Each triton kernel launched alone, as the backend launches it (its output
   allocated, glu_bwd's partial sums added up), over a grid of configs (row tile BM,
   column tile BN, reduction tile BK, warps, stages), at the shapes and data of one
   real forward/backward: ms and TFLOP/s of the best config, and of the config the
   backend's autotuner picks today, so a better config list can be read off.
3. The same kernels' work done by torch (grouped_mm on permuted rows) as the floor
   each kernel has to beat.

    python benchmarks/triton_sweep.py --shape 30b --tokens 16384 [--quick]

CUDA (or --tiny: a dry run through the interpreter); the configs compile side by side.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from expert_kernels import LABELS, SHAPES, expert_path, fwd_bwd, make_inputs  # noqa: E402

from experts import triton_backend as tb  # noqa: E402
from experts.dispatch import dispatch  # noqa: E402


def cuda_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --tiny: the interpreter, for a dry run
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def profile(inputs, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    for backend in ("grouped_mm", "triton"):
        path = expert_path(backend, compiled=True)
        for _ in range(3):
            fwd_bwd(path, inputs)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fwd_bwd(path, inputs)
            torch.cuda.synchronize()
        rows = {}
        for ev in p.key_averages():
            t = getattr(ev, "self_device_time_total", 0)
            if t > 0:
                rows[ev.key] = (t / 5 / 1e3, ev.count // 5)
        total = sum(ms for ms, _ in rows.values())
        print(f"#### kernels of {backend}, compiled: {total:.2f} ms of GPU time per fwd + bwd\n")
        print("| kernel | ms | calls |")
        print("|---|---:|---:|")
        for name, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"| {name[:90]} | {ms:.3f} | {n} |")
        print()


def sweep(inputs, quick: bool) -> None:
    x, weights, ids, w_in, w_out, dy = inputs
    D = x.shape[1]
    E, F2, _ = w_in.shape
    F = F2 // 2
    d = dispatch(ids, E)
    S = d.token_S.numel()
    w_S = weights.reshape(-1)[d.order_S].float()
    contiguous = torch.arange(S, device=x.device, dtype=d.token_S.dtype)
    x_S = x[d.token_S].contiguous()
    # the backend's own launches (triton_backend._Rows), one config each; a real forward
    # and backward first, so that every kernel reads real values
    gu = x.new_empty(S, 2 * F)
    first = tb._Rows(d.counts_E, S, x.dtype, config=(128, 64, 64, 8, 3))
    h = first.glu_fwd(x, d.token_S, w_in, None, gu, 0, True)
    dgu, _, hs = first.glu_bwd(dy, d.token_S, w_out, gu, w_S, None, 0)
    dw_out, dw_in = torch.empty_like(w_out), torch.empty_like(w_in)
    row_flops = 2 * S * D * F  # one (S x D) @ (D x F) GEMM

    def rows(cfg):
        return tb._Rows(d.counts_E, S, x.dtype, config=cfg)

    def glu_fwd(*cfg, src=d.token_S, xx=x):
        r = rows(cfg)
        return lambda: r.glu_fwd(xx, src, w_in, None, gu, 0, True)

    def down(*cfg):  # w_out (E, D, F) read as (K = F, N = D)
        r = rows(cfg)
        return lambda: r.mm(h, w_out, None, w_out.stride(2), w_out.stride(1), D)

    def dx(*cfg):  # w_in (E, 2F, D) read as (K = 2F, N = D)
        r = rows(cfg)
        return lambda: r.mm(dgu, w_in, None, w_in.stride(1), w_in.stride(2), D)

    def glu_bwd(*cfg):
        r = rows(cfg)
        return lambda: r.glu_bwd(dy, d.token_S, w_out, gu, w_S, None, 0)

    def wgrad_out(*cfg):
        r = rows(cfg)
        return lambda: r.wgrad(dw_out, None, dy, d.token_S, hs, None)

    def wgrad_in(*cfg):
        r = rows(cfg)
        return lambda: r.wgrad(dw_in, None, dgu, None, x, d.token_S)

    today = {"glu": {(tb.BM_CUDA,) + tuple(c) for c in tb._ROW_SHAPES["glu"]},
             "mm": {(tb.BM_CUDA,) + tuple(c) for c in tb._ROW_SHAPES["mm"]},
             "wgrad": {tuple(c) for c in tb._WGRAD_SHAPES}}
    if quick:
        row_grid = [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
        wg_grid = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4)]
    else:  # H100-minded candidates (BM, BN, BK, warps, stages); today's lists are added below
        row_grid = [(128, 64, 64, 4, 3), (128, 64, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
                    (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (128, 64, 128, 8, 3),
                    (128, 128, 128, 8, 2), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3),
                    (64, 64, 128, 4, 3), (256, 64, 64, 8, 3), (256, 128, 64, 8, 3), (256, 128, 32, 8, 4)]
        wg_grid = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4),
                   (256, 128, 64, 8, 3), (256, 128, 32, 8, 4), (128, 128, 32, 8, 5), (64, 256, 64, 8, 3),
                   (64, 64, 64, 4, 4), (256, 64, 64, 8, 3)]
    row_grid = list(dict.fromkeys(row_grid + sorted(today["glu"] | today["mm"])))
    wg_grid = list(dict.fromkeys(wg_grid + sorted(today["wgrad"])))
    kernels = [
        ("glu_fwd (gathered x, gate+up, SwiGLU)", glu_fwd, row_grid, 2 * row_flops),
        ("down (grouped_mm_kernel, h @ w_out)", down, row_grid, row_flops),
        ("glu_bwd (gathered dy @ w_out, dGLU, w glu)", glu_bwd, row_grid, row_flops),
        ("dX (grouped_mm_kernel, dgu @ w_in)", dx, row_grid, 2 * row_flops),
        ("wgrad w_out", wgrad_out, wg_grid, row_flops),
        ("wgrad w_in", wgrad_in, wg_grid, 2 * row_flops),
    ]
    summary = []
    for label, make, grid, flops in kernels:
        if torch.cuda.is_available():  # compile the configs side by side (ptxas runs in subprocesses)
            from concurrent.futures import ThreadPoolExecutor

            def first(cfg):
                try:
                    make(*cfg)()
                except Exception:  # noqa: BLE001  (reported when timed below)
                    pass

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(first, grid))
            torch.cuda.synchronize()
        res = []
        for cfg in grid:
            try:
                ms = cuda_ms(make(*cfg))
            except Exception as exc:  # out of shared memory / registers: not a candidate
                res.append((cfg, None, f"{type(exc).__name__} {str(exc)[:80]}"))
                continue
            res.append((cfg, ms, ""))
        ok = sorted((r for r in res if r[1] is not None), key=lambda r: r[1])
        failed = [f"{cfg}: {why}" for cfg, ms, why in res if ms is None]
        if not ok:
            print(f"#### {label}: no config ran ({'; '.join(failed)})\n")
            continue
        print(f"#### {label}: {flops / 1e9:.0f} GFLOP, {len(ok)} of {len(res)} configs ran\n")
        print("| BM | BN | BK | warps | stages | ms | TFLOP/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for cfg, ms, _ in ok[:6]:
            print("| " + " | ".join(map(str, cfg)) + f" | {ms:.3f} | {flops / ms / 1e9:.0f} |")
        kind = "wgrad" if label.startswith("wgrad") else ("glu" if "glu" in label else "mm")
        cur = min((ms for cfg, ms, _ in ok if cfg in today[kind]), default=float("nan"))
        if failed:
            print(f"\nfailed: {'; '.join(failed)}")
        print(f"\nbest {ok[0][1]:.3f} ms; the autotuner's current list at best {cur:.3f} ms\n")
        summary.append((label, ok[0][0], ok[0][1], cur, flops))
    # the floor: the same work through torch._grouped_mm on permuted rows
    offs = d.counts_E.cumsum(0).to(torch.int32)
    floor = [
        ("x[token] gather (S x D)", cuda_ms(lambda: x[d.token_S])),
        ("grouped_mm x_S @ w_in.T (gate+up)", cuda_ms(lambda: torch._grouped_mm(x_S, w_in.transpose(-2, -1), offs))),
        ("grouped_mm h @ w_out.T (down)", cuda_ms(lambda: torch._grouped_mm(h, w_out.transpose(-2, -1), offs))),
        ("grouped_mm dgu @ w_in (dX)", cuda_ms(lambda: torch._grouped_mm(dgu, w_in, offs))),
        ("glu_fwd on pre-permuted rows (best config)",
         cuda_ms(glu_fwd(*summary[0][1], src=contiguous, xx=x_S))),
    ]
    print("#### the floor (torch)\n")
    print("| work | ms |")
    print("|---|---:|")
    for label, ms in floor:
        print(f"| {label} | {ms:.3f} |")
    print("\n#### summary\n")
    print("| kernel | best config (BM, BN, BK, warps, stages) | best ms | today's list ms | TFLOP/s best |")
    print("|---|---|---:|---:|---:|")
    for label, cfg, best, cur, flops in summary:
        print(f"| {label} | {cfg} | {best:.3f} | {cur:.3f} | {flops / best / 1e9:.0f} |")
    print(f"\nsum of best: {sum(s[2] for s in summary):.2f} ms; sum at today's lists: "
          f"{sum(s[3] for s in summary):.2f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="30b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="a few configs per kernel")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a dry run on CPU (TRITON_INTERPRET=1, tiny shape)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.tokens, args.quick, args.no_profile = "tiny", 30, True, True
    elif not torch.cuda.is_available():
        print("triton_sweep.py needs a CUDA device (or --tiny with TRITON_INTERPRET=1)")
        return 1
    device = torch.device("cuda" if not args.tiny else "cpu")
    inputs = make_inputs(args.shape, args.tokens, device, torch.bfloat16)
    D, E, F, K = SHAPES[args.shape]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}: {LABELS[args.shape]} (d_model {D}, {E} experts of {F}, top {K}), "
          f"{args.tokens} tokens, bf16\n")
    if not args.no_profile:
        profile(inputs)
    sweep(inputs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
