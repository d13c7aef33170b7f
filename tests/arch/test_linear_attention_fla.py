"""flash-linear-attention's chunked kernel (model.attention.linear.backend fla / auto on
CUDA) against the chunked PyTorch reference. GPU only: skips without CUDA or fla."""
from __future__ import annotations

import pytest
import torch

from arch.linear_attention import chunk_gated_delta_rule, fla_backward_refused, fla_chunk_gated_delta_rule, l2norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fla_chunk_gated_delta_rule() is None,
                                reason="needs CUDA and flash-linear-attention (pip install 'moelab[fla]')")


def _inputs(B, T, H, Dk, Dv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, Dk, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, H, Dk, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, T, H, Dv, device="cuda", generator=g).bfloat16()
    decay = -torch.rand(B, T, H, device="cuda", generator=g) * 2  # float32, as the layer makes it
    beta = torch.rand(B, T, H, device="cuda", generator=g).bfloat16()
    return q, k, v, decay, beta


def _fla_and_reference(T, grad):
    q, k, v, g, beta = (t.requires_grad_(grad) for t in _inputs(2, T, 4, 64, 64))
    scale = 64 ** -0.5
    o, _ = fla_chunk_gated_delta_rule()(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True)
    ref, _ = chunk_gated_delta_rule(l2norm(q.float()), l2norm(k.float()), v, g, beta, scale, 64)
    return (q, k, v, g, beta), o, ref


@pytest.mark.parametrize("T", [64, 200, 1000])
def test_fla_forward_matches_the_chunked_reference(T):
    with torch.no_grad():
        _, o, ref = _fla_and_reference(T, grad=False)
    err = (o.float() - ref).abs().max().item()
    assert err < 2e-2 * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("T", [64, 200, 1000])
def test_fla_gradients_match_the_chunked_reference(T):
    if fla_backward_refused():
        pytest.skip("fla refuses its backward here (Hopper, Triton 3.4-3.7.0, no tilelang): auto trains on the "
                    "reference, see test_auto_trains_where_fla_refuses_its_backward")
    inputs, o, ref = _fla_and_reference(T, grad=True)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((o.float() * w).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for name, a, b in zip("q k v g beta".split(), grads, grads_ref):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 3e-2, (name, rel.item())


def test_auto_trains_where_fla_refuses_its_backward():
    """backend auto: fla for forward-only work; where fla refuses its backward, a training
    forward takes the reference (it must not reach fla's refusal), and backend fla says why
    in one sentence."""
    import experts  # noqa: F401
    from arch import build_model, load_recipe

    recipe = load_recipe("proxies/qwen3_next_tiny", ["model.attention.linear.backend=auto"])
    model = build_model(recipe.model, device="cuda")
    ids = torch.randint(0, 2048, (1, 130), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids, targets=ids).loss.backward()  # runs on either path
    if not fla_backward_refused():
        return
    recipe = load_recipe("proxies/qwen3_next_tiny", ["model.attention.linear.backend=fla"])
    model = build_model(recipe.model, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            model(ids)  # forward-only work keeps fla
        with pytest.raises(ValueError, match="refuses its backward"):
            model(ids, targets=ids)


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16-weights", "bf16-autocast"])
def test_layer_backends_agree_in_bf16(mixed):
    """The whole Qwen3-Next tiny proxy on CUDA, bf16 weights or float32 weights under bf16
    autocast (training's bf16-mixed, where q, k and v arrive in float32): fla against torch."""
    import experts  # noqa: F401
    from arch import build_model, load_recipe

    logits = {}
    for backend in ("torch", "fla"):
        torch.manual_seed(0)
        recipe = load_recipe("proxies/qwen3_next_tiny", [f"model.attention.linear.backend={backend}"])
        model = build_model(recipe.model, device="cuda")
        model = model if mixed else model.bfloat16()
        ids = torch.randint(0, 2048, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            logits[backend] = model(ids).logits.float()
    diff = (logits["fla"] - logits["torch"]).abs().max().item()
    assert diff < 5e-2 * logits["torch"].abs().max().item(), diff


def test_compiled_blocks_agree_with_eager():
    """Training compiles each block (lit_modules.train.strategy.parallelize); fla's kernel
    is a torch.compiler.disable region inside it (the reference, where fla refuses its
    backward, is compiled with the block), so the compiled step must run and give the
    eager step's loss and gradients (bf16 autocast, float32 weights, backend auto)."""
    import experts  # noqa: F401
    from arch import build_model, load_recipe
    from lit_modules.train.strategy import parallelize

    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        recipe = load_recipe("proxies/qwen3_next_tiny", ["model.attention.linear.backend=auto",
                                                         f"train.compile={str(compiled).lower()}"])
        model = build_model(recipe.model, device="cuda")
        parallelize(model, recipe.train)
        ids = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=ids).loss
        loss.backward()
        results[compiled] = (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                           if p.grad is not None})
    (loss_e, grads_e), (loss_c, grads_c) = results[False], results[True]
    assert abs(loss_c - loss_e) < 2e-2, (loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys()
    flat_e = torch.cat([g.flatten() for g in grads_e.values()])
    flat_c = torch.cat([grads_c[name].flatten() for name in grads_e])
    assert (flat_c - flat_e).norm() / flat_e.norm() < 2e-2
    for name, g in grads_e.items():  # bf16 rounding moves a small tensor's gradient by a few %, a wrong kernel by ~100%
        rel = (grads_c[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 0.2, (name, rel.item())
