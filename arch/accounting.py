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
- Gemma 4: each layer with its own head_dim and KV heads; keys = values drops v_proj
  but not the cached values (normed differently from the keys); a KV-sharing layer
  (model.kv_shared_layers) has no k/v projections and holds no cache; the per-layer
  input table (model.per_layer_input) is embedding, its projections are matmuls.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .config import LayerSpec, ModelConfig
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
    params_per_layer_embedding: int = 0  # the per-layer input table, part of params_embedding

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


def _attention_params(cfg: ModelConfig, spec: Optional[LayerSpec] = None):
    """(matmul params, all params, norm params, value width, KV-cache elements per
    token) of one layer's attention; `spec` gives the layer's own head width and KV
    heads, keys = values (no v_proj) and KV sharing (no k/v projections, no cache)."""
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
    hd = spec.head_dim if spec is not None and spec.head_dim else a.head_dim
    n_kv = spec.n_kv_heads if spec is not None and spec.n_kv_heads else a.n_kv_heads
    shared = spec is not None and spec.kv_source is not None
    # projections that exist: k and v, k alone (keys = values), none (KV sharing)
    n_kv_proj = 0 if shared else (1 if spec is not None and spec.k_eq_v else 2)
    q_out, kv_out = a.n_heads * hd, n_kv * hd
    q_proj = q_out * (2 if a.output_gate else 1)  # output_gate: q_proj also gives the gate
    mm = d * q_proj + n_kv_proj * d * kv_out + q_out * d
    params = mm + (q_proj + n_kv_proj * kv_out + d if a.bias else 0) + (a.n_heads if a.sinks else 0)
    norms = 0
    if a.qk_norm:  # one weight per normalised channel: a head's, or every head's
        q_norm = hd if a.qk_norm_scope == "head" else a.n_heads * hd
        k_norm = hd if a.qk_norm_scope == "head" else n_kv * hd
        norms = q_norm + (0 if shared else k_norm)
    # keys = values still caches both: the keys are normed and rotated, the values not
    return mm, params, norms, hd, 0 if shared else 2 * n_kv * hd


def _router_params(cfg: ModelConfig) -> int:
    """The router's parameters beyond its linear layer: normed_softmax_topk's per-channel
    and per-expert scales, a bias."""
    m = cfg.moe
    extra = cfg.d_model + m.n_experts if m.router.kind == "normed_softmax_topk" else 0
    return extra + (m.n_experts if m.router.bias else 0)


def count(cfg: ModelConfig, seq_len: Optional[int] = None, context: Optional[int] = None,
          kv_bytes_per_element: int = 2) -> Accounting:
    """`cfg` must be resolved (arch.resolve.resolve_model)."""
    seq_len = seq_len or cfg.max_seq_len
    context = context or cfg.max_seq_len
    a, m, d = cfg.attention, cfg.moe, cfg.d_model
    specs = layer_specs(cfg)

    lin_mm, lin, lin_norm, lin_rule, (lin_state, lin_conv) = _linear_attention_params(cfg)
    n_linear = sum(s.attention == "gated_deltanet" for s in specs)

    def mixer_params(spec: LayerSpec):
        """_attention_params of the layer's token mixer: a gated DeltaNet layer's value
        width goes unused (its FLOPs are mixer_flops') and it caches nothing per token."""
        if spec.attention == "gated_deltanet":
            return lin_mm, lin, lin_norm, None, 0
        return _attention_params(cfg, spec)

    block_norms = BLOCK_NORMS[cfg.norm_placement] * d
    # parallel_dense (Gemma 4): the dense FFN beside the experts, the block's pre-FFN norm
    # replaced by the layer's four (pre and post, for each branch)
    parallel = m.kind == "parallel_dense"
    moe_norms = 3 * d if parallel else 0
    expert = ffn_params(d, m.d_expert, m.expert_ffn, m.expert_bias) if m.n_experts else 0
    shared = m.n_shared_experts * ffn_params(d, m.d_shared, m.expert_ffn) if m.n_experts else 0
    shared_gate = d if (m.n_shared_experts and m.shared_gate) else 0
    router_mm = d * m.n_experts
    router = router_mm + _router_params(cfg)
    P = cfg.per_layer_input.dim  # per-layer inputs: gate and projection, a norm per layer
    ple_layer_mm, ple_layer_norm = 2 * d * P, (d if P else 0)

    def dense_ffn(spec: LayerSpec, matmul_only: bool = False) -> int:
        d_ff = spec.d_ff if spec.d_ff is not None else cfg.ffn.d_ff
        return ffn_params(d, d_ff, cfg.ffn.kind, cfg.ffn.bias and not matmul_only) if d_ff else 0

    n_moe = sum(s.moe for s in specs)
    embedding = cfg.vocab_size * d + (P and (cfg.per_layer_input.vocab_size or cfg.vocab_size) * cfg.n_layers * P)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    p_experts = n_moe * m.n_experts * expert
    p_shared = n_moe * (shared + shared_gate)
    p_router = n_moe * router
    attn_by_layer = [mixer_params(s) for s in specs]
    p_attention = sum(x[1] for x in attn_by_layer)
    p_dense = sum(dense_ffn(s) for s in specs if not s.moe or parallel)
    p_ple = (d * cfg.n_layers * P + P) + len(specs) * ple_layer_mm if P else 0  # projection, its norm, the layers'
    p_norms = sum(block_norms + x[2] + ple_layer_norm + (moe_norms if s.moe else 0)
                  for s, x in zip(specs, attn_by_layer)) + d
    total = embedding + head + p_attention + p_dense + p_experts + p_shared + p_router + p_norms + p_ple
    inactive = n_moe * (m.n_experts - m.top_k) * expert
    active = total - inactive

    moe_mm = m.top_k * expert + shared + shared_gate + router_mm
    matmul_active = (cfg.vocab_size * d + sum(x[0] for x in attn_by_layer)
                     + sum(dense_ffn(s, True) for s in specs if not s.moe or parallel) + n_moe * moe_mm
                     + (d * cfg.n_layers * P + len(specs) * ple_layer_mm if P else 0))

    def mixer_flops(spec: LayerSpec, x) -> float:
        """Training FLOPs per token of one layer's token mixing outside its projections:
        scores and weighted values (2 FLOPs per multiply-add, x3 for training; a layer's
        query/key width is its value width, but MLA's: head_dim = nope + rope), or the
        delta rule's state traffic, the same at any length."""
        if spec.attention == "gated_deltanet":
            return 6 * lin_rule
        return 6 * a.n_heads * ((a.head_dim if a.kind == "mla" else x[3]) + x[3]) * mean_keys(seq_len, spec.window)

    attn_flops = sum(mixer_flops(s, x) for s, x in zip(specs, attn_by_layer))
    flops = 6 * matmul_active + attn_flops

    # MTP: each module is the last layer's block, its norms, eh_proj, and a pass of the head
    last, depth = specs[-1], cfg.mtp.depth
    attn_mm, attn, qk_norm, _, _ = last_mixer = mixer_params(last)
    beside = last.moe and parallel  # a parallel_dense layer's dense FFN and extra norms
    ffn_last = (m.n_experts * expert + shared + shared_gate + router) if last.moe else dense_ffn(last)
    ffn_last += (dense_ffn(last) + moe_norms) if beside else 0
    p_mtp = depth * (attn + ffn_last + block_norms + qk_norm + 3 * d + 2 * d * d)
    mtp_mm = cfg.vocab_size * d + 2 * d * d + attn_mm + (moe_mm if last.moe else dense_ffn(last, True)) \
        + (dense_ffn(last, True) if beside else 0)
    flops += depth * (6 * mtp_mm + mixer_flops(last, last_mixer))

    kv_layer = [x[4] * kv_bytes_per_element for x in attn_by_layer]
    state = n_linear * (4 * lin_state + kv_bytes_per_element * lin_conv)
    return Accounting(
        params_total=total,
        params_active=active,
        params_embedding=embedding,
        params_head=head,
        params_non_embedding=total - embedding - head,
        params_attention=p_attention,
        params_ffn_dense=p_dense,
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
        kv_bytes_per_token=sum(kv_layer),
        kv_bytes_at_context=sum(b * min(context, s.window or context) for b, s in zip(kv_layer, specs)) + state,
        context=context,
        kv_bytes_per_element=kv_bytes_per_element,
        n_layers=len(specs),
        n_moe_layers=n_moe,
        n_linear_layers=n_linear,
        linear_state_bytes=state,
        layer_kinds=[s.kind for s in specs],
        layer_moe=[s.moe for s in specs],
        params_per_layer_embedding=embedding - cfg.vocab_size * d,
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

    # one block of each kind (below) is built (on meta), so the cost stays linear in
    # nothing but the recipe's size
    specs = layer_specs(cfg)
    shapes: List[tuple] = [(cfg.vocab_size, cfg.d_model)] * (1 if cfg.tie_embeddings else 2)
    rest = cfg.d_model  # the final norm
    P = cfg.per_layer_input.dim
    if P:  # the per-layer table and projection are matrices; the projection's norm is not
        shapes += [(cfg.per_layer_input.vocab_size or cfg.vocab_size, cfg.n_layers * P), (cfg.n_layers * P, cfg.d_model)]
        rest += P
    # layers differ in their weights by MoE or dense, by their mixer, and (Gemma 4) by
    # head width, KV heads, keys = values, KV sharing and FFN width: one block of each
    def shape_key(s):
        return s.moe, s.attention, s.head_dim, s.n_kv_heads, s.k_eq_v, s.kv_source is None, s.d_ff

    for key in dict.fromkeys(shape_key(s) for s in specs):
        n = sum(shape_key(s) == key for s in specs)
        with torch.device("meta"):
            block = Block(cfg, next(s for s in specs if shape_key(s) == key))
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
