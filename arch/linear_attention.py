"""Gated DeltaNet: the linear-attention layers of Qwen3-Next and Qwen3.5, registered as
attention kind `gated_deltanet` (a layer kind names it: `layer_kinds.linear.attention`).

    x ─ in_proj_qkv ─ causal depthwise conv (conv_kernel taps) ─ SiLU ─ q, k, v
      ─ in_proj_b ─ sigmoid ─────────────────────────────────────────── beta   (per value head)
      ─ in_proj_a ─ g = -exp(A_log) softplus(a + dt_bias) <= 0 ──────── decay  (per value head)
      ─ in_proj_z ─────────────────────────────────────────────────────── z      (the output gate)
    q, k: l2-normalised per head; each key head serves n_v_heads / n_k_heads value heads
    o = delta rule(q, k, v, g, beta);  y = out_proj(rmsnorm(o) * w * silu(z))

The gated delta rule keeps, per value head, a state S (k_head_dim x v_head_dim) in
place of a KV cache:

    S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)
    o_t = S_t^T q_t / sqrt(k_head_dim)

`recurrent_gated_delta_rule` is that loop, token by token: the obviously correct path,
for tests. `chunk_gated_delta_rule` computes the same in chunks of C tokens: inside a
chunk, with G_i the decay accumulated from the chunk's start to token i (inclusive),
the writes solve one unit lower-triangular system

    u_i + beta_i sum_{j<i} (G_i / G_j) (k_i . k_j) u_j = beta_i v_i - beta_i G_i S_0^T k_i

and o_i = G_i S_0^T q_i + sum_{j<=i} (G_i / G_j) (q_i . k_j) u_j, so the sequential part
is one small matmul step per chunk; the cost is linear in the sequence length. On
CUDA the flash-linear-attention package's Triton kernels (`backend: fla`) do the same.
fla 0.6 refuses its backward on Hopper GPUs with Triton 3.4 to 3.7.0 (wrong gradients,
its issue 640) unless tilelang is installed; there `auto` trains on the chunked
reference (compiled with the blocks) and keeps fla for forward-only work.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import StateCache
from .config import AttentionConfig, NormConfig
from .registry import ATTENTION, RecipeError

L2_EPS = 1e-6  # inside the square root, as transformers and fla normalise q and k


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale: float, initial_state=None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference: one token at a time. q, k: (B, T, H, Dk), v: (B, T, H, Dv), g, beta:
    (B, T, H), H the value heads; returns o (B, T, H, Dv) and the final state (B, H, Dk, Dv),
    in float32 (float64 if q is)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    B, T, H, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(out, dim=1), S


def chunk_gated_delta_rule(q, k, v, g, beta, scale: float, chunk_size: int = 64, initial_state=None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same as `recurrent_gated_delta_rule`, chunk by chunk (see the module notes).
    Any length: the last chunk is padded with tokens that neither decay nor write."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    # (B, H, T, D) and (B, H, T), padded; then (B, H, N, C, D) and (B, H, N, C)
    q, k, v = (F.pad(t.transpose(1, 2).to(dtype), (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t.transpose(1, 2).to(dtype), (0, pad)) for t in (g, beta))
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)
    q = q * scale

    G = g.cumsum(dim=-1)  # log of the decay from the chunk's start to token i, inclusive
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # G_i / G_j for j <= i (masked before exp: above the diagonal the exponent is positive)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    strictly_lower = lower.tril(-1)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strictly_lower, 0.0)
    system = A + torch.eye(C, dtype=dtype, device=q.device)
    u_v = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_from_start = q * G.exp()[..., None]  # reads S_0 decayed to token i
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # writes decayed to the chunk's end
    chunk_decay = G[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)

    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dtype)
    out = []
    for n in range(N):
        u = u_v[:, :, n] - w[:, :, n] @ S
        out.append(q_from_start[:, :, n] @ S + attn[:, :, n] @ u)
        S = S * chunk_decay[:, :, n] + k_to_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2), S


@functools.lru_cache(maxsize=1)
def fla_chunk_gated_delta_rule():
    """fla's chunked Triton kernel, or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:  # ImportError, or a Triton / CUDA mismatch at import
        return None
    return fla_chunk


@functools.lru_cache(maxsize=1)
def fla_backward_refused() -> bool:
    """True where fla's gated chunk backward refuses to run: Hopper GPUs with Triton >= 3.4
    and < 3.7.1 and no tilelang (fla's own guard, read from fla's own flags). False when
    fla is absent or its flags are not where fla 0.6 keeps them (then fla decides)."""
    if fla_chunk_gated_delta_rule() is None:
        return False
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    try:
        import tilelang  # noqa: F401  (fla's other backend, which has no such bug)
        return False
    except ImportError:
        pass
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


FLA_BACKWARD_REFUSED = ("flash-linear-attention refuses its backward on this GPU (Hopper with Triton >= 3.4 and "
                        "< 3.7.1 gives wrong gradients, fla issue 640)")


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(gate): the weight starts at 1
    (not zero-centred), applied to the normalised values cast back to the input dtype;
    the gate in float32 (transformers' Qwen3-Next order of casts)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(dtype) * F.silu(gate.float())).to(dtype)


@ATTENTION.register("gated_deltanet")
class GatedDeltaNet(nn.Module):
    """One gated DeltaNet layer; sizes from `model.attention.linear`. It has no RoPE and
    no window: the convolution and the decaying state carry the order of the tokens."""

    def __init__(self, d_model: int, cfg: AttentionConfig, norm: NormConfig, window: Optional[int], rope=None):
        super().__init__()
        lin = cfg.linear
        self.n_k, self.n_v, self.dk, self.dv = lin.n_k_heads, lin.n_v_heads, lin.k_head_dim, lin.v_head_dim
        self.chunk_size, self.backend = lin.chunk_size, lin.backend
        # looked up once here, not per call: compiled blocks then read attributes
        self._fla = fla_chunk_gated_delta_rule() if self.backend != "torch" else None
        self._fla_no_backward = self._fla is not None and fla_backward_refused()
        if self.backend == "fla" and self._fla is None:
            raise RecipeError("model.attention.linear.backend = 'fla' needs flash-linear-attention "
                              "(pip install 'moelab[fla]' on a CUDA machine); use backend 'auto' or 'torch'.")
        key_dim, value_dim = self.n_k * self.dk, self.n_v * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(d_model, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(d_model, value_dim, bias=False)
        self.in_proj_b = nn.Linear(d_model, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(d_model, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, lin.conv_kernel, groups=self.conv_dim, bias=False,
                                padding=lin.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = GatedRMSNorm(self.dv, norm.eps)
        self.out_proj = nn.Linear(value_dim, d_model, bias=False)  # a residual output (init_std scaled)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Decay rates A = exp(A_log) spread over [1, 16] (transformers: [0.01, 16]; a rate
        near 0 never forgets), dt_bias 1, the convolution's own default, gate norm 1. The
        linear layers are initialised as modules of their own."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        self.dt_bias.fill_(1.0)
        self.conv1d.reset_parameters()
        self.norm.weight.fill_(1.0)

    def block_mask(self, T: int, device, doc_ids=None):
        if doc_ids is not None:
            raise ValueError("gated_deltanet layers carry their state across document boundaries (no per-document "
                             "reset is built); turn train.document_mask off.")
        return None

    def new_cache(self, capacity: int) -> StateCache:
        """Decoding keeps this layer's convolution inputs and recurrent state (arch/cache.py)."""
        return StateCache(capacity, self.conv1d.kernel_size[0] - 1)

    def forward(self, x: torch.Tensor, rope=None, block_mask=None, cache=None) -> torch.Tensor:
        """`cache`: this layer's StateCache when decoding (x: the new tokens)."""
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # (B, channels, T) for the convolution
        w = self.conv1d.weight
        if cache is None:
            qkv = F.conv1d(qkv.to(w.dtype), w, padding=self.conv1d.padding[0], groups=self.conv_dim)[..., :T]
        else:  # the cached inputs stand in for the padding
            qkv = F.conv1d(cache.conv_inputs(qkv).to(w.dtype), w, groups=self.conv_dim)
        qkv = F.silu(qkv).to(x.dtype).transpose(1, 2)
        q, k, v = qkv.split([self.n_k * self.dk, self.n_k * self.dk, self.n_v * self.dv], dim=-1)
        q, k = q.reshape(B, T, self.n_k, self.dk), k.reshape(B, T, self.n_k, self.dk)
        v = v.reshape(B, T, self.n_v, self.dv)
        beta = torch.sigmoid(self.in_proj_b(x))
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if self.n_v != self.n_k:  # each key head serves a run of consecutive value heads
            q, k = (t.repeat_interleave(self.n_v // self.n_k, dim=2) for t in (q, k))
        o = self._delta_rule(q, k, v, g, beta) if cache is None else self._delta_rule_cached(q, k, v, g, beta, cache)
        o = o.to(x.dtype)
        z = self.in_proj_z(x).reshape(B, T, self.n_v, self.dv)
        return self.out_proj(self.norm(o, z).reshape(B, T, -1))

    def _delta_rule(self, q, k, v, g, beta) -> torch.Tensor:
        """fla's kernel (CUDA, bf16/fp16 inputs: it refuses float32) or the chunked reference.
        fla gets q and k already expanded to the value heads, which every fla version takes."""
        scale = self.dk ** -0.5
        dtype = q.dtype  # under bf16-mixed the residual stream, and so q, k and v, are float32
        if q.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        half = dtype in (torch.bfloat16, torch.float16)
        fla = self._fla if q.is_cuda and half else None
        if fla is not None and self._fla_no_backward and torch.is_grad_enabled():
            if self.backend == "fla":
                raise ValueError(f"model.attention.linear.backend = 'fla': {FLA_BACKWARD_REFUSED}; train with "
                                 "backend 'auto' (the chunked reference, compiled) or upgrade Triton to >= 3.7.1 "
                                 "or install tilelang.")
            fla = None  # auto: train on the reference; fla still serves eval and generate
        if fla is not None:
            q, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))
            o, _ = fla(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True)
            return o
        if self.backend == "fla":
            raise ValueError("model.attention.linear.backend = 'fla' runs on CUDA in bf16 or fp16 only (got "
                             f"{dtype} on {q.device.type}); use backend 'auto' or 'torch' here.")
        # float32 throughout: under autocast the rule's matmuls would otherwise run in bf16,
        # and the decays and the triangular solve compound that rounding over the sequence
        with torch.autocast(q.device.type, enabled=False):
            q, k = l2norm(q.float()), l2norm(k.float())
            return chunk_gated_delta_rule(q, k, v, g, beta, scale, self.chunk_size)[0]

    def _delta_rule_cached(self, q, k, v, g, beta, cache: StateCache) -> torch.Tensor:
        """The reference paths from the cached state: token by token for a decoding step,
        chunked for a prompt chunk; the final state goes back into the cache."""
        scale = self.dk ** -0.5
        with torch.autocast(q.device.type, enabled=False):  # float32, as in _delta_rule
            q, k = l2norm(q.float()), l2norm(k.float())
            if q.shape[1] < self.chunk_size:
                o, cache.state = recurrent_gated_delta_rule(q, k, v, g, beta, scale, cache.state)
            else:
                o, cache.state = chunk_gated_delta_rule(q, k, v, g, beta, scale, self.chunk_size, cache.state)
        cache.pos += q.shape[1]
        return o

    def extra_repr(self) -> str:
        return (f"k_heads={self.n_k}x{self.dk}, v_heads={self.n_v}x{self.dv}, conv={self.conv1d.kernel_size[0]}, "
                f"chunk={self.chunk_size}, backend={self.backend}")
