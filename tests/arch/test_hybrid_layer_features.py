"""Gated DeltaNet layers (Qwen3-Next) and Gemma 4's per-layer fields in one model: a
global kind with its own head width, KV heads and keys = values under the output gate,
KV sharing among the attention layers, per-layer inputs and layer scalars beside the
DeltaNet layers. Counts equal the built model, the cache decodes as a full forward, and
sharing or sizing the DeltaNet layers like attention is one sentence at load."""
from __future__ import annotations

import pytest
import torch

from arch import build_model, count, load_recipe
from arch.accounting import weight_memory
from arch.recipe import resolve_recipe
from arch.registry import RecipeError

HYBRID = ["model.layer_pattern=[linear,global]", "model.n_layers=6", "model.kv_shared_layers=1",
          "model.layer_kinds.global.head_dim=64", "model.layer_kinds.global.n_kv_heads=1",
          "model.layer_kinds.global.k_eq_v=true", "model.attention.v_norm=true", "model.per_layer_input.dim=8",
          "model.layer_scalar=true", "model.moe.backend=loop", "model.attention.linear.backend=torch"]


def hybrid(extra=()):
    return resolve_recipe(load_recipe("proxies/qwen3_next_tiny", HYBRID + list(extra)))


@pytest.mark.parametrize("extra", [[], ["model.attention.bias=true", "model.mtp.depth=0"],
                                   ["model.kv_shared_layers=0", "model.per_layer_input.dim=0", "model.mtp.depth=1"]])
def test_counts_equal_the_built_model(extra):
    m = hybrid(extra).model
    acc, model = count(m), build_model(m, device="meta")
    assert acc.params_total + acc.params_mtp == sum(p.numel() for p in model.parameters())
    assert acc.n_linear_layers == 3
    specs = model.specs
    assert [s.attention for s in specs] == ["gated_deltanet", "gqa"] * 3
    # the global layers: q_proj doubled by the output gate at their own head width; no v_proj
    attn = model.layers[1].attn
    assert attn.q_proj.weight.shape[0] == 2 * m.attention.n_heads * 64 and attn.v_proj is None
    # bf16 weights (MTP modules, training-only, left out): two bytes a parameter, when
    # one block of each shape stands for its layers
    assert weight_memory(m)["bf16"] == 2 * acc.params_total


def test_kv_cache_decodes_as_a_full_forward():
    """DeltaNet layers keep their StateCache, the sharing global layer reads its producer's."""
    from arch.cache import KVCache

    m = hybrid().model
    assert [s.kv_source for s in build_model(m, device="meta").specs] == [None] * 5 + [3]
    torch.manual_seed(0)
    model = build_model(m, device="cpu").eval()
    ids = torch.randint(0, m.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 24)
        steps = [model(ids[:, :15], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(15, 24)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert cache.layers[5].k is None and cache.layers[3].k is not None


@pytest.mark.parametrize("extra, named", [
    (["model.kv_shared_layers=2"], "covers layers of kind 'linear', gated DeltaNet layers"),
    (["model.layer_kinds.linear.head_dim=16"], "model.layer_kinds.linear sets head_dim, n_kv_heads or k_eq_v"),
    (["model.layer_kinds.linear.k_eq_v=true"], "which its gated DeltaNet layers do not take"),
])
def test_deltanet_layers_are_not_sized_or_shared_like_attention(extra, named):
    with pytest.raises(RecipeError) as e:
        hybrid(extra)
    assert named in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_weight_memory_tells_the_mixers_apart():
    """Qwen3-Next's DeltaNet and attention layers share every Gemma 4 field (head width,
    KV heads, ...): only their mixer tells their blocks apart."""
    m = resolve_recipe(load_recipe("proxies/qwen3_next_tiny")).model
    assert weight_memory(m)["bf16"] == 2 * count(m).params_total
