"""Expert compute backends: rows already sorted by expert -> expert outputs.

Interface (one function per backend, registered under its YAML key):

    backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind) -> y_SD

Expert e owns the counts_E[e] rows after those of experts 0..e-1 and computes
    y = act_gated(x @ w_in[e].T) @ w_out[e].T.
Rows past counts_E.sum() (tokens dropped by capacity) are unspecified in y_SD; the
caller masks them. Every backend must match `loop`, the obviously correct
reference, on any input (tests/experts/test_backends.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from arch.ffn import ACTIVATIONS, GATED
from arch.registry import EXPERT_BACKEND

# torch.nn.functional.grouped_mm is the public name since torch 2.10; older releases
# only have the private op with the same signature.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def expert_activation(h_SI: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up for gated kinds (w_in holds [gate; up]), act(h) otherwise."""
    act = ACTIVATIONS[kind]
    if GATED[kind]:
        gate, up = h_SI.chunk(2, dim=-1)
        return act(gate) * up
    return act(h_SI)


@EXPERT_BACKEND.register("loop")
def loop_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str) -> torch.Tensor:
    """One matmul pair per expert; reads the counts on the host. The reference."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        h = F.linear(x_SD[start:start + n], w_in_EID[e])
        outs.append(F.linear(expert_activation(h, kind), w_out_EDF[e]))
        start += n
    # dropped rows: zeros (any value is allowed; zeros keep the reference tidy)
    outs.append(outs[0].new_zeros(x_SD.shape[0] - start, w_out_EDF.shape[1]))
    return torch.cat(outs)


@EXPERT_BACKEND.register("grouped_mm")
def grouped_mm_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str) -> torch.Tensor:
    """Two grouped_mm calls over the stacked weights; no host sync.

    Under autocast the operands are cast to the autocast dtype: grouped_mm is on no
    autocast list, and the CUDA kernel takes bf16 only. On CPU it takes float32 as
    long as row strides are multiples of 16 bytes (d_model, d_expert multiples of 4)."""
    dtype = x_SD.dtype
    if torch.is_autocast_enabled(x_SD.device.type):
        dtype = torch.get_autocast_dtype(x_SD.device.type)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_SI = _grouped_mm(x_SD.to(dtype), w_in_EID.to(dtype).transpose(-2, -1), offs=offs_E)
    return _grouped_mm(expert_activation(h_SI, kind), w_out_EDF.to(dtype).transpose(-2, -1), offs=offs_E)
