"""Dispatch and expert backends: grouped_mm against the loop reference, the whole
layer against a per-token reference, capacity semantics, and no host sync."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from arch.ffn import ACTIVATIONS, GATED
from experts.dispatch import dispatch, expert_capacity
from moe_helpers import D_MODEL, clone_with, make_moe, rel_err

T = 24  # tokens
SHARED = {"none": {}, "shared": dict(n_shared=2, d_shared=4), "gated": dict(n_shared=1, shared_gate=True)}


def _forward_backward(layer, x, g):
    layer.train()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    loss = (y * g).sum() + sum(layer.gather_aux([layer]).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["<input>"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("shared", sorted(SHARED))
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_grouped_mm_matches_loop(router, capacity_factor, shared):
    kw = dict(router=router, capacity_factor=capacity_factor, aux_coef=0.01, z_coef=0.001, **SHARED[shared])
    grouped = make_moe(seed=1, backend="grouped_mm", **kw)
    loop = clone_with(grouped, backend="loop")
    torch.manual_seed(2)
    x, g = torch.randn(2, T // 2, D_MODEL), torch.randn(2, T // 2, D_MODEL)
    y_g, grads_g = _forward_backward(grouped, x, g)
    y_l, grads_l = _forward_backward(loop, x, g)
    if capacity_factor is not None:  # the case must really drop something
        assert grouped.stats["dropped_tokens"].item() > 0
    assert rel_err(y_g, y_l) < 1e-5
    assert grads_g.keys() == grads_l.keys()
    for name in grads_l:
        assert grads_l[name].abs().sum() > 0, f"{name} gets no gradient: the comparison would be empty"
        assert rel_err(grads_g[name], grads_l[name]) < 1e-5, name


@pytest.mark.parametrize("expert_ffn", ["gelu", "geglu"])
def test_grouped_mm_matches_loop_other_ffns(expert_ffn):
    grouped = make_moe(seed=3, expert_ffn=expert_ffn, capacity_factor=1.0)
    loop = clone_with(grouped, backend="loop")
    x, g = torch.randn(T, D_MODEL), torch.randn(T, D_MODEL)
    y_g, grads_g = _forward_backward(grouped, x, g)
    y_l, grads_l = _forward_backward(loop, x, g)
    assert rel_err(y_g, y_l) < 1e-5
    for name in grads_l:
        assert rel_err(grads_g[name], grads_l[name]) < 1e-5, name


def _per_token_reference(layer, x_TD):
    """sum_k w_tk * expert_{e_tk}(x_t), skipping slots past an expert's first C in
    token order; written from the definition, one token at a time."""
    r = layer.router(x_TD)
    E, K = layer.n_experts, layer.top_k
    cf = layer.cfg.capacity_factor
    C = None if cf is None else expert_capacity(x_TD.shape[0], K, E, cf)
    seen = [0] * E
    act, gated = ACTIVATIONS[layer.cfg.expert_ffn], GATED[layer.cfg.expert_ffn]
    out = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1])
        for k in range(K):
            e = int(r.ids_TK[t, k])
            seen[e] += 1
            if C is not None and seen[e] > C:
                continue
            h = layer.w_in[e] @ x_TD[t]
            if gated:
                gate, up = h.chunk(2)
                h = act(gate) * up
            else:
                h = act(h)
            y = y + r.weights_TK[t, k] * (layer.w_out[e] @ h)
        if layer.shared is not None:
            s = layer.shared(x_TD[t])
            if layer.shared_gate is not None:
                s = torch.sigmoid(layer.shared_gate(x_TD[t])) * s
            y = y + s
        out.append(y)
    return torch.stack(out), seen, C


@pytest.mark.parametrize("fused", [False, True], ids=["eager_form", "compiled_form"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
def test_layer_matches_per_token_reference(backend, capacity_factor, fused, monkeypatch):
    """Forward and every gradient: the dispatch/combine code is shared by all
    backends, so this, not the backend comparison, is what checks it; in both forms
    of the permute backward and the combine (the one used when compiled is forced
    here, in eager mode)."""
    import experts.dispatch

    monkeypatch.setattr(experts.dispatch, "_fused_form", lambda: fused)
    layer = make_moe(seed=4, backend=backend, capacity_factor=capacity_factor, n_shared=1, shared_gate=True).eval()
    x = torch.randn(T, D_MODEL)
    g = torch.randn(T, D_MODEL)
    results = []
    for run in ("layer", "reference"):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = layer(xr) if run == "layer" else _per_token_reference(layer, xr)[0]
        (y * g).sum().backward()
        results.append([y.detach(), xr.grad] + [p.grad.clone() for p in layer.parameters()])
    for got, ref in zip(*results):
        assert rel_err(got, ref) < 1e-5
    with torch.no_grad():
        _, seen, C = _per_token_reference(layer, x)
    expected_dropped = 0 if C is None else sum(max(0, n - C) for n in seen)
    assert layer.stats["dropped_tokens"].item() == expected_dropped
    assert layer.stats["tokens_per_expert"].tolist() == seen
    if capacity_factor == 0.5:
        assert expected_dropped > 0


def test_gather_rows_gradient():
    from experts.dispatch import _GatherRows

    ids = torch.randint(0, 5, (7, 3))
    d = dispatch(ids, 5)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, d.token_S, d.inverse_S, 3), (x,))
    y = torch.randn(21, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, d.inverse_S, d.order_S, 1), (y,))


def test_padded_gather_and_sum():
    """The expert-parallel token exchange's row movement: a gather where rows have
    0..C copies (a slot equal to the number of output rows is no copy) and its
    adjoint sum, by hand and by gradcheck (float64)."""
    from experts.dispatch import _GatherPadded, _SumPadded

    # src rows 0..3; copies: row 0 -> out 2, 0; row 1 -> none; row 2 -> out 1; row 3 -> out 3, 4
    index = torch.tensor([0, 2, 0, 3, 3])
    n_out = index.numel()
    slots = torch.tensor([[2, 0], [n_out, n_out], [1, n_out], [3, 4]])
    src = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_GatherPadded.apply(src, index, slots), src[index])
    torch.autograd.gradcheck(lambda t: _GatherPadded.apply(t, index, slots), (src,))
    rows = torch.randn(n_out, 3, dtype=torch.float64, requires_grad=True)
    summed = _SumPadded.apply(rows, slots, index)
    want = torch.stack([rows[2] + rows[0], torch.zeros(3, dtype=torch.float64), rows[1], rows[3] + rows[4]])
    assert torch.allclose(summed, want)
    torch.autograd.gradcheck(lambda r: _SumPadded.apply(r, slots, index), (rows,))


@pytest.mark.parametrize("fused", [False, True], ids=["eager_form", "compiled_form"])
@pytest.mark.parametrize("capacity", [None, 4])
def test_weighted_combine_gradient_and_value(capacity, fused, monkeypatch):
    """combine = sum_k w_tk * rows[row of slot (t, k)]: value from the definition,
    gradients of the rows and of the weights by gradcheck (float64), dropped slots
    contributing nothing."""
    import experts.dispatch
    from experts.dispatch import _GatherRows, _WeightedCombine, combine

    monkeypatch.setattr(experts.dispatch, "_fused_form", lambda: fused)

    torch.manual_seed(0)
    T_, K, E = 7, 3, 5
    ids = torch.rand(T_, E).argsort(-1)[:, :K]  # K distinct experts per token
    d = dispatch(ids, E, capacity)
    rows = torch.randn(T_ * K, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T_, K, dtype=torch.float64, requires_grad=True)
    y = combine(rows, w, d, T_)
    slot_row = d.inverse_S.view(T_, K)
    n_kept = T_ * K if d.keep_S is None else int(d.keep_S.sum())
    expected = torch.stack([sum((w[t, k] * rows[slot_row[t, k]] for k in range(K) if slot_row[t, k] < n_kept),
                                 torch.zeros(4, dtype=torch.float64))
                            for t in range(T_)])
    assert torch.allclose(y, expected)
    if capacity is not None:
        assert n_kept < T_ * K  # something really was dropped
    torch.autograd.gradcheck(lambda r, ww: combine(r, ww, d, T_), (rows, w))
    if fused:
        torch.autograd.gradcheck(lambda r, ww: _WeightedCombine.apply(r, ww, slot_row, d.order_S), (rows, w))
    x = torch.randn(T_, 4, dtype=torch.float64, requires_grad=True)  # the permute, both forms
    torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, d.token_S, d.inverse_S, K), (x,))


@pytest.mark.parametrize("fused", [False, True], ids=["eager_form", "compiled_form"])
@pytest.mark.parametrize("capacity", [None, 4])
def test_sum_of_token_rows_gradient_and_value(capacity, fused, monkeypatch):
    """sum_token_rows = sum_k rows[row of slot (t, k)] (the combine of rows a backend
    already weighted): value from the definition, dropped slots adding nothing even
    when they hold NaN, gradient by gradcheck (float64) in both forms."""
    import experts.dispatch
    from experts.dispatch import sum_token_rows

    monkeypatch.setattr(experts.dispatch, "_fused_form", lambda: fused)
    torch.manual_seed(0)
    T_, K, E = 7, 3, 5
    d = dispatch(torch.rand(T_, E).argsort(-1)[:, :K], E, capacity)
    rows = torch.randn(T_ * K, 4, dtype=torch.float64)
    slot_row = d.inverse_S.view(T_, K)
    n_kept = T_ * K if d.keep_S is None else int(d.keep_S.sum())
    rows[n_kept:] = float("nan")
    want = torch.stack([sum((rows[slot_row[t, k]] for k in range(K) if slot_row[t, k] < n_kept),
                            torch.zeros(4, dtype=torch.float64)) for t in range(T_)])
    assert torch.allclose(sum_token_rows(rows, d, T_), want)
    if capacity is not None:
        assert n_kept < T_ * K
    rows = rows.nan_to_num().requires_grad_(True)
    torch.autograd.gradcheck(lambda r: sum_token_rows(r, d, T_), (rows,))


@pytest.mark.parametrize("biased", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_backend_scale_is_a_per_row_factor_of_the_output(backend, biased):
    """The interface's scale_S: backend(..., scale_S=s) = s * backend(...), output bias
    included, and its gradient reaches the scale (float64 gradcheck for the loop)."""
    from experts.backends import EXPERT_BACKEND

    fn = EXPERT_BACKEND.get(backend)
    torch.manual_seed(1)
    E, D, F_, counts = 3, 8, 4, torch.tensor([3, 0, 4])
    S = int(counts.sum())
    x, w_in, w_out = torch.randn(S, D), torch.randn(E, 2 * F_, D), torch.randn(E, D, F_)
    biases = (torch.randn(E, 2 * F_), torch.randn(E, D)) if biased else ()
    s = torch.rand(S) + 0.5
    got = fn(x, counts, w_in, w_out, "swiglu", *biases, scale_S=s)
    assert rel_err(got, s[:, None] * fn(x, counts, w_in, w_out, "swiglu", *biases)) < 1e-6
    if backend == "loop":
        args = [t.double().requires_grad_() for t in (x, w_in, w_out, *biases, s)]
        torch.autograd.gradcheck(
            lambda x_, wi, wo, *rest: fn(x_, counts, wi, wo, "swiglu", *rest[:-1], scale_S=rest[-1]), args)


@pytest.mark.parametrize("capacity", [None, 5])
def test_routed_experts_equals_weighting_the_outputs(capacity):
    """routed_experts (weights applied before the down projection, rows summed) against
    the backend's unweighted rows combined with the weights: value and the gradients
    of the input, the weights and the routing weights."""
    from experts.backends import grouped_mm_backend
    from experts.dispatch import combine, permute, routed_experts

    torch.manual_seed(2)
    T_, K, E, D, F_ = 9, 2, 4, 8, 4
    d = dispatch(torch.rand(T_, E).argsort(-1)[:, :K], E, capacity)
    leaves = [torch.randn(T_, D), torch.rand(T_, K), torch.randn(E, 2 * F_, D), torch.randn(E, D, F_)]
    outs = []
    for form in ("scaled", "weighted"):
        x, w, w_in, w_out = [t.clone().requires_grad_() for t in leaves]
        if form == "scaled":
            y = routed_experts(grouped_mm_backend, x, w, d, w_in, w_out, "swiglu")
        else:
            y = combine(grouped_mm_backend(permute(x, d), d.counts_E, w_in, w_out, "swiglu"), w, d, T_)
        y.pow(2).sum().backward()
        outs.append([y.detach(), x.grad, w.grad, w_in.grad, w_out.grad])
    if capacity is not None:
        assert d.keep_S is not None and not bool(d.keep_S.all())
    for got, want in zip(*outs):
        assert got.abs().sum() > 0 and rel_err(got, want) < 1e-5


def test_dispatch_layout_by_hand():
    # the sketch in experts/dispatch.py: t0:(e1,e0) t1:(e1,e2) t2:(e1,e0), E = 3, C = 2
    ids = torch.tensor([[1, 0], [1, 2], [1, 0]])
    d = dispatch(ids, 3)
    assert d.counts_E.tolist() == [2, 3, 1] and d.keep_S is None
    assert d.token_S.tolist() == [0, 2, 0, 1, 2, 1]
    d = dispatch(ids, 3, capacity=expert_capacity(3, 2, 3, 1.0))
    assert d.counts_E.tolist() == [2, 2, 1] and d.tokens_per_expert_E.tolist() == [2, 3, 1]
    assert d.token_S.tolist() == [0, 2, 0, 1, 1, 2]  # t2's slot of e1 dropped, moved last
    assert d.keep_S.tolist() == [True] * 5 + [False] and d.n_dropped.item() == 1
    assert d.order_S.tolist() == [1, 5, 0, 2, 3, 4]
    assert d.inverse_S[d.order_S].tolist() == list(range(6))


# Ops that read a device value on the host (or do on CUDA: bincount reads the max id).
SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2",
           "unique_consecutive", "item"}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads tensor data on the host. item(), bool(t), int(t)
    reach aten._local_scalar_dense; tolist() and numpy() read CPU memory without the
    dispatcher, so they are patched for the duration."""

    def __enter__(self):
        def refuse(*_, **__):
            raise AssertionError("host sync in the grouped path: tolist/numpy")

        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        torch.Tensor.tolist = torch.Tensor.numpy = refuse
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            raise AssertionError(f"host sync in the grouped path: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_forward_and_backward_have_no_host_sync(capacity_factor):
    layer = make_moe(seed=5, capacity_factor=capacity_factor, aux_coef=0.01, aux_scope="global", z_coef=1e-3,
                     n_shared=1, shared_gate=True, bias_update_rate=1e-3, router="sigmoid_topk").train()
    x = torch.randn(T, D_MODEL, requires_grad=True)
    with NoHostSync():
        y = layer(x)
        loss = y.square().mean() + sum(layer.gather_aux([layer]).values())
        loss.backward()
    assert x.grad is not None
    # the check must catch a sync: the loop backend reads counts with tolist(), and
    # anything reading a scalar goes through item()
    loop = clone_with(layer, backend="loop")
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        loop(x)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        int(layer.stats["dropped_tokens"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_forward_has_no_cuda_sync():
    layer = make_moe(seed=6, capacity_factor=1.25, aux_coef=0.01, z_coef=1e-3, d_model=64, d_expert=32).cuda().train()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    layer(x)  # warm up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_matches_loop_cuda_bf16():
    grouped = make_moe(seed=7, capacity_factor=1.0, d_model=64, d_expert=32).cuda()
    loop = clone_with(grouped, backend="loop").cuda()
    x, g = torch.randn(128, 64, device="cuda"), torch.randn(128, 64, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        y_g, grads_g = _forward_backward(grouped, x, g)
        y_l, grads_l = _forward_backward(loop, x, g)
    assert rel_err(y_g.float(), y_l.float()) < 2e-2
    for name in grads_l:
        assert rel_err(grads_g[name].float(), grads_l[name].float()) < 2e-2, name


def test_grouped_mm_casts_to_autocast_dtype_and_router_stays_float32():
    layer = make_moe(seed=8)
    x = torch.randn(T, D_MODEL)
    with torch.autocast("cpu", torch.bfloat16):
        r = layer.router(x)
        y = layer(x)
    assert r.scores_TE.dtype == r.weights_TK.dtype == r.logits_TE.dtype == torch.float32
    assert y.dtype == x.dtype
    assert rel_err(y, layer(x).detach()) < 3e-2  # bf16 experts, float32 routing: same choices


def test_compile_takes_the_fused_form_and_matches_eager():
    """Under torch.compile the permute backward and the combine take their K-read
    form (_fused_form is True while tracing); the traced layer (aot_eager: the graphs
    autograd would hand to Inductor) gives the eager layer's output and gradients."""
    import experts.dispatch

    @torch.compile(backend="eager", fullgraph=True)
    def which(x):
        return x + 1 if experts.dispatch._fused_form() else x - 1

    assert which(torch.zeros(1)).item() == 1 and not experts.dispatch._fused_form()

    # loop backend: grouped_mm's fake-tensor rule wants bf16, which CPU cannot run
    layer = make_moe(seed=5, capacity_factor=1.0, backend="loop")
    x, g = torch.randn(T, D_MODEL), torch.randn(T, D_MODEL)
    y_e, grads_e = _forward_backward(layer, x, g)
    torch._dynamo.reset()
    compiled = clone_with(layer)
    compiled.compile(backend="aot_eager")
    y_c, grads_c = _forward_backward(compiled, x, g)
    assert rel_err(y_c, y_e) < 1e-5
    for name in grads_e:
        assert rel_err(grads_c[name], grads_e[name]) < 1e-5, name


def _compiled_grads_match_eager(combine_, rows, w, g):
    """The gradients of the rows and the weights through `combine_(rows, w)` (loss
    sum(y * g)), eager and traced by Dynamo (aot_eager, one graph): equal and nonzero."""
    def grads(fn):
        r, ww = rows.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (fn(r, ww).float() * g.float()).sum().backward()
        return r.grad, ww.grad

    torch._dynamo.reset()
    eager, compiled = grads(combine_), grads(torch.compile(combine_, backend="aot_eager", fullgraph=True))
    for e, c in zip(eager, compiled):
        assert c.abs().sum() > 0 and rel_err(c.float(), e.float()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_combine_gets_the_eager_gradients(dtype):
    """The cause of issue 21, pinned on every torch: traced by Dynamo, a custom
    Function whose forward ends in a `.to()` that changes nothing got exactly zero
    gradients on torch 2.11 (the float32 combine did; bf16 rows, a real cast, did
    not). Runs without the compiled-loop skip: the combine is in every compiled MoE."""
    from experts.dispatch import _WeightedCombine

    torch.manual_seed(0)
    d = dispatch(torch.rand(6, 4).argsort(-1)[:, :2], 4)
    rows, w, g = torch.randn(12, 8, dtype=dtype), torch.rand(6, 2), torch.randn(6, 8, dtype=dtype)

    def combine_(r, ww):
        return _WeightedCombine.apply(r, ww, d.inverse_S.view(6, 2), d.order_S)

    _compiled_grads_match_eager(combine_, rows, w, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_sum_of_token_rows_gets_the_eager_gradients(dtype):
    """The same pin for the combine of rows scaled by their routing weights: the rows'
    sum (_SumCopies) and the weights' gather (row_weights), traced by Dynamo, give the
    eager gradients of the rows and of the weights, in float32 (where the sum's cast
    changes nothing) and in bf16."""
    from experts.dispatch import row_weights, sum_token_rows

    torch.manual_seed(0)
    d = dispatch(torch.rand(6, 4).argsort(-1)[:, :2], 4, 2)  # capacity 2: a dropped row too
    assert d.keep_S is not None and not bool(d.keep_S.all())
    rows, w, g = torch.randn(12, 8, dtype=dtype), torch.rand(6, 2), torch.randn(6, 8, dtype=dtype)

    def combine_(r, ww):
        return sum_token_rows(r * row_weights(ww, d).to(r.dtype)[:, None], d, 6)

    _compiled_grads_match_eager(combine_, rows, w, g)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_expert_biases_and_clamped_swiglu_match_a_per_token_reference(capacity_factor):
    """Biased experts with gpt-oss's clamped SwiGLU: grouped_mm against a plain
    per-token loop over the chosen experts (dropless), and against the loop backend,
    gradients included, with and without capacity dropping."""
    from arch.ffn import swiglu_clamped

    layer = make_moe(seed=9, expert_ffn="swiglu_clamped", expert_bias=True, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.w_in.mul_(10)  # push gate/up values past the clamp limit of 7
    x = torch.randn(T, D_MODEL)
    if capacity_factor is None:  # dropless: every chosen expert counts
        y = layer(x)
        r = layer.router(x)
        want, clamped = torch.zeros_like(y), 0
        for t in range(T):
            for k in range(layer.top_k):
                e = r.ids_TK[t, k]
                gate, up = (layer.w_in[e] @ x[t] + layer.b_in[e]).chunk(2)
                clamped += int((gate > 7).sum() + (up.abs() > 7).sum())
                want[t] += r.weights_TK[t, k] * (layer.w_out[e] @ swiglu_clamped(gate, up) + layer.b_out[e])
        assert clamped > 0 and rel_err(y, want) < 1e-5
    loop = clone_with(layer, backend="loop")
    g = torch.randn(T, D_MODEL)
    y_g, grads_g = _forward_backward(layer, x, g)
    y_l, grads_l = _forward_backward(loop, x, g)
    assert rel_err(y_g, y_l) < 1e-5
    for name in grads_l:
        assert rel_err(grads_g[name], grads_l[name]) < 1e-5, name
    assert grads_g["b_in"].abs().sum() > 0 and grads_g["b_out"].abs().sum() > 0
