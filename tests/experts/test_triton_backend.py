"""The `triton` expert backend against `loop`: output and every gradient (input,
expert weights and biases, router through the routing weights), float32 and bf16,
top_k > 1, capacity drops, experts with no tokens, each fused GLU kind, the
backend interface the expert-parallel exchange calls, no host sync, torch.compile.

On CPU the kernels run through Triton's interpreter: run these with
TRITON_INTERPRET=1 (they skip, saying so, without it or without triton). Shapes are
chosen so that every kernel sees several row tiles per expert, partial tiles, more
than one column tile and masked reduction tails (D = 40, F = 24 against the
interpreter's 16-row, 16/32-wide blocks). The CUDA class runs bigger layers on a GPU.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from arch.registry import RecipeError
from experts.triton_backend import interpreting, unavailable, unsupported_kind
from moe_helpers import clone_with, make_moe, rel_err

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_kernels = pytest.mark.skipif(
    not HAVE_TRITON or not (interpreting() or torch.cuda.is_available()),
    reason="triton is not importable" if not HAVE_TRITON else
    "no CUDA device: run with TRITON_INTERPRET=1 to run the Triton kernels through the interpreter")
cpu_interpreter = pytest.mark.skipif(not HAVE_TRITON or not interpreting(),
                                     reason="run with TRITON_INTERPRET=1 (and triton importable)")

D, F, T = 40, 24, 30


def _layer(seed=1, **kw):
    kw = {"d_model": D, "d_expert": F, "backend": "loop", **kw}
    return make_moe(seed=seed, **kw)


def _run(layer, x, g, autocast=None):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", autocast, enabled=autocast is not None):
        y = layer(x)
    (y.float() * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.clone()
    return y.detach().float(), grads


def _compare(ref_layer, x, tol=1e-5, autocast=None, **tri_kw):
    tri = clone_with(ref_layer, backend="triton", **tri_kw)
    g = torch.randn_like(x)
    y_l, grads_l = _run(ref_layer, x, g, autocast)
    y_t, grads_t = _run(tri, x, g, autocast)
    assert rel_err(y_t, y_l) < tol
    assert grads_t.keys() == grads_l.keys()
    for name in grads_l:
        assert grads_l[name].abs().sum() > 0, f"{name} gets no gradient: the comparison would be empty"
        assert rel_err(grads_t[name].float(), grads_l[name].float()) < tol, name
    return tri, grads_t


@cpu_interpreter
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_matches_loop_float32(capacity_factor):
    """swiglu, top 2 of 6, dropless and with capacity drops: output and the gradients
    of the input, both expert weights and the router (through the routing weights).
    Dropless with 64 tokens, every expert spans several 16-row tiles (and several
    16-row steps of the weight-gradient loop)."""
    from experts.triton_backend import BM_INTERPRET

    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(64 if capacity_factor is None else T, D)
    tri, grads = _compare(layer, x)
    if capacity_factor is not None:
        assert tri.stats["dropped_tokens"].item() > 0  # the case really drops slots
    else:
        assert tri.stats["tokens_per_expert"].min() > BM_INTERPRET
    assert "router.gate.weight" in grads


@cpu_interpreter
@pytest.mark.parametrize("expert_ffn", ["geglu", "swiglu_clamped"])
def test_other_glus_and_expert_biases_match_loop(expert_ffn):
    """The other fused epilogues, with expert biases (their gradients come from the
    wgrad kernels' column sums and glu_bwd's bias term); top 3, capacity drops."""
    layer = _layer(seed=3, expert_ffn=expert_ffn, expert_bias=True, top_k=3, capacity_factor=0.8)
    if expert_ffn == "swiglu_clamped":
        with torch.no_grad():
            layer.w_in.mul_(8)  # push gate/up past the clamp limit of 7 in places
    x = torch.randn(T, D)
    _compare(layer, x)
    if expert_ffn == "swiglu_clamped":
        gate, up = torch.einsum("td,eid->tei", x, layer.w_in).chunk(2, dim=-1)
        assert (gate > 7).any() and (up.abs() > 7).any()


@cpu_interpreter
def test_experts_with_no_tokens_and_top1():
    """Experts the router never picks own no tile; their weight gradients are zeros
    (written by wgrad over an empty row range), as loop's are."""
    layer = _layer(seed=4, top_k=1, n_experts=5, renormalize=False)  # weight = a softmax score, not 1
    with torch.no_grad():
        layer.router.expert_bias[torch.tensor([0, 3])] = -1e4  # never selected
    x = torch.randn(T, D)
    tri, grads = _compare(layer, x)
    counts = tri.stats["tokens_per_expert"]
    assert counts[0] == 0 and counts[3] == 0 and counts.sum() == T
    assert grads["w_in"][[0, 3]].abs().sum() == 0 and grads["w_out"][[0, 3]].abs().sum() == 0
    assert grads["w_in"][[1, 2, 4]].abs().min(-1).values.sum() > 0


@cpu_interpreter
def test_bf16_autocast_matches_loop():
    """Under bf16 autocast both backends compute in bf16 with float32 routing: within
    bf16's rounding of each other (the loop's F.linear rounds its outputs to bf16
    at each step, the kernels keep float32 accumulators longer)."""
    layer = _layer(seed=5, capacity_factor=1.0)
    _compare(layer, torch.randn(T, D), tol=2e-2, autocast=torch.bfloat16)


@cpu_interpreter
def test_routing_weight_gradient_and_backend_interface():
    """The op itself: d loss / d routing weight of each slot (formed in glu_bwd's
    epilogue, no expert output saved) against autograd through loop + the combine,
    with dropped slots getting zero; and the plain backend interface (what the
    expert-parallel exchange calls: sorted rows in, unweighted rows out, dropped rows
    zero) against loop."""
    from experts.backends import loop_backend
    from experts.dispatch import combine, dispatch, expert_capacity, permute
    from experts.triton_backend import TritonBackend

    torch.manual_seed(6)
    E, K = 5, 2
    layer = _layer(seed=6, n_experts=E, top_k=K)
    w_in, w_out = layer.w_in.detach(), layer.w_out.detach()
    x = torch.randn(T, D)
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    d = dispatch(ids, E, expert_capacity(T, K, E, 0.8))
    assert d.n_dropped.item() > 0
    w = torch.rand(T, K)
    g = torch.randn(T, D)

    def ref(x_, w_):
        return combine(loop_backend(permute(x_, d), d.counts_E, w_in, w_out, "swiglu"), w_, d, T)

    results = []
    for fn in (ref, lambda x_, w_: TritonBackend.fused(x_, w_, d, w_in, w_out, "swiglu")):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xr, wr)
        (y * g).sum().backward()
        results.append((y.detach(), xr.grad, wr.grad))
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < 1e-5
    dropped_slots = d.inverse_S.view(T, K) >= d.counts_E.sum()
    assert dropped_slots.any() and (results[1][2][dropped_slots] == 0).all()

    x_S = permute(x, d)
    y_loop = loop_backend(x_S, d.counts_E, w_in, w_out, "swiglu")
    y_tri = TritonBackend()(x_S, d.counts_E, w_in, w_out, "swiglu")
    n_kept = int(d.counts_E.sum())
    assert rel_err(y_tri[:n_kept], y_loop[:n_kept]) < 1e-5 and (y_tri[n_kept:] == 0).all()


@cpu_interpreter
def test_forward_and_backward_have_no_host_sync():
    from test_backends import NoHostSync

    layer = _layer(seed=7, capacity_factor=1.0, backend="triton").train()
    x = torch.randn(T, D, requires_grad=True)
    with NoHostSync():
        layer(x).square().sum().backward()
    assert x.grad.abs().sum() > 0


@cpu_interpreter
def test_custom_ops_compile_fullgraph_and_pass_opcheck():
    """The layer compiles in one graph (fullgraph) with the ops opaque inside it,
    forward and backward equal to eager; torch.library.opcheck checks the fake
    (meta) functions and the autograd registration against the real kernels."""
    from experts.dispatch import dispatch
    from experts.triton_backend import triton_experts

    layer = _layer(seed=8, capacity_factor=1.0, backend="triton")
    x, g = torch.randn(T, D), torch.randn(T, D)
    y_e, grads_e = _run(layer, x, g)
    torch._dynamo.reset()
    compiled = clone_with(layer)
    compiled.compile(backend="aot_eager", fullgraph=True)
    y_c, grads_c = _run(compiled, x, g)
    assert rel_err(y_c, y_e) < 1e-6
    for name in grads_e:
        assert rel_err(grads_c[name], grads_e[name]) < 1e-6, name

    torch.manual_seed(9)
    E, K, T_, D_, F_ = 3, 2, 8, 16, 16
    d = dispatch(torch.rand(T_, E).argsort(-1)[:, :K], E)
    args = (torch.randn(T_, D_, requires_grad=True), torch.randn(E, 2 * F_, D_, requires_grad=True),
            torch.randn(E, D_, F_, requires_grad=True), None, None, torch.rand(T_, K, requires_grad=True),
            d.token_S, d.order_S, d.inverse_S, d.counts_E, "swiglu", True)
    torch.library.opcheck(triton_experts, args, test_utils=("test_schema", "test_autograd_registration",
                                                            "test_faketensor"))


def test_refusals_name_the_problem_in_one_sentence(monkeypatch):
    """Recipe validation refuses a kind with no fused epilogue; setup refuses a CPU
    run outside the interpreter and a machine without triton. Runs everywhere."""
    from arch import load_recipe

    with pytest.raises(RecipeError, match="expert_ffn = 'gelu' has no fused kernel"):
        load_recipe("qwen3/30b_a3b", ["model.moe.backend=triton", "model.moe.expert_ffn=gelu"])
    load_recipe("qwen3/30b_a3b", ["model.moe.backend=triton"])  # swiglu: fine, wherever it runs
    assert unsupported_kind("swiglu") is None

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problem = unavailable("cpu")
    assert problem is not None and problem.count(". ") == 0
    assert ("not importable" in problem) if not HAVE_TRITON else ("CUDA devices only" in problem)
    layer = _layer(backend="triton")
    with pytest.raises(RecipeError, match="model.moe.backend = 'triton'"):
        layer(torch.randn(4, D))
    from lit_modules.runtime import check_expert_backend

    with pytest.raises(RecipeError, match="model.moe.backend = 'triton'"):
        check_expert_backend(load_recipe("qwen3/30b_a3b", ["model.moe.backend=triton"]).model, "cpu")
    import experts.triton_backend as tb

    monkeypatch.setattr(tb.importlib.util, "find_spec", lambda name: None)
    assert "not importable" in unavailable("cuda")


@cpu_interpreter
def test_kernel_sweep_script_launches_every_kernel(tmp_path):
    """benchmarks/triton_sweep.py launches each kernel by hand with its full argument
    list: its CPU dry run (interpreter, tiny shape) must still run every kernel, so a
    kernel signature change that the script missed fails here, not on a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "triton_sweep.py"), "--tiny"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = out.stdout.split("#### summary", 1)[1]
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")]
    assert len(rows) == 6, summary  # glu_fwd, down, glu_bwd, dX and both weight gradients
    assert "no config ran" not in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting() or not HAVE_TRITON,
                    reason="needs CUDA and triton (compiled kernels, not the interpreter)")
class TestCuda:
    """Compiled kernels on a GPU: bigger shapes (several 128-row tiles per expert,
    the autotuned blocks), float32 against loop, bf16 against grouped_mm and the
    float32 loop, torch.compile with Inductor."""

    def _layers(self, **kw):
        layer = make_moe(seed=11, d_model=256, d_expert=192, n_experts=16, top_k=4, backend="loop", **kw).cuda()
        return layer

    @pytest.mark.parametrize("capacity_factor", [None, 0.9])
    def test_float32_matches_loop(self, capacity_factor):
        layer = self._layers(capacity_factor=capacity_factor)
        x, g = torch.randn(2048, 256, device="cuda"), torch.randn(2048, 256, device="cuda")
        y_l, grads_l = _run_cuda(layer, x, g)
        y_t, grads_t = _run_cuda(clone_with(layer, backend="triton").cuda(), x, g)
        assert rel_err(y_t, y_l) < 1e-4
        for name in grads_l:
            assert rel_err(grads_t[name], grads_l[name]) < 1e-4, name

    @pytest.mark.parametrize("expert_ffn", ["swiglu", "geglu", "swiglu_clamped"])
    def test_bf16_matches_grouped_mm(self, expert_ffn):
        layer = self._layers(capacity_factor=1.0, expert_ffn=expert_ffn, expert_bias=expert_ffn == "swiglu_clamped")
        x, g = torch.randn(4096, 256, device="cuda"), torch.randn(4096, 256, device="cuda")
        y_ref, grads_ref = _run_cuda(layer, x, g)  # float32 loop: the truth
        y_g, grads_g = _run_cuda(clone_with(layer, backend="grouped_mm").cuda(), x, g, torch.bfloat16)
        y_t, grads_t = _run_cuda(clone_with(layer, backend="triton").cuda(), x, g, torch.bfloat16)
        # no worse than grouped_mm's own bf16 error (plus a margin), and small
        assert rel_err(y_t, y_ref) < max(1.5 * rel_err(y_g, y_ref), 1e-2)
        for name in grads_ref:
            err_t, err_g = rel_err(grads_t[name], grads_ref[name]), rel_err(grads_g[name], grads_ref[name])
            assert err_t < max(1.5 * err_g, 2e-2), (name, err_t, err_g)

    @pytest.mark.parametrize("kind, bias", [("swiglu", False), ("swiglu_clamped", True)])
    def test_each_config_of_each_kernel_matches_torch(self, kind, bias):
        """Every launch config the autotuner may pick, forced one at a time, against
        torch in float32 on the same bf16 operands. The autotuner picks by timing, so a
        config that miscompiles fails a layer test only on the machines that pick it:
        Triton 3.6 on an H200 got glu_bwd's dot wrong under one config when the output
        bias's dot product was summed inside its loop (10-12% off, different at every
        call), and the layer test failed or passed with the pick."""
        import experts.triton_backend as tb
        from arch.ffn import swiglu_clamped

        gen = torch.Generator(device="cuda").manual_seed(3)
        E, D, F, T, K = 8, 256, 192, 1024, 4
        bf = torch.bfloat16

        def rnd(*shape, std=1.0):
            return (torch.randn(*shape, device="cuda", generator=gen) * std).to(bf)

        counts_E = torch.tensor([700, 0, 129, 1, 1000, 256, 333, 1400], device="cuda")  # S = 3819 of T K = 4096
        S = T * K
        n_kept = int(counts_E.sum())
        e_S = torch.repeat_interleave(torch.arange(E, device="cuda"), counts_E)
        src = torch.randint(0, T, (S,), device="cuda", generator=gen)
        x, dy = rnd(T, D), rnd(T, D)
        w_in, w_out = rnd(E, 2 * F, D, std=D ** -0.5), rnd(E, D, F, std=F ** -0.5)
        b_in, b_out = (rnd(E, 2 * F), rnd(E, D)) if bias else (None, None)
        w_S = torch.rand(S, device="cuda", generator=gen)
        glu = (lambda g, u: torch.nn.functional.silu(g) * u) if kind == "swiglu" else swiglu_clamped

        def per_expert(a_rows, w_E, transpose):  # float32 (n_kept, N): a_rows[r] @ W[e(r)] (W.T if transpose)
            out = []
            for e in range(E):
                w = w_E[e].float()
                out.append(a_rows[e_S == e].float() @ (w.T if transpose else w))
            return torch.cat(out)

        # references, float32 on the bf16 operands
        gu_ref = per_expert(x[src[:n_kept]], w_in, True) + (b_in.float()[e_S] if bias else 0)
        gu = gu_ref.to(bf)  # what glu_fwd saves: the backward's input
        g, u = gu.float().split(F, 1)
        h_ref = glu(g, u)
        c_ref = per_expert(h_ref.to(bf), w_out, True) + (b_out.float()[e_S] if bias else 0)
        G = per_expert(dy[src[:n_kept]], w_out, False)
        g_, u_ = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        dg, du = torch.autograd.grad((glu(g_, u_) * G * w_S[:n_kept, None]).sum(), (g_, u_))
        dgu_ref = torch.cat([dg, du], 1)
        dw_ref = (G * h_ref).sum(1) + ((dy[src[:n_kept]].float() * b_out.float()[e_S]).sum(1) if bias else 0)
        dwin_ref = torch.stack([dgu_ref.to(bf)[e_S == e].float().T @ x[src[:n_kept]][e_S == e].float()
                                for e in range(E)])

        gu_S = torch.cat([gu, torch.full((S - n_kept, 2 * F), float("nan"), dtype=bf, device="cuda")])
        checked = 0
        for bn, bk, warps, stages in tb._ROW_SHAPES["glu"]:
            rows = tb._Rows(counts_E, S, bf, config=(tb.BM_CUDA, bn, bk, warps, stages))
            gu_t = torch.empty(S, 2 * F, dtype=bf, device="cuda")
            h_t = rows.glu_fwd(x, src, w_in, b_in, gu_t, tb.KINDS[kind], True)
            assert rel_err(gu_t[:n_kept].float(), gu_ref) < 1e-2, ("glu_fwd gu", bn, bk, warps, stages)
            assert rel_err(h_t[:n_kept].float(), h_ref) < 2e-2, ("glu_fwd h", bn, bk, warps, stages)
            for _ in range(2):  # the miscompiled config gave a different wrong answer at each call
                dgu, dw_S, hs = rows.glu_bwd(dy, src, w_out, gu_S, w_S, b_out, tb.KINDS[kind])
                assert rel_err(dgu[:n_kept].float(), dgu_ref) < 2e-2, ("glu_bwd dgu", bn, bk, warps, stages)
                assert rel_err(dw_S[:n_kept], dw_ref) < 1e-2, ("glu_bwd dw", bn, bk, warps, stages)
                assert rel_err(hs[:n_kept].float(), h_ref * w_S[:n_kept, None]) < 2e-2, ("glu_bwd hs", bn, bk)
            checked += 1
        h_in = h_ref.to(bf)
        h_S = torch.cat([h_in, torch.zeros(S - n_kept, F, dtype=bf, device="cuda")])
        for bn, bk, warps, stages in tb._ROW_SHAPES["mm"]:
            rows = tb._Rows(counts_E, S, bf, config=(tb.BM_CUDA, bn, bk, warps, stages))
            c = rows.mm(h_S, w_out, b_out, w_out.stride(2), w_out.stride(1), D)
            assert rel_err(c[:n_kept].float(), c_ref) < 1e-2, ("grouped_mm", bn, bk, warps, stages)
            checked += 1
        dgu_S = torch.cat([dgu_ref.to(bf), torch.zeros(S - n_kept, 2 * F, dtype=bf, device="cuda")])
        for bm, bn, bk, warps, stages in tb._WGRAD_SHAPES:
            rows = tb._Rows(counts_E, S, bf, config=(bm, bn, bk, warps, stages))
            out = torch.empty_like(w_in)
            db = torch.empty(E, 2 * F, dtype=bf, device="cuda")
            rows.wgrad(out, db, dgu_S, None, x, src)
            assert rel_err(out.float(), dwin_ref) < 1e-2, ("wgrad", bm, bn, bk, warps, stages)
            db_ref = torch.stack([dgu_ref.to(bf)[e_S == e].float().sum(0) for e in range(E)])
            assert rel_err(db.float(), db_ref) < 1e-2, ("wgrad dbias", bm, bn, bk, warps, stages)
            checked += 1
        assert checked == sum(map(len, (tb._ROW_SHAPES["glu"], tb._ROW_SHAPES["mm"], tb._WGRAD_SHAPES)))

    def test_inductor_compile_fullgraph_matches_eager_and_has_no_sync(self):
        layer = clone_with(self._layers(capacity_factor=1.25), backend="triton").cuda()
        x, g = torch.randn(4096, 256, device="cuda"), torch.randn(4096, 256, device="cuda")
        y_e, grads_e = _run_cuda(layer, x, g, torch.bfloat16)
        torch._dynamo.reset()
        compiled = clone_with(layer).cuda()
        compiled.compile(fullgraph=True)
        y_c, grads_c = _run_cuda(compiled, x, g, torch.bfloat16)
        assert rel_err(y_c, y_e) < 1e-2
        for name in grads_e:
            assert rel_err(grads_c[name], grads_e[name]) < 2e-2, name
        def step():
            with torch.autocast("cuda", torch.bfloat16):
                compiled(x.clone().requires_grad_(True)).float().square().sum().backward()

        step()  # compiles this call's graphs: Inductor's own compile-time work may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()  # the compiled step itself: no host sync
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _run_cuda(layer, x, g, autocast=None):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", autocast or torch.float32, enabled=autocast is not None):
        y = layer(x)
    (y.float() * g).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.float().clone()
    return y.detach().float(), grads


_HOPPER_COMPILE = r'''
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import experts.triton_kernels as K

bf, i64, f32 = "*bf16", "*i64", "*fp32"
dot = dict(DOT_T=tl.bfloat16, PREC="tf32")
tiles = dict(tile_e_ptr=i64, tile_lo_ptr=i64, tile_hi_ptr=i64)
cases = [
    (K.glu_fwd_kernel, dict(x_ptr=bf, src_ptr=i64, w_ptr=bf, b_ptr=bf, h_ptr=bf, gu_ptr=bf, **tiles),
     dict(D=2048, KIND=2, HAS_BIAS=True, SAVE_GU=True, BM=128, BN=64, BK=64, **dot)),
    (K.grouped_mm_kernel, dict(a_ptr=bf, b_ptr=bf, bias_ptr=bf, c_ptr=bf, **tiles),
     dict(K=768, HAS_BIAS=True, BM=128, BN=128, BK=64, **dot)),
    (K.glu_bwd_kernel, dict(dy_ptr=bf, src_ptr=i64, w_ptr=bf, gu_ptr=bf, wrow_ptr=f32, bout_ptr=bf, dgu_ptr=bf,
                            dwp_ptr=f32, hs_ptr=bf, **tiles),
     dict(D=2048, KIND=1, HAS_BIAS=True, BM=128, BN=64, BK=64, **dot)),
    (K.wgrad_kernel, dict(a_ptr=bf, a_src_ptr=i64, scale_ptr=f32, b_ptr=bf, b_src_ptr=i64, out_ptr=bf,
                          dbias_ptr=bf, first_ptr=i64, counts_ptr=i64),
     dict(A_GATHER=True, B_GATHER=False, HAS_DBIAS=True, DBIAS_SCALE=True, BM=128, BN=128, BK=64,
          INTERPRET=False, **dot)),
    (K.wgrad_kernel, dict(a_ptr=bf, a_src_ptr=i64, scale_ptr=f32, b_ptr=bf, b_src_ptr=i64, out_ptr=bf,
                          dbias_ptr=bf, first_ptr=i64, counts_ptr=i64),
     dict(A_GATHER=False, B_GATHER=True, HAS_DBIAS=False, DBIAS_SCALE=False, BM=128, BN=128,
          BK=64, INTERPRET=False, **dot)),
    (K.gather_sum_kernel, dict(rows_ptr=bf, slot_row_ptr=i64, w_ptr=f32, n_kept_ptr=i64, out_ptr=bf),
     dict(K=8, HAS_W=True, BT=4, BD=1024)),
]
for fn, ptrs, consts in cases:
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    # what the JIT assumes of torch's tensors and these widths: 16-divisible pointers and strides
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (n.endswith("_ptr") or n.startswith("stride"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
    assert "warp_group_dot" in k.asm["ttgir"] or fn is K.gather_sum_kernel, fn.__name__  # Hopper wgmma
    print("compiled", fn.__name__)
'''


@pytest.mark.skipif(not HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its NVIDIA backend")
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs the kernels' Python, not Triton's compiler: compile each
    kernel (one variant of its constexpr branches each) for sm_90 ahead of time, no
    GPU needed, so that a kernel only a GPU would reject fails here too; the MMAs
    must lower to Hopper's wgmma."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the repository first, then the caller's path (where omegaconf may live)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                   os.environ.get("PYTHONPATH", "")) if p)
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, not a cached success
    out = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 6
