"""Compiled training reaches every parameter, with every expert backend.

Issue 21: on torch 2.11 a model with `model.moe.backend: loop` and
`train.compile: true` trained its MoE layers on nothing, silently: the compiled
layer's output was right and every gradient through it exactly zero. This trains a
tiny MoE model the way `moelab train` prepares it (strategy.parallelize compiles each
block) for a few optimizer steps and checks that every trainable parameter gets a
finite, non-zero gradient at every step and moves.

Backend aot_eager, not Inductor: it hands the same AOTAutograd forward and backward
graphs (where the bug was) to an eager runner, in seconds instead of ~50 s a case
on a CPU.
"""
from __future__ import annotations

import pytest
import torch

import experts  # noqa: F401  (registers the expert backends)
from arch import build_model, materialize
from arch.registry import EXPERT_BACKEND
from conftest import tiny_recipe
from lit_modules.train.optim import build_optimizer
from lit_modules.train.strategy import parallelize

STEPS = 3
# Compiled grouped_mm takes bf16 only (its fake-tensor rule refuses float32 even where
# the CPU kernel runs it), so it trains as bf16-mixed does on a GPU: float32 weights,
# bf16 autocast. Everything else in float32.
AUTOCAST = {"grouped_mm": torch.bfloat16}


def _skip_unless_runs_here(backend: str, dtype: torch.dtype) -> None:
    """Skip, with the reason, a backend whose kernel this torch build lacks on CPU."""
    if backend == "triton":
        from experts.triton_backend import unavailable

        # this test trains on the CPU
        pytest.skip(unavailable("cpu") or "under Triton's interpreter a model's training is too slow here "
                    "(tests/experts/test_triton_backend.py compiles its layer instead)")
    if backend != "grouped_mm":
        return
    from experts.backends import _grouped_mm

    try:
        _grouped_mm(torch.randn(8, 16, dtype=dtype), torch.randn(2, 16, 8, dtype=dtype),
                    offs=torch.tensor([3, 8], dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"grouped_mm does not run on this CPU build in {dtype}: {e}")


@pytest.mark.parametrize("capacity_factor", ["null", "1.0"], ids=["dropless", "capacity"])
@pytest.mark.parametrize("backend", EXPERT_BACKEND.keys())
def test_compiled_training_reaches_every_parameter(backend, capacity_factor, monkeypatch):
    dtype = AUTOCAST.get(backend, torch.float32)
    _skip_unless_runs_here(backend, dtype)
    recipe = tiny_recipe("qwen3_moe", f"model.moe.backend={backend}", f"model.moe.capacity_factor={capacity_factor}",
                         "train.compile=true", f"train.max_steps={STEPS}", "train.optim.warmup_steps=1")
    # parallelize compiles each block with Module.compile(); only the backend changes here
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **{"backend": "aot_eager", **kw}))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(recipe.model, "meta")  # as CausalLM.configure_model does
    parallelize(model, recipe.train)
    model = materialize(model, "cpu")
    assert all(block._compiled_call_impl is not None for block in model.layers)
    opt, _ = build_optimizer(model, recipe.train.optim, STEPS, "cpu")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    assert any(n.endswith("ffn.w_in") for n in trained)  # MoE layers, whose experts must learn
    batch = torch.randint(0, recipe.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]

    model.train()
    for step in range(STEPS):
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            out = model(x, targets=y, return_logits=False)
        (out.loss + sum(out.aux.values())).backward()
        for name, p in trained.items():
            assert p.grad is not None, f"step {step}: {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"step {step}: {name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"step {step}: {name}'s gradient is exactly zero"
        opt.step()
        opt.zero_grad(set_to_none=True)

    unmoved = [n for n, p in trained.items() if torch.equal(p.detach(), before[n])]
    assert not unmoved, f"not changed by {STEPS} steps: {unmoved}"
