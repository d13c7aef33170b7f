"""The `triton` expert backend: the experts' gather, both projections, the GLU and
the weighted combine in Triton kernels (experts/triton_kernels.py), as torch
custom ops with their own backward, so that torch.compile sees two opaque ops.

    forward   glu_fwd:    h = glu(x[token_S] @ w_in[e].T)    rows of x gathered on load
              grouped_mm: y_S = h @ w_out[e].T               sorted rows
              gather_sum: y_T[t] = sum_k w_tk y_S[row(t, k)]
    backward  glu_bwd:    G = dy[token_S] @ w_out[e]         rows of dy gathered on load;
                          d[gate; up] = w G glu',  d w_tk = sum_f G glu,  hs = w glu (epilogue)
              grouped_mm: dx_S = d[gate; up] @ w_in[e]
              gather_sum: dx_T[t] = sum_k dx_S[row(t, k)]
              wgrad:      dw_out[e] = dy[token].T @ hs,  dw_in[e] = d[gate; up].T @ x[token]
                          (the biases' gradients are the same kernels' column sums)

Combine: a gather in a final reduction (gather_sum), not a scatter-add from the
down projection's epilogue. Each token's K rows are read by one program and summed
in float32 in a fixed order: deterministic, no atomics, no float32 (T, D) buffer to
zero first, and the output is written once in the compute dtype. It costs one write
and one read of the (S, D) rows, which the scatter-add would save.

Memory for backward: the layer input x (alive anyway) and the pre-activation
gu = [gate; up] (S, 2F) in the compute dtype are saved; the activation glu(gu) (S, F)
is not: glu_bwd recomputes it and writes it, times the routing weight, for w_out's
gradient only (freed right after), and the expert outputs y_S (S, D) are not saved
at all: d loss / d w_tk = dy_t . y_S = sum_f G glu is formed in glu_bwd's epilogue.
Per routed row that is 2F elements saved; the eager grouped_mm path keeps the
permuted x_S and the combine's rows (D each) plus h (2F) and at least one F-wide
activation: 2D + 3F or more. Recomputing gu as well (one more gathered GEMM
in backward, a third more forward FLOPs) would save the last 2F; not done.

Rows past counts_E.sum() (capacity-dropped) are in no tile, never computed, and the
gather_sum skips them: they contribute nothing and get no gradient.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from arch.ffn import SWIGLU_CLAMPED_ALPHA, SWIGLU_CLAMPED_LIMIT
from arch.registry import EXPERT_BACKEND, RecipeError

# expert_ffn kinds the kernels have an epilogue for
KINDS = {"swiglu": 0, "geglu": 1, "swiglu_clamped": 2}

_kernels = None  # experts.triton_kernels, imported on first use


def interpreting() -> bool:
    """Whether Triton runs its kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device_type: str) -> Optional[str]:
    """One sentence saying why the backend cannot run on `device_type`, or None."""
    if importlib.util.find_spec("triton") is None:
        return ("model.moe.backend = 'triton' needs the triton package, which is not importable here; "
                "install it (it ships with CUDA builds of torch) or choose model.moe.backend=grouped_mm.")
    if device_type != "cuda" and not interpreting():
        return (f"model.moe.backend = 'triton' runs on CUDA devices only, not on {device_type}; choose "
                "model.moe.backend=grouped_mm, or set TRITON_INTERPRET=1 to run its kernels (slowly) "
                "through Triton's interpreter.")
    return None


def unsupported_kind(kind: str) -> Optional[str]:
    """One sentence refusing an expert FFN the kernels have no epilogue for, or None."""
    if kind in KINDS:
        return None
    return (f"model.moe.expert_ffn = '{kind}' has no fused kernel in model.moe.backend = 'triton' (gated "
            f"kinds only: {', '.join(KINDS)}); choose one of those or model.moe.backend=grouped_mm.")


def _k():
    global _kernels
    if _kernels is None:
        from . import triton_kernels

        # the kernels repeat arch.ffn's gpt-oss constants as literals
        assert (triton_kernels.CLAMP_ALPHA.value, triton_kernels.CLAMP_LIMIT.value) == \
            (SWIGLU_CLAMPED_ALPHA, SWIGLU_CLAMPED_LIMIT), "triton_kernels' clamp constants drifted from arch.ffn"
        _kernels = triton_kernels
    return _kernels


# ------------------------------------------------------------------ launch configs

# Block sizes. BM, the row tile of the tile table, is fixed per device so that
# forward and backward share one table; the rest are tuned on CUDA over a few
# configs. The interpreter runs one small config: many partial tiles on the tiny test
# shapes, and few configs to interpret. The CUDA lists are the best few of
# benchmarks/triton_sweep.py's grid on an H100 at the Qwen3-30B-A3B shape (16K tokens).
BM_CUDA, BM_INTERPRET = 128, 16
_INTERPRET_META = {"rows": dict(BN=16, BK=32), "wgrad": dict(BM=32, BN=32, BK=16)}
# (BN, BK, warps, stages); the GLU kernels hold two accumulators (gate and up) or
# an accumulator and an epilogue of loads, hence narrower tiles
_ROW_SHAPES = {"glu": [(128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
               "mm": [(256, 64, 8, 3), (256, 32, 8, 4), (128, 64, 4, 3), (128, 64, 8, 3)]}
# (BM, BN, BK, warps, stages); BK runs over an expert's rows (~T K / E of them)
_WGRAD_SHAPES = [(128, 128, 32, 8, 5), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (256, 128, 64, 8, 3)]

_tuned = {}


def _kernel(name: str):
    """The named kernel of triton_kernels: autotuned on CUDA, plain when interpreted."""
    if name not in _tuned:
        import triton

        k = getattr(_k(), name)
        if not interpreting():
            if name == "wgrad_kernel":
                configs = [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s)
                           for bm, bn, bk, w, s in _WGRAD_SHAPES]
                k = triton.autotune(configs, key=["M", "N"])(k)
            elif name != "gather_sum_kernel":
                shapes = _ROW_SHAPES["mm" if name == "grouped_mm_kernel" else "glu"]
                configs = [triton.Config(dict(BN=bn, BK=bk), num_warps=w, num_stages=s) for bn, bk, w, s in shapes]
                key = ["N", "K"] if name == "grouped_mm_kernel" else ["D", "F"]
                # glu_bwd's partial sums: each BN writes its own columns, so the trials
                # of other BNs must not leave theirs behind
                zero = ["dwp_ptr"] if name == "glu_bwd_kernel" else None
                k = triton.autotune(configs, key=key, reset_to_zero=zero)(k)
        _tuned[name] = k
    return _tuned[name]


def _launch(name: str, n_programs, *args, **meta):
    """Launch `name` over n_programs(meta) programs (1-D grid): the interpreter's
    fixed block sizes, or the autotuner's."""
    kind = "wgrad" if name == "wgrad_kernel" else "rows"
    if interpreting():
        meta = {**_INTERPRET_META[kind], **meta}
        return _kernel(name)[(n_programs(meta),)](*args, **meta)
    return _kernel(name)[lambda m: (n_programs(m),)](*args, **meta)


def _dot_meta(dtype: torch.dtype) -> dict:
    import triton.language as tl

    if interpreting():  # its bf16 dot is broken (triton_kernels' docstring)
        return dict(DOT_T=tl.float32, PREC="ieee")
    dot_t = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    # float32 as torch's matmuls compute it by default: no TF32
    return dict(DOT_T=dot_t, PREC="ieee" if dtype == torch.float32 else "tf32")


def _row_tiles(counts_E: Tensor, n_rows: int, bm: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Tile table (expert, first row, end row) of the sorted rows, on the device: each
    expert's rows cut into ceil(n_e / bm) tiles of its own, so that no tile straddles
    two experts. Its length, ceil(n_rows / bm) + E, bounds the real count without
    reading it; the entries past the real ones have first = end = 0."""
    E = counts_E.numel()
    n = -(-n_rows // bm) + E
    tiles_E = (counts_E + bm - 1) // bm
    end_tile_E = tiles_E.cumsum(0)
    j = torch.arange(n, device=counts_E.device)
    e_j = torch.bucketize(j, end_tile_E, right=True)  # E for the unused entries
    ec = e_j.clamp(max=E - 1)
    first_row_E = counts_E.cumsum(0) - counts_E
    lo = first_row_E[ec] + (j - (end_tile_E - tiles_E)[ec]) * bm
    hi = torch.minimum(lo + bm, first_row_E[ec] + counts_E[ec])
    valid = e_j < E
    zero = torch.zeros((), dtype=lo.dtype, device=lo.device)
    return ec, torch.where(valid, lo, zero), torch.where(valid, hi, zero), n


class _Rows:
    """The sorted rows' layout, shared by the kernels of one forward or backward.

    `config` = (BM, BN, BK, warps, stages) launches every kernel of this layout with
    that one config instead of the autotuner's (BM: the tile table's row tile, and
    wgrad's own): benchmarks/triton_sweep.py times each kernel over a grid so."""

    def __init__(self, counts_E: Tensor, n_rows: int, dtype: torch.dtype, config: Optional[tuple] = None):
        self.config = config
        self.bm = config[0] if config is not None else BM_INTERPRET if interpreting() else BM_CUDA
        self.e, self.lo, self.hi, self.n_tiles = _row_tiles(counts_E, n_rows, self.bm)
        self.first_E = counts_E.cumsum(0) - counts_E
        self.counts_E = counts_E
        self.n_kept = counts_E.sum().reshape(1)
        self.meta = dict(BM=self.bm, **_dot_meta(dtype))
        self.wmeta = _dot_meta(dtype)

    def _launch(self, name: str, n_programs, *args, **meta):
        if self.config is None:
            return _launch(name, n_programs, *args, **meta)
        bm, bn, bk, warps, stages = self.config
        meta = {**meta, "BN": bn, "BK": bk, **({"BM": bm} if name == "wgrad_kernel" else {})}
        return getattr(_k(), name)[(n_programs(meta),)](*args, num_warps=warps, num_stages=stages, **meta)

    def programs(self, n_cols: int):
        """Program count of a row-tiled kernel with n_cols output columns."""
        return lambda m: self.n_tiles * -(-n_cols // m["BN"])

    def glu_fwd(self, x, src, w_in, b_in, gu, kind: int, save: bool) -> Tensor:
        S, F = src.numel(), w_in.shape[1] // 2
        h = x.new_empty(S, F)
        self._launch("glu_fwd_kernel", self.programs(F), x, src, w_in, b_in if b_in is not None else w_in, h,
                     gu if save else h, self.e, self.lo, self.hi, x.shape[1], F, x.stride(0), w_in.stride(0),
                     w_in.stride(1), h.stride(0), gu.stride(0) if save else 0,
                     KIND=kind, HAS_BIAS=b_in is not None, SAVE_GU=save, **self.meta)
        return h

    def mm(self, a, w, bias, k_stride: int, n_stride: int, N: int) -> Tensor:
        """c[r] = a[r] @ W[e] (+ bias[e]), W[e] read as (K, N) with the given strides."""
        c = a.new_empty(a.shape[0], N)
        self._launch("grouped_mm_kernel", self.programs(N), a, w, bias if bias is not None else w, c, self.e, self.lo,
                     self.hi, N, a.shape[1], a.stride(0), w.stride(0), k_stride, n_stride, c.stride(0),
                     HAS_BIAS=bias is not None, **self.meta)
        return c

    def glu_bwd(self, dy, src, w_out, gu, w_S, b_out, kind: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(d[gate; up], d loss / d w of each row, w glu(gate, up)) (glu_bwd_kernel)."""
        S, F, D = src.numel(), w_out.shape[2], w_out.shape[1]
        dgu = gu.new_empty(S, 2 * F)
        hs = gu.new_empty(S, F)
        # one partial sum per (row, n-tile); zeros where the tuned BN leaves columns
        min_bn = (self.config[1] if self.config is not None else _INTERPRET_META["rows"]["BN"] if interpreting()
                  else min(c[0] for c in _ROW_SHAPES["glu"]))
        dwp = torch.zeros(S, -(-F // min_bn), dtype=torch.float32, device=gu.device)
        self._launch("glu_bwd_kernel", self.programs(F), dy, src, w_out, gu, w_S, b_out if b_out is not None else w_out,
                     dgu, dwp, hs, self.e, self.lo, self.hi, D, F, dy.stride(0), w_out.stride(0), w_out.stride(1),
                     gu.stride(0), dgu.stride(0), dwp.stride(0), hs.stride(0), KIND=kind, HAS_BIAS=b_out is not None,
                     **self.meta)
        return dgu, dwp.sum(1), hs

    def wgrad(self, out: Tensor, dbias: Optional[Tensor], a, a_src, b, b_src, dbias_scale=None):
        """out[e] = a[a_src][rows of e].T @ b[b_src][rows of e], dbias[e] its column sums of
        a (times dbias_scale per row) (triton_kernels.wgrad_kernel)."""
        E, M, N = out.shape
        self._launch("wgrad_kernel", lambda m: E * -(-M // m["BM"]) * -(-N // m["BN"]),
                     a, a_src if a_src is not None else self.counts_E,
                     dbias_scale if dbias_scale is not None else self.n_kept, b,
                     b_src if b_src is not None else self.counts_E, out, dbias if dbias is not None else out,
                     self.first_E, self.counts_E, M, N, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
                     A_GATHER=a_src is not None, B_GATHER=b_src is not None, HAS_DBIAS=dbias is not None,
                     DBIAS_SCALE=dbias_scale is not None, INTERPRET=interpreting(), **self.wmeta)

    def gather_sum(self, rows, slot_row, w, n_tokens: int) -> Tensor:
        """out[t] = sum_k w[t, k] rows[slot_row[t, k]] over kept rows (w None: 1)."""
        D = rows.shape[1]
        K = slot_row.numel() // n_tokens
        out = rows.new_empty(n_tokens, D)
        BT, BD = (16, 64) if interpreting() else (4, min(1024, 1 << (D - 1).bit_length()))
        grid = (-(-n_tokens // BT), -(-D // BD))
        _kernel("gather_sum_kernel")[grid](rows, slot_row, w if w is not None else rows, self.n_kept, out, n_tokens,
                                            D, K, rows.stride(0), out.stride(0), HAS_W=w is not None, BT=BT, BD=BD,
                                            num_warps=4)
        return out


# ------------------------------------------------------------------ custom ops

def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("moelab::triton_experts", mutates_args=())
def triton_experts(x_TD: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor], b_out: Optional[Tensor],
                   weights_TK: Tensor, token_S: Tensor, order_S: Tensor, slot_row: Tensor, counts_E: Tensor,
                   kind: str, save: bool) -> Tuple[Tensor, Tensor]:
    """y_T = sum_k w_tk expert_(e_tk)(x_t) over kept slots; also the pre-activation
    gu (S, 2F) when `save` (for backward), else an empty tensor. token_S: token of
    each sorted row; order_S: slot (t * K + k) of each row; slot_row: row of each
    slot; counts_E: rows each expert computes. All on one device, no host reads."""
    S, F = token_S.numel(), w_in.shape[1] // 2
    rows = _Rows(counts_E, S, x_TD.dtype)
    gu = x_TD.new_empty(S, 2 * F) if save else _empty(x_TD)
    h = rows.glu_fwd(x_TD, token_S, w_in, b_in, gu, KINDS[kind], save)
    # w_out (E, D, F) read as (K = F, N = D)
    y_S = rows.mm(h, w_out, b_out, w_out.stride(2), w_out.stride(1), w_out.shape[1])
    del h
    return rows.gather_sum(y_S, slot_row, weights_TK, x_TD.shape[0]), gu


@triton_experts.register_fake
def _(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row, counts_E, kind, save):
    S, F = token_S.numel(), w_in.shape[1] // 2
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(S, 2 * F) if save else x_TD.new_empty(0)


@torch.library.custom_op("moelab::triton_experts_backward", mutates_args=())
def triton_experts_backward(dy_TD: Tensor, x_TD: Tensor, w_in: Tensor, w_out: Tensor, b_in: Optional[Tensor],
                            b_out: Optional[Tensor], weights_TK: Tensor, token_S: Tensor, order_S: Tensor,
                            slot_row: Tensor, counts_E: Tensor, gu: Tensor, kind: str
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of triton_experts: (x, w_in, w_out, b_in, b_out, weights); a bias
    the layer lacks gets an empty tensor."""
    S, T = token_S.numel(), x_TD.shape[0]
    k = KINDS[kind]
    rows = _Rows(counts_E, S, x_TD.dtype)
    w_S = weights_TK.reshape(-1)[order_S]  # routing weight of each sorted row
    dgu, dw_S, hs_S = rows.glu_bwd(dy_TD, token_S, w_out, gu, w_S, b_out, k)
    dw_out, dw_in = torch.empty_like(w_out), torch.empty_like(w_in)
    db_out = torch.empty_like(b_out) if b_out is not None else None
    db_in = torch.empty_like(b_in) if b_in is not None else None
    # d w_out[e] = dy[token].T @ (w glu); d b_out[e] = sum of w dy[token]
    rows.wgrad(dw_out, db_out, dy_TD, token_S, hs_S, None, dbias_scale=w_S)
    del hs_S
    # w_in (E, 2F, D) read as (K = 2F, N = D)
    dx_S = rows.mm(dgu, w_in, None, w_in.stride(1), w_in.stride(2), w_in.shape[2])
    dx = rows.gather_sum(dx_S, slot_row, None, T)
    del dx_S
    rows.wgrad(dw_in, db_in, dgu, None, x_TD, token_S)
    # d w of each slot: its row's sum, zero for dropped slots (their rows were never computed)
    dweights = torch.where(slot_row < rows.n_kept, dw_S[slot_row], 0.0).view_as(weights_TK).to(weights_TK.dtype)
    return (dx, dw_in, dw_out, db_in if db_in is not None else _empty(w_in),
            db_out if db_out is not None else _empty(w_out), dweights)


@triton_experts_backward.register_fake
def _(dy_TD, x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row, counts_E, gu, kind):
    return (torch.empty_like(x_TD), torch.empty_like(w_in), torch.empty_like(w_out),
            torch.empty_like(b_in) if b_in is not None else w_in.new_empty(0),
            torch.empty_like(b_out) if b_out is not None else w_out.new_empty(0), torch.empty_like(weights_TK))


def _setup_context(ctx, inputs, output):
    x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row, counts_E, kind, save = inputs
    ctx.save_for_backward(x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row, counts_E, output[1])
    ctx.kind, ctx.saved_gu = kind, save


def _backward(ctx, dy_TD, _dgu):
    if not ctx.saved_gu:
        raise RuntimeError("triton_experts ran with save=False (no pre-activation kept); call it with "
                           "save=True where a backward follows.")
    x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row, counts_E, gu = ctx.saved_tensors
    dx, dw_in, dw_out, db_in, db_out, dweights = triton_experts_backward(
        dy_TD.to(x_TD.dtype).contiguous(), x_TD, w_in, w_out, b_in, b_out, weights_TK, token_S, order_S, slot_row,
        counts_E, gu, ctx.kind)
    return (dx, dw_in, dw_out, db_in if b_in is not None else None, db_out if b_out is not None else None,
            dweights, None, None, None, None, None, None)


triton_experts.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ the backend

def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check(x: Tensor, kind: str) -> None:
    problem = unavailable(x.device.type) or unsupported_kind(kind)
    if problem:
        raise RecipeError(problem)


def triton_moe(x_TD: Tensor, weights_TK: Tensor, token_S: Tensor, order_S: Tensor, slot_row: Tensor,
               counts_E: Tensor, w_in: Tensor, w_out: Tensor, kind: str, b_in: Optional[Tensor] = None,
               b_out: Optional[Tensor] = None) -> Tensor:
    """sum_k w_tk expert_(e_tk)(x_t) for each token t, in the compute dtype (the
    autocast dtype under autocast, like grouped_mm; routing weights as given)."""
    if not torch.compiler.is_compiling():  # checked eagerly; Dynamo cannot trace find_spec
        _check(x_TD, kind)
    dtype = _compute_dtype(x_TD)

    def cast(t):
        return None if t is None else t.to(dtype).contiguous()

    params = (x_TD, w_in, w_out, b_in, b_out, weights_TK)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    y, _ = triton_experts(cast(x_TD), cast(w_in), cast(w_out), cast(b_in), cast(b_out), weights_TK.contiguous(),
                          token_S, order_S, slot_row, counts_E, kind, save)
    return y


class TritonBackend:
    """The `triton` backend. Called with the backend interface (rows already sorted:
    the expert-parallel exchange does that), it gathers nothing and combines with
    weight 1; the MoE layer calls `fused` instead, which gathers the token rows
    itself and combines them, so the layer runs no permute and no combine of its own.
    A `scale_S` (per-row weights) is its combine weight."""

    unavailable = staticmethod(unavailable)
    unsupported_kind = staticmethod(unsupported_kind)

    def __call__(self, x_SD, counts_E, w_in_EID, w_out_EDF, kind: str, b_in_EI=None, b_out_ED=None,
                 scale_S=None) -> Tensor:
        S = x_SD.shape[0]
        rows = torch.arange(S, device=x_SD.device)
        w_S1 = torch.ones(S, 1, dtype=torch.float32, device=x_SD.device) if scale_S is None else scale_S[:, None]
        return triton_moe(x_SD, w_S1, rows, rows, rows, counts_E, w_in_EID, w_out_EDF, kind, b_in_EI, b_out_ED)

    @staticmethod
    def fused(x_TD, weights_TK, d, w_in_EID, w_out_EDF, kind: str, b_in_EI=None, b_out_ED=None) -> Tensor:
        """y_TD of the routed experts for dispatch `d` (experts.dispatch.Dispatch)."""
        return triton_moe(x_TD, weights_TK, d.token_S, d.order_S, d.inverse_S, d.counts_E, w_in_EID, w_out_EDF,
                          kind, b_in_EI, b_out_ED)


EXPERT_BACKEND.register("triton")(TritonBackend())
