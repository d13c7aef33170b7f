"""Benchmarks behind `moelab bench`: whole-model training steps and one MoE layer.

Whole model (`bench_model`): the recipe's model, AdamW, random token batches of
(train.micro_batch_size, train.seq_len); a step is

    zero_grad -> forward (loss = CE + sum of the balancing losses) -> backward -> AdamW step

Warm-up steps run first, then every timed step is bracketed by a pair of CUDA events
that are read after one synchronize at the end, so the timing itself adds no host
sync inside the loop (on CPU: time.perf_counter around each step). The figure is the
median over the timed steps. Whatever the model syncs on its own (the `loop` expert
backend reads the expert counts on the host) is part of its time; on CUDA one extra,
untimed step runs under torch.cuda's sync debug mode and reports how many syncs a
step makes.

    tokens/s = tokens per step / median step time
    MFU      = tokens/s x training FLOPs per token (arch.count: 6 x active matmul
               parameters + causal attention) / peak FLOP/s

With `vs_hf` the Hugging Face twin (same weights through lit_modules.checkpoints.hf) runs
the same steps on the same batches in the same process, one side after the other,
the first side freed before the second is built on the device.

Layer (`bench_layer`, workload W1): one MoE layer of the recipe's shape, fwd + bwd of
loss = mean(y^2) (+ the layer's balancing losses), router included, against a dense
FFN of the same active FLOPs (d_ff = top_k x d_expert, plus the shared experts), with
optional variants of the MoE settings and the `loop` reference on the same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from arch import build_model, count, materialize
from arch.config import Recipe
from arch.ffn import ffn_params
from arch.registry import FFN, MOE, RecipeError

from lit_modules.train.strategy import parallelize
from lit_modules.runtime import device_name, lookup_peak_tflops

GiB = 2**30


class BenchError(RecipeError):
    """A benchmark that cannot run as asked. A RecipeError, so the CLI prints it as
    one sentence and exits 2, like every other bad input."""


# ----------------------------------------------------------------- device, dtype, peak



def resolve_peak(cli_tflops: Optional[float], recipe_tflops: Optional[float],
                 device: torch.device) -> Tuple[Optional[float], str]:
    """The MFU denominator in TFLOP/s and where it came from: --peak-tflops, then the
    recipe's train.peak_tflops, then the datasheet table; None when none applies."""
    if cli_tflops:
        return cli_tflops, "--peak-tflops"
    if recipe_tflops:
        return recipe_tflops, "train.peak_tflops"
    name = device_name(device)
    found = lookup_peak_tflops(name)
    if found is not None:
        return found, f"{name}, dense bf16 datasheet"
    return None, f"no peak known for {name}; pass --peak-tflops"


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype]  # None: no autocast

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        return {"fp32": "fp32", "bf16": "pure bf16 parameters",
                "bf16-mixed": "bf16 autocast, fp32 master weights"}[self.name]


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, None),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16),
    "bf16": Precision("bf16", torch.bfloat16, None),
}
# Lightning precision strings a recipe may carry in train.precision
LIGHTNING_PRECISION = {"32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16-mixed",
                       "bf16-true": "bf16", "bf16": "bf16"}


def resolve_precision(name: str, device: torch.device, recipe_precision: str = "auto",
                      layer: bool = False) -> Precision:
    """auto: the recipe's train.precision if it names one, else bf16-mixed on CUDA
    (pure bf16 for the layer benchmark, as W1 is stated) and fp32 on CPU."""
    if name == "auto" and recipe_precision not in ("auto", None):
        if recipe_precision not in LIGHTNING_PRECISION:
            raise BenchError(f"train.precision = '{recipe_precision}' has no benchmark equivalent; "
                             f"use one of {', '.join(LIGHTNING_PRECISION)} or pass --dtype.")
        name = LIGHTNING_PRECISION[recipe_precision]
    if name == "auto":
        name = ("bf16" if layer else "bf16-mixed") if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise BenchError(f"--dtype '{name}' is not one of auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


# ----------------------------------------------------------------------------- timing


def time_steps(step: Callable[[int], torch.Tensor], warmup: int, steps: int,
               device: torch.device) -> Tuple[List[float], List[torch.Tensor]]:
    """Run `step(i)` for i = 0 .. warmup + steps - 1; return the timed steps' times in
    ms and every step's returned tensor (left on the device: reading it would sync)."""
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0 (got {steps} and {warmup}).")
    outs = [step(i) for i in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for j, (start, end) in enumerate(events):
            start.record()
            outs.append(step(warmup + j))
            end.record()
        torch.cuda.synchronize(device)
        ms = [start.elapsed_time(end) for start, end in events]
    else:
        ms = []
        for j in range(steps):
            t0 = time.perf_counter()
            outs.append(step(warmup + j))
            ms.append((time.perf_counter() - t0) * 1e3)
    return ms, outs


def count_host_syncs(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Host-device syncs one call of `step` makes (CUDA only, via torch's sync debug
    mode); None on CPU, where the question does not arise."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    # only the per-operation warning; set_sync_debug_mode also warns once that it is a
    # prototype, and that warning must not count
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def measure_matmul_ceiling(device: torch.device, n: int = 8192, iters: int = 10) -> Dict:
    """Achieved TFLOP/s of an n x n x n matmul (bf16 on CUDA, fp32 on CPU): the
    practical ceiling the MFU can be read against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def step(_):
        torch.matmul(a, b, out=c)
        return c

    ms, _ = time_steps(step, warmup=2, steps=iters, device=device)
    return {"ceiling_tflops": 2 * n**3 / (statistics.median(ms) / 1e3) / 1e12, "ceiling_n": n,
            "ceiling_dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}


# ----------------------------------------------------------------- whole-model steps


@dataclass
class Result:
    """One implementation's timed run. `work` is FLOPs per step for MFU/TFLOP/s."""

    name: str
    ms: List[float]
    tokens_per_step: int
    flops_per_step: float
    peak_tflops: Optional[float]
    peak_bytes: Optional[int]
    losses: List[float] = field(default_factory=list)  # total loss of every step, warm-up included
    ce: List[float] = field(default_factory=list)  # cross-entropy part (whole model only)
    host_syncs_per_step: Optional[int] = None
    detail: str = ""

    @property
    def ms_per_step(self) -> float:
        return statistics.median(self.ms)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.ms_per_step / 1e3)

    @property
    def tflops(self) -> float:
        return self.flops_per_step / (self.ms_per_step / 1e3) / 1e12

    @property
    def mfu(self) -> Optional[float]:
        return self.tflops / self.peak_tflops if self.peak_tflops else None

    def to_dict(self) -> Dict:
        return {
            "name": self.name, "detail": self.detail, "ms_per_step": self.ms_per_step,
            "ms_min": min(self.ms), "ms_max": max(self.ms), "ms_all": self.ms,
            "tokens_per_s": self.tokens_per_s, "achieved_tflops": self.tflops, "mfu": self.mfu,
            "peak_memory_bytes": self.peak_bytes,
            "peak_memory_gib": None if self.peak_bytes is None else self.peak_bytes / GiB,
            "first_step_loss": self.losses[0] if self.losses else None,
            "first_step_ce": self.ce[0] if self.ce else None,
            "last_step_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses, "ce": self.ce, "host_syncs_per_step": self.host_syncs_per_step,
        }


def make_batches(vocab_size: int, batch: int, seq_len: int, n: int, seed: int,
                 device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """n random (inputs, next-token targets) pairs, made on the CPU from `seed` (the
    same tokens on every device) and moved to the device before any timing."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n, batch, seq_len + 1), generator=g).to(device)
    return [(tokens[i, :, :-1].contiguous(), tokens[i, :, 1:].contiguous()) for i in range(n)]


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


BENCH_EOS = 0  # the id that ends a document in the bench's random batches (train.document_mask)
BENCH_DOCS_PER_SEQ = 4


def with_documents(batches, seq_len: int):
    """train.document_mask: random batches hold BENCH_DOCS_PER_SEQ documents per
    sequence, BENCH_EOS ending each (random tokens carry no document structure)."""
    every = max(seq_len // BENCH_DOCS_PER_SEQ, 2)
    out = []
    for x, y in batches:
        x, y = x.clone(), y.clone()
        x[:, every - 1::every] = BENCH_EOS
        y[:, every - 2::every] = BENCH_EOS
        out.append((x, y))
    return out


def moelab_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, documents: Optional[bool] = None):
    """(loss that is backpropagated, its cross-entropy part); the same call and loss as
    training (no logits kept: the fused head + loss when model.fused_ce_chunk > 0).
    `documents`: None, or document masks made per step as training makes them, with
    (True) or without (False) per-document positions."""
    docs = {}
    if documents is not None:
        from arch.documents import document_ids, document_positions

        doc = document_ids(x, BENCH_EOS)
        docs = {"doc_ids": doc, "positions": document_positions(doc) if documents else None}
    out = model(x, targets=y, return_logits=False, **docs)
    total = out.loss
    for value in out.aux.values():
        total = total + value
    return total, out.loss


def hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """HF's own loss path. `shift_labels` hands it targets that are already the next
    tokens, so both sides score the same T positions. With output_router_logits the
    returned loss already includes router_aux_loss_coef x aux_loss."""
    out = model(input_ids=x, labels=y, shift_labels=y, use_cache=False)
    aux = getattr(out, "aux_loss", None)
    ce = out.loss if aux is None else out.loss - model.router_aux_loss_coef * aux
    return out.loss, ce


def make_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyper-parameters, one group (the decay/no-decay split of
    training does not change the cost of a step); fused on CUDA unless the recipe says."""
    o = recipe.train.optim
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=fused)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_step(model: nn.Module, loss_fn: LossFn, recipe: Recipe, batches, precision: Precision,
                  device: torch.device) -> Callable[[int], torch.Tensor]:
    """`step(i)`: one training step of `model` on batches[i % len(batches)], as every
    benchmark times it (zero_grad, forward and loss under the precision's autocast,
    backward, AdamW from make_optimizer); returns the detached (total, cross-entropy)
    losses. Puts `model` in training mode."""
    model.train()
    opt = make_optimizer(model, recipe, device)
    graphs = recipe.train.compile == "graphs"

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        if graphs:  # the last step's graph outputs may be overwritten now (lit_modules/train/module.py)
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with precision.autocast(device):
            total, ce = loss_fn(model, x, y)
        total.backward()
        opt.step()
        return torch.stack([total.detach().float(), ce.detach().float()])

    return step


def run_training_steps(name: str, model: nn.Module, loss_fn: LossFn, recipe: Recipe,
                       batches, precision: Precision, device: torch.device, warmup: int,
                       steps: int, flops_per_token: float, peak_tflops: Optional[float],
                       detail: str = "") -> Result:
    """Time `warmup + steps` training steps of `model` on `batches` (one batch per step)."""
    step = training_step(model, loss_fn, recipe, batches, precision, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms, outs = time_steps(step, warmup, steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    syncs = count_host_syncs(lambda: step(warmup + steps), device)
    values = torch.stack(outs).cpu()
    B, T = batches[0][0].shape
    return Result(name=name, ms=ms, tokens_per_step=B * T, flops_per_step=flops_per_token * B * T,
                  peak_tflops=peak_tflops, peak_bytes=peak, losses=values[:, 0].tolist(),
                  ce=values[:, 1].tolist(), host_syncs_per_step=syncs, detail=detail)


# -------------------------------------------------------------------- the HF twin


def hf_twin(model: nn.Module, recipe: Recipe) -> Tuple[nn.Module, List[str]]:
    """The Hugging Face twin of `model` with its current weights, on the CPU in
    float32, and the converter's notes. The config and the tensor names come from
    lit_modules.checkpoints.hf (hf_config_for, ours_to_hf); transformers' own loader turns the
    per-expert tensors into its fused expert weights. sdpa attention; for MoE models
    grouped_mm experts where the installed transformers lets one choose, and router
    logits on so its auxiliary loss is part of the step as ours is.
    Raises BenchError for anything that stops the comparison."""
    try:
        import transformers
    except ImportError:
        raise BenchError("--vs-hf needs the transformers package; pip install 'moelab[hf]'.") from None
    from lit_modules.checkpoints import hf, hf_config

    if recipe.model.mtp.depth:
        raise BenchError(f"--vs-hf: model.mtp.depth = {recipe.model.mtp.depth}, and transformers trains no "
                         "multi-token prediction modules; set model.mtp.depth=0 to compare like with like.")
    try:
        arch, cfg, notes = hf_config.hf_config_for(recipe.model)
        pairs = (pair for name, tensor in model.state_dict().items()
                 for pair in hf.ours_to_hf(arch, name, tensor.detach().to("cpu", torch.float32, copy=True)))
        state = dict(hf.export_pairs(arch, recipe.model, pairs))  # Qwen3-Next fuses some
    except RecipeError as e:  # ConvertError: one sentence naming what HF cannot express
        raise BenchError(f"--vs-hf: {e}") from None
    kwargs = {"attn_implementation": "sdpa"}
    if arch == hf_config.GPT_OSS:  # transformers runs its sinks on the eager path only (as moelab does)
        kwargs["attn_implementation"] = "eager"
        notes.append(f"{arch} has no sdpa attention in transformers: both sides run eager attention")
    cfg.use_cache = False
    if any(getattr(cfg, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        cfg.output_router_logits = True
        if hasattr(cfg, "_experts_implementation"):  # transformers 5.x
            kwargs["experts_implementation"] = "grouped_mm"
        else:
            notes.append("the installed transformers has no experts_implementation: HF runs its default experts")
    transformers.utils.logging.disable_progress_bar()
    twin = getattr(transformers, arch).from_pretrained(None, config=cfg, state_dict=state,
                                                       dtype=torch.float32, **kwargs)
    return twin, notes


@contextlib.contextmanager
def hf_delta_rule_as_ours(twin: nn.Module, notes: List[str]):
    """While the twin is timed: where fla refuses its backward (arch/linear_attention.py
    fla_backward_refused), moelab's DeltaNet layers train on the chunked PyTorch rule, and
    transformers' would call fla and fail; they take transformers' own PyTorch rule, the
    path it runs without fla (hf_qwen3_next.transformers_pytorch_delta_rule)."""
    from arch.linear_attention import FLA_BACKWARD_REFUSED, fla_backward_refused
    from lit_modules.checkpoints.hf_qwen3_next import ARCHS, transformers_pytorch_delta_rule

    if not fla_backward_refused() or type(twin).__name__ not in ARCHS:
        yield
        return
    notes.append(f"{FLA_BACKWARD_REFUSED}: both sides train their DeltaNet layers on PyTorch's chunked rule "
                 "(moelab's compiled with the blocks, transformers' torch_chunk_gated_delta_rule eager)")
    with transformers_pytorch_delta_rule(twin):
        yield


def hf_detail(twin: nn.Module) -> str:
    cfg = twin.config
    parts = [f"{type(twin).__name__}, attn {cfg._attn_implementation}"]
    if getattr(cfg, "num_experts", 0):
        parts.append(f"experts {getattr(cfg, '_experts_implementation', 'default')}")
    return ", ".join(parts)


# ----------------------------------------------------------------- whole-model bench


def bench_model(recipe: Recipe, *, device: torch.device, precision: Precision, warmup: int = 3,
                steps: int = 20, peak_tflops: Optional[float] = None, peak_source: str = "",
                vs_hf: bool = False) -> Dict:
    """Time training steps of the recipe's model (and of its HF twin with `vs_hf`).
    Returns a plain dict (the --json output)."""
    from lit_modules.runtime import resolve_speed

    m = resolve_speed(recipe, device.type).model
    B, T = recipe.train.micro_batch_size, recipe.train.seq_len
    if T > m.max_seq_len:
        raise BenchError(f"train.seq_len {T} exceeds model.max_seq_len {m.max_seq_len}; "
                         "lower train.seq_len or raise model.max_seq_len.")
    acc = count(m, seq_len=T)
    batches = make_batches(m.vocab_size, B, T, warmup + steps + 1, recipe.train.seed, device)
    loss_fn = moelab_loss
    if recipe.train.document_mask:
        if vs_hf:
            raise BenchError("--vs-hf compares plain causal attention; set train.document_mask=false for it.")
        batches = with_documents(batches, T)
        loss_fn = functools.partial(moelab_loss, documents=recipe.train.document_positions)

    torch.manual_seed(recipe.train.seed)
    model = prepare_model(recipe, device, precision)
    # build the twin from the freshly initialised weights, before any step changes them;
    # it waits on the CPU so it takes no device memory while moelab is timed
    twin, hf_notes = hf_twin(model, recipe) if vs_hf else (None, [])
    args = dict(recipe=recipe, batches=batches, precision=precision, device=device, warmup=warmup,
                steps=steps, flops_per_token=acc.flops_per_token, peak_tflops=peak_tflops)
    results = [run_training_steps("moelab", model, loss_fn, detail=model_detail(recipe), **args)]
    del model
    _free(device)
    if twin is not None:
        twin = twin.to(device=device, dtype=precision.param_dtype)
        with hf_delta_rule_as_ours(twin, hf_notes):
            results.append(run_training_steps("HF transformers", twin, hf_loss, detail=hf_detail(twin), **args))
        del twin
        _free(device)

    report = {
        "mode": "model", "recipe": recipe.name, "device": device_name(device),
        "precision": precision.name, "precision_detail": precision.describe(),
        "batch": B, "seq_len": T, "tokens_per_step": B * T, "data": "random tokens",
        "warmup": warmup, "steps": steps,
        "timing": "CUDA events, median" if device.type == "cuda" else "perf_counter, median",
        "params_total": acc.params_total, "params_active": acc.params_active,
        "flops_per_token": acc.flops_per_token, "peak_tflops": peak_tflops, "peak_source": peak_source,
        "notes": model_notes(recipe, vs_hf),
        "convert_notes": hf_notes,  # the converter's own remarks (what HF has no field for)
        "results": [r.to_dict() for r in results],
    }
    if len(results) == 2:
        ours, hf = results
        report["vs_hf"] = {
            "speedup": hf.ms_per_step / ours.ms_per_step,  # moelab tokens/s over HF tokens/s
            "first_step_loss_diff": ours.losses[0] - hf.losses[0],
            "first_step_ce_diff": ours.ce[0] - hf.ce[0],
            # same optimizer on the same batches: the curves stay together only if the
            # gradients agree too (up to rounding, which bf16 lets grow step by step)
            "max_ce_diff_all_steps": max(abs(a - b) for a, b in zip(ours.ce, hf.ce)),
        }
    return report


def prepare_model(recipe: Recipe, device: torch.device, precision: Precision) -> nn.Module:
    """The recipe's model as `moelab train` prepares it (LightningModule.configure_model):
    built on the meta device, then lit_modules.train.strategy.parallelize (activation
    checkpointing, regional compile, as train.* asks), then materialised. One place, so
    what the benchmark times is what training runs."""
    from lit_modules.runtime import resolve_speed

    resolve_speed(recipe, device.type)  # train.compile auto etc., as the run resolves them
    model = build_model(recipe.model, device="meta")
    parallelize(model, recipe.train)
    return materialize(model, device).to(precision.param_dtype)


def model_detail(recipe: Recipe) -> str:
    """The performance switches in force, for the table's moelab row (a recipe not yet
    resolved for a device reads auto as off)."""
    m, t = recipe.model, recipe.train
    parts = [f"experts {m.moe.backend}"] if m.moe.n_experts else []
    parts.append({True: "compiled blocks", "graphs": "compiled blocks as CUDA graphs"}.get(t.compile, "eager"))
    if t.activation_checkpointing:
        parts.append("act. checkpointing")
    if (m.fused_ce_chunk or 0) > 0:
        parts.append(f"fused CE chunk {m.fused_ce_chunk}" + (" compiled" if m.fused_ce_compile else ""))
    else:
        parts.append("plain CE")
    if m.attention.impl != "auto":
        parts.append(f"attention {m.attention.impl}")
    if t.document_mask:
        parts.append(f"document masks ({BENCH_DOCS_PER_SEQ} per sequence)")
    return ", ".join(parts)


def model_notes(recipe: Recipe, vs_hf: bool) -> List[str]:
    m, b = recipe.model, recipe.model.moe.balance
    notes = []
    if m.moe.n_experts and m.moe.backend == "loop":
        notes.append("the loop expert backend reads expert counts on the host: one sync per MoE layer")
    if vs_hf and m.moe.n_experts and (b.aux_coef > 0 or b.z_coef > 0) and (b.aux_scope != "pooled" or b.z_coef > 0):
        notes.append(f"moelab's balancing loss (aux_scope {b.aux_scope}, z_coef {b.z_coef:g}) is not HF's pooled "
                     "aux loss, so the total losses differ by design: compare the cross-entropy difference")
    return notes


# ------------------------------------------------------------------------ layer (W1)


def layer_loss(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """mean(y^2), plus the layer's own weighted balancing losses when it has any (the
    router's backward then runs as it does in training)."""
    loss = y.float().pow(2).mean()
    if hasattr(layer, "gather_aux"):
        for value in layer.gather_aux([layer]).values():
            loss = loss + value
    return loss


def output_and_input_grad(layer: nn.Module, x: torch.Tensor, precision: Precision,
                          device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, dL/dx) of one more step, detached. A function of its own so that no live
    output outlasts it: its autograd graph would keep the layer's weights alive."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with precision.autocast(device):
        y = layer(x)
    layer_loss(layer, y).backward()
    return y.detach(), x.grad.detach().clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def moe_layer(m, moe) -> nn.Module:
    """One MoE layer of `moe`'s settings in model `m` (a layer that runs the dense FFN
    beside its experts takes the model's FFN and norms: arch.block.build_ffn)."""
    cls = MOE.get(moe.kind, "model.moe.kind")
    if getattr(cls, "takes_model_config", False):
        return cls(m.d_model, moe, model=m, d_ff=m.ffn.d_ff)
    return cls(m.d_model, moe)


def bench_layer(recipe: Recipe, *, device: torch.device, precision: Precision, tokens: Optional[int] = None,
                warmup: int = 3, steps: int = 20, with_loop: bool = False,
                variants: Sequence[Tuple[str, Recipe]] = (), peak_tflops: Optional[float] = None,
                peak_source: str = "", seed: int = 0) -> Dict:
    """One MoE layer of the recipe's shape, fwd + bwd of mean(y^2) (+ its balancing
    losses), router included, against a dense FFN of the same active FLOPs. Rows: the
    recipe's layer; each of `variants` (label, recipe differing in the MoE settings
    only: backend, capacity factor, losses ...; same weights); `loop` if asked; dense.
    The input gets a gradient too, as inside a model. With `loop` in the run, every
    MoE row that differs from it only in the backend reports its relative error
    against it (output and input gradient)."""
    from lit_modules.runtime import resolve_speed

    m = resolve_speed(recipe, device.type).model
    moe = m.moe
    if moe.n_experts <= 0:
        raise BenchError(f"--layer needs a recipe with MoE layers; {recipe.name} has model.moe.n_experts = 0.")
    T = tokens or recipe.train.micro_batch_size * recipe.train.seq_len
    D = m.d_model
    # a parallel_dense layer (Gemma 4) runs the model's dense FFN beside its experts: the
    # dense row of the same active FLOPs is that much wider
    beside = ffn_params(D, m.ffn.d_ff, m.ffn.kind) if moe.kind == "parallel_dense" else 0
    d_ff = moe.top_k * moe.d_expert + moe.n_shared_experts * (moe.d_shared or 0) \
        + (m.ffn.d_ff if moe.kind == "parallel_dense" else 0)
    per_token = {
        "moe": moe.top_k * ffn_params(D, moe.d_expert, moe.expert_ffn) + D * moe.n_experts
        + moe.n_shared_experts * ffn_params(D, moe.d_shared or 0, moe.expert_ffn) + beside,
        "dense": ffn_params(D, d_ff, moe.expert_ffn),
    }
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=precision.param_dtype).requires_grad_()

    # every MoE row copies one reference layer's weights (kept on the CPU so they take
    # no device memory while the rows are timed)
    torch.manual_seed(seed)
    with torch.device(device):
        reference = moe_layer(m, moe)
    ref_state = {k: v.to("cpu") for k, v in reference.state_dict().items()}
    del reference

    def make_moe(cfg, label: str) -> nn.Module:
        with torch.device("meta"):  # no second random init; the weights are copied in
            layer = moe_layer(m, cfg)
        shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in ref_state.items()}:
            raise BenchError(f"layer variant '{label}' changes the layer's weights; a variant may change "
                             "MoE settings (backend, capacity_factor, balance, router) but not its shape.")
        layer = layer.to_empty(device=device)
        layer.load_state_dict(ref_state)
        return layer

    # (name, kind, MoE settings or None, constructor)
    rows_spec: List[Tuple[str, str, Optional[object], Callable[[], nn.Module]]] = [
        (f"MoE, {moe.backend}", "moe", moe, lambda: make_moe(moe, recipe.name))]
    for label, v in variants:
        if v.model.d_model != D:
            raise BenchError(f"layer variant '{label}' changes model.d_model; a variant may change MoE settings only.")
        rows_spec.append((f"MoE, {v.model.moe.backend}, {label}", "moe", v.model.moe,
                          lambda v=v, label=label: make_moe(v.model.moe, label)))
    loop_name, loop_cfg = "MoE, loop", dataclasses.replace(moe, backend="loop")
    if with_loop and moe.backend != "loop":
        rows_spec.append((loop_name, "moe", loop_cfg, lambda: make_moe(loop_cfg, "loop")))
    rows_spec.append((f"dense {moe.expert_ffn}, d_ff {d_ff}", "dense", None,
                      lambda: FFN.get(moe.expert_ffn, "model.moe.expert_ffn")(D, d_ff).to(device)))
    # rows that compute the same function as the loop row (only the backend differs)
    same_as_loop = {name for name, _, cfg, _ in rows_spec
                    if cfg is not None and name != loop_name and dataclasses.replace(cfg, backend="loop") == loop_cfg}

    # train.compile compiles every row but the loop reference, the dense floor too, so
    # that the ratio compares like with like (the loop reads counts on the host anyway)
    compiled = recipe.train.compile
    results, checks = [], {}
    for name, kind, _cfg, make in rows_spec:
        layer = make().to(dtype=precision.param_dtype).train()
        if compiled and name != loop_name:
            layer.compile()

        def step(_=0):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with precision.autocast(device):
                y = layer(x)
            loss = layer_loss(layer, y)
            loss.backward()
            return loss.detach()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms, outs = time_steps(step, warmup, steps, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        syncs = count_host_syncs(step, device)
        if name in same_as_loop or name == loop_name:  # output and input gradient, for the check
            checks[name] = output_and_input_grad(layer, x, precision, device)
        detail = kind + (", compiled" if compiled and name != loop_name else "")
        results.append(Result(name=name, ms=ms, tokens_per_step=T, flops_per_step=6 * T * per_token[kind],
                              peak_tflops=peak_tflops, peak_bytes=peak, detail=detail,
                              losses=torch.stack(outs).float().cpu().tolist(), host_syncs_per_step=syncs))
        # `step` holds the layer too: drop both, and the gradients, before the next row
        layer.zero_grad(set_to_none=True)
        del layer, step
        x.grad = None
        _free(device)

    dense = results[-1]
    rows = []
    for r in results:
        row = r.to_dict()
        row["x_dense"] = r.ms_per_step / dense.ms_per_step
        if r.name in same_as_loop and loop_name in checks:
            (y, dx), (y_ref, dx_ref) = checks[r.name], checks[loop_name]
            row["rel_err_vs_loop"] = {"output": rel_err(y, y_ref), "input_grad": rel_err(dx, dx_ref)}
        rows.append(row)
    return {
        "mode": "layer", "recipe": recipe.name, "device": device_name(device),
        "precision": precision.name, "precision_detail": precision.describe(),
        "tokens": T, "d_model": D, "n_experts": moe.n_experts, "top_k": moe.top_k,
        "d_expert": moe.d_expert, "n_shared_experts": moe.n_shared_experts, "dense_d_ff": d_ff,
        "warmup": warmup, "steps": steps, "compiled": compiled,
        "loss": "mean(y^2) + the layer's balancing losses, input gradient included",
        "timing": "CUDA events, median" if device.type == "cuda" else "perf_counter, median",
        "flops_per_token": {"moe": 6 * per_token["moe"], "dense": 6 * per_token["dense"]},
        "peak_tflops": peak_tflops, "peak_source": peak_source,
        "results": rows,
    }


# ----------------------------------------------------------------------- formatting


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_report(report: Dict) -> str:
    lines = []
    peak = (f"MFU against {report['peak_tflops']:g} TFLOP/s ({report['peak_source']})"
            if report.get("peak_tflops") else f"MFU n/a ({report.get('peak_source', '')})")
    if "ceiling_tflops" in report:
        peak += (f"; measured {report['ceiling_dtype']} matmul ceiling {report['ceiling_tflops']:.1f} TFLOP/s "
                 f"({report['ceiling_n']}^3)")
    if report["mode"] == "model":
        lines.append(f"moelab bench {report['recipe']} on {report['device']}: {report['precision_detail']}, "
                     f"batch {report['batch']} x {report['seq_len']} {report['data']}, "
                     f"{report['warmup']} warm-up + {report['steps']} timed steps ({report['timing']})")
        lines.append(f"{report['flops_per_token'] / 1e9:.4g} GFLOP/token train "
                     f"({report['params_active'] / 1e6:.4g}M active of {report['params_total'] / 1e6:.4g}M params); {peak}")
        rows = []
        for r in report["results"]:
            name = r["name"] + (f" ({r['detail']})" if r["detail"] else "")
            rows.append([name, f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", _fmt(r["mfu"], ".1%"),
                         _fmt(r["peak_memory_gib"], ".2f"), f"{r['first_step_loss']:.5f}",
                         _fmt(r["host_syncs_per_step"], "d")])
        lines.append(table(["implementation", "ms/step", "tokens/s", "MFU", "peak GiB", "first-step loss",
                            "syncs/step"], rows))
        if "vs_hf" in report:
            v = report["vs_hf"]
            lines.append(f"moelab / HF speed: {v['speedup']:.2f}x; first-step loss difference "
                         f"{v['first_step_loss_diff']:+.2e} (cross-entropy alone {v['first_step_ce_diff']:+.2e}; "
                         f"largest over all {len(report['results'][0]['ce'])} steps {v['max_ce_diff_all_steps']:.2e})")
        lines += [f"note: {n}" for n in report["notes"]]
    else:
        lines.append(f"moelab bench {report['recipe']} --layer on {report['device']}: one MoE layer, "
                     f"{report['tokens']} tokens x d_model {report['d_model']}, {report['n_experts']} experts "
                     f"top-{report['top_k']} x d_expert {report['d_expert']}, {report['precision_detail']}, "
                     f"{'compiled (train.compile; loop eager)' if report.get('compiled') else 'eager'}, "
                     f"fwd + bwd of {report['loss']}, {report['warmup']} warm-up + {report['steps']} timed "
                     f"({report['timing']}); {peak}")
        rows = []
        for r in report["results"]:
            err = r.get("rel_err_vs_loop")
            err = f"{err['output']:.1e} / {err['input_grad']:.1e}" if err else "-"
            rows.append([r["name"], f"{r['ms_per_step']:.2f}", f"{r['x_dense']:.2f}", f"{r['achieved_tflops']:.1f}",
                         _fmt(r["mfu"], ".1%"), _fmt(r["peak_memory_gib"], ".2f"), err,
                         _fmt(r["host_syncs_per_step"], "d")])
        lines.append(table(["implementation", "ms", "x dense", "TFLOP/s", "MFU", "peak GiB",
                            "rel. err vs loop (y / dx)", "syncs/step"], rows))
    return "\n".join(lines)
