"""GPU smoke check: the model paths run on CUDA (bf16 autocast) and agree with the
float32 references. Prints versions and a short pass/fail table."""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
from conftest import tiny_model  # noqa: E402

from arch.attention import Attention  # noqa: E402
from arch.config import AttentionConfig, NormConfig, RopeConfig  # noqa: E402
from arch.rope import RoPE  # noqa: E402

rows = []
print("torch", torch.__version__, torch.cuda.get_device_name(), "grouped_mm:", hasattr(F, "grouped_mm"))
dev = "cuda"
for name in ["qwen3", "qwen3_moe", "gemma3"]:
    m = tiny_model(name, "model.fused_ce_chunk=32").to(dev).train()
    ids = torch.randint(0, 256, (2, 64), device=dev)
    ref = m(ids, targets=ids).loss.item()  # fp32
    with torch.autocast("cuda", torch.bfloat16):
        out = m(ids, targets=ids, return_logits=False)
    out.loss.backward()
    rows.append((f"{name} fp32 vs bf16 loss", ref, out.loss.item(), abs(ref - out.loss.item()) < 0.05))

# flex (compiled) vs eager on CUDA with a window, fp32
torch.backends.cuda.matmul.allow_tf32 = False
for window in [None, 16]:
    cfg = dict(n_heads=4, n_kv_heads=2, head_dim=64, qk_norm=True)
    a = Attention(256, AttentionConfig(**cfg, impl="flex"), NormConfig(), window).to(dev)
    b = Attention(256, AttentionConfig(**cfg, impl="eager"), NormConfig(), window).to(dev)
    b.load_state_dict(a.state_dict())
    rope = RoPE(64, RopeConfig())(256, torch.device(dev))
    x = torch.randn(2, 256, 256, device=dev, requires_grad=True)
    ya, yb = a(x, rope), b(x, rope)
    ga = torch.autograd.grad(ya.square().sum(), x)[0]
    gb = torch.autograd.grad(yb.square().sum(), x)[0]
    err = ((ya - yb).norm() / yb.norm()).item()
    gerr = ((ga - gb).norm() / gb.norm()).item()
    rows.append((f"flex vs eager window={window}", err, gerr, err < 1e-4 and gerr < 1e-4))

# grouped_mm in bf16 on CUDA vs loop
import experts  # noqa: E402,F401
from experts.backends import grouped_mm_backend, loop_backend  # noqa: E402
E, D, Fd = 8, 256, 128
counts = torch.tensor([0, 5, 100, 3, 0, 64, 1, 83], device=dev)
x = torch.randn(int(counts.sum()), D, device=dev, dtype=torch.bfloat16)
w_in = torch.randn(E, 2 * Fd, D, device=dev, dtype=torch.bfloat16) / 16
w_out = torch.randn(E, D, Fd, device=dev, dtype=torch.bfloat16) / 12
g = grouped_mm_backend(x, counts, w_in, w_out, "swiglu").float()
l = loop_backend(x, counts, w_in, w_out, "swiglu").float()
err = ((g - l).norm() / l.norm()).item()
rows.append(("grouped_mm vs loop bf16", err, 0.0, err < 1e-2))

for r in rows:
    print(f"{r[0]:32s} {r[1]:12.6g} {r[2]:12.6g} {'ok' if r[3] else 'FAIL'}")
