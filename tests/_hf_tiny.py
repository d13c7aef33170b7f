"""Tiny random Hugging Face models that keep every quirk, for the conversion tests.

Each base config is deliberately awkward: head_dim != hidden / heads, GQA, and for
Gemma 3 query_pre_attn_scalar != head_dim, >= 7 layers (local and global), a window
shorter than the test sequence and linear RoPE scaling on the global layers only.
HF initialises norms at 1 (Qwen) or 0 (Gemma) and biases at 0, and its router at
std 0.02 (near-ties between experts): `perturb` makes all of them matter and keeps
the top-k choice clear of ties, so a wrong mapping shows in the logits."""
from __future__ import annotations

import copy

import torch

SEQ = 16  # longer than every window below
VOCAB = 96

QWEN3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
QWEN3_MOE = dict(QWEN3, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02)
# every layer MoE; head_dim 12 != 32 / 4 and GQA as for Qwen3; no QK-norm
MIXTRAL = dict({k: v for k, v in QWEN3.items() if k != "intermediate_size"}, intermediate_size=16,
               num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, rms_norm_eps=1e-5)
# every layer MoE; QK-norm over the whole projections, so head_dim = hidden / heads (8)
OLMOE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, num_experts=8,
             num_experts_per_tok=2, router_aux_loss_coef=0.01, pad_token_id=None, eos_token_id=None,
             rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
# sinks, biased clamped-SwiGLU experts, top-k then softmax with a router bias; head_dim
# 12 != 32 / 4; local (window 5) and global layers; YaRN from a context of 8 untruncated
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
               num_local_experts=8, num_experts_per_tok=2, sliding_window=5, attention_bias=True,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"], router_aux_loss_coef=0.01,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "beta_fast": 8.0,
                                "truncate": False, "original_max_position_embeddings": 8})
# MLA (query bottleneck, interleaved RoPE, YaRN with mscale), 1 dense layer then MoE with
# 2 groups (1 kept), sigmoid scores + correction bias, a shared expert, x2.5
DEEPSEEK_V3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=16,
                   qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6, rope_interleave=True,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 0.9})
GEMMA3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
              max_position_embeddings=64, rms_norm_eps=1e-6,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                               "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0}})


def config(kind: str, **overrides):
    import transformers

    cls, base = {"qwen3": (transformers.Qwen3Config, QWEN3), "qwen3_moe": (transformers.Qwen3MoeConfig, QWEN3_MOE),
                 "mixtral": (transformers.MixtralConfig, MIXTRAL), "olmoe": (transformers.OlmoeConfig, OLMOE),
                 "gpt_oss": (transformers.GptOssConfig, GPT_OSS),
                 "deepseek_v3": (transformers.DeepseekV3Config, DEEPSEEK_V3),
                 "gemma3": (transformers.Gemma3TextConfig, GEMMA3)}[kind]
    # a deep copy: transformers writes into a rope_parameters dict it is given
    return cls(**copy.deepcopy({**base, **overrides}))


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith(("mlp.gate.weight", "mlp.router.weight", "self_attn.sinks")):
            p.normal_(0.0, 1.0, generator=g)  # router: spread the logits apart; sinks that matter
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias must matter too
            b.normal_(0.0, 0.5, generator=g)


def hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers model (float32, eager attention: the oracle) in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind, **overrides), attn_implementation="eager")
    perturb(model, seed)
    return model.eval()


def gemma3_multimodal(seed: int = 0, **text_overrides):
    """A tiny Gemma3ForConditionalGeneration: SigLIP tower of one layer, 4 image tokens."""
    import transformers

    torch.manual_seed(seed)
    text = transformers.Gemma3TextConfig(**{**GEMMA3, **text_overrides})
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                    image_token_index=VOCAB - 1)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    perturb(model, seed)
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB - 3, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def save_hf_state(hf, state, folder) -> None:
    """Write `hf`'s config and a hand-made state dict as a Hugging Face directory
    (for layouts save_pretrained would not write, e.g. fused experts in memory)."""
    from safetensors.torch import save_file

    folder.mkdir()
    hf.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def import_and_load(hf, tmp_path, state=None, **kw):
    """`hf` written as a Hugging Face directory (save_pretrained, or `state` as a
    hand-made state dict), imported with `moelab import-hf`, loaded back: (recipe, model)."""
    from lit_modules.checkpoints.model_dir import load_model_dir
    from lit_modules.checkpoints.hf import import_hf

    if state is None:
        hf.save_pretrained(tmp_path / "hf")
    else:
        save_hf_state(hf, state, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "moelab", **kw)
    return load_model_dir(tmp_path / "moelab")
