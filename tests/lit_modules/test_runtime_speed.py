"""Fast by default (lit_modules/runtime.py resolve_speed): on CUDA the switches a recipe
leaves to auto become compiled blocks and the compiled fused cross-entropy; on a CPU
eager blocks and the plain loss; a value the recipe sets is kept."""
import pytest

from arch import load_recipe
from arch.registry import RecipeError
from lit_modules.runtime import AUTO_CE_CHUNK, resolve_speed


def test_auto_on_cuda_is_the_tuned_setting():
    r = resolve_speed(load_recipe("qwen3/30b_a3b", ["proxy.d_model=512"]), "cuda")
    assert r.train.compile is True and r.model.fused_ce_chunk == AUTO_CE_CHUNK and r.model.fused_ce_compile is True
    # what the tuned GPU proxy sets by hand is what auto gives
    tuned = load_recipe("proxies/qwen3_moe_w2")
    assert (tuned.train.compile, tuned.model.fused_ce_chunk, tuned.model.fused_ce_compile) == (True, AUTO_CE_CHUNK, True)


def test_auto_on_cpu_keeps_the_cpu_defaults():
    r = resolve_speed(load_recipe("qwen3/0.6b"), "cpu")
    assert r.train.compile is False and r.model.fused_ce_chunk == 0 and r.model.fused_ce_compile is False


def test_explicit_values_are_kept():
    r = resolve_speed(load_recipe("qwen3/0.6b", ["train.compile=false", "model.fused_ce_chunk=0"]), "cuda")
    assert r.train.compile is False and r.model.fused_ce_chunk == 0 and r.model.fused_ce_compile is False
    r = resolve_speed(load_recipe("qwen3/0.6b", ["train.compile=true", "model.fused_ce_chunk=512"]), "cpu")
    assert r.train.compile is True and r.model.fused_ce_chunk == 512 and r.model.fused_ce_compile is False


def test_bad_compile_value_is_one_sentence():
    with pytest.raises(RecipeError, match="train.compile = 'sometimes' must be true, false, auto .* or graphs"):
        resolve_speed(load_recipe("qwen3/0.6b", ["train.compile=sometimes"]), "cpu")


def test_graphs_are_kept_on_cuda_and_refused_elsewhere():
    assert resolve_speed(load_recipe("qwen3/0.6b", ["train.compile=graphs"]), "cuda").train.compile == "graphs"
    with pytest.raises(RecipeError) as e:
        resolve_speed(load_recipe("qwen3/0.6b", ["train.compile=graphs"]), "cpu")
    msg = str(e.value)
    assert "needs a CUDA device, not cpu" in msg and "train.compile=true" in msg and "\n" not in msg
