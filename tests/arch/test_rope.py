"""RoPE scalings against transformers' own tables (the oracle), and partial rotation."""
from __future__ import annotations

import math

import pytest
import torch

from arch.config import RopeConfig
from arch.rope import RoPE, apply_rope, inv_frequencies, yarn_attention_factor

YARN = {
    # Qwen3's long-context setting: factor 4 from 32K
    "qwen3": (64, dict(rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768)),
    # DeepSeek-V3: mscale / mscale_all_dim give the attention factor; 64 rotary dims
    "deepseek_v3": (64, dict(rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    # gpt-oss: no truncation of the ramp's ends
    "gpt_oss": (64, dict(rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0,
                         beta_slow=1.0, truncate=False)),
    # a ramp that covers a few dimensions only, and an explicit attention factor
    "short": (16, dict(rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16, beta_fast=4.0,
                       beta_slow=2.0, attention_factor=1.3)),
}


def _ours(params: dict) -> RopeConfig:
    return RopeConfig(theta=params["rope_theta"], scaling="yarn", factor=params["factor"],
                      original_max_seq_len=params["original_max_position_embeddings"],
                      beta_fast=params.get("beta_fast", 32.0), beta_slow=params.get("beta_slow", 1.0),
                      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                      attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True))


@pytest.mark.parametrize("case", sorted(YARN))
def test_yarn_matches_transformers(case):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, params = YARN[case]
    cfg = transformers.Qwen3Config(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=int(params["original_max_position_embeddings"]
                                                               * params["factor"]),
                                   rope_parameters={"rope_type": "yarn", **params})
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours = _ours(params)
    assert torch.equal(inv_frequencies(head_dim, ours), theirs)
    assert yarn_attention_factor(ours) == pytest.approx(their_factor, rel=1e-12)
    if params.get("mscale") != params.get("mscale_all_dim"):  # equal: DeepSeek's 1.0 (its softmax scale takes it)
        assert their_factor != 1.0  # the factor is really applied: the comparison can fail
    cos, sin = RoPE(head_dim, ours)(12, torch.device("cpu"))
    angles = torch.outer(torch.arange(12.0), theirs)
    assert torch.allclose(cos[:, :head_dim // 2], angles.cos() * their_factor)
    assert torch.allclose(sin[:, head_dim // 2:], angles.sin() * their_factor)


def test_yarn_interpolates_slow_and_keeps_fast_frequencies():
    cfg = _ours(YARN["qwen3"][1])
    plain = inv_frequencies(64, RopeConfig(theta=1e6))
    yarn = inv_frequencies(64, cfg)
    assert torch.equal(yarn[:4], plain[:4])  # many turns over 32K: extrapolated, unchanged
    assert torch.allclose(yarn[-4:], plain[-4:] / 4)  # under one turn: interpolated by the factor
    assert yarn_attention_factor(cfg) == pytest.approx(0.1 * math.log(4) + 1)


def test_partial_rotation_leaves_the_rest_alone():
    cfg = RopeConfig(theta=10000.0, partial=0.25)
    cos, sin = RoPE(32, cfg)(6, torch.device("cpu"))
    assert cos.shape == (6, 8)
    x = torch.randn(2, 3, 6, 32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.equal(y[..., :8], apply_rope(x[..., :8].contiguous(), cos, sin))
    assert not torch.equal(y[..., :8], x[..., :8])


def test_partial_must_rotate_an_even_number_of_dimensions():
    from arch import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="rotates 5 of head_dim 32 dimensions"):
        load_recipe("proxies/qwen3_moe_tiny", ["model.layer_kinds.global.rope.partial=0.16"])
