"""Where and how a run computes, resolved once for train, bench and eval: the
accelerator and devices, the precision, and the peak FLOP/s that MFU is measured
against.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from arch.config import TrainConfig
from arch.registry import RecipeError, nearest


# 16-mixed is left out: its loss scaling would need unscaling before clipping and
# skipped steps on overflow, which the manual training step does not do
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"--device '{name}' is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {name} was asked but torch sees no CUDA device here; "
                         "run on a GPU machine or pass --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"--device {name}: only cpu and cuda are supported.")
    return device


def check_expert_backend(model, device_type: str) -> None:
    """Refuse, before any work, an expert backend that cannot run on `device_type`
    (a backend says so through its `unavailable(device_type)`: triton without the
    package, or off CUDA outside Triton's interpreter). `model`: a ModelConfig."""
    from arch.registry import EXPERT_BACKEND

    if model.moe.n_experts <= 0:
        return
    problem = getattr(EXPERT_BACKEND.get(model.moe.backend, "model.moe.backend"), "unavailable", lambda _: None)(
        device_type)
    if problem:
        raise RecipeError(problem)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, no sparsity), matched in
# order against torch.cuda.get_device_name(). Other devices: set train.peak_tflops.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
)


def lookup_peak_tflops(device_name: str) -> Optional[float]:
    """The table entry for a device name (case-insensitive), or None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def peak_flops_per_device(peak_tflops: Optional[float], precision: str) -> Optional[float]:
    """FLOP/s of one device for MFU: train.peak_tflops if set, else the bf16 table entry
    for this GPU when training in bf16; None (MFU not logged) otherwise, e.g. on CPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not torch.cuda.is_available() or not precision.startswith("bf16"):
        return None
    tflops = lookup_peak_tflops(torch.cuda.get_device_name())
    return tflops * 1e12 if tflops else None


# ------------------------------------------------------------------ throughput
