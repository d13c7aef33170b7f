"""Malformed recipes fail at load with one clear sentence naming the key, before any
tensor is allocated."""
from __future__ import annotations

import dataclasses
import math
import time
import typing

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arch import RecipeError, load_recipe
from arch.config import Recipe
from arch.ranges import RANGES, Interval


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
    # no groups (n_group 1) with a token routed to 2 of them: transformers' DeepSeek-V3 fails on it
    ("proxies/deepseek_v3_tiny", ["model.moe.router.n_group=1"],
     ["model.moe.router.topk_group (2) must be at most n_group (1)"]),
    ("proxies/gpt_oss_tiny", ["model.attention.impl=sdpa"], ["'sdpa' cannot add attention sinks"]),
    ("proxies/gpt_oss_tiny", ["model.per_layer_input.dim=8"], ["'swiglu_clamped' has none of its own"]),
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


# ------------------------------------------------------------------ numbers
# Every numeric field of the schema, found from its types (so a new field is covered
# without editing this file): NaN and infinities are refused everywhere, and every
# field refuses values just outside its interval in arch/ranges.py, naming the key.

NUMBERS_RECIPE = "qwen3/30b_a3b"  # MoE with a dense FFN width; layer kind "global"


def numeric_fields(cls=Recipe, prefix=""):
    """(RANGES pattern, int or float) of every numeric field under the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield from _numeric(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)


def _numeric(tp, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float):
        yield path, tp
    elif dataclasses.is_dataclass(tp):
        yield from numeric_fields(tp, path)
    elif origin is typing.Union:  # Optional[...]
        for a in args:
            yield from _numeric(a, path)
    elif origin is dict:
        yield from _numeric(args[1], path + ".*")
    elif origin is list:
        yield from _numeric(args[0], path + "[*]")


FIELDS = dict(numeric_fields())


def override(pattern, value):
    """(a.b=c override, the key path the error must name) for one field pattern."""
    path = pattern.replace(".*.", ".global.")
    if "[*]." in path:  # a field of a list's items (data.mix, train.stages): one item, complete but for it
        items, field = path.split("[*].", 1)
        extra = "steps: 1, " if items == "train.stages" and field != "steps" else ""
        return f"{items}=[{{{extra}{field}: {value}}}]", f"{items}[0].{field}"
    if path.endswith("[*]"):  # train.optim.betas: the second item
        return f"{path[:-3]}=[0.9,{value}]", f"{path[:-3]}[1]"
    return f"{path}={value}", path


def outside(pattern):
    """Values just outside the field's interval, below and (if capped) above."""
    iv, integer = Interval.parse(RANGES[pattern][0]), FIELDS[pattern] is int
    step = 1 if integer else 0.5
    values = [iv.low - step if iv.low_closed else iv.low]
    if math.isfinite(iv.high):
        values.append(iv.high + step if iv.high_closed else iv.high)
    return [int(v) if integer else v for v in values]


def test_every_numeric_field_has_a_range_rule():
    assert set(FIELDS) - set(RANGES) == set(), "numeric fields without a rule in arch/ranges.py RANGES"
    assert set(RANGES) - set(FIELDS) == set(), "RANGES entries that name no field of arch/config.py"


def refused(recipe, overrides):
    with pytest.raises(RecipeError) as exc, NoTensors():
        load_recipe(recipe, overrides)
    return str(exc.value)


@pytest.mark.parametrize("pattern", sorted(FIELDS))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_key(pattern, value):
    ov, path = override(pattern, value)
    msg = refused(NUMBERS_RECIPE, [ov])
    assert "\n" not in msg and path in msg, msg
    if FIELDS[pattern] is float:
        assert f"{path} = {value} is not a finite number" in msg
    else:  # an integer field cannot hold one at all
        assert "wrong type" in msg


@pytest.mark.parametrize("pattern,value", [(p, v) for p in sorted(RANGES) for v in outside(p)])
def test_numbers_outside_their_field_are_refused_naming_the_key(pattern, value):
    ov, path = override(pattern, value)
    msg = refused(NUMBERS_RECIPE, [ov])
    assert msg.startswith(f"{path} = {value} is out of range; ") and "\n" not in msg, msg


@pytest.mark.parametrize("recipe", ["qwen3/30b_a3b", "qwen3/0.6b"])  # MoE and dense
def test_nan_never_switches_a_feature_off(recipe):
    for ov, path in (("model.moe.balance.aux_coef=nan", "model.moe.balance.aux_coef"),
                     ("model.moe.balance.z_coef=nan", "model.moe.balance.z_coef"),
                     ("train.grad_clip=nan", "train.grad_clip")):
        assert refused(recipe, [ov]).startswith(f"{path} = nan is not a finite number")


@pytest.mark.parametrize("ov", ["model.n_layers=1000000000", "model.vocab_size=1000000000000",
                                "model.d_model=1000000000", "model.moe.n_experts=1000000000",
                                "model.max_seq_len=1000000000000", "model.moe.d_expert=1000000000000",
                                "model.ffn.d_ff=1000000000000", "model.layer_kinds.global.window=1000000000000",
                                "proxy.n_layers=1000000000", "train.micro_batch_size=1000000000",
                                f"model.n_layers={10**400}"])
def test_absurd_sizes_are_refused_at_once(ov):
    t0 = time.perf_counter()
    msg = refused(NUMBERS_RECIPE, [ov])
    assert time.perf_counter() - t0 < 2.0
    assert msg.startswith(ov.split("=")[0] + " = ") and "out of range" in msg and "\n" not in msg


def test_numbers_in_recipe_files_anywhere(tmp_path):
    """YAML's .nan / .inf in a nested dict of the file and in a free-form (Any) field."""
    (tmp_path / "r.yaml").write_text(
        "base: qwen3/0.6b\n"
        "model:\n  layer_kinds:\n    global: {rope: {theta: .nan}}\n"
        "train:\n  devices: [0, .inf]\n  optim: {betas: [0.9, 1.0]}\n"
    )
    lines = refused(tmp_path / "r.yaml", []).splitlines()
    assert lines[0].startswith("model.layer_kinds.global.rope.theta = nan is not a finite number")
    assert any(l.startswith("train.devices[1] = inf is not a finite number") for l in lines)
    assert any(l.startswith("train.optim.betas[1] = 1.0 is out of range") for l in lines)
    assert len(lines) == 3


def test_number_and_structure_problems_are_reported_together_once():
    lines = refused(NUMBERS_RECIPE, ["model.attention.n_kv_heads=0", "model.moe.top_k=1000000",
                                     "model.attention.n_heads=24", "train.optim.lr=-1"]).splitlines()
    # kv heads and top_k are refused on their own only (no "not divisible", no "top_k <= n_experts")
    assert [l.split(" ")[0] for l in lines] == ["model.attention.n_kv_heads", "model.moe.top_k",
                                                "train.optim.lr"], lines


def test_real_models_and_far_larger_ones_pass():
    big = load_recipe("qwen3/235b_a22b", ["model.n_layers=1000", "model.vocab_size=4194304",
                                          "model.moe.n_experts=4096", "model.max_seq_len=10485760",
                                          "model.d_model=65536", "model.attention.n_heads=512"])
    assert big.model.n_layers == 1000 and big.model.vocab_size == 2**22
