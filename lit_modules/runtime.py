"""Where and how a run computes, resolved once for train, bench and eval: the
accelerator and devices, the precision, the speed switches left to auto, and the
peak FLOP/s that MFU is measured against.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from arch.config import Recipe, TrainConfig
from arch.registry import RecipeError, check_choice


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
    check_choice("train.precision", train.precision, PRECISIONS, "a precision")
    if train.precision == "auto":
        return "bf16-mixed" if accelerator in ("gpu", "cuda") else "32-true"
    return train.precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in under a resolved precision (resolve_precision)."""
    return torch.float32 if precision == "32-true" else torch.bfloat16


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


def check_compiled_experts(model, compile_: Any, compute_dtype: torch.dtype, precision_fix: str) -> None:
    """Refuse, before any work, compiled blocks with grouped_mm experts in a dtype torch
    cannot compile them in: its compiled grouped_mm takes bf16 only, even on a CPU whose
    eager kernel runs float32 (probed on meta tensors, so a torch that lifts the limit
    passes). `model`: a ModelConfig; `precision_fix`: how this command picks bf16."""
    if (model.moe.n_experts <= 0 or model.moe.backend != "grouped_mm" or compile_ not in (True, "graphs")
            or _grouped_mm_compiles(compute_dtype)):
        return
    raise RecipeError(f"train.compile = {str(compile_).lower()} with model.moe.backend = grouped_mm needs bf16 compute, not "
                      f"{str(compute_dtype).replace('torch.', '')} (torch compiles grouped_mm for bf16 only); "
                      f"{precision_fix}, or set train.compile=false or model.moe.backend=loop.")


def _grouped_mm_compiles(dtype: torch.dtype) -> bool:
    """Whether grouped_mm's meta rule, the one torch.compile traces with, takes `dtype`."""
    from experts.backends import _grouped_mm

    try:
        _grouped_mm(torch.empty(8, 16, dtype=dtype, device="meta"), torch.empty(2, 8, 16, dtype=dtype,
                    device="meta").transpose(-2, -1), offs=torch.empty(2, dtype=torch.int32, device="meta"))
    except (RuntimeError, NotImplementedError):
        return False
    return True


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


# the fused cross-entropy's rows per chunk when left to auto on CUDA: 4096 rows of a
# 152K vocabulary are 2.3 GiB of float32 logits, of a 32K one 0.5 GiB
AUTO_CE_CHUNK = 4096


def processes(train: TrainConfig) -> int:
    """How many processes train.strategy=auto runs (auto devices: one)."""
    devices = resolve_devices(train)
    return (devices if isinstance(devices, int) else len(devices)) * train.num_nodes


def graphs_refusal(train: TrainConfig) -> Optional[str]:
    """Why train.compile = graphs cannot run with these settings (one sentence), or None
    where it can: one process or DDP, one micro-batch per step, no activation
    checkpointing, no expert parallelism. A graph's outputs live in memory that its next
    replay overwrites: gradients accumulated over micro-batches would be overwritten,
    and FSDP2's hooks between blocks free and gather the weights a graph reads. Under
    DDP the gradients are averaged after the backward (train.grad_sync = step): DDP's
    own hooks beside the graphs gave NaN gradients in the first replayed step on 4
    H100s (2026-11-27; DDP keeps the AccumulateGrad nodes of the first step alive, on
    another stream than the graphs' backward)."""
    accum = max([train.grad_accum] + [st.grad_accum for st in train.stages if st.grad_accum is not None])
    if train.strategy in ("fsdp", "model_parallel"):
        return (f"train.compile = graphs runs on one process or under DDP, not with train.strategy = "
                f"{train.strategy} (FSDP2 frees and gathers the weights a graph reads); set train.compile=true, "
                f"or train.strategy=ddp.")
    if train.expert_parallel > 1:
        return (f"train.compile = graphs is not built for train.expert_parallel = {train.expert_parallel} (the "
                f"token exchange between ranks inside the blocks); set train.compile=true.")
    if train.grad_sync == "hooks" and (train.strategy == "ddp" or processes(train) > 1):
        return ("train.compile = graphs under DDP averages gradients after the backward, not in DDP's hooks "
                "(beside the graphs they gave NaN gradients); set train.grad_sync=auto (or step), or "
                "train.compile=true.")
    if accum > 1:
        return (f"train.compile = graphs needs one micro-batch per step, not train.grad_accum = {accum}; "
                f"set train.grad_accum=1 with a larger train.micro_batch_size, or train.compile=true.")
    if train.activation_checkpointing:
        return ("train.compile = graphs is not built for train.activation_checkpointing=true; set one of "
                "them to false (or train.compile=true).")
    return None


def graphs_fit(recipe: Recipe) -> bool:
    """Whether train.compile = auto on CUDA picks graphs (resolve_speed): wherever they
    run (graphs_refusal) on one host. Under DDP on 4 H200s they made W2 1.88x faster at
    micro-batch 2 and 1.09x at 8 (benchmarks/results/ddp_graphs_4xh200.md); across
    hosts, where the gradients' all-reduce after the backward crosses a slower network
    than DDP's overlapped one, not measured, so not picked."""
    t = recipe.train
    return recipe.model.moe.backend != "loop" and t.num_nodes == 1 and graphs_refusal(t) is None


def resolve_speed(recipe: Recipe, device_type: str) -> Recipe:
    """Fill, in place, the speed switches a recipe leaves to auto (train.compile: auto,
    model.fused_ce_chunk / fused_ce_compile: null) with what is fastest on `device_type`:
    on CUDA compiled blocks and the compiled, chunked fused cross-entropy (what the
    tuned GPU proxies set by hand), elsewhere eager blocks and the plain loss. Compiled
    blocks are replayed as CUDA graphs (graphs) where graphs run: one process, one
    micro-batch per step, no activation checkpointing (graphs_refusal,
    graphs_fit), and an expert backend other than the loop reference (a host read
    per layer). Values a recipe sets are kept. Returns the recipe."""
    t, m = recipe.train, recipe.model
    cuda = device_type == "cuda"
    if t.compile not in (True, False, "auto", "graphs"):
        raise RecipeError(f"train.compile = {t.compile!r} must be true, false, auto (on with CUDA) or graphs "
                          f"(compiled blocks replayed as CUDA graphs).")
    if t.compile == "graphs" and not cuda:
        raise RecipeError(f"train.compile = graphs replays the compiled blocks as CUDA graphs and needs a CUDA "
                          f"device, not {device_type}; set train.compile=true or auto.")
    if t.compile == "auto":
        t.compile = cuda and ("graphs" if graphs_fit(recipe) else True)
    if m.fused_ce_chunk is None:  # fused_ce_compile: true asks for the fused loss anywhere
        m.fused_ce_chunk = AUTO_CE_CHUNK if cuda or m.fused_ce_compile else 0
    if m.fused_ce_compile is None:
        m.fused_ce_compile = cuda and m.fused_ce_chunk > 0
    return recipe
