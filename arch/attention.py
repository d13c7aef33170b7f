"""Multi-head attention with grouped KV heads (MHA / GQA / MQA).

Every variant is a field, not a class: QK-norm (per head, or over the whole projection
as OLMoE does), explicit head_dim, a softmax scale
from query_pre_attn_scalar, a sliding window, tanh soft-capping of the logits.

A sliding-window layer with window W lets query i see keys j with i - W < j <= i:

    W = 3      keys ->
    q0  x . . . .
    q1  x x . . .
    q2  x x x . .
    q3  . x x x .
    q4  . . x x x
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .config import AttentionConfig, NormConfig
from .documents import document_block_mask, document_mask
from .norm import build_norm, rms_normalize
from .registry import ATTENTION
from .rope import apply_rope


def causal_mask(T: int, window: Optional[int], device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


def eager_attention(q, k, v, scale: float, window: Optional[int], softcap: Optional[float],
                    sinks: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
    """The obviously correct path: explicit scores, float32 softmax. q: (B,H,T,D).
    `sinks` (H,): one more logit per head in each row's softmax, whose share of the
    attention goes nowhere (gpt-oss). `mask` (T, S) or (B, 1, T, S): what each query may
    see, in place of the causal (and window) mask of a square (decoding with a KV cache,
    or documents of a packed sequence: arch/documents.py)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        mask = causal_mask(q.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return scores.softmax(dim=-1).to(v.dtype) @ v
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def sdpa_attention(q, k, v, scale: float, window: Optional[int]):
    if window is None or window >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = causal_mask(q.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


FLEX_MIN_HEAD_DIM = 16  # smallest head_dim CUDA flex_attention compiles for


@functools.lru_cache(maxsize=32)
def _block_mask(T: int, window: Optional[int], device: str):
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        return allowed & (q_idx - kv_idx < window) if window is not None else allowed

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


# flex_attention's tiles on an H100 (compute capability 9.0), bf16/fp16 operands, by the
# largest head size they serve; torch's own defaults elsewhere. From a sweep of
# Inductor's fwd_/bwd_ kernel options at Gemma 3 shapes on one H100 (torch 2.11,
# benchmarks/results/flex_tiles_h100.md): at head_dim 256 the backward runs 23% faster
# and the forward ~30% (a Gemma 3 proxy at head_dim 256 trains 10% faster:
# issue18_rows_h100.md); at 128 the backward ~12% (W3 end to end: within noise). Larger
# tiles fail for want of shared memory; float32 operands (twice the bytes) keep the defaults.
FLEX_TILES_SM90 = (
    (128, dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=2,
               bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
               bwd_num_warps=8, bwd_num_stages=2)),
    (256, dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8, fwd_num_stages=2,
               bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
               bwd_num_warps=8, bwd_num_stages=2)),
)


def flex_kernel_options(head_dim: int, dtype: torch.dtype, capability: Optional[Tuple[int, int]], q_len: int):
    """The tuned flex tiles for `q_len` queries of `head_dim` and `dtype` on a GPU of
    compute `capability`, or None (Inductor's defaults): only H100-class GPUs (9.0), in
    16-bit precision, for head sizes above 64 (the default tiles are right below) and
    at least 128 queries (fewer take Inductor's decoding kernel, not swept)."""
    if capability != (9, 0) or dtype not in (torch.bfloat16, torch.float16) or head_dim <= 64 or q_len < 128:
        return None
    for largest, options in FLEX_TILES_SM90:
        if head_dim <= largest:
            return dict(options)
    return None


_CAPABILITY: dict = {}  # CUDA device index -> compute capability


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    """The compute capability of a CUDA `device`, read once and remembered. Called outside
    compiled code (Attention.block_mask, the eager flex path), so that compiled blocks
    find it in _CAPABILITY: Dynamo reads a dict, it does not trace the CUDA query."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_attn(q, k, v, scale: float, window: Optional[int], softcap: Optional[float], block_mask=None,
              sinks: Optional[torch.Tensor] = None):
    """flex_attention with a block-sparse causal/window mask: a local layer costs what
    its window costs (SDPA with a dense boolean mask pays for the whole square).

    `block_mask`: the mask for (T, window), built outside any compiled region by
    `Attention.block_mask` (the model does this once per forward); None builds it
    here, which inside a compiled block happens on every call (Dynamo does not keep
    the lru_cache)."""
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
    # flex_attention must be compiled to be fast on CUDA; inside a compiled block the
    # outer compile already traces it, and CPU flex runs eagerly
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    if block_mask is None:
        block_mask = _block_mask(q.shape[2], window, str(q.device))
    options = None
    if q.is_cuda:  # compiling, a capability not yet read means Inductor's default tiles
        capability = _CAPABILITY.get(q.device.index) if torch.compiler.is_compiling() else cuda_capability(q.device)
        options = flex_kernel_options(max(q.shape[-1], v.shape[-1]), q.dtype, capability, q.shape[2])
    if sinks is None:
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True,
                  kernel_options=options)
    # a sink s joins each row's softmax: p_j e^lse / (e^lse + e^s) = p_j sigmoid(lse - s)
    out, lse = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True,
                  kernel_options=options)
    return out * torch.sigmoid(lse - sinks.float().view(1, -1, 1))[..., None].to(out.dtype)


@ATTENTION.register("gqa")
class Attention(nn.Module):
    """Head counts are read from tensor shapes in forward, so sharding the projections
    over heads never needs a mutated config."""

    def __init__(self, d_model: int, cfg: AttentionConfig, norm: NormConfig, window: Optional[int], rope=None,
                 k_eq_v: bool = False, kv_shared: bool = False):
        """`k_eq_v`: no v_proj, the values are the key projection (Gemma 4 global
        layers). `kv_shared`: no key/value projections at all, forward takes another
        layer's keys and values (model.kv_shared_layers)."""
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.window = window
        self.softcap = cfg.softcap
        # auto: SDPA (flash) for plain causal layers; on CUDA flex_attention for windowed
        # or soft-capped layers; on CPU the SDPA mask / eager reference for those.
        self.impl = cfg.impl
        self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        # output_gate: q_proj gives each head [query, gate] side by side (Qwen3-Next's layout)
        self.output_gate = cfg.output_gate
        self.q_proj = nn.Linear(d_model, cfg.n_heads * hd * (2 if cfg.output_gate else 1), bias=cfg.bias)
        self.kv_shared = kv_shared
        self.k_proj = None if kv_shared else nn.Linear(d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.v_proj = None if kv_shared or k_eq_v else nn.Linear(d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.v_norm_eps = norm.eps if cfg.v_norm else None
        self.o_proj = nn.Linear(cfg.n_heads * hd, d_model, bias=cfg.bias)
        # per head: one norm over head_dim shared by the heads; all_heads: one over the
        # whole projection (n_heads * head_dim channels for q, n_kv_heads * head_dim for k)
        self.qk_norm_all_heads = cfg.qk_norm and cfg.qk_norm_scope == "all_heads"
        q_width, k_width = (cfg.n_heads * hd, cfg.n_kv_heads * hd) if self.qk_norm_all_heads else (hd, hd)
        self.q_norm = build_norm(q_width, norm) if cfg.qk_norm else nn.Identity()
        self.k_norm = build_norm(k_width, norm) if cfg.qk_norm and not kv_shared else nn.Identity()
        # attention sinks: only the eager path adds them to the softmax
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.sinks else None

    def init_weights(self, std: float, out_std: float) -> None:
        """The sinks start at 0 (a sink as likely as a key of score 0); the
        projections and norms are initialised as modules of their own."""
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], block_mask=None,
                cache=None, shared_kv=None, return_kv: bool = False):
        """`block_mask`: what `self.block_mask(T, device[, doc_ids])` returns, when the
        caller built it already (flex layers, or any layer with documents; None
        otherwise or to build a flex layer's plain mask here).
        `cache`: this layer's arch.cache.LayerCache when decoding (x: the new tokens).
        KV sharing: `shared_kv` is what another layer's forward with `return_kv` gave
        beside its output ((k, v), or (k, v, mask) when decoding), attended over in
        place of keys and values of this layer's own."""
        B, T, _ = x.shape
        q = self.q_proj(x)
        gate = None
        if self.output_gate:
            q, gate = q.view(B, T, -1, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        q = self.q_norm(q).view(B, T, -1, self.head_dim) if self.qk_norm_all_heads else \
            self.q_norm(q.view(B, T, -1, self.head_dim))
        q = apply_rope(q.transpose(1, 2), *rope)
        if shared_kv is None:
            k_raw = self.k_proj(x)
            k = self.k_norm(k_raw).view(B, T, -1, self.head_dim) if self.qk_norm_all_heads else \
                self.k_norm(k_raw.view(B, T, -1, self.head_dim))
            k = apply_rope(k.transpose(1, 2), *rope)
            v = (self.v_proj(x) if self.v_proj is not None else k_raw).view(B, T, -1, self.head_dim)
            if self.v_norm_eps is not None:
                v = rms_normalize(v, self.v_norm_eps)
            v = v.transpose(1, 2)
            if cache is not None:
                shared_kv = cache.update(k, v)  # (keys, values, mask) over the whole cache
        if cache is not None:
            y = self._attend_masked(q, *shared_kv)
        else:
            if shared_kv is not None:
                k, v = shared_kv
            y = self._attend(q, k, v, block_mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        out = self.o_proj(y if gate is None else y * torch.sigmoid(gate))
        if return_kv:
            return out, (shared_kv if shared_kv is not None else (k, v))
        return out

    def _impl(self, T: int, is_cuda: bool, documents: bool = False) -> str:
        """The path a sequence of length T takes: the configured impl, or auto's pick.
        CUDA flex_attention needs head_dim >= 16 (Inductor's kernel): auto falls back
        below that, an explicit flex says so. `documents` (a document mask): auto takes
        flex on CUDA, which skips the other documents' blocks (SDPA would take a dense
        mask and leave flash attention)."""
        flex_ok = not is_cuda or self.head_dim >= FLEX_MIN_HEAD_DIM
        if self.sinks is not None:  # SDPA has no softmax term without a key; flex adds it through its lse
            if self.impl == "sdpa":
                raise ValueError("model.attention.impl = 'sdpa' cannot add attention sinks; use impl 'auto', "
                                 "'flex' or 'eager' with model.attention.sinks.")
            if self.impl == "flex" and not flex_ok:
                raise ValueError(f"model.attention.impl = 'flex' needs head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA "
                                 f"(got {self.head_dim}); use impl 'auto' or 'eager'.")
            # flex's backward runs on CUDA only
            return "flex" if self.impl == "flex" or (self.impl == "auto" and is_cuda and flex_ok) else "eager"
        if self.impl == "flex" and not flex_ok:
            raise ValueError(f"model.attention.impl = 'flex' needs head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA "
                             f"(got {self.head_dim}); use impl 'auto' or 'sdpa'.")
        if self.impl != "auto":
            return self.impl
        windowed = self.window is not None and self.window < T
        if is_cuda and flex_ok and (windowed or self.softcap is not None or documents):
            return "flex"
        return "eager" if self.softcap is not None else "sdpa"

    def block_mask(self, T: int, device: torch.device, doc_ids: Optional[torch.Tensor] = None):
        """The mask this layer needs for length T; call it outside compiled code.
        Without `doc_ids`: the flex block mask (cached per (T, window, device)), or None
        when the layer does not use flex. With `doc_ids` (B, T) (arch/documents.py): a
        flex block mask of the documents, or a boolean (B, 1, T, T) mask for the SDPA
        and eager paths."""
        device = torch.device(device)
        flex = self._impl(T, device.type == "cuda", documents=doc_ids is not None) == "flex"
        if flex and device.type == "cuda":
            cuda_capability(device)  # for flex_attn's tiles inside the compiled blocks
        if doc_ids is None:
            return _block_mask(T, self.window, str(device)) if flex else None
        return document_block_mask(doc_ids, self.window) if flex else document_mask(doc_ids, self.window)

    def _attend(self, q, k, v, block_mask=None):
        if isinstance(block_mask, torch.Tensor):  # documents, on the SDPA or eager path
            if self.impl == "eager" or self.softcap is not None or self.sinks is not None:
                return eager_attention(q, k, v, self.scale, self.window, self.softcap, self.sinks, mask=block_mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, scale=self.scale, enable_gqa=True)
        # a block mask comes only for flex (a document mask may choose flex where the
        # plain layer would not)
        impl = "flex" if block_mask is not None else self._impl(q.shape[2], q.is_cuda)
        if impl == "flex":
            return flex_attn(q, k, v, self.scale, self.window, self.softcap, block_mask, self.sinks)
        if impl == "eager" or self.softcap is not None:
            return eager_attention(q, k, v, self.scale, self.window, self.softcap, self.sinks)
        return sdpa_attention(q, k, v, self.scale, self.window)

    def _attend_cached(self, q, k, v, cache):
        """Append k, v to the layer's cache and attend over all it holds."""
        return self._attend_masked(q, *cache.update(k, v))

    def _attend_masked(self, q, k, v, mask):
        """The new queries over the cached and new keys, masked by position (the cache
        builds the mask). Eager for sinks or a soft-cap (or when asked), else SDPA; flex
        is not used here: a decoding step is one query row."""
        if self.sinks is not None or self.softcap is not None or self.impl == "eager":
            return eager_attention(q, k, v, self.scale, None, self.softcap, self.sinks, mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, window={self.window}, scale={self.scale:.5g}"


