"""Weight quantization: quantize-dequantize (fake quantization) with a straight-through
gradient, for quantization-aware training (train.qat) and post-training quantization
(`moelab eval --quantize`). Pure torch; nothing here knows about modules.

Formats (every weight is read as (..., out, in): nn.Linear's (out, in), the stacked
experts' (E, out, in), an embedding's (vocab, d) with one "channel" per token row):

  int4      symmetric, one scale per output channel: s = absmax / 7, q = round(w / s)
            clamped to -7..7 (the code -8, which int4 could hold, is never used, so the
            grid is symmetric and zero is exact)
  int4_b32  the same per block of 32 consecutive inputs: s = absmax(block) / 7. An
            input width not divisible by 32 is refused (`check_quantizable`), not
            padded: every width of the reference recipes divides.
  fp8       float8 e4m3 (torch.float8_e4m3fn), one scale per output channel:
            s = absmax / 448 (e4m3's largest finite value), q = fp8(w / s)

Scales are computed and applied in float32 and the result cast back to the weight's
dtype. A channel (or block) of zeros gets a tiny scale instead of zero, so it stays
exactly zero rather than NaN.

The straight-through estimator: forward uses dequant(quant(w)), backward passes the
gradient to w unchanged (d out / d w = identity). With absmax scales nothing is ever
clipped, so the clipped STE (zero gradient outside the grid) is the same thing.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import RecipeError

INT4_MAX = 7
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 32


def _scale(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    return (absmax / qmax).clamp_min(torch.finfo(torch.float32).tiny)


def qdq_int4(w: torch.Tensor) -> torch.Tensor:
    """int4, one symmetric scale per output channel (the last dim reduced)."""
    x = w.float()
    s = _scale(x.abs().amax(dim=-1, keepdim=True), INT4_MAX)
    return ((x / s).round().clamp(-INT4_MAX, INT4_MAX) * s).to(w.dtype)


def qdq_int4_b32(w: torch.Tensor) -> torch.Tensor:
    """int4, one symmetric scale per block of 32 inputs of each output channel."""
    x = w.float()
    xb = x.unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))
    s = _scale(xb.abs().amax(dim=-1, keepdim=True), INT4_MAX)
    return ((xb / s).round().clamp(-INT4_MAX, INT4_MAX) * s).flatten(-2).to(w.dtype)


def qdq_fp8(w: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one scale per output channel."""
    x = w.float()
    s = _scale(x.abs().amax(dim=-1, keepdim=True), FP8_MAX)
    # the clamp guards the float32 rounding of w / s just past 448 (e4m3fn has no inf:
    # an overflowing cast would give NaN)
    q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).to(w.dtype)


QDQ: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int4": qdq_int4, "int4_b32": qdq_int4_b32, "fp8": qdq_fp8,
}
FORMATS: Tuple[str, ...] = tuple(QDQ)

# Stored bytes of one weight, and of one scale (bf16), per format: (bits per weight,
# weights sharing a scale: None = one per output channel)
STORAGE = {"bf16": (16, 0), "int4": (4, None), "int4_b32": (4, BLOCK), "fp8": (8, None)}
SCALE_BYTES = 2


def check_format(fmt: str, where: str) -> None:
    if fmt not in QDQ:
        from .registry import nearest

        raise RecipeError(f"{where} = '{fmt}' is not a quantization format{nearest(fmt, QDQ)}; choose one of "
                          f"{', '.join(FORMATS)}.")


def check_quantizable(name: str, shape, fmt: str, where: str) -> None:
    """Refuse a weight `fmt` cannot split into blocks (int4_b32 needs in % 32 == 0)."""
    if fmt == "int4_b32" and shape[-1] % BLOCK != 0:
        raise RecipeError(f"{where} = 'int4_b32' needs input widths divisible by {BLOCK}, but {name} has "
                          f"{shape[-1]} inputs; choose int4 or fp8, or a width that is a multiple of {BLOCK}.")


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """dequant(quant(w)) in forward, the identity in backward (straight-through).

    Written as w + (qdq(w) - w).detach(), plain tensor ops with no custom autograd
    Function, so torch.compile traces it into the surrounding graph and it works on
    whatever tensor the caller reads (under FSDP2, the all-gathered full weight)."""
    return w + (QDQ[fmt](w.detach()) - w).detach()


def weight_bytes(shape, fmt: str) -> int:
    """Bytes to store one weight matrix of `shape` (..., out, in) in `fmt` (bf16 scales)."""
    n = 1
    for d in shape:
        n *= d
    bits, group = STORAGE[fmt]
    if group == 0:
        return n * bits // 8
    rows = n // shape[-1]
    scales = rows if group is None else rows * -(-shape[-1] // group)  # a partial block still has a scale
    return (n * bits + 7) // 8 + SCALE_BYTES * scales


# --------------------------------------------------------------- modules


class FakeQuantizer:
    """The weight transform one model shares: fake_quant in `fmt` while `active`, the
    weight itself otherwise. `active` is flipped by the training loop at
    train.qat.start_step; a compiled block guards on it and recompiles once then."""

    def __init__(self, fmt: str, active: bool = True):
        check_format(fmt, "the quantization format")
        self.fmt, self.active = fmt, active

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.fmt) if self.active else w

    def __repr__(self) -> str:
        return f"FakeQuantizer({self.fmt}, active={self.active})"


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>` as forward must use it: through the module's fake quantizer when
    QAT gave it one. Every place that reads a quantizable weight itself (the stacked
    experts handed to any backend, the routers, the head) reads it through here.

    Why this composes with FSDP2 and torch.compile: the transform runs inside forward on
    whatever `module.<name>` is at that moment. Under FSDP2 that is the all-gathered
    full weight (fully_shard's pre-forward hook unshards before the forward runs), so
    each channel's scale sees its whole row, the result is the single-device one, and
    the straight-through gradient lands on the unsharded weight that FSDP2
    reduce-scatters as usual; the parameters, their names and the state dict never
    change (no parametrization moving them to `.original`, no DTensor ops). Under
    compile it is plain tensor ops traced into the block's graph."""
    w = getattr(module, name)
    fq = getattr(module, "fake_quant", None)
    return w if fq is None else fq(w)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward reads its weight through `read_weight`. QAT swaps the
    class of existing layers in place (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, read_weight(self), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is read through `read_weight` (one scale per token row)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, read_weight(self), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


EXTRA_KINDS = ("embed", "head", "router")


def _kind(name: str, module: nn.Module) -> Optional[str]:
    if getattr(module, "expert_weight_names", None):
        return "experts"
    if isinstance(module, nn.Embedding):
        return "embed"
    if isinstance(module, nn.Linear):
        if name == "head":
            return "head"
        if name.endswith(".router.gate") or name.endswith("shared_gate"):
            return "router"
        return "linear"
    return None


def quant_targets(model: nn.Module, include: Sequence[str] = ()) -> List[Tuple[str, nn.Module, Tuple[str, ...]]]:
    """(module name, module, its quantized weight names) of a Transformer: every linear
    layer and every MoE layer's stacked experts, plus the kinds in `include`. With tied
    embeddings the head is the embedding: either name selects it."""
    for kind in include:
        if kind not in EXTRA_KINDS:
            from .registry import nearest

            raise RecipeError(f"train.qat.include has '{kind}'{nearest(kind, EXTRA_KINDS)}; list only "
                              f"{', '.join(EXTRA_KINDS)} (linear layers and experts are always quantized).")
    wanted = {"linear", "experts", *include}
    if getattr(model, "head", 0) is None and "head" in include:
        wanted.add("embed")
    out = []
    for name, module in model.named_modules():
        kind = _kind(name, module)
        if kind in wanted:
            names = tuple(module.expert_weight_names) if kind == "experts" else ("weight",)
            out.append((name, module, names))
    return out


def check_targets(targets, fmt: str, where: str) -> None:
    for name, module, names in targets:
        for w in names:
            check_quantizable(f"{name}.{w}", getattr(module, w).shape, fmt, where)


def apply_fake_quant(model: nn.Module, fmt: str, include: Sequence[str] = (), active: bool = True) -> FakeQuantizer:
    """Give every target of `quant_targets` one shared FakeQuantizer, in place (on a
    meta-device model too: nothing is read). Returns it; flip `.active` to start."""
    check_format(fmt, "train.qat.format")
    targets = quant_targets(model, include)
    check_targets(targets, fmt, "train.qat.format")
    q = FakeQuantizer(fmt, active)
    for _, module, _ in targets:
        module.fake_quant = q
        if type(module) is nn.Linear:
            module.__class__ = FakeQuantLinear
        elif type(module) is nn.Embedding:
            module.__class__ = FakeQuantEmbedding
    model.fake_quantizer = q
    return q


@torch.no_grad()
def quantize_weights_(model: nn.Module, fmt: str, include: Sequence[str] = (), where: str = "--quantize") -> int:
    """Post-training quantization: replace every target weight by dequant(quant(w)), in
    place. Returns the number of weights changed."""
    check_format(fmt, where)
    targets = quant_targets(model, include)
    check_targets(targets, fmt, where)
    n = 0
    for _, module, names in targets:
        for w in names:
            p = getattr(module, w)
            p.copy_(QDQ[fmt](p))
            n += p.numel()
    return n
