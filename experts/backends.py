"""Expert compute backends: rows already sorted by expert -> expert outputs.

Interface (one function per backend, registered under its YAML key):

    backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind, b_in_EI=None, b_out_ED=None, scale_S=None) -> y_SD

Expert e owns the counts_E[e] rows after those of experts 0..e-1 and computes
    y = s * (act_gated(x @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e])
(the biases only where the layer has them: model.moe.expert_bias; s = scale_S of the
row, 1 without it). The MoE layer passes the routing weights as scale_S
(experts.dispatch.routed_experts); the backends apply them to the activation and the
output bias, before the down projection's GEMM, where they cost nothing extra.
Rows past counts_E.sum() (tokens dropped by capacity) are unspecified in y_SD; the
caller masks them. Every backend must match `loop`, the obviously correct
reference, on any input (tests/experts/test_backends.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from arch.ffn import ACTIVATIONS, GATED, GLU
from arch.registry import EXPERT_BACKEND

# torch.nn.functional.grouped_mm is the public name since torch 2.10; older releases
# only have the private op with the same signature.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def expert_activation(h_SI: torch.Tensor, kind: str) -> torch.Tensor:
    """glu(gate, up) for gated kinds (w_in holds [gate; up]), act(h) otherwise."""
    if GATED[kind]:
        gate, up = h_SI.chunk(2, dim=-1)
        return GLU[kind](gate, up)
    return ACTIVATIONS[kind](h_SI)


def scaled(a_SF: torch.Tensor, scale_S) -> torch.Tensor:
    """a * scale per row (None: a), computed in float32 (float64 for float64 rows) and
    returned in a's dtype, so the scale is rounded once, with the product."""
    if scale_S is None:
        return a_SF
    dtype = torch.promote_types(a_SF.dtype, torch.float32)
    return (a_SF.to(dtype) * scale_S[:, None].to(dtype)).to(a_SF.dtype)


def expert_of_rows(counts_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The expert of each of `n_rows` sorted rows (rows past counts_E.sum(), dropped,
    get the last expert: their values are unspecified anyway). No host sync."""
    row = torch.arange(n_rows, device=counts_E.device)
    return torch.bucketize(row, counts_E.cumsum(0), right=True).clamp(max=counts_E.numel() - 1)


@EXPERT_BACKEND.register("loop")
def loop_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str, b_in_EI=None, b_out_ED=None,
                 scale_S=None) -> torch.Tensor:
    """One matmul pair per expert; reads the counts on the host. The reference."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        s = None if scale_S is None else scale_S[start:start + n]
        h = F.linear(x_SD[start:start + n], w_in_EID[e], None if b_in_EI is None else b_in_EI[e])
        y = F.linear(scaled(expert_activation(h, kind), s), w_out_EDF[e])
        if b_out_ED is not None:
            y = y + scaled(b_out_ED[e].expand_as(y), s)
        outs.append(y)
        start += n
    # dropped rows: zeros (any value is allowed; zeros keep the reference tidy)
    outs.append(outs[0].new_zeros(x_SD.shape[0] - start, w_out_EDF.shape[1]))
    return torch.cat(outs)


@EXPERT_BACKEND.register("grouped_mm")
def grouped_mm_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str, b_in_EI=None, b_out_ED=None,
                       scale_S=None) -> torch.Tensor:
    """Two grouped_mm calls over the stacked weights; no host sync.

    Under autocast the operands are cast to the autocast dtype: grouped_mm is on no
    autocast list, and the CUDA kernel takes bf16 only. On CPU it takes float32 as
    long as row strides are multiples of 16 bytes (d_model, d_expert multiples of 4)."""
    dtype = x_SD.dtype
    if torch.is_autocast_enabled(x_SD.device.type):
        dtype = torch.get_autocast_dtype(x_SD.device.type)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_SI = _grouped_mm(x_SD.to(dtype), w_in_EID.to(dtype).transpose(-2, -1), offs=offs_E)
    if b_in_EI is None and b_out_ED is None:
        return _grouped_mm(scaled(expert_activation(h_SI, kind), scale_S), w_out_EDF.to(dtype).transpose(-2, -1),
                           offs=offs_E)
    # biases on the computed rows only: where, not +, so that the rows past the kept
    # ones (uninitialised memory, possibly NaN) send the biases no gradient
    S = x_SD.shape[0]
    e_S = expert_of_rows(counts_E, S)
    kept_S1 = (torch.arange(S, device=x_SD.device) < offs_E[-1])[:, None]
    if b_in_EI is not None:
        h_SI = torch.where(kept_S1, h_SI + b_in_EI.to(dtype)[e_S], h_SI)
    y_SD = _grouped_mm(scaled(expert_activation(h_SI, kind), scale_S), w_out_EDF.to(dtype).transpose(-2, -1),
                       offs=offs_E)
    return y_SD if b_out_ED is None else torch.where(kept_S1, y_SD + scaled(b_out_ED.to(dtype)[e_S], scale_S), y_SD)
