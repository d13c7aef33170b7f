"""Model-state memory per device under each training layout, from the parameter count
alone (no allocation): what `moelab inspect` prints to choose a layout.

Model state is the weights, their gradients and AdamW's two moments: 16 bytes a
parameter with float32 master weights (bf16-mixed, 32-true), 8 in bf16-true.
Activations come on top; they scale with micro_batch_size x seq_len and shrink with
train.activation_checkpointing. Layouts (lit_modules/train/strategy.py):

    ddp              every device holds everything
    fsdp             everything sharded over the W devices
    ddp  + EP=E      experts split E ways (each slice kept whole on its device), the rest replicated
    fsdp + EP=E      experts split E ways, the rest sharded over the W devices
"""
from __future__ import annotations

from typing import List, Tuple

from arch.accounting import Accounting
from arch.config import Recipe


def bytes_per_param(precision: str) -> int:
    return 8 if precision == "bf16-true" else 16


def layout_rows(recipe: Recipe, acc: Accounting, precision: str = "bf16-mixed") -> List[Tuple[str, float]]:
    """(layout, bytes of model state per device) for one device and for the recipe's
    device count (train.devices x train.num_nodes; 4 when devices is 'auto')."""
    t = recipe.train
    devices = t.devices if isinstance(t.devices, int) else (len(t.devices) if isinstance(t.devices, list) else 4)
    world = max(1, devices * t.num_nodes)
    b = bytes_per_param(precision)
    total, experts = acc.params_total + acc.params_mtp, acc.params_experts  # MTP modules train too
    if acc.params_mtp and acc.layer_moe[-1]:  # their blocks are MoE when the last layer is
        experts += recipe.model.mtp.depth * acc.params_experts // acc.n_moe_layers
    rest = total - experts
    rows = [("1 device", total * b)]
    if world > 1:
        rows += [(f"ddp x {world}", total * b), (f"fsdp x {world}", total * b / world)]
        n_experts = recipe.model.moe.n_experts
        for ep in sorted({e for e in (t.expert_parallel, world) if e > 1 and world % e == 0}):
            if n_experts and n_experts % ep == 0:
                rows += [(f"ddp + EP={ep} x {world}", rest * b + experts * b / ep),
                         (f"fsdp + EP={ep} x {world}", rest * b / world + experts * b / ep)]
    return rows
