"""The recipe schema: one small dataclass per component, plain types only.

A recipe YAML is merged into `Recipe` by OmegaConf (see arch/recipe.py), so every
key and type here is checked at load time. Derived values (head_dim, kv heads, the
per-layer table) are filled by `arch.resolve.resolve_model`, never stored by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


# --------------------------------------------------------------------------- model


@dataclass
class NormConfig:
    """RMSNorm flavour, shared by the block norms, the final norm and QK-norm."""

    kind: str = "rmsnorm"
    eps: float = 1e-6
    # Gemma: weight initialised at 0 and applied as (1 + w).
    zero_centered: bool = False
    # Gemma multiplies by the weight in float32 and casts once at the end; Qwen/Llama
    # cast the normalised activations back to the input dtype and then multiply.
    weight_in_float32: bool = False


@dataclass
class RopeConfig:
    theta: float = 10_000.0
    # none | linear (positional interpolation: positions / factor) | yarn (YaRN: each
    # frequency interpolated by factor, extrapolated, or ramped between the two by how
    # many turns it makes over original_max_seq_len; cos and sin scaled by an
    # attention factor)
    scaling: str = "none"
    factor: float = 1.0
    # YaRN only (Qwen3 long context, DeepSeek-V3, gpt-oss): the context trained before
    # scaling (null: model.max_seq_len), the ramp's ends in turns, and the attention
    # factor (null: 0.1 ln(factor) + 1, or DeepSeek's ratio from mscale / mscale_all_dim)
    original_max_seq_len: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True  # round the ramp's ends to whole dimensions (gpt-oss: false)
    # the fraction of head_dim that rotates (the first dimensions; the rest pass through)
    partial: float = 1.0
    # Gemma 4's "proportional" partial RoPE: the rotated pairs spread over the whole
    # head, (i, i + head_dim / 2) for the first partial x head_dim / 2 values of i, at
    # frequencies theta^(-2i / head_dim) (over the full head_dim, not the rotated part);
    # the other pairs pass through (frequency 0). false: the first partial x head_dim
    # dimensions rotate among themselves
    proportional: bool = False


@dataclass
class LayerKindConfig:
    """What differs between the named kinds of layer in `model.layer_pattern`."""

    window: Optional[int] = None  # sliding window in tokens; null = global attention
    rope: RopeConfig = field(default_factory=RopeConfig)
    # this kind's own head width and KV heads (Gemma 4: global layers 512 wide, fewer KV
    # heads); null: model.attention.head_dim / n_kv_heads
    head_dim: Optional[int] = None
    n_kv_heads: Optional[int] = None
    # keys equal values (Gemma 4's attention_k_eq_v, global layers): no v_proj, the
    # values are the key projection's output before the key's norm and RoPE
    k_eq_v: bool = False
    # the token mixer of these layers, an attention registry key (gated_deltanet for the
    # linear layers of Qwen3-Next / Qwen3.5); null: model.attention.kind
    attention: Optional[str] = None


@dataclass
class LinearAttentionConfig:
    """Gated DeltaNet layers (arch/linear_attention.py; Qwen3-Next, Qwen3.5): the sizes
    of their heads, the short convolution, and how the delta rule is computed."""

    n_k_heads: int = 16  # query/key heads (linear_num_key_heads)
    n_v_heads: int = 32  # value heads, a multiple of n_k_heads (each key head serves a group)
    k_head_dim: int = 128
    v_head_dim: int = 128
    conv_kernel: int = 4  # the causal depthwise convolution over q, k and v, in tokens
    # tokens per chunk of the chunked delta rule (the torch path); any length works
    chunk_size: int = 64
    # auto: fla's Triton kernels on CUDA when the package imports, else torch; torch: the
    # chunked PyTorch reference; fla: flash-linear-attention, or an error without it
    backend: str = "auto"


@dataclass
class AttentionConfig:
    kind: str = "gqa"
    n_heads: int = MISSING
    n_kv_heads: Optional[int] = None  # null: n_heads (MHA); 1: MQA
    head_dim: Optional[int] = None  # null: d_model // n_heads
    qk_norm: bool = False  # RMSNorm on q and k, before RoPE
    # what one QK-norm normalises: head (each head's head_dim values; Qwen3, Gemma 3) or
    # all_heads (the whole q / k projection, one weight per channel; OLMoE)
    qk_norm_scope: str = "head"
    bias: bool = False
    # softmax scale = query_pre_attn_scalar ** -0.5 (null: head_dim)
    query_pre_attn_scalar: Optional[float] = None
    softcap: Optional[float] = None  # tanh soft-capping of attention logits
    # a scale-free RMSNorm over each value head (Gemma 4), with model.norm.eps
    v_norm: bool = False
    # attention sinks (gpt-oss): one learned logit per head joins each softmax's
    # denominator, so a head may give less than all of its attention to the keys
    sinks: bool = False
    # kind mla (multi-head latent attention, DeepSeek-V2/V3): q through a low-rank
    # bottleneck (q_lora_rank; null: a full projection), k and v from a kv_lora_rank
    # latent, each head's query/key = qk_nope_head_dim without RoPE + qk_rope_head_dim
    # with it (the rotary key shared by all heads), values of v_head_dim. head_dim is
    # derived (nope + rope) and n_kv_heads = n_heads.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    rope_interleave: bool = False  # the rotary dims in interleaved pairs (DeepSeek's layout)
    latent_norm_eps: float = 1e-6  # the RMSNorms of the q and kv latents
    impl: str = "auto"  # auto | sdpa | flex | eager (the reference); see arch/attention.py
    # a sigmoid gate per head and channel on the attention output, from a second half of
    # q_proj (Qwen3-Next, Qwen3.5: q_proj yields [query, gate] per head)
    output_gate: bool = False
    # the gated_deltanet layers' own sizes (used only by layers of that kind)
    linear: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)


@dataclass
class FFNConfig:
    kind: str = "swiglu"  # swiglu | geglu | gelu
    d_ff: int = MISSING
    bias: bool = False


@dataclass
class RouterConfig:
    # softmax_topk: softmax over all experts, then top-k (Qwen3-MoE, Mixtral);
    # sigmoid_topk: sigmoid per expert, then top-k (DeepSeek-V3);
    # topk_softmax: top-k of the logits, then softmax over those k (gpt-oss);
    # normed_softmax_topk: softmax_topk on a scale-free RMSNorm of the input times a
    # learned per-channel scale and d_model^-0.5, the kept weights then times a learned
    # per-expert scale (Gemma 4)
    kind: str = "softmax_topk"
    renormalize: bool = True  # renormalise the kept top-k weights to sum to 1
    jitter: float = 0.0  # multiplicative input jitter (training only), 0 = off
    bias: bool = False  # a learned bias in the router's linear layer
    # auxiliary-loss-free balancing: per-expert selection bias, updated outside
    # forward by `update_bias()` with this rate; 0 = off
    bias_update_rate: float = 0.0
    scale: float = 1.0  # routed weights are multiplied by this (DeepSeek-V3: 2.5)
    # group-limited routing (DeepSeek-V3): experts form n_group equal groups, each scored
    # by the sum of its 2 best selection scores; only the topk_group best groups compete
    n_group: int = 1
    topk_group: int = 1
    # bf16 input and weight: float32 logits from tensor-core matmuls that
    # accumulate in float32 (the float32 matmul's sums of the same values; backward
    # splits the float32 gradient into two bf16 halves), instead of float32 matmuls
    fast_logits: bool = True


@dataclass
class BalanceConfig:
    """Load-balancing losses; each weighted and logged separately."""

    aux_coef: float = 0.0  # Switch-style f*p loss
    # micro: per layer, per micro-batch; pooled: all layers pooled as HF Qwen3-MoE
    # does; global: Qwen's global-batch loss (frequencies reduced over DP ranks and
    # gradient-accumulation steps)
    aux_scope: str = "micro"
    # global scope with gradient accumulation: where f^G comes from. exact: the whole
    # step's counts, from a routing pre-pass (one extra no-grad forward per step);
    # running: the counts of the step's micro-batches so far, this one included
    # (Megatron-LM's and Qwen's form: no pre-pass, and micro-batch i sees i of them)
    global_counts: str = "exact"
    z_coef: float = 0.0  # router z-loss


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers. n_experts = 0 means the model has none."""

    # moe: routed (+ shared) experts in place of the dense FFN; parallel_dense (Gemma 4):
    # the dense FFN (model.ffn) and the routed experts side by side on the block's
    # input, each with its own pre- and post-norm, summed (the router reads the input
    # itself)
    kind: str = "moe"
    n_experts: int = 0
    top_k: int = 1
    d_expert: int = 0
    expert_ffn: str = "swiglu"  # the experts' own FFN kind (swiglu_clamped: gpt-oss's)
    expert_bias: bool = False  # biases on the experts' projections (gpt-oss)
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    n_shared_experts: int = 0
    d_shared: Optional[int] = None  # null: d_expert
    shared_gate: bool = False  # sigmoid gate on the shared experts' output
    # loop | grouped_mm | triton (fused gather + GLU + combine kernels; CUDA, or
    # TRITON_INTERPRET=1 on CPU; gated expert_ffn kinds only)
    backend: str = "grouped_mm"
    capacity_factor: Optional[float] = None  # null: dropless
    # placement: layer i is MoE iff i >= first_k_dense and (i - first_k_dense) % every == 0
    every: int = 1
    first_k_dense: int = 0


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2; arch/mtp.py): `depth` modules
    after the model, the k-th predicting at position i the token i + k + 1. A training
    objective: the logits and the validation loss are the next-token model's alone."""

    depth: int = 0  # 0: off (DeepSeek-V3: 1)
    # the MTP loss = loss_weight / depth x the sum over depths of their mean
    # cross-entropies (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1)
    loss_weight: float = 0.3


@dataclass
class PerLayerInputConfig:
    """Per-layer input embeddings (Gemma 4's PLE, arch/per_layer.py): every layer gets a
    `dim`-wide input of its own, the sum of a token embedding (one table, n_layers x dim
    wide) and a projection of the model's input embedding; after its FFN the layer adds
    norm(up(act(gate(x)) * input)). 0 = off."""

    dim: int = 0  # Gemma 4's hidden_size_per_layer_input (E2B, E4B: 256)
    vocab_size: Optional[int] = None  # rows of the per-layer table (null: model.vocab_size)


@dataclass
class LayerOverride:
    kind: Optional[str] = None  # a key of model.layer_kinds
    moe: Optional[bool] = None  # force this layer MoE (true) or dense (false)


@dataclass
class ModelConfig:
    d_model: int = MISSING
    n_layers: int = MISSING
    vocab_size: int = MISSING
    max_seq_len: int = 4096  # native context length
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    # pre: x + f(norm(x)); sandwich: x + norm(f(norm(x))) (Gemma 2/3); post: x + norm(f(x))
    norm_placement: str = "pre"
    layer_kinds: Dict[str, LayerKindConfig] = field(
        default_factory=lambda: {"global": LayerKindConfig()}
    )
    layer_pattern: List[str] = field(default_factory=lambda: ["global"])  # cycled
    # layer index -> override, e.g. {0: {moe: false}} (keys may be ints or digit strings)
    layer_overrides: Dict[Any, LayerOverride] = field(default_factory=dict)
    # the last n layers compute no keys and values: each attends over those of the last
    # earlier layer of its kind that does (Gemma 4's num_kv_shared_layers); 0 = off
    kv_shared_layers: int = 0
    # the dense FFN width of those layers, in multiples of ffn.d_ff (Gemma 4's
    # use_double_wide_mlp: 2)
    kv_shared_ffn_mult: int = 1
    per_layer_input: PerLayerInputConfig = field(default_factory=PerLayerInputConfig)
    # a fixed scalar per layer (a buffer, loaded from checkpoints, not trained) that
    # multiplies the block's output (Gemma 4's layer_scalar)
    layer_scalar: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False  # x * sqrt(d_model), the scale cast to the weight dtype
    final_softcap: Optional[float] = None
    # rows per chunk of the fused head + cross-entropy used by training (arch/loss.py);
    # 0 = plain F.linear + F.cross_entropy on the full logits; null = auto: 4096 on
    # CUDA, 0 elsewhere (lit_modules/runtime.py resolve_speed; a model built without
    # it reads null as 0)
    fused_ce_chunk: Optional[int] = None
    # torch.compile each chunk's loss-and-gradient math (one fused kernel in place of
    # the softmax, exp and elementwise passes over the chunk's float32 logits); null =
    # auto: on with CUDA, off elsewhere
    fused_ce_compile: Optional[bool] = None
    init_std: float = 0.02
    # output projections get init_std / sqrt(2 * n_layers) (GPT-2); false: init_std
    init_scale_residual: bool = True


@dataclass
class ProxyConfig:
    """Shrink a reference recipe while keeping its structure (see arch/proxy.py).

    Every field is optional; set at least one to derive a proxy. Fields not given are
    derived from the ones that are, keeping the ratios of the reference.
    """

    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    n_experts: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    max_seq_len: Optional[int] = None
    multiple_of: int = 64  # FFN / expert widths are rounded to this


# ------------------------------------------------------------------ training, data


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    fused: Optional[bool] = None  # fused AdamW; null: on when on CUDA


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (arch/distill.py); off without a teacher."""

    # a moelab model directory, run directory, .ckpt, sharded .dcp folder or Hugging
    # Face directory; its tokenizer.json must map every token to the student's id
    teacher: Optional[str] = None
    kind: str = "sampled"  # sampled (k draws from the teacher) | topk (its k likeliest ids) | full
    k: int = 256  # draws (sampled) or ids kept (topk) per token
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    alpha: float = 0.5  # loss = alpha * distillation + (1 - alpha) * next-token cross-entropy
    # online: the teacher runs beside the student (bf16 on a GPU); offline: its targets
    # (k ids and weights a token) are cached to disk first by `moelab distill-cache`
    # and read per step, for teachers that do not fit beside the student
    mode: str = "online"
    # offline: the cache folder; null: distill-<key> under data.cache_dir, the key naming
    # the teacher, the data and these settings
    cache: Optional[str] = None
    chunk: int = 4096  # rows per chunk: the two models' logits exist for this many tokens at a time


@dataclass
class QATConfig:
    """Quantization-aware training: fake-quantized weights in forward, straight-through
    gradients (arch/quant.py). Applied to every linear layer and the stacked expert
    weights; the embedding, the head and the routers keep full precision unless listed."""

    format: Optional[str] = None  # int4 | int4_b32 | fp8; null: off
    start_step: int = 0  # optimizer steps done before the weights are fake-quantized
    # extra module kinds to quantize: embed, head (the same matrix when tied), router
    # (the routers' and the shared-expert gate's linear layers)
    include: List[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of `train.stages` (arch/stages.py): a stretch of optimizer steps with
    its own shapes, learning-rate segment and RoPE. Shapes and RoPE not given here
    carry over from the stage before (the first stage: from train.* and
    model.layer_kinds.*.rope); the learning-rate segment does not carry over."""

    name: str = ""  # "": stage<i>; checkpoints and logs name the stage by it
    steps: int = MISSING  # optimizer steps in this stage
    seq_len: Optional[int] = None
    micro_batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    # this stage's own learning-rate schedule over its steps: any of train.optim's lr (the
    # peak), schedule, warmup_steps, min_lr_ratio, decay_fraction (the rest from
    # train.optim); empty: the run's schedule (train.optim over train.max_steps) goes on
    optim: Dict[str, Any] = field(default_factory=dict)
    # RoPE from this stage on, per layer kind: fields of model.layer_kinds.<kind>.rope,
    # e.g. {global: {theta: 1000000}} (Qwen3's long-context stage) or {global: {scaling:
    # linear, factor: 8}} (Gemma 3's 128K extension). The weights are unchanged. A YaRN
    # original_max_seq_len left null is the previous stage's seq_len.
    rope: Dict[str, Any] = field(default_factory=dict)
    # this stage's data mixture: weights over the sources named in data.mix, e.g.
    # {web: 1, code: 2, docs: 3}; a source left out is not drawn in this stage (it is
    # still validated). Empty: data.mix's weights (or data.source). Not carried over: a
    # later stage without its own mix goes back to data.mix's weights
    mix: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    seed: int = 1234
    seq_len: int = 2048
    micro_batch_size: int = 8
    grad_accum: int = 1
    # null: the sum of train.stages' steps (filled at load; required without stages)
    max_steps: Optional[int] = 1000
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    # torch.compile each block: true, false, graphs (compiled and replayed as CUDA
    # graphs: one GPU, one process, grad_accum 1, no activation checkpointing; pays at
    # small micro-batches, where launching kernels sets the pace) or auto (on a CPU off,
    # compiling costs more than it saves there; on CUDA graphs where they run, else true:
    # lit_modules/runtime.py resolve_speed)
    compile: Any = "auto"
    activation_checkpointing: bool = False
    # packed sequences (documents each ended by the tokenizer's end-of-text token):
    # attention stops at document boundaries, a token sees only its own document's
    # earlier tokens (arch/documents.py), in training and validation
    document_mask: bool = False
    # with document_mask: RoPE positions restart at 0 in each document, as the
    # document would see them alone (RoPE is relative: this changes rounding only)
    document_positions: bool = False
    val_every: int = 200
    val_batches: int = 20
    log_every: int = 10
    # when the step's loss and gradient norm are checked for NaN / inf (a non-finite
    # step is never applied, and stops the run): deferred (the update is skipped on
    # the device through fused AdamW's found_inf, and the flag read one step later,
    # so no step waits for the device; needs train.optim.fused, else it acts as step)
    # | step (read before each update: one host sync per step)
    finite_check: str = "deferred"
    ckpt_every: int = 500  # 0: only at the end; -1: never (benchmarks)
    keep_checkpoints: int = 3  # periodic checkpoints kept besides last.ckpt; 0 = all
    checkpoint_format: str = "full"  # full: one file (rank 0); sharded: a folder, each rank writes its shards
    expert_image_every: int = 100
    # > 0: torch.profiler records this many optimizer steps after 5 warm-up steps;
    # per-rank kernel tables and rank 0's trace go to <run>/profile/
    profile_steps: int = 0
    # Python's garbage collector during fit: automatic collection off, a generation-1
    # collection every this many optimizer steps, at the same step on every rank (an
    # automatic one falls at a different moment on each rank, and the others wait for it
    # at the next collective; torchtitan's gc_freq). 0: automatic collection, as Python does
    gc_every: int = 50
    run_dir: str = "runs"
    run_name: Optional[str] = None
    # a checkpoint path or run directory; "auto": the newest run of this recipe under
    # run_dir with a checkpoint (or of run_name, which resumes by itself anyway)
    resume: Optional[str] = None
    # a model directory, .ckpt, sharded .dcp folder or run directory whose model weights
    # start a new run (step 0, a fresh optimizer; `moelab upcycle` writes it into its
    # recipe); its architecture must be this recipe's. A resumed run ignores it.
    init_from: Optional[str] = None
    peak_tflops: Optional[float] = None  # MFU denominator; null: looked up for the device
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"  # auto | ddp | fsdp | model_parallel
    expert_parallel: int = 1
    # how a dropless MoE layer's tokens reach their experts under expert parallelism:
    # allgather (every token to every rank of the EP group: static shapes, no host read,
    # one compiled graph per block; 1.4x the tokens/s of alltoall on 4 H100s) | alltoall
    # (each token only to the ranks holding its experts: fewer rows in memory with
    # backends other than triton, but one host read of the split sizes per layer, which
    # breaks a compiled block's graph). experts/parallel.py
    ep_dispatch: str = "allgather"
    # FSDP2 (fsdp strategy): free each block's gathered weights after its forward (true:
    # least memory, the weights are gathered again for backward) or keep them until
    # backward (false: one all-gather per block and step instead of two, for the
    # memory of one block's full weights per block)
    reshard_after_forward: bool = True
    # the dtype gradients cross the wire in, between data-parallel ranks: float32 (exact
    # sums of float32 gradients) | bf16 (half the bytes: a bf16 all-reduce hook under
    # DDP, FSDP2's reduce_dtype; the average is rounded to bf16, then kept in float32).
    # Expert shards under expert parallelism are averaged in float32 either way. On one
    # host with NVLink (4 H100s) bf16 gained nothing; it is for slower networks.
    grad_reduce_dtype: str = "float32"
    # how DDP's ranks average gradients: hooks (DDP's reducer: buckets all-reduced during
    # backward, overlapped with it) | step (no DDP wrapper: flat buckets of gradients
    # all-reduced from gradient hooks during the step's last backward, handed back after
    # it; what CUDA graphs need, since DDP's hooks and the blocks' graphs gave NaN
    # gradients) | auto (step under train.compile=graphs, else hooks).
    # lit_modules/train/strategy.py GradAverager
    grad_sync: str = "auto"
    num_nodes: int = 1  # hosts in a multi-node launch (torchrun / SLURM); devices is per host
    optim: OptimConfig = field(default_factory=OptimConfig)
    # stages of one run (Qwen3's 4K general -> knowledge -> 32K long context; Gemma 3's
    # 32K -> 128K): see StageConfig; empty: one stage made of the fields above
    stages: List[StageConfig] = field(default_factory=list)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QATConfig = field(default_factory=QATConfig)


@dataclass
class MixSource:
    """One source of a weighted data mixture (`data.mix`)."""

    source: Any = None  # what data.source accepts: "stdlib", a path/glob, a list of them
    weight: float = 1.0  # share of training windows, relative to the other entries' weights
    name: Optional[str] = None  # in logs (val/<name>/loss); null: derived from the source
    text_field: Optional[str] = None  # this source's JSONL key / column; null: data.text_field


@dataclass
class DataConfig:
    # "stdlib" (the embedded corpus: this Python's standard library), "site-packages"
    # (every *.py of this Python's installed packages: a larger corpus for GPU runs), or
    # paths/globs of .txt / .jsonl files
    source: Any = "stdlib"
    text_field: str = "text"  # JSONL key, or Parquet / datasets (Arrow) column, holding the text
    # how the data files' bytes are decoded (any Python codec: utf-8, latin-1, cp1252,
    # utf-16); a file that does not decode is refused, never read with replacements
    encoding: str = "utf-8"
    val_fraction: float = 0.02
    tokenizer: Optional[str] = None  # a tokenizer.json path; null: train a BPE
    cache_dir: str = ".cache/moelab"
    max_chars: Optional[int] = None  # cap on corpus size (characters), null = all; per source in a mix
    num_workers: int = 0
    # processes that tokenize the corpus into the cache (1: this process alone); the
    # cache is the same whatever the number, so it is not part of the cache key
    num_proc: int = 1
    # a weighted mixture instead of data.source (which it then replaces): each entry is
    # tokenized and cached on its own, training windows are drawn by weight, and each
    # source's validation loss is logged as val/<name>/loss
    mix: Optional[List[MixSource]] = None
    # a litdata dataset (folder, shared file system or s3:// URL with train/ and val/
    # token chunks, written by `python -m lit_modules.data.export_stream`) streamed instead
    # of the local token cache; needs data.tokenizer and the `streaming` extra
    streaming: Optional[str] = None


@dataclass
class Recipe:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class LayerSpec:
    """One resolved layer: what `layer_pattern` + overrides + MoE placement give it."""

    index: int
    kind: str
    window: Optional[int]
    rope: RopeConfig
    moe: bool
    attention: str = "gqa"  # the layer's attention registry key (its kind's, or model.attention.kind)
    head_dim: Optional[int] = None  # null: model.attention.head_dim
    n_kv_heads: Optional[int] = None  # null: model.attention.n_kv_heads
    k_eq_v: bool = False
    # KV sharing (model.kv_shared_layers): the layer whose keys and values this one
    # attends over (null: its own), and whether a later layer reads this one's
    kv_source: Optional[int] = None
    kv_store: bool = False
    d_ff: Optional[int] = None  # the dense FFN width (null: model.ffn.d_ff)
