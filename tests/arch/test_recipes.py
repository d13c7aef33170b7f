"""Every shipped recipe loads, validates, builds on the meta device, and its
accounting equals both sum(p.numel()) and the published sizes."""
from __future__ import annotations

import pytest

from arch import available_recipes, build_model, count, load_recipe

RECIPES = [r for r in available_recipes() if not r.split("/")[-1].startswith("_")]

# ../shared/reference/models.md, "computed from the numbers above": within 0.5%
COMPUTED = [
    ("qwen3/0.6b", "params_total", 596.05e6), ("qwen3/0.6b", "params_non_embedding", 440.47e6),
    ("qwen3/1.7b", "params_total", 1.721e9), ("qwen3/1.7b", "params_non_embedding", 1.409e9),
    ("qwen3/4b", "params_total", 4.022e9), ("qwen3/4b", "params_non_embedding", 3.634e9),
    ("qwen3/8b", "params_total", 8.191e9), ("qwen3/8b", "params_non_embedding", 6.946e9),
    ("qwen3/14b", "params_total", 14.768e9), ("qwen3/14b", "params_non_embedding", 13.212e9),
    ("qwen3/32b", "params_total", 32.762e9), ("qwen3/32b", "params_non_embedding", 31.206e9),
    ("qwen3/30b_a3b", "params_total", 30.532e9), ("qwen3/30b_a3b", "params_active", 3.353e9),
    ("qwen3/235b_a22b", "params_total", 235.094e9), ("qwen3/235b_a22b", "params_active", 22.191e9),
    ("gemma3/270m", "params_embedding", 167.77e6), ("gemma3/270m", "params_non_embedding", 100.33e6),
    ("gemma3/1b", "params_embedding", 301.99e6), ("gemma3/1b", "params_non_embedding", 697.90e6),
    ("gemma3/4b", "params_non_embedding", 3208.9e6), ("gemma3/12b", "params_non_embedding", 10759.2e6),
    ("gemma3/27b", "params_non_embedding", 25599.0e6),
]
# the published figures themselves, where they are given to 3 significant digits
PUBLISHED = [
    ("qwen3/8b", "params_total", 8.2e9), ("qwen3/14b", "params_total", 14.8e9),
    ("qwen3/32b", "params_total", 32.8e9), ("qwen3/30b_a3b", "params_total", 30.5e9),
    ("qwen3/235b_a22b", "params_total", 235e9), ("qwen3/8b", "params_non_embedding", 6.95e9),
    ("qwen3/14b", "params_non_embedding", 13.2e9), ("qwen3/32b", "params_non_embedding", 31.2e9),
    ("gemma3/1b", "params_non_embedding", 698e6), ("gemma3/4b", "params_non_embedding", 3209e6),
    ("gemma3/12b", "params_non_embedding", 10759e6), ("gemma3/27b", "params_non_embedding", 25600e6),
    ("gemma3/270m", "params_non_embedding", 100e6),
    # issue 19's figures: Mixtral 8x7B 46.7B / 12.9B, OLMoE-1B-7B 6.9B total
    ("mixtral/8x7b", "params_total", 46.7e9), ("mixtral/8x7b", "params_active", 12.9e9),
    ("olmoe/1b_7b", "params_total", 6.9e9),
    ("gpt_oss/20b", "params_total", 20.9e9), ("gpt_oss/120b", "params_total", 116.8e9),
    ("deepseek_v3/671b", "params_total", 671e9),
]
# figures published to 2 significant digits: within half a unit of the last digit (OLMoE's
# "1.3B active" is 1.282B with the embedding and the head, 1.179B without; 0.5% of a
# two-digit figure would ask for more digits than were published)
ROUNDED = [("olmoe/1b_7b", "params_active", 1.3e9, 0.05e9),
           # OpenAI's active counts leave the embedding out (the head stays in): 3.6B, 5.1B
           ("gpt_oss/20b", "params_active_without_embedding", 3.6e9, 0.05e9),
           ("gpt_oss/120b", "params_active_without_embedding", 5.1e9, 0.05e9),
           # DeepSeek's 37B active likewise leaves the embedding out (36.6B; 37.6B with it)
           ("deepseek_v3/671b", "params_active_without_embedding", 37e9, 0.5e9)]
# the released config.json of each, as transformers reads it: its own model built on the
# meta device must have exactly our parameter count
HF_CONFIGS = {
    "mixtral/8x7b": ("MixtralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                           max_position_embeddings=32768, rms_norm_eps=1e-5, num_local_experts=8,
                                           num_experts_per_tok=2, tie_word_embeddings=False,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "deepseek_v3/671b": ("DeepseekV3Config", dict(  # the defaults are DeepSeek-V3's own; the rest as released
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        tie_word_embeddings=False)),
    "gpt_oss/20b": ("GptOssConfig", dict(num_hidden_layers=24, num_local_experts=32)),  # the rest: defaults
    "gpt_oss/120b": ("GptOssConfig", dict(num_hidden_layers=36, num_local_experts=128)),
    "olmoe/1b_7b": ("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5, num_experts=64,
                                        num_experts_per_tok=8, norm_topk_prob=False, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def test_all_reference_recipes_present():
    for family, sizes in {"qwen3": ["0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b_a3b", "235b_a22b"],
                          "gemma3": ["270m", "1b", "4b", "12b", "27b"], "mixtral": ["8x7b"],
                          "olmoe": ["1b_7b"], "gpt_oss": ["20b", "120b"], "deepseek_v3": ["671b"]}.items():
        for size in sizes:
            assert f"{family}/{size}" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_on_meta_and_counts_match(name):
    recipe = load_recipe(name)
    model = build_model(recipe.model, device="meta")
    acc = count(recipe.model)
    # the multi-token prediction modules (training only) are counted apart
    assert sum(p.numel() for p in model.parameters()) == acc.params_total + acc.params_mtp
    assert acc.params_mtp == sum(p.numel() for p in model.mtp.parameters())
    assert all(p.is_meta for p in model.parameters())
    moe_layers = model.moe_layers
    if moe_layers:  # active = total minus the experts a token is not routed to
        m0 = moe_layers[0]
        per_expert = sum(p[0].numel() for p in (m0.w_in, m0.w_out, m0.b_in, m0.b_out) if p is not None)
        idle = sum((m.n_experts - m.top_k) * per_expert for m in moe_layers)
        assert acc.params_total - acc.params_active == idle
    else:
        assert acc.params_active == acc.params_total
    assert acc.n_layers == len(model.layers) == recipe.model.n_layers


@pytest.mark.parametrize("name,field,published", COMPUTED + PUBLISHED)
def test_parameter_counts(name, field, published):
    value = getattr(count(load_recipe(name).model), field)
    assert abs(value - published) / published < 0.005, f"{name} {field}: {value:,} vs {published:,.0f}"


@pytest.mark.parametrize("name,field,published,half_unit", ROUNDED)
def test_parameter_counts_round_to_the_published_figure(name, field, published, half_unit):
    acc = count(load_recipe(name).model)
    value = acc.params_active - acc.params_embedding if field == "params_active_without_embedding" else getattr(acc, field)
    assert abs(value - published) < half_unit, f"{name} {field}: {value:,} vs {published:,.0f}"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_counts_equal_transformers_own_model(name):
    transformers = pytest.importorskip("transformers")
    import torch

    cls, fields = HF_CONFIGS[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**fields))
    acc = count(load_recipe(name).model)
    assert sum(p.numel() for p in hf.parameters()) == acc.params_total


@pytest.mark.parametrize("name,kib", [("qwen3/0.6b", 112), ("qwen3/1.7b", 112), ("qwen3/4b", 144),
                                      ("qwen3/8b", 144), ("qwen3/14b", 160), ("qwen3/32b", 256),
                                      ("qwen3/30b_a3b", 96), ("qwen3/235b_a22b", 188)])
def test_kv_cache_per_token(name, kib):
    assert count(load_recipe(name).model).kv_bytes_per_token == kib * 1024


def test_gemma3_27b_kv_cache_with_windows():
    acc = count(load_recipe("gemma3/27b").model, context=32768)
    assert abs(acc.kv_bytes_at_context / 1e9 - 3.12) < 0.01  # "about 3.12 GB per sequence"


def test_gemma3_layer_pattern_and_rope():
    m = load_recipe("gemma3/27b").model
    acc = count(m)
    assert [k == "global" for k in acc.layer_kinds] == [(i + 1) % 6 == 0 for i in range(62)]
    assert m.layer_kinds["local"].window == 1024 and m.layer_kinds["global"].window is None
    assert m.layer_kinds["local"].rope.theta == 10_000 and m.layer_kinds["local"].rope.scaling == "none"
    assert m.layer_kinds["global"].rope.theta == 1e6 and m.layer_kinds["global"].rope.factor == 8
    assert m.attention.query_pre_attn_scalar == 168 and m.attention.head_dim == 128
    assert load_recipe("gemma3/1b").model.layer_kinds["global"].rope.scaling == "none"


def test_qwen3_head_dim_is_not_width_over_heads():
    for size in ["0.6b", "4b", "32b", "30b_a3b", "235b_a22b"]:
        m = load_recipe(f"qwen3/{size}").model
        assert m.attention.head_dim == 128 != m.d_model // m.attention.n_heads


def test_flops_count_windows_at_their_window():
    # gemma3/1b: 26 layers, 4 global ((i+1) % 6 == 0) and 22 local with window 512
    acc = count(load_recipe("gemma3/1b").model, seq_len=4096)
    per_key = 12 * 4 * 256  # 12 x heads x head_dim
    local_keys = (512 * 513 / 2 + (4096 - 512) * 512) / 4096  # queries < 512 see fewer keys
    assert acc.attention_flops_per_token == pytest.approx(per_key * (4 * 4097 / 2 + 22 * local_keys))
    assert acc.flops_per_token == pytest.approx(6 * acc.matmul_params_active + acc.attention_flops_per_token)
    # plain causal attention: 6 x matmul params + 12 x L x H x hd x (T + 1) / 2
    acc = count(load_recipe("qwen3/0.6b").model, seq_len=1024)
    assert acc.flops_per_token == 6 * acc.matmul_params_active + 28 * 12 * 16 * 128 * (1024 + 1) / 2
    # matmul params: everything but the embedding gather and the norms (tied head counted)
    assert acc.matmul_params_active == acc.params_total - acc.params_norms
