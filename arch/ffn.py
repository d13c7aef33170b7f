"""Dense feed-forward networks. The experts reuse `ACTIVATIONS` and `GATED`."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FFN


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"swiglu": F.silu, "geglu": gelu_tanh, "gelu": F.gelu}
GATED = {"swiglu": True, "geglu": True, "gelu": False}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with tanh-GELU."""

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))): the plain two-matrix FFN."""

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


# swiglu/geglu/gelu -> a constructor taking (d_model, d_ff, bias=False)
for _kind in ACTIVATIONS:
    FFN.register(_kind)(partial(GatedMLP if GATED[_kind] else MLP, kind=_kind))


def ffn_params(d_model: int, d_ff: int, kind: str, bias: bool = False) -> int:
    """Parameter count of one dense FFN of this kind (used by the accounting)."""
    n_in = 2 if GATED[kind] else 1
    return (n_in + 1) * d_model * d_ff + bias * (n_in * d_ff + d_model)
