"""Every number in a recipe: finite, and inside what its field means.

`check_numbers(section, prefix)` walks one section of a recipe (a dataclass of
arch/config.py with its nested dicts and lists, `Any` fields included) and returns
{key path: sentence} for each value that

- is NaN or infinite, wherever it sits: nothing reads a NaN weight as "off";
- lies outside the interval that RANGES gives its field.

RANGES has one interval per numeric field, written as in a textbook: "[0, 1)" takes
0 and refuses 1, "inf" is an open end. It holds what a field means on its own (betas
in [0, 1), a positive vocabulary); rules between fields (top_k <= n_experts, heads
divisible by kv heads, train.seq_len <= model.max_seq_len) live where the fields
meet: arch/resolve.py and lit_modules/train/run.py. tests/arch/test_errors.py
fails on a numeric field of the schema that RANGES leaves out.

The caps on sizes refuse a typo such as 10**9 layers or a 10**12 vocabulary (terabytes
once built) before any work, and bound `moelab inspect`, which loops over the layers
and over nothing else. Each cap sits far above the largest real model, for scale:
d_model 16,384 and 126 layers (Llama 3.1 405B), a vocabulary of 262,144 (Gemma 3),
10M tokens of context (Llama 4 Scout), 128 query heads (DeepSeek-V3), d_ff 53,248
(Llama 3.1 405B), 384 experts (Kimi K2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterator, NamedTuple, Tuple, Type

from .registry import RecipeError

MAX_WIDTH = 2**17  # d_model, head_dim: 8 x the widest real model
MAX_LAYERS = 10_000  # ~80 x the deepest; inspect's per-layer table is at most this long
MAX_VOCAB = 2**24  # 64 x Gemma 3's 262,144
MAX_CONTEXT = 2**24  # 16.7M tokens, above Llama 4 Scout's 10M
MAX_HEADS = 2**12  # 32 x DeepSeek-V3's 128
MAX_FFN = 2**20  # d_ff, d_expert: ~20 x Llama 3.1 405B's 53,248
MAX_EXPERTS = 2**16  # ~170 x Kimi K2's 384
MAX_BATCH = 2**16  # sequences per micro-batch, micro-batches per step
MAX_STEPS = 10**9  # optimizer steps and step intervals; long real runs take ~10**6
MAX_NODES = 2**16  # hosts; the largest runs use a few thousand
MAX_WORKERS = 1024  # data-loader processes per rank
MAX_CE_CHUNK = 2**24  # rows per fused-CE chunk: 2**24 rows of a 32K vocab are 2 TiB of float32 logits
MAX_SEED = 2**32 - 1  # numpy's seed range; Lightning would replace a larger seed by 0 with a warning

# key path ("*" for any key of a dict, "[*]" for any list item) -> (interval, what it is)
RANGES: Dict[str, Tuple[str, str]] = {
    # model sizes
    "model.d_model": (f"[1, {MAX_WIDTH}]", "the residual width"),
    "model.n_layers": (f"[1, {MAX_LAYERS}]", "the number of blocks"),
    "model.vocab_size": (f"[1, {MAX_VOCAB}]", "the vocabulary size"),
    "model.max_seq_len": (f"[1, {MAX_CONTEXT}]", "the native context length in tokens"),
    "model.attention.n_heads": (f"[1, {MAX_HEADS}]", "the number of query heads"),
    "model.attention.n_kv_heads": (f"[1, {MAX_HEADS}]", "the number of key/value heads (null: n_heads)"),
    "model.attention.head_dim": (f"[1, {MAX_WIDTH}]", "the width of a head (null: d_model / n_heads)"),
    "model.ffn.d_ff": (f"[0, {MAX_FFN}]", "the dense FFN width (0 only when every layer is MoE)"),
    "model.moe.n_experts": (f"[0, {MAX_EXPERTS}]", "the number of routed experts (0: no MoE)"),
    "model.moe.top_k": (f"[1, {MAX_EXPERTS}]", "the number of experts per token"),
    "model.moe.d_expert": (f"[0, {MAX_FFN}]", "an expert's FFN width (0 only without experts)"),
    "model.moe.n_shared_experts": (f"[0, {MAX_EXPERTS}]", "the number of shared experts"),
    "model.moe.d_shared": (f"[0, {MAX_FFN}]", "a shared expert's FFN width (null: d_expert; 0 only without experts)"),
    "model.moe.every": (f"[1, {MAX_LAYERS}]", "the spacing of MoE layers"),
    "model.moe.first_k_dense": (f"[0, {MAX_LAYERS}]", "the number of leading dense layers"),
    "model.layer_kinds.*.head_dim": (f"[1, {MAX_WIDTH}]", "a layer kind's head width (null: attention.head_dim)"),
    "model.layer_kinds.*.n_kv_heads": (f"[1, {MAX_HEADS}]", "a layer kind's KV heads (null: attention.n_kv_heads)"),
    "model.kv_shared_layers": (f"[0, {MAX_LAYERS}]", "the trailing layers that reuse earlier keys and values"),
    "model.kv_shared_ffn_mult": ("[1, 64]", "the FFN width multiplier of the KV-sharing layers"),
    "model.per_layer_input.dim": (f"[0, {MAX_WIDTH}]", "the per-layer input width (0: off)"),
    "model.per_layer_input.vocab_size": (f"[1, {MAX_VOCAB}]", "the per-layer embedding's rows (null: vocab_size)"),
    "model.layer_kinds.*.window": (f"[1, {MAX_CONTEXT}]", "the sliding window in tokens (null: global)"),
    "model.mtp.depth": ("[0, 64]", "the number of multi-token prediction modules (0: off)"),
    "model.fused_ce_chunk": (f"[0, {MAX_CE_CHUNK}]", "rows per fused cross-entropy chunk (0: off)"),
    # model numbers
    "model.norm.eps": ("(0, inf)", "the RMSNorm epsilon"),
    "model.moe.router.n_group": (f"[1, {MAX_EXPERTS}]", "the number of expert groups (1: no groups)"),
    "model.moe.router.topk_group": (f"[1, {MAX_EXPERTS}]", "the number of groups a token may route to"),
    "model.attention.q_lora_rank": (f"[1, {MAX_WIDTH}]", "MLA's query bottleneck width (null: none)"),
    "model.attention.kv_lora_rank": (f"[1, {MAX_WIDTH}]", "MLA's key/value latent width"),
    "model.attention.qk_nope_head_dim": (f"[1, {MAX_WIDTH}]", "MLA's per-head query/key width without RoPE"),
    "model.attention.qk_rope_head_dim": (f"[2, {MAX_WIDTH}]", "MLA's per-head query/key width with RoPE"),
    "model.attention.v_head_dim": (f"[1, {MAX_WIDTH}]", "MLA's per-head value width"),
    "model.attention.latent_norm_eps": ("(0, 1)", "the epsilon of MLA's latent RMSNorms"),
    "model.attention.linear.n_k_heads": (f"[1, {MAX_HEADS}]", "the gated DeltaNet query/key heads"),
    "model.attention.linear.n_v_heads": (f"[1, {MAX_HEADS}]", "the gated DeltaNet value heads"),
    "model.attention.linear.k_head_dim": (f"[1, {MAX_WIDTH}]", "the gated DeltaNet query/key head width"),
    "model.attention.linear.v_head_dim": (f"[1, {MAX_WIDTH}]", "the gated DeltaNet value head width"),
    "model.attention.linear.conv_kernel": ("[1, 64]", "the gated DeltaNet causal convolution's width in tokens"),
    "model.attention.linear.chunk_size": ("[1, 4096]", "tokens per chunk of the chunked delta rule"),
    "model.layer_kinds.*.rope.theta": ("(0, inf)", "the RoPE base"),
    "model.layer_kinds.*.rope.factor": ("[1, inf)", "the RoPE interpolation factor (positions are divided by it)"),
    "model.layer_kinds.*.rope.original_max_seq_len": (f"[1, {MAX_CONTEXT}]", "YaRN's pre-extension context length"),
    "model.layer_kinds.*.rope.beta_fast": ("(0, inf)", "YaRN's extrapolation end of the ramp, in turns"),
    "model.layer_kinds.*.rope.beta_slow": ("(0, inf)", "YaRN's interpolation end of the ramp, in turns"),
    "model.layer_kinds.*.rope.mscale": ("(0, inf)", "YaRN's attention-factor multiplier (DeepSeek)"),
    "model.layer_kinds.*.rope.mscale_all_dim": ("(0, inf)", "YaRN's attention-factor divisor multiplier (DeepSeek)"),
    "model.layer_kinds.*.rope.attention_factor": ("(0, inf)", "YaRN's scale of cos and sin"),
    "model.layer_kinds.*.rope.partial": ("(0, 1]", "the fraction of head_dim that RoPE rotates"),
    "model.attention.query_pre_attn_scalar": ("(0, inf)", "the softmax scale's base (null: head_dim)"),
    "model.attention.softcap": ("(0, inf)", "the attention logit cap (null: off)"),
    "model.final_softcap": ("(0, inf)", "the final logit cap (null: off)"),
    "model.init_std": ("(0, inf)", "the standard deviation of the initial weights"),
    "model.moe.router.jitter": ("[0, 1)", "the router input jitter (inputs times U(1 - jitter, 1 + jitter); 0: off)"),
    "model.moe.router.bias_update_rate": ("[0, inf)", "the router bias step (0: off)"),
    "model.moe.router.scale": ("(0, inf)", "the routed-weight multiplier"),
    "model.moe.balance.aux_coef": ("[0, inf)", "the load-balancing loss weight (0: off)"),
    "model.moe.balance.z_coef": ("[0, inf)", "the router z-loss weight (0: off)"),
    "model.mtp.loss_weight": ("[0, inf)", "the weight of the multi-token prediction loss"),
    "model.moe.capacity_factor": ("(0, inf)", "the expert capacity factor (null: dropless)"),
    # proxy: the model's caps; null: derived from the reference
    "proxy.d_model": (f"[1, {MAX_WIDTH}]", "the proxy's residual width"),
    "proxy.n_layers": (f"[1, {MAX_LAYERS}]", "the proxy's number of blocks"),
    "proxy.n_experts": (f"[1, {MAX_EXPERTS}]", "the proxy's number of experts"),
    "proxy.n_heads": (f"[1, {MAX_HEADS}]", "the proxy's number of query heads"),
    "proxy.n_kv_heads": (f"[1, {MAX_HEADS}]", "the proxy's number of key/value heads"),
    "proxy.head_dim": (f"[1, {MAX_WIDTH}]", "the proxy's head width"),
    "proxy.vocab_size": (f"[1, {MAX_VOCAB}]", "the proxy's vocabulary size"),
    "proxy.max_seq_len": (f"[1, {MAX_CONTEXT}]", "the proxy's context length"),
    "proxy.multiple_of": (f"[1, {MAX_FFN}]", "the rounding of the proxy's FFN widths"),
    # training
    "train.seed": (f"[0, {MAX_SEED}]", "the random seed"),
    "train.seq_len": (f"[1, {MAX_CONTEXT}]", "the training sequence length"),
    "train.micro_batch_size": (f"[1, {MAX_BATCH}]", "the sequences per micro-batch"),
    "train.grad_accum": (f"[1, {MAX_BATCH}]", "the micro-batches per optimizer step"),
    "train.max_steps": (f"[1, {MAX_STEPS}]", "the number of optimizer steps"),
    "train.grad_clip": ("[0, inf)", "the gradient-norm clip (0: off)"),
    "train.val_every": (f"[0, {MAX_STEPS}]", "the steps between validations (0: none)"),
    "train.val_batches": (f"[0, {MAX_STEPS}]", "the batches per validation (0: none)"),
    "train.log_every": (f"[1, {MAX_STEPS}]", "the steps between log lines"),
    "train.ckpt_every": (f"[-1, {MAX_STEPS}]", "the steps between checkpoints (0: only at the end; -1: none, "
                                               "for benchmarks)"),
    "train.keep_checkpoints": (f"[0, {MAX_STEPS}]", "the periodic checkpoints kept (0: all)"),
    "train.expert_image_every": (f"[0, {MAX_STEPS}]", "the steps between expert-load images (0: none)"),
    "train.profile_steps": ("[0, 1000]", "the steps torch.profiler records (0: none)"),
    "train.gc_every": (f"[0, {MAX_STEPS}]", "the steps between garbage collections (0: Python's automatic gc)"),
    "train.peak_tflops": ("(0, inf)", "the device's peak TFLOP/s (null: looked up)"),
    "train.expert_parallel": (f"[1, {MAX_EXPERTS}]", "the expert-parallel group size"),
    "train.num_nodes": (f"[1, {MAX_NODES}]", "the number of hosts"),
    "train.stages[*].steps": (f"[1, {MAX_STEPS}]", "a stage's optimizer steps"),
    "train.stages[*].seq_len": (f"[1, {MAX_CONTEXT}]", "a stage's sequence length"),
    "train.stages[*].micro_batch_size": (f"[1, {MAX_BATCH}]", "a stage's sequences per micro-batch"),
    "train.stages[*].grad_accum": (f"[1, {MAX_BATCH}]", "a stage's micro-batches per optimizer step"),
    "train.optim.lr": ("(0, inf)", "the peak learning rate"),
    "train.optim.min_lr_ratio": ("[0, 1]", "the final learning rate as a share of the peak"),
    "train.optim.weight_decay": ("[0, inf)", "the AdamW weight decay"),
    "train.optim.betas[*]": ("[0, 1)", "an Adam moment decay rate"),
    "train.optim.eps": ("(0, inf)", "the Adam epsilon (0 divides an unused expert's zero moments by zero)"),
    "train.optim.warmup_steps": (f"[0, {MAX_STEPS}]", "the learning-rate warmup in steps"),
    "train.optim.decay_fraction": ("[0, 1]", "the share of steps spent decaying (WSD)"),
    "train.distill.k": (f"[1, {MAX_VOCAB}]", "the ids drawn or kept per token for distillation"),
    "train.distill.temperature": ("(0, inf)", "the distillation temperature"),
    "train.distill.alpha": ("[0, 1]", "the weight of the distillation loss against the next-token loss"),
    "train.distill.chunk": (f"[1, {MAX_CE_CHUNK}]", "the rows per distillation chunk"),
    "train.qat.start_step": (f"[0, {MAX_STEPS}]", "the optimizer steps before quantization-aware training"),
    # data
    "data.val_fraction": ("[0, 1)", "the share of documents kept for validation (0: none)"),
    "data.max_chars": ("[1, inf)", "the corpus cap in characters (null: all)"),
    "data.num_workers": (f"[0, {MAX_WORKERS}]", "the data-loader processes"),
    "data.num_proc": (f"[1, {MAX_WORKERS}]", "the tokenizing processes"),
    "data.mix[*].weight": ("(0, inf)", "a mix source's weight"),
}


class Interval(NamedTuple):
    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        low, high = (float(s) for s in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]", text)

    def __contains__(self, v) -> bool:
        above = v >= self.low if self.low_closed else v > self.low
        below = v <= self.high if self.high_closed else v < self.high
        return above and below

    def requirement(self, integer: bool) -> str:
        """'must be ...' in words where they are plainer than the interval."""
        cap = f" no larger than {int(self.high)}" if math.isfinite(self.high) else ""
        if integer and self.low_closed and self.low in (0, 1):
            return ("a positive integer" if self.low == 1 else "an integer >= 0") + cap
        if math.isinf(self.high):
            if self.low == 0:
                return "positive" if not self.low_closed else ">= 0"
            return f"{'>=' if self.low_closed else '>'} {self.low:g}"
        return f"in {self.text}"


_INTERVALS = {path: Interval.parse(interval) for path, (interval, _) in RANGES.items()}


def _leaves(obj: Any, path: str, pattern: str) -> Iterator[Tuple[str, str, Any]]:
    """(key path, RANGES pattern, value) of every leaf under `obj`."""
    join = (lambda a, b: f"{a}.{b}" if a else str(b))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), join(path, f.name), join(pattern, f.name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, join(path, k), join(pattern, "*"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]", f"{pattern}[*]")
    else:
        yield path, pattern, obj


def _show(v) -> str:
    # str() of an int past 4300 digits raises; such a value needs no digits to be refused
    return f"a {v.bit_length()}-bit integer" if isinstance(v, int) and v.bit_length() > 64 else str(v)


def check_numbers(section: Any, prefix: str = "") -> Dict[str, str]:
    """{key path: one sentence} for each non-finite or out-of-range number under
    `section`, whose own key path is `prefix` ("model", "train.optim", ...)."""
    problems: Dict[str, str] = {}
    for path, pattern, v in _leaves(section, prefix, prefix):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        finite = isinstance(v, int) or math.isfinite(v)  # isfinite(int) overflows past 1e308
        rule = _INTERVALS.get(pattern)
        if rule is None and finite:
            continue
        need = ""
        if rule is not None:
            need = f"; {RANGES[pattern][1]} must be {rule.requirement(isinstance(v, int))}"
        if not finite:
            problems[path] = f"{path} = {v} is not a finite number{need or '; give a finite value'}."
        elif v not in rule:
            problems[path] = f"{path} = {_show(v)} is out of range{need}."
    return problems


def require_numbers(section: Any, prefix: str = "", error: Type[RecipeError] = RecipeError) -> None:
    """Raise `error` with every problem `check_numbers` finds, a line each."""
    problems = check_numbers(section, prefix)
    if problems:
        raise error("\n".join(problems.values()))
