"""Distributed helpers for the MoE layers; the only experts/ module that touches
torch.distributed. Expert parallelism (all-to-all dispatch) will live here too.

Everything here is a no-op in a single process, so the model math never branches on
whether a process group exists.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum `t` over `group` (None: the default world group) and return the result.

    Works on a detached copy: the balancing counts it is used for are integers that
    carry no gradient, so a plain (non-differentiable) collective is the right tool.
    Without an initialised process group it returns `t` unchanged (no copy)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
