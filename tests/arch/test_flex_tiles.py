"""flex_attention's tuned tiles (arch/attention.py FLEX_TILES_SM90): which calls get them,
and, on a GPU, that attention with them equals the obviously correct eager path."""
from __future__ import annotations

import pytest
import torch

import arch.attention as attention
from arch.attention import FLEX_TILES_SM90, eager_attention, flex_attn, flex_kernel_options

H100 = (9, 0)


@pytest.mark.parametrize("head_dim, largest", [(80, 128), (128, 128), (192, 256), (256, 256)])
def test_tuned_tiles_by_head_size(head_dim, largest):
    options = flex_kernel_options(head_dim, torch.bfloat16, H100, 4096)
    assert options == dict(FLEX_TILES_SM90)[largest]
    assert flex_kernel_options(head_dim, torch.float16, H100, 128) == options
    # every backward tile pair divides the way Inductor asks (N1 % M1, M2 % N2)
    assert options["bwd_BLOCK_N1"] % options["bwd_BLOCK_M1"] == 0
    assert options["bwd_BLOCK_M2"] % options["bwd_BLOCK_N2"] == 0


@pytest.mark.parametrize("head_dim, dtype, capability, q_len", [
    (256, torch.float32, H100, 4096),      # twice the bytes: the tiles would not fit
    (256, torch.bfloat16, (8, 0), 4096),   # not swept on other GPUs
    (256, torch.bfloat16, (10, 0), 4096),
    (64, torch.bfloat16, H100, 4096),      # the defaults are right at 64 and below
    (512, torch.bfloat16, H100, 4096),     # Gemma 4's global heads: larger than swept
    (256, torch.bfloat16, H100, 127),      # fewer than 128 queries: Inductor's decoding kernel
])
def test_defaults_elsewhere(head_dim, dtype, capability, q_len):
    assert flex_kernel_options(head_dim, dtype, capability, q_len) is None


def test_options_are_a_copy():
    """A caller (or flex_attention) changing the options it got leaves the table as it is."""
    options = flex_kernel_options(256, torch.bfloat16, H100, 4096)
    options["bwd_num_warps"] = 1
    assert dict(FLEX_TILES_SM90)[256]["bwd_num_warps"] == 8


def test_cpu_flex_takes_no_options(monkeypatch):
    """On a CPU flex_attention gets no kernel options at all (and no capability read)."""
    seen = []
    monkeypatch.setattr(attention, "flex_attention", lambda *a, **kw: seen.append(kw["kernel_options"]) or a[0])
    monkeypatch.setattr(attention, "cuda_capability", lambda device: pytest.fail("capability read on a CPU"))
    q = torch.randn(1, 2, 128, 256)
    flex_attn(q, q, q, 0.0625, None, None)
    assert seen == [None]


def test_capability_read_once_per_device(monkeypatch):
    """cuda_capability asks CUDA once per device (the current one for a bare "cuda") and
    remembers it where compiled blocks look (_CAPABILITY)."""
    asked = []
    monkeypatch.setattr(attention, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for _ in range(3):
        assert attention.cuda_capability(torch.device("cuda:0")) == (9, 0)
    assert attention.cuda_capability(torch.device("cuda")) == (9, 0)
    assert asked == [0, 1] and attention._CAPABILITY == {0: (9, 0), 1: (9, 0)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("compiled", [False, True])
def test_tuned_flex_matches_eager_on_cuda(head_dim, window, compiled):
    """bf16 flex with the tiles this GPU gets (the tuned ones on an H100) against the
    eager path in float32: output and every input gradient, within bf16 rounding; inside
    a compiled region too (fullgraph: taking the tiles breaks no graph)."""
    torch.manual_seed(0)
    B, H, KV, T = 2, 4, 2, 384
    q = torch.randn(B, H, T, head_dim, device="cuda")
    k, v = torch.randn(B, KV, T, head_dim, device="cuda"), torch.randn(B, KV, T, head_dim, device="cuda")
    scale = head_dim ** -0.5
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    attention.cuda_capability(q.device)  # as Attention.block_mask does before the compiled blocks run
    fn = torch.compile(flex_attn, fullgraph=True, dynamic=False) if compiled else flex_attn
    out = fn(q16, k16, v16, scale, window, None)
    ref = eager_attention(q32, k32, v32, scale, window, None)
    g = torch.randn_like(ref)
    out.backward(g.bfloat16())
    ref.backward(g)
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    for mine, exact in ((q16, q32), (k16, k32), (v16, v32)):
        err = (mine.grad.float() - exact.grad).abs().max() / exact.grad.abs().max()
        assert err < 0.02, f"{err:.3g}"
