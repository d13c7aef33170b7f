"""Size and cost of a model from its resolved config, with nothing allocated.

Conventions (those of the Qwen3 and Gemma 3 reports and model cards):
- embedding = the input embedding; an untied head is counted apart ("head");
  non-embedding = total - embedding - untied head.
- active = what one token touches: everything but the experts it was not routed to
  (embedding and head included, as Qwen counts "activated").
- training FLOPs per token = 6 x active matmul parameters (the head included, the
  embedding gather and norms not) + causal attention: 12 x heads x head_dim x the mean
  number of keys a query sees (a sliding window caps it at its window).
- multi-token prediction modules (model.mtp) are training-only: their parameters are
  counted apart ("mtp", in no other figure, as DeepSeek-V3's 671B leaves out its 14B),
  their FLOPs are in the training FLOPs per token.
- KV cache: 2 (k and v) x kv_heads x head_dim x bytes per layer per token; a
  sliding-window layer holds at most `window` tokens.
- gated DeltaNet layers (arch/linear_attention.py) hold no KV cache but a state of
  fixed size per sequence: n_v_heads x k_head_dim x v_head_dim in float32 (as
  transformers and fla keep it) plus the convolution's last conv_kernel - 1 inputs
  (at the KV cache's bytes per element); `kv_bytes_at_context` includes it. Their
  attention FLOPs are those of the recurrent form, linear in the context: per token and
  value head, reading the state, writing it and reading it out (3 x k_head_dim x
  v_head_dim multiply-adds), plus the depthwise convolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .config import ModelConfig
from .ffn import ffn_params
from .resolve import layer_specs

BLOCK_NORMS = {"pre": 2, "sandwich": 4, "post": 2}


def mean_keys(seq_len: int, window: Optional[int]) -> float:
    """Mean over queries 0..T-1 of the number of keys each sees (causal, windowed)."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    W = window  # queries 0..W-1 see i+1 keys, the rest see W
    return (W * (W + 1) / 2 + (T - W) * W) / T


@dataclass
class Accounting:
    params_total: int
    params_active: int
    params_embedding: int
    params_head: int  # 0 when tied
    params_non_embedding: int
    params_attention: int
    params_ffn_dense: int
    params_experts: int  # all routed experts of all layers
    params_shared_experts: int
    params_router: int
    params_norms: int
    params_mtp: int  # multi-token prediction modules, in no other figure
    matmul_params_active: int
    flops_per_token: float  # training (fwd + bwd) at seq_len
    flops_per_token_forward: float
    attention_flops_per_token: float  # training, included in flops_per_token
    seq_len: int
    kv_bytes_per_token: int  # every layer holding the token, at `kv_bytes_per_element`
    kv_bytes_at_context: int  # one sequence of `context` tokens, windows applied
    context: int
    kv_bytes_per_element: int
    n_layers: int
    n_moe_layers: int
    n_linear_layers: int = 0  # gated DeltaNet layers
    linear_state_bytes: int = 0  # their recurrent + convolution state for one sequence, in kv_bytes_at_context
    layer_kinds: List[str] = field(default_factory=list)
    layer_moe: List[bool] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return asdict(self)


def _linear_attention_params(cfg: ModelConfig):
    """(matmul params, all params, norm params, multiply-adds per token outside the
    matmuls, state elements per sequence (recurrent, convolution)) of one gated DeltaNet layer."""
    lin, d = cfg.attention.linear, cfg.d_model
    key, value = lin.n_k_heads * lin.k_head_dim, lin.n_v_heads * lin.v_head_dim
    conv = 2 * key + value
    mm = d * conv + d * value + 2 * d * lin.n_v_heads + value * d  # qkv, z, b and a, o_proj
    params = mm + conv * lin.conv_kernel + 2 * lin.n_v_heads  # + conv taps, A_log, dt_bias
    rule = 3 * lin.n_v_heads * lin.k_head_dim * lin.v_head_dim + conv * lin.conv_kernel
    return mm, params, lin.v_head_dim, rule, (lin.n_v_heads * lin.k_head_dim * lin.v_head_dim,
                                              conv * (lin.conv_kernel - 1))


def _attention_params(cfg: ModelConfig):
    """(matmul params, all params, norm params, value width, KV-cache elements per
    token) of one layer's attention."""
    a, d = cfg.attention, cfg.d_model
    if a.kind == "mla":  # the latent norms count as norms
        H, qk = a.n_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        q_mm = d * H * qk if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank * H * qk
        mm = q_mm + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) \
            + H * a.v_head_dim * d
        bias = ((a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim + d) if a.bias else 0
        norms = (a.q_lora_rank or 0) + a.kv_lora_rank
        # the cache holds the latent and the shared rotary key (DeepSeek-V2's point)
        return mm, mm + bias, norms, a.v_head_dim, a.kv_lora_rank + a.qk_rope_head_dim
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    mm = d * q_out * (2 if a.output_gate else 1) + 2 * d * kv_out + q_out * d
    q_bias = q_out * (2 if a.output_gate else 1)
    params = mm + (q_bias + 2 * kv_out + d if a.bias else 0) + (a.n_heads if a.sinks else 0)
    norms = 0
    if a.qk_norm:  # one weight per normalised channel: a head's, or every head's
        norms = 2 * a.head_dim if a.qk_norm_scope == "head" else (a.n_heads + a.n_kv_heads) * a.head_dim
    return mm, params, norms, a.head_dim, 2 * a.n_kv_heads * a.head_dim


def count(cfg: ModelConfig, seq_len: Optional[int] = None, context: Optional[int] = None,
          kv_bytes_per_element: int = 2) -> Accounting:
    """`cfg` must be resolved (arch.resolve.resolve_model)."""
    seq_len = seq_len or cfg.max_seq_len
    context = context or cfg.max_seq_len
    a, m, d = cfg.attention, cfg.moe, cfg.d_model
    specs = layer_specs(cfg)

    attn_mm, attn, qk_norm, v_dim, kv_elements = _attention_params(cfg)
    lin_mm, lin, lin_norm, lin_rule, (lin_state, lin_conv) = _linear_attention_params(cfg)
    linear = [s.attention == "gated_deltanet" for s in specs]
    n_linear = sum(linear)
    n_full = len(specs) - n_linear
    block_norms = BLOCK_NORMS[cfg.norm_placement] * d
    dense_ffn = ffn_params(d, cfg.ffn.d_ff, cfg.ffn.kind, cfg.ffn.bias) if cfg.ffn.d_ff else 0
    dense_ffn_mm = ffn_params(d, cfg.ffn.d_ff, cfg.ffn.kind) if cfg.ffn.d_ff else 0
    expert = ffn_params(d, m.d_expert, m.expert_ffn, m.expert_bias) if m.n_experts else 0
    shared = m.n_shared_experts * ffn_params(d, m.d_shared, m.expert_ffn) if m.n_experts else 0
    shared_gate = d if (m.n_shared_experts and m.shared_gate) else 0
    router_mm = d * m.n_experts
    router = router_mm + (m.n_experts if m.router.bias else 0)

    n_moe = sum(s.moe for s in specs)
    n_dense = len(specs) - n_moe
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    p_experts = n_moe * m.n_experts * expert
    p_shared = n_moe * (shared + shared_gate)
    p_router = n_moe * router
    p_attention = n_full * attn + n_linear * lin
    p_norms = len(specs) * block_norms + n_full * qk_norm + n_linear * lin_norm + d
    total = (embedding + head + p_attention + n_dense * dense_ffn + p_experts + p_shared
             + p_router + p_norms)
    inactive = n_moe * (m.n_experts - m.top_k) * expert
    active = total - inactive

    moe_mm = m.top_k * expert + shared + shared_gate + router_mm
    matmul_active = (cfg.vocab_size * d + n_full * attn_mm + n_linear * lin_mm + n_dense * dense_ffn_mm
                     + n_moe * moe_mm)

    def mixer_flops(spec) -> float:
        """Training FLOPs per token of one layer's token mixing outside its projections:
        scores and weighted values (2 FLOPs per multiply-add, x3 for training), or the
        delta rule's state traffic, the same at any length."""
        if spec.attention == "gated_deltanet":
            return 6 * lin_rule
        return 6 * a.n_heads * (a.head_dim + v_dim) * mean_keys(seq_len, spec.window)

    attn_flops = sum(mixer_flops(s) for s in specs)
    flops = 6 * matmul_active + attn_flops

    # MTP: each module is the last layer's block, its norms, eh_proj, and a pass of the head
    last, depth = specs[-1], cfg.mtp.depth
    last_linear = last.attention == "gated_deltanet"
    ffn_last = (m.n_experts * expert + shared + shared_gate + router) if last.moe else dense_ffn
    p_mtp = depth * ((lin + lin_norm if last_linear else attn + qk_norm) + ffn_last + block_norms + 3 * d + 2 * d * d)
    mtp_mm = (cfg.vocab_size * d + 2 * d * d + (lin_mm if last_linear else attn_mm)
              + (moe_mm if last.moe else dense_ffn_mm))
    flops += depth * (6 * mtp_mm + mixer_flops(last))

    kv_layer = kv_elements * kv_bytes_per_element
    state = n_linear * (4 * lin_state + kv_bytes_per_element * lin_conv)
    return Accounting(
        params_total=total,
        params_active=active,
        params_embedding=embedding,
        params_head=head,
        params_non_embedding=total - embedding - head,
        params_attention=p_attention,
        params_ffn_dense=n_dense * dense_ffn,
        params_experts=p_experts,
        params_shared_experts=p_shared,
        params_router=p_router,
        params_norms=p_norms,
        params_mtp=p_mtp,
        matmul_params_active=matmul_active,
        flops_per_token=flops,
        flops_per_token_forward=flops / 3,
        attention_flops_per_token=attn_flops,
        seq_len=seq_len,
        kv_bytes_per_token=kv_layer * n_full,
        kv_bytes_at_context=sum(kv_layer * min(context, s.window or context) for s, lin_layer in zip(specs, linear)
                                if not lin_layer) + state,
        context=context,
        kv_bytes_per_element=kv_bytes_per_element,
        n_layers=len(specs),
        n_moe_layers=n_moe,
        n_linear_layers=n_linear,
        linear_state_bytes=state,
        layer_kinds=[s.kind for s in specs],
        layer_moe=[s.moe for s in specs],
    )


# ------------------------------------------------------------------ memory by format

MEMORY_CONTEXT = 32_768  # the context of the memory table (the Gemma 3 report's)


def weight_memory(cfg: ModelConfig) -> Dict[str, int]:
    """Bytes of the weights stored in bf16, int4, int4_b32 and fp8 (arch/quant.py's
    formats, bf16 scales). Every weight matrix is quantized, the embedding, head and
    routers included (what a quantized checkpoint holds, as the Gemma 3 report
    counts); norms, biases and sinks stay bf16. A width not divisible by 32 pays a
    scale for its partial block. Built on the meta device: nothing allocated. The
    caller must have registered the MoE layer (import experts) for an MoE recipe."""
    import torch

    from .block import Block
    from .quant import EXTRA_KINDS, STORAGE, quant_targets, weight_bytes

    # blocks differ in their weights only by MoE or dense and by their mixer: one block of each kind is
    # built (on meta), so the cost stays linear in nothing but the recipe's size
    specs = layer_specs(cfg)
    shapes: List[tuple] = [(cfg.vocab_size, cfg.d_model)] * (1 if cfg.tie_embeddings else 2)
    rest = cfg.d_model  # the final norm
    for moe, mixer in dict.fromkeys((s.moe, s.attention) for s in specs):
        n = sum(s.moe == moe and s.attention == mixer for s in specs)
        with torch.device("meta"):
            block = Block(cfg, next(s for s in specs if s.moe == moe and s.attention == mixer))
        matrices = {id(getattr(m, w)): getattr(m, w) for _, m, names in quant_targets(block, EXTRA_KINDS)
                    for w in names}
        shapes += [tuple(p.shape) for p in matrices.values()] * n
        rest += n * sum(p.numel() for p in block.parameters() if id(p) not in matrices)
    return {fmt: 2 * rest + sum(weight_bytes(shape, fmt) for shape in shapes) for fmt in STORAGE}


def memory_table(cfg: ModelConfig, context: int = MEMORY_CONTEXT) -> Dict[str, Dict[str, int]]:
    """Per format: weights, weights + a bf16 KV cache of one `context`-token sequence
    with the sliding windows honoured, and the same with every layer global."""
    acc = count(cfg, context=context)
    windowed, every_global = acc.kv_bytes_at_context, acc.kv_bytes_per_token * context + acc.linear_state_bytes
    return {fmt: {"weights": w, "with_kv": w + windowed, "with_kv_all_global": w + every_global}
            for fmt, w in weight_memory(cfg).items()}
