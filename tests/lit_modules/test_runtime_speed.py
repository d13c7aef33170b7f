"""Fast by default (lit_modules/runtime.py resolve_speed): on CUDA the switches a recipe
leaves to auto become compiled blocks and the compiled fused cross-entropy; on a CPU
eager blocks and the plain loss; a value the recipe sets is kept."""
import pytest

from arch import load_recipe
from arch.registry import RecipeError
from lit_modules.runtime import AUTO_CE_CHUNK, resolve_speed


def test_auto_on_cuda_is_the_tuned_setting():
    r = resolve_speed(load_recipe("qwen3/30b_a3b", ["proxy.d_model=512"]), "cuda")
    # one process, one micro-batch: the compiled blocks as CUDA graphs (below)
    assert r.train.compile == "graphs" and r.model.fused_ce_chunk == AUTO_CE_CHUNK and r.model.fused_ce_compile is True
    # what the tuned GPU proxy sets by hand is what auto gives (its blocks compiled, launched kernel by kernel)
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


def test_auto_on_cuda_picks_graphs_where_they_run():
    """auto on CUDA: the compiled blocks replayed as CUDA graphs for one process or DDP on
    one host, with one micro-batch per step; compiled blocks launched kernel by kernel
    where graphs are refused (lit_modules/runtime.py graphs_refusal), across hosts, or
    where the experts are the loop reference (a host read per layer)."""
    picks = {
        (): "graphs",
        ("train.grad_accum=2",): True,
        ("train.strategy=ddp", "train.devices=2"): "graphs",
        ("train.devices=2",): "graphs",
        ("train.strategy=ddp", "train.devices=2", "train.grad_sync=hooks"): True,
        ("train.strategy=ddp", "train.devices=2", "train.num_nodes=2"): True,
        ("train.strategy=ddp", "train.devices=2", "train.expert_parallel=2"): True,
        ("train.strategy=fsdp",): True,
        ("train.activation_checkpointing=true",): True,
        ("model.moe.backend=loop",): True,
    }
    for extra, want in picks.items():
        r = resolve_speed(load_recipe("proxies/qwen3_moe_w2", ["train.compile=auto", *extra]), "cuda")
        assert r.train.compile == want, extra
    staged = load_recipe("proxies/qwen3_stages_tiny", ["train.compile=auto"])
    accum = [st.grad_accum for st in staged.train.stages if st.grad_accum is not None]
    assert resolve_speed(staged, "cuda").train.compile == (True if max(accum, default=1) > 1 else "graphs")
    assert resolve_speed(load_recipe("proxies/dense_w2", ["train.compile=auto"]), "cuda").train.compile == "graphs"
