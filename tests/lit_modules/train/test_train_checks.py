"""`moelab train` refuses bad settings before any data work, and `resume=auto` finds
the newest run of the recipe."""
from __future__ import annotations

import os
import time

import pytest

from arch import RecipeError, load_recipe
from lit_modules.train.run import check_on_accelerator, check_train, resolve_run

RECIPE = "proxies/qwen3_moe_tiny"


@pytest.mark.parametrize("override,words", [
    ("train.devices=abc", "train.devices = 'abc'"),
    ("train.devices=0", "train.devices = 0"),
    ("train.num_nodes=0", "train.num_nodes = 0"),
    ("train.max_steps=0", "train.max_steps = 0"),
    ("train.checkpoint_format=shards", "train.checkpoint_format = 'shards' is not a checkpoint format (did you mean"),
])
def test_train_settings_fail_in_one_sentence(override, words):
    with pytest.raises(RecipeError) as exc:
        check_train(load_recipe(RECIPE, [override]))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_device_lists_and_auto_are_accepted():
    for override in ("train.devices=auto", "train.devices=2", "train.devices=[0,1]"):
        check_train(load_recipe(RECIPE, [override]))


def test_flex_attention_is_refused_on_cpu_only():
    recipe = load_recipe(RECIPE, ["model.attention.impl=flex"])
    with pytest.raises(RecipeError, match="no backward pass on CPU"):
        check_on_accelerator(recipe, "cpu")
    check_on_accelerator(recipe, "gpu")
    small = load_recipe(RECIPE, ["model.attention.impl=flex", "model.attention.head_dim=8"])
    with pytest.raises(RecipeError, match="needs head_dim >= 16 on CUDA"):
        check_on_accelerator(small, "gpu")


def test_resume_auto_takes_the_newest_run_of_the_recipe(tmp_path):
    def run(name, age):
        last = tmp_path / name / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"x")
        t = time.time() - age
        os.utime(last, (t, t))
        return last

    recipe = load_recipe(RECIPE, [f"train.run_dir={tmp_path}", "train.resume=auto"])
    run_dir, ckpt = resolve_run(recipe)  # nothing yet: a new run
    assert ckpt is None and run_dir.name.startswith("qwen3_moe_tiny-")
    run("qwen3_moe_tiny-20260101-000000", 100)
    newest = run("qwen3_moe_tiny-20260102-000000", 10)
    run("gemma3_tiny-20260103-000000", 0)  # another recipe: never picked
    assert resolve_run(recipe) == (newest.parent.parent, newest)
