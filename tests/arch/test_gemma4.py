"""Gemma 4 in moelab: the shipped recipes' counts equal transformers' own model built on
the meta device from the released configs; inspect's KV cache leaves KV-sharing layers
out; proportional RoPE; the KV cache with KV sharing decodes as a full forward; every
bad combination of the new fields is one sentence at load."""
from __future__ import annotations

import pytest
import torch

from arch import build_model, count, load_recipe
from arch.config import RopeConfig
from arch.recipe import resolve_recipe
from arch.registry import RecipeError
from arch.rope import RoPE, apply_rope

from _hf_tiny_gemma4 import GLOBAL, LOCAL, RELEASED as HF_CONFIGS, ROPE


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_counts_equal_transformers_own_model(name):
    transformers = pytest.importorskip("transformers")
    import copy

    with torch.device("meta"):
        hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**copy.deepcopy(HF_CONFIGS[name])))
    theirs = sum(p.numel() for p in hf.parameters())
    acc = count(load_recipe(name).model)
    assert acc.params_total == theirs
    # the per-layer input table is embedding: what transformers' embed_tokens_per_layer holds
    ple = getattr(hf.model, "embed_tokens_per_layer", None)
    assert acc.params_embedding == hf.model.embed_tokens.weight.numel() + (0 if ple is None else ple.weight.numel())
    ours = build_model(load_recipe(name).model, device="meta")
    assert sum(b.numel() for n, b in ours.named_buffers() if n.endswith("layer_scalar")) == len(hf.model.layers)


def test_kv_cache_leaves_shared_layers_out():
    """E2B: 15 layers hold a cache (12 local of 1 x 256, 3 global of 1 x 512); the 20
    KV-sharing ones hold none. 31B: keys = values still caches both, 4 KV heads global."""
    e2b = count(load_recipe("gemma4/e2b").model, context=4096)
    assert e2b.kv_bytes_per_token == (12 * 2 * 256 + 3 * 2 * 512) * 2
    assert e2b.kv_bytes_at_context == (12 * 2 * 256 * 512 + 3 * 2 * 512 * 4096) * 2
    b31 = count(load_recipe("gemma4/31b").model)
    assert b31.kv_bytes_per_token == (50 * 2 * 16 * 256 + 10 * 2 * 4 * 512) * 2


def test_moe_active_counts_one_dense_ffn_and_top_k_experts():
    m = load_recipe("gemma4/26b_a4b").model
    acc = count(m)
    expert = 3 * m.d_model * m.moe.d_expert
    assert acc.params_total - acc.params_active == m.n_layers * (m.moe.n_experts - m.moe.top_k) * expert
    assert acc.params_ffn_dense == m.n_layers * 3 * m.d_model * m.ffn.d_ff


def test_proportional_rope_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hd, x = 64, torch.randn(1, 2, 7, 64)
    cfg = transformers.Gemma4TextConfig(head_dim=16, global_head_dim=hd, num_hidden_layers=2,
                                        layer_types=[LOCAL, GLOBAL], rope_parameters={
                                            LOCAL: ROPE[LOCAL], GLOBAL: {**ROPE[GLOBAL], "factor": 2.0}})
    inv, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, layer_type=GLOBAL)
    freqs = torch.arange(7).float()[:, None] * inv
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = hd // 2
    theirs = x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
    ours = apply_rope(x, *RoPE(hd, RopeConfig(theta=1e6, partial=0.25, proportional=True, scaling="linear",
                                               factor=2.0))(7, x.device))
    assert torch.allclose(ours, theirs, atol=1e-6)
    # pairs (i, i + 32) turn for i < 8 only: the rest of the head passes through
    still = torch.cat((x[..., 8:half], x[..., half + 8:]), -1)
    assert torch.equal(torch.cat((ours[..., 8:half], ours[..., half + 8:]), -1), still)
    assert not torch.allclose(ours[..., 1:8], x[..., 1:8])


def test_kv_sharing_decodes_as_a_full_forward():
    """The KV cache with KV-sharing layers (they read the producer's cache) gives the
    logits of one forward over the whole sequence."""
    from arch.cache import KVCache

    recipe = load_recipe("proxies/gemma4_moe_tiny", ["model.layer_pattern=[local,local,global]",
                                                     "model.n_layers=6", "model.kv_shared_layers=2",
                                                     "model.kv_shared_ffn_mult=2", "model.per_layer_input.dim=8",
                                                     "model.moe.backend=loop"])
    torch.manual_seed(0)
    model = build_model(recipe.model, device="cpu").eval()
    ids = torch.randint(0, recipe.model.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 40)
        steps = [model(ids[:, :25], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(25, 40)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert all(cache.layers[i].k is None for i in (4, 5))  # the sharing layers hold nothing


BAD = {
    "model.kv_shared_layers=6": "model.kv_shared_layers (6) must be below model.n_layers",
    "model.kv_shared_ffn_mult=2": "model.kv_shared_ffn_mult = 2 widens",
    "model.layer_kinds.global.n_kv_heads=3": "model.layer_kinds.global.n_kv_heads (3) does not divide",
    "model.layer_kinds.global.head_dim=31": "model.layer_kinds.global.head_dim must be even",
    "model.layer_kinds.global.rope.partial=0.01": "rotates no pair",
    "model.layer_kinds.global.rope.scaling=yarn": "proportional takes scaling",
    "model.ffn.d_ff=0": "beside their experts (moe.kind parallel_dense)",
    "model.mtp.depth=1": "model.mtp.depth > 0 cannot go with",
    "model.ffn.kind=swiglu_clamped": "model.per_layer_input gates its input with model.ffn.kind's activation",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_bad_combinations_are_one_sentence(override):
    extra = ["model.per_layer_input.dim=8"] if "mtp" in override or "ffn.kind" in override else []
    with pytest.raises(RecipeError) as e:
        resolve_recipe(load_recipe("proxies/gemma4_moe_tiny", [override] + extra))
    assert BAD[override] in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_layer_sharing_needs_a_producer_of_its_kind():
    # five local layers then a global one, the last sharing: no global layer before 5
    with pytest.raises(RecipeError, match="no layer before 5 is of its kind"):
        resolve_recipe(load_recipe("proxies/gemma4_moe_tiny", ["model.kv_shared_layers=1"]))


@pytest.mark.parametrize("name", ["gemma4/e2b", "gemma4/26b_a4b"])
def test_proxy_keeps_the_gemma4_structure(name):
    recipe = resolve_recipe(load_recipe(name, ["proxy.d_model=512", "proxy.n_layers=12", "proxy.n_experts=16"]))
    m, ref = recipe.model, load_recipe(name).model
    glob, ref_glob = m.layer_kinds["global"], ref.layer_kinds["global"]
    assert glob.head_dim / m.attention.head_dim == ref_glob.head_dim / ref.attention.head_dim
    assert m.attention.query_pre_attn_scalar == 1.0  # a scale of 1 stays 1
    if ref.kv_shared_layers:  # 20 of 35 -> two periods of 5 of 10, one period computing its own
        assert m.n_layers == 10 and m.kv_shared_layers == 5 and m.kv_shared_ffn_mult == 2
        assert m.per_layer_input.dim == 88
    model = build_model(m, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count(m).params_total


def test_activation_checkpointing_with_kv_sharing_keeps_the_gradients():
    """Recomputed blocks (train.activation_checkpointing) re-store the shared keys and
    values; the gradients through the sharing layers into their producer are unchanged."""
    from lit_modules.train.strategy import checkpoint_block

    recipe = load_recipe("proxies/gemma4_moe_tiny", ["model.layer_pattern=[local,local,global]", "model.n_layers=6",
                                                     "model.kv_shared_layers=2", "model.per_layer_input.dim=8",
                                                     "model.moe.backend=loop"])
    torch.manual_seed(0)
    model = build_model(recipe.model, device="cpu")
    ids = torch.randint(0, recipe.model.vocab_size, (2, 24))
    model(ids, targets=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert [b.spec.kv_source for b in model.layers][4:] == [3, 2]
    model.zero_grad()
    for block in model.blocks():
        checkpoint_block(block)
    model(ids, targets=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in want:
            assert torch.allclose(p.grad, want[n], atol=1e-6), n


@pytest.mark.parametrize("overrides", [
    ["model.mtp.depth=2"],  # MTP blocks built like the last (parallel_dense) layer
    ["model.layer_pattern=[local,local,global]", "model.kv_shared_layers=2", "model.kv_shared_ffn_mult=3",
     "model.per_layer_input.dim=24", "model.per_layer_input.vocab_size=512", "model.attention.bias=true"],
    ["model.moe.n_experts=0", "model.layer_kinds.global.k_eq_v=false", "model.tie_embeddings=false"],
])
def test_counts_equal_the_built_model(overrides):
    recipe = load_recipe("proxies/gemma4_moe_tiny", overrides)
    model, acc = build_model(recipe.model, device="meta"), count(recipe.model)
    assert sum(p.numel() for p in model.parameters()) == acc.params_total + acc.params_mtp
    assert acc.params_mtp == sum(p.numel() for p in model.mtp.parameters())
    per_layer = model.per_layer.embed.weight.numel() if model.per_layer is not None else 0
    assert acc.params_embedding == model.embed.weight.numel() + per_layer
