"""Accelerator, precision and strategy from the recipe, and how a model is prepared.

Two seams for the parallel work that comes later:
- `STRATEGIES` maps `train.strategy` to a factory returning what `Trainer(strategy=)`
  takes. `fsdp` and `model_parallel` (FSDP2 + expert parallel) are one entry each.
- `parallelize(model, train, device_mesh)` is called by the LightningModule's
  `configure_model` on the meta-device model, before materialisation, in the order
  STYLE.md fixes: expert parallel, activation checkpointing, compile, FSDP. Only the
  middle two exist today.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from arch.config import TrainConfig
from arch.registry import RecipeError, nearest

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")


def resolve_accelerator(train: TrainConfig) -> str:
    """`auto` -> gpu when CUDA is present, else cpu; anything else as given."""
    if train.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(f"train.accelerator = '{train.accelerator}' but no CUDA device is visible; "
                          f"set train.accelerator=auto (or cpu).")
    return train.accelerator


def resolve_precision(train: TrainConfig, accelerator: str) -> str:
    """`auto` -> bf16-mixed on a GPU, 32-true on a CPU (CPU bf16 autocast is slow)."""
    if train.precision not in PRECISIONS:
        raise RecipeError(f"train.precision = '{train.precision}' is not one of {', '.join(PRECISIONS)}"
                          f"{nearest(train.precision, PRECISIONS)}.")
    if train.precision == "auto":
        return "bf16-mixed" if accelerator in ("gpu", "cuda") else "32-true"
    return train.precision


def resolve_devices(train: TrainConfig) -> Any:
    """`auto` devices with the `auto` strategy is one device: Lightning's own `auto`
    would take every visible GPU and switch to DDP unasked. With a parallel strategy,
    `auto` means all of them."""
    if train.devices == "auto" and train.strategy == "auto":
        return 1
    return train.devices


def _auto(train: TrainConfig) -> Any:
    return "auto"


def _ddp(train: TrainConfig) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    # Every parameter takes part in every step (stacked expert weights are passed
    # whole to the backend), so DDP need not search for unused ones.
    return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


def _not_yet(name: str) -> Callable[[TrainConfig], Any]:
    def factory(train: TrainConfig) -> Any:
        raise RecipeError(f"train.strategy = '{name}' is not implemented yet; use auto (one device) or ddp.")
    return factory


# train.strategy -> factory(train) returning a Lightning strategy (or its name)
STRATEGIES: Dict[str, Callable[[TrainConfig], Any]] = {
    "auto": _auto,
    "ddp": _ddp,
    "fsdp": _not_yet("fsdp"),
    "model_parallel": _not_yet("model_parallel"),
}


def build_strategy(train: TrainConfig) -> Any:
    if train.strategy not in STRATEGIES:
        raise RecipeError(f"train.strategy = '{train.strategy}' is unknown{nearest(train.strategy, STRATEGIES)}; "
                          f"choose one of {', '.join(STRATEGIES)}.")
    if train.expert_parallel != 1:
        raise RecipeError(f"train.expert_parallel = {train.expert_parallel} needs the model_parallel strategy, "
                          f"which is not implemented yet; set train.expert_parallel=1.")
    return STRATEGIES[train.strategy](train)


# ------------------------------------------------------------- model preparation


def checkpoint_block(block: nn.Module) -> None:
    """Recompute `block` in backward instead of storing its activations.

    The block's forward is wrapped on the instance, so module names and state_dict
    keys stay what they were (checkpoints and converters rely on "model.layers.i.*").
    Non-reentrant checkpointing re-runs forward during backward: an MoE layer's
    `aux`/`last` are overwritten with identical values, which is harmless."""
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def parallelize(model: nn.Module, train: TrainConfig, device_mesh=None) -> nn.Module:
    """Prepare a meta-device model for training, in place; see the module docstring.

    Regional compilation (one `torch.compile` per block, all blocks alike) keeps
    compile time to one block's and survives any change to the outer loop."""
    # 1. expert parallel: shard experts over device_mesh["ep"] (model_parallel strategy)
    if train.activation_checkpointing:  # 2.
        for block in model.layers:
            checkpoint_block(block)
    if train.compile:  # 3.
        for block in model.layers:
            block.compile()
    # 4. FSDP2 fully_shard per block, then the root (fsdp / model_parallel strategies)
    return model
