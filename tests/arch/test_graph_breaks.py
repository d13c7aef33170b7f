"""Regional compilation (train.compile) is fast only if a block is one graph: a host
read (`.item()`, `.tolist()`) or an untraceable call in a block splits it and costs a
round trip per layer. Checked with torch._dynamo.explain, which traces without
compiling (seconds on a CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model


@pytest.mark.parametrize("name, extra, dtype", [
    # grouped_mm's compile-time check accepts bf16 only (what CUDA runs anyway)
    ("qwen3_moe", [], torch.bfloat16),
    # a sliding-window layer through flex_attention, as on CUDA (forward only: CPU flex
    # has no backward)
    ("gemma3", ["model.attention.impl=flex"], torch.float32),
    # quantization-aware training: the fake quantizers (every linear layer, the stacked
    # experts, the routers) trace into the same one graph
    ("qwen3_moe", ["qat:fp8"], torch.bfloat16),
])
def test_a_block_is_one_graph(name, extra, dtype):
    qat = [e[4:] for e in extra if e.startswith("qat:")]
    extra = [e for e in extra if not e.startswith("qat:")]
    model = tiny_model(name, *extra).to(dtype)
    if qat:
        from arch.quant import apply_fake_quant

        apply_fake_quant(model, qat[0], ["router"])
    torch._dynamo.reset()
    T = 32
    for block in {b.spec.kind: b for b in model.layers}.values():  # one of each kind
        x = torch.randn(2, T, model.cfg.d_model, dtype=dtype)
        rope = model.ropes[block.spec.kind](T, "cpu")
        mask = block.attn.block_mask(T, "cpu")  # built outside, passed in, as the model does
        assert (mask is not None) == ("flex" in str(extra))
        with torch.no_grad():
            explained = torch._dynamo.explain(block)(x, rope, mask)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1
