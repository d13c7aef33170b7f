"""Malformed recipes fail at load with one clear sentence naming the key, before any
tensor is allocated."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arch import RecipeError, load_recipe


class NoTensors(TorchDispatchMode):
    """Fails the test if any tensor operation (allocation included) runs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise AssertionError(f"a tensor op ran during recipe validation: {func}")


BAD = [
    # (recipe, overrides, words the message must contain)
    ("qwen3/0.6b", ["model.attention.n_head=4"], ["model.attention.n_head", "did you mean 'n_heads'"]),
    ("qwen3/0.6b", ["model.d_model=wide"], ["model.d_model", "wrong type"]),
    ("qwen3/0.6b", ["model.attention.n_kv_heads=5"], ["n_heads (16)", "not divisible", "n_kv_heads (5)"]),
    ("qwen3/30b_a3b", ["model.moe.top_k=129"], ["model.moe.top_k (129)", "n_experts (128)"]),
    ("gemma3/1b", ["model.layer_kinds.local.window=0"], ["model.layer_kinds.local.window", "positive"]),
    ("gemma3/1b", ["model.layer_pattern=[local,globl]"], ["model.layer_pattern[1]", "'globl'", "did you mean 'global'"]),
    ("qwen3/0.6b", ["model.ffn.kind=swiglo"], ["model.ffn.kind", "did you mean 'swiglu'"]),
    ("qwen3/30b_a3b", ["model.moe.router.kind=softmax"], ["model.moe.router.kind", "softmax_topk"]),
    ("qwen3/30b_a3b", ["model.moe.backend=grouped"], ["model.moe.backend", "grouped_mm"]),
    ("qwen3/0.6b", ["model.attention.head_dim=7"], ["model.attention.head_dim", "even"]),
    ("qwen3/0.6b", ["model.norm_placement=sandwch"], ["model.norm_placement", "did you mean 'sandwich'"]),
    ("qwen3/30b_a3b", ["model.moe.balance.aux_scope=globl"], ["model.moe.balance.aux_scope", "global"]),
    ("qwen3/0.6b", ["model.layer_overrides.99.kind=global"], ["model.layer_overrides", "99", "0..27"]),
    ("qwen3/0.6b", ["model.layer_kinds.global.rope.scaling=yarnn"], ["rope.scaling", "none, linear"]),
    ("qwen3/0.6b", ["model.vocab_size=0"], ["model.vocab_size", "positive"]),
    ("qwen3/0.6b", ["train.micro_batch_size=lots"], ["train.micro_batch_size", "wrong type"]),
    ("qwen3/0.6b", ["modle.d_model=8"], ["modle", "did you mean 'model'"]),
    ("qwen3/0.6b", ["proxy.d_model=-8"], ["proxy.d_model", "positive"]),
    ("qwen3/0.6b", ["model.d_model"], ["key.path=value"]),
    ("qwen3/30b_a3b", ["model.moe.capacity_factor=0"], ["model.moe.capacity_factor", "positive"]),
]


@pytest.mark.parametrize("recipe,overrides,words", BAD, ids=[o[0] for _, o, _ in BAD])
def test_bad_recipe_fails_clearly_before_allocation(recipe, overrides, words):
    with pytest.raises(RecipeError) as exc, NoTensors():
        load_recipe(recipe, overrides)
    msg = str(exc.value)
    assert "\n" not in msg, f"one sentence expected, got:\n{msg}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_unknown_recipe_name_suggests_nearest():
    with pytest.raises(RecipeError, match="did you mean 'qwen3/30b_a3b'"):
        load_recipe("qwen3/30b_a3")


def test_several_problems_reported_together():
    with pytest.raises(RecipeError) as exc:
        load_recipe("qwen3/30b_a3b", ["model.moe.top_k=0", "model.attention.n_kv_heads=3"])
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and any("top_k" in l for l in lines) and any("n_kv_heads" in l for l in lines)


def test_recipe_files_with_problems(tmp_path):
    (tmp_path / "cycle_a.yaml").write_text("base: cycle_b.yaml\n")
    (tmp_path / "cycle_b.yaml").write_text("base: cycle_a.yaml\n")
    with pytest.raises(RecipeError, match="inherits from itself"):
        load_recipe(tmp_path / "cycle_a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "missing.yaml").write_text("model:\n  n_layers: 2\n")
    with pytest.raises(RecipeError, match="model.d_model' is required"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "child.yaml").write_text("base: qwen3/0.6b\nmodel:\n  n_layers: 3\n")
    assert load_recipe(tmp_path / "child.yaml").model.n_layers == 3
    (tmp_path / "multi.yaml").write_text("base: [qwen3/0.6b, gemma3/1b]\n")
    assert load_recipe(tmp_path / "multi.yaml").model.d_model == 1152  # later base wins
