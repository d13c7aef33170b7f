"""Multi-head latent attention against transformers' DeepSeek-V3 attention (the
oracle), with and without the query bottleneck, plain and interleaved RoPE, and YaRN
with DeepSeek's mscale correction of the softmax scale."""
from __future__ import annotations

import pytest
import torch

from arch import RecipeError, count, load_recipe
from arch.config import AttentionConfig, NormConfig, RopeConfig
from arch.mla import MultiHeadLatentAttention
from arch.rope import RoPE

pytest.importorskip("transformers")


@pytest.mark.parametrize("q_lora, interleave, yarn", [(None, False, False), (12, True, True), (12, False, True)])
def test_mla_matches_transformers(q_lora, interleave, yarn):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    params = {"rope_type": "default", "rope_theta": 1e4}
    rope = RopeConfig(theta=1e4)
    if yarn:
        params = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
                  "mscale": 0.7, "mscale_all_dim": 0.9}
        rope = RopeConfig(theta=1e4, scaling="yarn", factor=4.0, original_max_seq_len=16, mscale=0.7,
                          mscale_all_dim=0.9)
    cfg = transformers.DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                        q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                        v_head_dim=5, rope_interleave=interleave, rope_parameters=params,
                                        max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = DeepseekV3Attention(cfg, 0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    a = AttentionConfig(kind="mla", n_heads=4, q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=6,
                        qk_rope_head_dim=4, v_head_dim=5, rope_interleave=interleave)
    ours = MultiHeadLatentAttention(32, a, NormConfig(), None, rope=rope)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same parameter names
    x, T = torch.randn(2, 7, 32), 7
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    y_theirs = theirs(x, DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(T)[None]), mask)[0]
    for impl in ("eager", "sdpa"):
        ours.impl = impl
        assert torch.allclose(ours(x, RoPE(4, rope)(T, "cpu")), y_theirs, atol=1e-5), impl
    if yarn:  # the softmax scale carries DeepSeek's mscale correction
        assert ours.scale == pytest.approx(theirs.scaling) and ours.scale != 10 ** -0.5


def test_mla_needs_its_widths_and_counts_its_latent_cache():
    with pytest.raises(RecipeError, match="needs model.attention.kv_lora_rank"):
        load_recipe("proxies/qwen3_moe_tiny", ["model.attention.kind=mla"])
    acc = count(load_recipe("deepseek_v3/671b").model)
    assert acc.kv_bytes_per_token == 61 * (512 + 64) * 2  # the latent and the shared rotary key


def test_auto_never_takes_flex_for_mla():
    a = AttentionConfig(kind="mla", n_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                        v_head_dim=8)
    assert MultiHeadLatentAttention(32, a, NormConfig(), window=8)._impl(64, is_cuda=True) == "sdpa"
    assert MultiHeadLatentAttention(32, a, NormConfig(), window=None)._impl(64, is_cuda=True) == "sdpa"
    a.softcap = 30.0
    assert MultiHeadLatentAttention(32, a, NormConfig(), window=8)._impl(64, is_cuda=True) == "eager"
