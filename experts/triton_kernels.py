"""Triton kernels of the `triton` expert backend (experts/triton_backend.py drives
them; this module imports triton at the top, so only that module imports it, and
only once triton is known to be importable).

Rows are the dispatch's sorted (token, expert) slots: row r belongs to expert e(r)
and reads token src[r] of the token matrix. Row-tiled kernels take a tile table
built on the device: tile j covers rows lo[j] <= r < hi[j] of ONE expert e[j], so
no tile straddles two experts. An expert's rows are cut into ceil(n_e / BM) tiles,
its last tile partial (rows past hi masked on load and store); experts with no rows
own no tile; table entries past the real tiles have lo = hi and return at once.

    sorted rows   |e0: 0..37       |e1: 38..39|e3: 40..99         | dropped (capacity)
    BM = 32 tiles [0,32)[32,38)     [38,40)    [40,72)[72,100)      no tile
                  (e2 has no rows and no tile; 6 tiles, table length ceil(S/32) + E)

Kernels (operands in the compute dtype, float32 accumulators):
  glu_fwd       gu = x[src] @ w_in[e].T (+ b_in)  -> h = glu(gate, up)     gathered A
  grouped_mm    c = a @ B[e] (+ bias[e])          (down projection, dX rows)
  glu_bwd       G = dy[src] @ w_out[e]            -> d[gate; up], dweight partials, w glu
  wgrad         dW[e] = A'[rows of e].T @ B'[rows of e]  (+ column sums: d bias)
  gather_sum    out[t] = sum_k w[t, k] * rows[slot_row[t, k]]   (kept rows only)

Under TRITON_INTERPRET (INTERPRET = True): dot operands go to float32, because the
interpreter's bf16 dot returns garbage (triton 3.6 with numpy 2), and loops whose
bound is a loaded value are while loops, because its `range` cannot take one. On a
GPU both are the plain forms (a for loop is what Triton software-pipelines). For
the same reason the reduction widths (D, F, 2F, top_k) are constexprs: the
interpreter's `range` takes no runtime bound at all; on a GPU it means one compile
per model width, and loops of known trip count. The interpreter also re-patches
triton.language at every call of a jit helper (milliseconds each), so the per-tile
helpers are written inline and sigmoid is spelled out (tl.sigmoid is such a helper).
"""
from __future__ import annotations

import triton
import triton.language as tl

# KIND: 0 swiglu, 1 geglu, 2 swiglu_clamped (triton_backend.KINDS maps the recipe's names)
# arch.ffn's gpt-oss constants, repeated as literals: a jit function reads globals only
# when they are constexpr; triton_backend checks at import that they still agree. In a
# product they stand right of a tensor: Triton 3.9's interpreter turns constexpr * tensor
# into a constexpr holding the tensor, which tl.exp then refuses
CLAMP_ALPHA = tl.constexpr(1.702)
CLAMP_LIMIT = tl.constexpr(7.0)
GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


@triton.jit
def _glu(g, u, KIND: tl.constexpr):
    """act(gate) * up in float32 (arch.ffn.GLU). Sigmoids written out: tl.sigmoid and
    tanh-free forms are jit helpers, which the interpreter re-patches at every call."""
    if KIND == 0:
        a = g / (1.0 + tl.exp(-g)) * u
    elif KIND == 1:  # gelu_tanh(g) = g (1 + tanh z) / 2 = g sigmoid(2z)
        a = g / (1.0 + tl.exp((g + 0.044715 * g * g * g) * (-2.0 * GELU_C))) * u
    else:
        gc = tl.minimum(g, CLAMP_LIMIT)
        uc = tl.minimum(tl.maximum(u, -CLAMP_LIMIT), CLAMP_LIMIT)
        a = (uc + 1.0) * gc / (1.0 + tl.exp(gc * -CLAMP_ALPHA))
    return a


@triton.jit
def _glu_grad(g, u, KIND: tl.constexpr):
    """(glu, d glu / d gate, d glu / d up) in float32; clamp passes the gradient
    where the value is inside its bounds, ends included, as torch.clamp does."""
    if KIND == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        act = g * s
        a = act * u
        da_dg = u * s * (1.0 + g * (1.0 - s))
        da_du = act
    elif KIND == 1:
        t = 2.0 / (1.0 + tl.exp((g + 0.044715 * g * g * g) * (-2.0 * GELU_C))) - 1.0  # tanh z
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * g * g)
        a = act * u
        da_dg = u * dact
        da_du = act
    else:
        gc = tl.minimum(g, CLAMP_LIMIT)
        uc = tl.minimum(tl.maximum(u, -CLAMP_LIMIT), CLAMP_LIMIT)
        s = 1.0 / (1.0 + tl.exp(gc * -CLAMP_ALPHA))
        act = gc * s
        a = (uc + 1.0) * act
        dact = s + gc * CLAMP_ALPHA * s * (1.0 - s)
        da_dg = tl.where(g <= CLAMP_LIMIT, (uc + 1.0) * dact, 0.0)
        da_du = tl.where((u >= -CLAMP_LIMIT) & (u <= CLAMP_LIMIT), act, 0.0)
    return a, da_dg, da_du


@triton.jit
def glu_fwd_kernel(x_ptr, src_ptr, w_ptr, b_ptr, h_ptr, gu_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                   D: tl.constexpr, F, stride_x, stride_we, stride_wi, stride_h, stride_gu,
                   KIND: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_GU: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_T: tl.constexpr,
                   PREC: tl.constexpr):
    """h[r, f] = glu(x[src r] . w_in[e, f], x[src r] . w_in[e, F + f]); the rows of x
    are gathered while loading, never copied. gu (pre-activation, for backward) is
    stored only when SAVE_GU. w_in is (E, 2F, D) with unit stride along D."""
    # tile of the table, then n-tile: n fastest, so the programs of one row tile run
    # side by side and share its (gathered) rows in L2
    pid_m = tl.program_id(0) // ((F + BN - 1) // BN)
    pid_n = tl.program_id(0) % ((F + BN - 1) // BN)
    e = tl.load(tile_e_ptr + pid_m)
    lo = tl.load(tile_lo_ptr + pid_m)
    hi = tl.load(tile_hi_ptr + pid_m)
    if lo >= hi:
        return
    rows = lo + tl.arange(0, BM)
    rmask = rows < hi
    src = tl.load(src_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < F
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(x_ptr + src[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + cols[None, :] * stride_wi + ks[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_base + (cols + F)[None, :] * stride_wi + ks[:, None], mask=wmask, other=0.0)
        a = a.to(DOT_T)
        acc_g = tl.dot(a, wg.to(DOT_T), acc_g, input_precision=PREC)
        acc_u = tl.dot(a, wu.to(DOT_T), acc_u, input_precision=PREC)
    if HAS_BIAS:
        b_base = b_ptr + e.to(tl.int64) * 2 * F
        acc_g += tl.load(b_base + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_base + F + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_t = h_ptr.dtype.element_ty
    # the activation of the stored (rounded) values: what backward recomputes from
    g = acc_g.to(out_t)
    u = acc_u.to(out_t)
    omask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    if SAVE_GU:
        tl.store(gu_ptr + r64[:, None] * stride_gu + cols[None, :], g, mask=omask)
        tl.store(gu_ptr + r64[:, None] * stride_gu + (cols + F)[None, :], u, mask=omask)
    h = _glu(g.to(tl.float32), u.to(tl.float32), KIND)
    tl.store(h_ptr + r64[:, None] * stride_h + cols[None, :], h.to(out_t), mask=omask)


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                      N, K: tl.constexpr, stride_a, stride_be, stride_bk, stride_bn, stride_c,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      DOT_T: tl.constexpr, PREC: tl.constexpr):
    """c[r, n] = sum_k a[r, k] B[e][k, n] (+ bias[e, n]) over each expert's rows; B's
    strides say which way its (E, ., .) weight is read (w_out: k = F, n = D;
    w_in for dX: k = 2F, n = D)."""
    # tile of the table, then n-tile: n fastest, so the programs of one row tile run
    # side by side and share its (gathered) rows in L2
    pid_m = tl.program_id(0) // ((N + BN - 1) // BN)
    pid_n = tl.program_id(0) % ((N + BN - 1) // BN)
    e = tl.load(tile_e_ptr + pid_m)
    lo = tl.load(tile_lo_ptr + pid_m)
    hi = tl.load(tile_hi_ptr + pid_m)
    if lo >= hi:
        return
    rows = lo + tl.arange(0, BM)
    rmask = rows < hi
    r64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(a_ptr + r64[:, None] * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e.to(tl.int64) * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + r64[:, None] * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def glu_bwd_kernel(dy_ptr, src_ptr, w_ptr, gu_ptr, wrow_ptr, bout_ptr, dgu_ptr, dwp_ptr, hs_ptr,
                   tile_e_ptr, tile_lo_ptr, tile_hi_ptr, D: tl.constexpr, F,
                   stride_dy, stride_we, stride_wd, stride_gu, stride_dgu, stride_dwp, stride_hs,
                   KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """G[r, f] = dy[src r] . w_out[e, :, f] with the rows of dy gathered while loading
    (the combine's backward and the down projection's dgrad in one), then in the
    epilogue, from the saved pre-activation gu:
        d gate = w_r G glu'_g,  d up = w_r G glu'_u          (w_r: row r's routing weight)
        dwp[r, n-tile] = sum_f G glu(gate, up) (+ dy[src r] . b_out[e] on n-tile 0)
        hs = w_r glu(gate, up)                                 (for w_out's gradient)
    dwp summed over n-tiles is d loss / d w_r = dy[src r] . y_r, without y ever saved.
    hs makes d w_out[e] = dy[rows of e].T @ hs a plain gathered GEMM (wgrad), with the
    routing weight on the side that is written here anyway. w_out is (E, D, F) with
    unit stride along F."""
    # tile of the table, then n-tile: n fastest, so the programs of one row tile run
    # side by side and share its (gathered) rows in L2
    pid_m = tl.program_id(0) // ((F + BN - 1) // BN)
    pid_n = tl.program_id(0) % ((F + BN - 1) // BN)
    e = tl.load(tile_e_ptr + pid_m)
    lo = tl.load(tile_lo_ptr + pid_m)
    hi = tl.load(tile_hi_ptr + pid_m)
    if lo >= hi:
        return
    rows = lo + tl.arange(0, BM)
    rmask = rows < hi
    r64 = rows.to(tl.int64)
    src = tl.load(src_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < F
    e64 = e.to(tl.int64)
    w_base = w_ptr + e64 * stride_we
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(dy_ptr + src[:, None] * stride_dy + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wd + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_T), w.to(DOT_T), acc, input_precision=PREC)
    # dy . b_out, on n-tile 0 only, in a loop of its own that reads dy's rows once more.
    # Summed inside the dot's pipelined loop from the dot's own loaded tile, Triton 3.6
    # on an H200 computed the dot itself wrong under one config (BN 128, BK 64, 8 warps,
    # 3 stages: d[gate; up] 10-12% off, different at every call; the other configs and
    # the biasless kernel right); in this form every config agrees with torch to 2e-3
    # (tests/experts/test_triton_backend.py, TestCuda.test_each_config_of_each_kernel_matches_torch)
    bias_dot = tl.zeros((BM,), tl.float32)
    if HAS_BIAS:
        if pid_n == 0:
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < D
                a32 = tl.load(dy_ptr + src[:, None] * stride_dy + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                              other=0.0).to(tl.float32)
                bo = tl.load(bout_ptr + e64 * D + ks, mask=kmask, other=0.0).to(tl.float32)
                bias_dot += tl.sum(a32 * bo[None, :], axis=1)
    omask = rmask[:, None] & cmask[None, :]
    g = tl.load(gu_ptr + r64[:, None] * stride_gu + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64[:, None] * stride_gu + (cols + F)[None, :], mask=omask, other=0.0).to(tl.float32)
    h, dh_dg, dh_du = _glu_grad(g, u, KIND)
    dwp = tl.sum(acc * h, axis=1) + bias_dot  # masked columns: g = u = 0 -> h = 0; bias_dot: 0 past n-tile 0
    tl.store(dwp_ptr + r64 * stride_dwp + pid_n, dwp, mask=rmask)
    wr = tl.load(wrow_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    dh = acc * wr[:, None]
    out_t = dgu_ptr.dtype.element_ty
    tl.store(hs_ptr + r64[:, None] * stride_hs + cols[None, :], (h * wr[:, None]).to(out_t), mask=omask)
    tl.store(dgu_ptr + r64[:, None] * stride_dgu + cols[None, :], (dh * dh_dg).to(out_t), mask=omask)
    tl.store(dgu_ptr + r64[:, None] * stride_dgu + (cols + F)[None, :], (dh * dh_du).to(out_t), mask=omask)


@triton.jit
def _wgrad_step(acc, dbias, r0, hi, a_ptr, a_src_ptr, scale_ptr, b_ptr, b_src_ptr, ms, mmask, ns, nmask,
                stride_a, stride_b, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_DBIAS: tl.constexpr,
                DBIAS_SCALE: tl.constexpr, BK: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    rows = r0 + tl.arange(0, BK)
    rmask = rows < hi
    if A_GATHER:
        a_rows = tl.load(a_src_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    if B_GATHER:
        b_rows = tl.load(b_src_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        b_rows = rows.to(tl.int64)
    # A read transposed, (BM, BK): its columns are the rows being summed over
    a = tl.load(a_ptr + a_rows[None, :] * stride_a + ms[:, None], mask=mmask[:, None] & rmask[None, :], other=0.0)
    b = tl.load(b_ptr + b_rows[:, None] * stride_b + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    if HAS_DBIAS:
        if DBIAS_SCALE:
            sc = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            dbias += tl.sum(a.to(tl.float32) * sc[None, :], axis=1)
        else:
            dbias += tl.sum(a.to(tl.float32), axis=1)
    return acc, dbias


@triton.jit
def wgrad_kernel(a_ptr, a_src_ptr, scale_ptr, b_ptr, b_src_ptr, out_ptr, dbias_ptr, first_ptr, counts_ptr,
                 M, N, stride_a, stride_b, stride_oe, stride_om,
                 A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_DBIAS: tl.constexpr, DBIAS_SCALE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """out[e, m, n] = sum over expert e's rows r of A'[r, m] B'[r, n], where
        A'[r, m] = a[a_src r, m],  B'[r, n] = b[b_src r, n]   (each gather optional)
    and, with HAS_DBIAS, dbias[e, m] = sum_r A'[r, m] (times scale[r] with
    DBIAS_SCALE), written by the n-block 0 programs. An expert with no rows gets
    zeros. Unit stride along m and n. Operands go to the tensor cores as loaded: a
    scale or an activation applied in this loop would cost a pass through registers
    per tile (w_out's gradient took 2.4-3.9 ms against 1.9 ms for w_in's, twice
    the FLOPs, on an H100), so the callers pass operands that need neither."""
    pid = tl.program_id(0)
    n_m = (M + BM - 1) // BM
    n_n = (N + BN - 1) // BN
    e = pid // (n_m * n_n)
    rest = pid % (n_m * n_n)
    pid_m = rest // n_n
    pid_n = rest % n_n
    lo = tl.load(first_ptr + e)
    hi = lo + tl.load(counts_ptr + e)
    ms = pid_m * BM + tl.arange(0, BM)
    mmask = ms < M
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < N
    acc = tl.zeros((BM, BN), tl.float32)
    dbias = tl.zeros((BM,), tl.float32)
    if INTERPRET:
        r0 = lo
        while r0 < hi:
            acc, dbias = _wgrad_step(acc, dbias, r0, hi, a_ptr, a_src_ptr, scale_ptr, b_ptr, b_src_ptr, ms, mmask,
                                     ns, nmask, stride_a, stride_b, A_GATHER, B_GATHER, HAS_DBIAS, DBIAS_SCALE, BK,
                                     DOT_T, PREC)
            r0 += BK
    else:
        for r0 in range(lo, hi, BK):
            acc, dbias = _wgrad_step(acc, dbias, r0, hi, a_ptr, a_src_ptr, scale_ptr, b_ptr, b_src_ptr, ms, mmask,
                                     ns, nmask, stride_a, stride_b, A_GATHER, B_GATHER, HAS_DBIAS, DBIAS_SCALE, BK,
                                     DOT_T, PREC)
    e64 = e.to(tl.int64)
    tl.store(out_ptr + e64 * stride_oe + ms[:, None] * stride_om + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
    if HAS_DBIAS:
        # one column block writes the bias gradient; a branch, not mmask & (pid_n == 0):
        # Triton 3.9's interpreter refuses a mask made of a vector and a scalar
        if pid_n == 0:
            tl.store(dbias_ptr + e64 * M + ms, dbias.to(dbias_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def gather_sum_kernel(rows_ptr, slot_row_ptr, w_ptr, n_kept_ptr, out_ptr, T, D, K: tl.constexpr, stride_rows, stride_out,
                      HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_k w[t, k] rows[slot_row[t, k]] in float32, over kept rows only
    (slot_row < n_kept: dropped slots sit past every expert's rows, never written)."""
    ts = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = ts < T
    n_kept = tl.load(n_kept_ptr)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    t64 = ts.to(tl.int64)
    acc = tl.zeros((BT, BD), tl.float32)
    for k in range(0, K):
        r = tl.load(slot_row_ptr + t64 * K + k, mask=tmask, other=0)
        keep = tmask & (r < n_kept)
        v = tl.load(rows_ptr + r.to(tl.int64)[:, None] * stride_rows + cols[None, :],
                    mask=keep[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t64 * K + k, mask=tmask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + t64[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])
