"""Model-state memory per device for each layout (lit_modules/train/memory.py), checked
against the parameters of a model built on the meta device."""
from __future__ import annotations

import pytest

from arch import build_model, count
from conftest import tiny_recipe
from lit_modules.train.memory import layout_rows


@pytest.mark.parametrize("precision, per_param", [("bf16-mixed", 16), ("bf16-true", 8)])
def test_layouts_split_what_they_shard(precision, per_param):
    recipe = tiny_recipe("qwen3_moe", "train.devices=4", "train.expert_parallel=2")
    model = build_model(recipe.model, device="meta")
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("ffn.w_in", "ffn.w_out")))
    total = sum(p.numel() for p in model.parameters())
    assert experts > 0
    rows = dict(layout_rows(recipe, count(recipe.model), precision))
    assert rows["1 device"] == rows["ddp x 4"] == total * per_param
    assert rows["fsdp x 4"] == total * per_param / 4
    assert rows["fsdp + EP=2 x 4"] == (total - experts) * per_param / 4 + experts * per_param / 2
    assert rows["ddp + EP=4 x 4"] == (total - experts) * per_param + experts * per_param / 4


def test_dense_model_has_no_expert_rows():
    rows = dict(layout_rows(tiny_recipe("qwen3", "train.devices=2"), count(tiny_recipe("qwen3").model)))
    assert set(rows) == {"1 device", "ddp x 2", "fsdp x 2"}
