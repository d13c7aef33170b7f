"""Expert compute backends: tokens already sorted by expert -> expert outputs.

Every backend computes, for each expert e and its contiguous slice of rows,
    y = act_gated(x @ w_in[e].T) @ w_out[e].T
and must match `loop`, the obviously correct reference, on any input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from arch.ffn import ACTIVATIONS, GATED
from arch.registry import EXPERT_BACKEND


def expert_activation(h_SI: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up for gated kinds (w_in holds [gate; up]), act(h) otherwise."""
    act = ACTIVATIONS[kind]
    if GATED[kind]:
        gate, up = h_SI.chunk(2, dim=-1)
        return act(gate) * up
    return act(h_SI)


@EXPERT_BACKEND.register("loop")
def loop_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str) -> torch.Tensor:
    """One matmul pair per expert; syncs to read the counts. The reference."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        h = F.linear(x_SD[start:start + n], w_in_EID[e])
        outs.append(F.linear(expert_activation(h, kind), w_out_EDF[e]))
        start += n
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w_out_EDF.shape[1])


@EXPERT_BACKEND.register("grouped_mm")
def grouped_mm_backend(x_SD, counts_E, w_in_EID, w_out_EDF, kind: str) -> torch.Tensor:
    """Two torch.nn.functional.grouped_mm calls over the stacked weights; no host sync.

    Under autocast the operands are cast to the autocast dtype (grouped_mm is not on
    autocast's lists, and CUDA's kernel wants bf16)."""
    dtype = x_SD.dtype
    if torch.is_autocast_enabled(x_SD.device.type):
        dtype = torch.get_autocast_dtype(x_SD.device.type)
    offs = counts_E.cumsum(0).to(torch.int32)
    h = F.grouped_mm(x_SD.to(dtype), w_in_EID.to(dtype).transpose(-2, -1), offs=offs)
    return F.grouped_mm(expert_activation(h, kind), w_out_EDF.to(dtype).transpose(-2, -1), offs=offs)
