"""Sweep flex_attention's tiles (Inductor's fwd_/bwd_ kernel options) at Gemma 3 shapes on one GPU.

Where arch/attention.py's FLEX_TILES_SM90 come from: flex_attention compiled alone, bf16,
GQA, causal with a sliding window; each forward tile timed on a forward without grad,
each backward tile on forward + backward; gradients compared with the default tiles'.
Two shapes: head_dim 256 (4 x 4096 tokens, window 1024) and head_dim 128 (W3: 8 x 2048,
window 512). About 6 minutes on an H100 (each tile compiles once); results in
benchmarks/results/flex_tiles_h100.md.

    python benchmarks/flex_tiles.py
"""
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

torch.manual_seed(0)
dev = "cuda"

def timeit(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(n):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]

def shape_sweep(B, HQ, HKV, T, D, W, fwd_cfgs, bwd_cfgs):
    def mm(b, h, qi, ki):
        a = ki <= qi
        return a & (qi - ki < W) if W else a
    bm = create_block_mask(mm, None, None, T, T, device=dev)
    q = torch.randn(B, HQ, T, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, HKV, T, D, device=dev, dtype=torch.bfloat16)
    g = torch.randn(B, HQ, T, D, device=dev, dtype=torch.bfloat16)
    rows = []
    ref = None
    for name, opts in [("default", None)] + fwd_cfgs:  # forward alone (no grad: a forward-only kernel)
        try:
            f = torch.compile(lambda: flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts), dynamic=False)
            out = f().float()
            ref = out if ref is None else ref
            rows.append(("fwd", name, timeit(f), (out - ref).abs().max().item()))
        except Exception as ex:
            rows.append(("fwd", name + " FAIL " + type(ex).__name__, float("nan"), float("nan")))
        torch._dynamo.reset()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    refg = None
    for name, opts in [("default", None)] + bwd_cfgs:
        try:
            f = torch.compile(lambda: flex_attention(qg, kg, vg, block_mask=bm, enable_gqa=True, kernel_options=opts), dynamic=False)
            def step():
                qg.grad = kg.grad = vg.grad = None
                f().backward(g)
            step()
            grads = [t.grad.float() for t in (qg, kg, vg)]
            refg = grads if refg is None else refg
            err = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads, refg))
            rows.append(("fwd+bwd", name, timeit(step), err))
        except Exception as ex:
            rows.append(("fwd+bwd", name + " FAIL " + type(ex).__name__ + str(ex).splitlines()[0][:60], float("nan"), float("nan")))
        torch._dynamo.reset()
    print(f"\n## B {B} Hq {HQ} Hkv {HKV} T {T} D {D} window {W}")
    print(f"{'pass':8} | {'config':50} | ms | rel err vs default")
    for r in rows:
        print(f"{r[0]:8} | {r[1]:50} | {r[2]:.3f} | {r[3]:.1e}", flush=True)

def fwd(M, N, w, s):
    return (f"fwd M{M} N{N} w{w} s{s}", dict(fwd_BLOCK_M=M, fwd_BLOCK_N=N, fwd_num_warps=w, fwd_num_stages=s))

def bwd(M1, N1, w, s):
    return (f"bwd M1 {M1} N1 {N1} w{w} s{s}", dict(bwd_BLOCK_M1=M1, bwd_BLOCK_N1=N1, bwd_BLOCK_M2=N1, bwd_BLOCK_N2=M1,
                                                 bwd_num_warps=w, bwd_num_stages=s))

t0 = time.time()
F256 = [fwd(M, N, w, s) for (M, N) in ((64, 64), (128, 64), (64, 32), (128, 32)) for w in (4, 8) for s in (2, 3)]
B256 = [bwd(M1, N1, w, s) for (M1, N1) in ((32, 64), (64, 64), (32, 128), (64, 128), (16, 64)) for w in (4, 8) for s in (1, 2, 3)]
shape_sweep(4, 8, 2, 4096, 256, 1024, F256, B256)
print(f"({time.time() - t0:.0f} s)")
F128 = [fwd(M, N, w, s) for (M, N) in ((128, 64), (128, 128), (64, 128)) for w in (4, 8) for s in (2, 3)]
B128 = [bwd(M1, N1, w, s) for (M1, N1) in ((64, 128), (32, 128), (64, 64)) for w in (4, 8) for s in (2, 3)]
shape_sweep(8, 8, 2, 2048, 128, 512, F128, B128)
print(f"({time.time() - t0:.0f} s)")
