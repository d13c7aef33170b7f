"""Gemma 4 (text) parity with transformers: tiny random Gemma4ForCausalLM models keeping
every quirk (per-kind head_dim and KV heads, keys = values, proportional partial RoPE,
KV sharing with the double-wide FFN, per-layer inputs, the dense + routed MoE block and
its router, layer scalars, soft-capping), imported with `moelab import-hf`'s converter
and compared in float32 on CPU: logits and loss within 1e-4."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny import VOCAB, import_and_load, max_diff, tokens  # noqa: E402

TOL = 1e-4
LOCAL, GLOBAL = "sliding_attention", "full_attention"
ROPE = {LOCAL: {"rope_type": "default", "rope_theta": 10_000.0},
        GLOBAL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25}}
# head_dim 12 != 64 / 4; global layers 24 wide; window 5 < 16 tokens; final soft-cap
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, global_head_dim=24, sliding_window=5, max_position_embeddings=64, rms_norm_eps=1e-6,
            final_logit_softcapping=30.0, hidden_size_per_layer_input=0, rope_parameters=ROPE)
CASES = {
    # E2B / E4B-like: per-layer inputs, the last 3 of 7 layers share keys and values (and
    # have a double-wide FFN), tied head; global layers layer 3 and 6
    "dense-ple-kvshare": dict(num_hidden_layers=7, layer_types=[LOCAL, LOCAL, LOCAL, GLOBAL] * 1 + [LOCAL, LOCAL, GLOBAL],
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
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma4_matches_transformers(case, tmp_path):
    hf = gemma4(**CASES[case])
    recipe, ours = import_and_load(hf, tmp_path)
    ids = tokens()
    with torch.no_grad():
        mine, theirs = ours(ids, targets=ids), hf(ids, labels=ids)
    diff = max_diff(mine.logits, theirs.logits)
    assert diff <= TOL, f"{case}: max |logit diff| = {diff:.3g}"
    # transformers' labels are shifted inside; moelab's targets are the next tokens
    with torch.no_grad():
        shifted = ours(ids[:, :-1], targets=ids[:, 1:]).loss
    assert abs(shifted.item() - theirs.loss.item()) <= TOL
    m = recipe.model
    glob = m.layer_kinds["global"]
    assert glob.head_dim == 24 and glob.rope.proportional
    if case == "moe-keqv":
        assert m.moe.kind == "parallel_dense" and glob.k_eq_v and glob.n_kv_heads == 1
    else:
        assert m.kv_shared_layers == 3 and m.kv_shared_ffn_mult == 2 and m.per_layer_input.dim == 8


def test_gemma4_export_round_trip(tmp_path):
    """import-hf then export-hf gives back a directory transformers loads with the same
    logits (the MoE case: the fused expert layout and the router's own tensors)."""
    from transformers import AutoModelForCausalLM

    from lit_modules.checkpoints.hf import export_hf

    hf = gemma4(**CASES["moe-keqv"])
    import_and_load(hf, tmp_path)
    export_hf(tmp_path / "moelab", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = tokens()
    with torch.no_grad():
        assert max_diff(back(ids).logits, hf(ids).logits) <= TOL
