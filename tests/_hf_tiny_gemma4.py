"""Tiny random Gemma4ForCausalLM models that keep every quirk, for the conversion
tests (tests/_hf_tiny.py's pattern): per-kind head_dim and KV heads, keys = values,
proportional partial RoPE, KV sharing with the double-wide FFN, per-layer inputs, the
dense + routed MoE block and its router, layer scalars, soft-capping."""
from __future__ import annotations

import copy

import torch

from _hf_tiny import VOCAB

LOCAL, GLOBAL = "sliding_attention", "full_attention"
ROPE = {LOCAL: {"rope_type": "default", "rope_theta": 10_000.0},
        GLOBAL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25}}
# head_dim 12 != 64 / 4; global layers 24 wide; window 5 < 16 tokens; final soft-cap
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, global_head_dim=24, sliding_window=5, max_position_embeddings=64, rms_norm_eps=1e-6,
            final_logit_softcapping=30.0, hidden_size_per_layer_input=0, rope_parameters=ROPE)
CASES = {
    # E2B / E4B-like: per-layer inputs, the last 3 of 7 layers share keys and values (and
    # have a double-wide FFN), tied head; global layers 3 and 6
    "dense-ple-kvshare": dict(num_hidden_layers=7, layer_types=[LOCAL, LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL],
                              num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                              vocab_size_per_layer_input=VOCAB, tie_word_embeddings=True),
    # 26B-A4B-like: every layer dense FFN + 8 experts top-2; global layers with keys =
    # values and 1 KV head; proportional RoPE on half the head with a factor; untied
    "moe-keqv": dict(num_hidden_layers=6, layer_types=[LOCAL, LOCAL, GLOBAL] * 2, attention_k_eq_v=True,
                     num_global_key_value_heads=1, enable_moe_block=True, num_experts=8, top_k_experts=2,
                     moe_intermediate_size=16, tie_word_embeddings=False,
                     rope_parameters={LOCAL: ROPE[LOCAL], GLOBAL: {"rope_type": "proportional", "rope_theta": 1e6,
                                                                   "partial_rotary_factor": 0.5, "factor": 2.0}}),
}


def gemma4(seed: int = 0, **overrides):
    """A random transformers Gemma4ForCausalLM (float32, eager) in eval mode, its norms,
    layer scalars and router scales moved off their initial 1s and its router logits
    spread apart (no near-ties between experts), so a wrong mapping shows."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma4TextConfig(**copy.deepcopy({**BASE, **overrides}))
    model = transformers.Gemma4ForCausalLM._from_config(cfg, attn_implementation="eager")
    _perturb(model, seed)
    return model.eval()


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "router.per_expert_scale")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("router.proj.weight"):
                p.normal_(0.0, 1.0, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5, generator=g)




def gemma4_multimodal(seed: int = 0, **text_overrides):
    """A tiny Gemma4ForConditionalGeneration (a one-layer vision tower, no audio): its
    text model perturbed as `gemma4` perturbs one."""
    import transformers

    torch.manual_seed(seed)
    text = transformers.Gemma4TextConfig(**copy.deepcopy({**BASE, **text_overrides}))
    vision = transformers.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                             global_head_dim=8)
    cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None)
    model = transformers.Gemma4ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    _perturb(model, seed)
    return model.eval()


def _types(n: int, period: int):
    return [GLOBAL if (i + 1) % period == 0 else LOCAL for i in range(n)]


# the released text_config of each size (recipes/gemma4/*.yaml say where from), as
# Gemma4TextConfig reads it (the rest: its defaults)
RELEASED = {
    "gemma4/e2b": dict(hidden_size=1536, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
                       intermediate_size=6144, global_head_dim=512, sliding_window=512, layer_types=_types(35, 5),
                       num_kv_shared_layers=20, use_double_wide_mlp=True, hidden_size_per_layer_input=256,
                       final_logit_softcapping=30.0, rope_parameters=ROPE),
    "gemma4/e4b": dict(hidden_size=2560, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
                       intermediate_size=10240, global_head_dim=512, sliding_window=512, layer_types=_types(42, 6),
                       num_kv_shared_layers=18, hidden_size_per_layer_input=256, final_logit_softcapping=30.0,
                       rope_parameters=ROPE),
    "gemma4/31b": dict(max_position_embeddings=262144, hidden_size=5376, num_hidden_layers=60,
                       num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504,
                       global_head_dim=512, sliding_window=1024, layer_types=_types(60, 6),
                       hidden_size_per_layer_input=0, final_logit_softcapping=30.0, rope_parameters=ROPE),
    "gemma4/26b_a4b": dict(max_position_embeddings=262144, hidden_size=2816, num_hidden_layers=30,
                           num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=2112,
                           global_head_dim=512, sliding_window=1024, layer_types=_types(30, 6),
                           hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
                           moe_intermediate_size=704, final_logit_softcapping=30.0, rope_parameters=ROPE),
}
