"""`moelab bench` on CPU with tiny recipes: the figures are consistent with each other
and with an independent computation, the errors are one sentence."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from arch import build_model, count, materialize
from conftest import TINY, tiny_recipe
from lit_modules.tools import bench
from lit_modules.cli import main

SHAPE = ["train.seq_len=16", "train.micro_batch_size=2"]
CPU = torch.device("cpu")


def tiny_args(name, *extra):
    recipe, overrides = TINY[name]
    return [recipe, *overrides, *SHAPE, *extra]


def run_json(capsys, *argv):
    assert main(["bench", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_json_figures_agree(capsys):
    d = run_json(capsys, *tiny_args("qwen3_moe"), "--steps", "2", "--warmup", "1", "--peak-tflops", "0.5")
    assert d["mode"] == "model" and d["data"] == "random tokens" and d["precision"] == "fp32"
    recipe = tiny_recipe("qwen3_moe", *SHAPE)
    assert d["flops_per_token"] == count(recipe.model, seq_len=16).flops_per_token
    assert d["tokens_per_step"] == 32 and d["peak_tflops"] == 0.5
    (r,) = d["results"]
    assert len(r["ms_all"]) == 2 and len(r["losses"]) == 3  # warm-up losses are kept too
    assert r["ms_per_step"] == pytest.approx(sorted(r["ms_all"])[0] / 2 + sorted(r["ms_all"])[1] / 2)
    assert r["tokens_per_s"] == pytest.approx(32 / (r["ms_per_step"] / 1e3))
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * d["flops_per_token"] / 0.5e12)
    assert r["peak_memory_bytes"] is None and r["host_syncs_per_step"] is None  # CUDA-only figures

    # the first-step loss is the training loss of the freshly initialised model on the
    # first batch, recomputed here independently of the benchmark
    torch.manual_seed(recipe.train.seed)
    model = materialize(build_model(recipe.model, device="meta"), "cpu")
    tokens = torch.randint(0, 256, (1, 2, 17), generator=torch.Generator().manual_seed(recipe.train.seed))[0]
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert out.aux, "the tiny MoE recipe should carry a balancing loss"
    expected = out.loss + sum(out.aux.values())
    assert r["first_step_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert r["first_step_ce"] == pytest.approx(out.loss.item(), abs=1e-5)
    assert abs(r["first_step_ce"] - math.log(256)) < 0.3  # near-uniform predictions at init


def test_steps_update_the_weights_and_use_one_batch_each():
    recipe = tiny_recipe("gemma3", *SHAPE)
    torch.manual_seed(0)
    model = materialize(build_model(recipe.model, device="meta"), "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    batches = bench.make_batches(256, 2, 16, 4, seed=1, device=CPU)
    assert torch.equal(batches[0][0][:, 1:], batches[0][1][:, :-1])  # targets are the next tokens
    assert not torch.equal(batches[0][0], batches[1][0])
    res = bench.run_training_steps("moelab", model, bench.moelab_loss, recipe, batches, bench.PRECISIONS["fp32"],
                                   CPU, warmup=1, steps=2, flops_per_token=1.0, peak_tflops=None)
    assert len(res.losses) == 3 and res.mfu is None
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the same first batch on the untouched weights gives the first recorded loss
    torch.manual_seed(0)
    fresh = materialize(build_model(recipe.model, device="meta"), "cpu")
    assert res.losses[0] == pytest.approx(fresh(*batches[0]).loss.item(), abs=1e-6)


def test_time_steps_calls_in_order_and_times_only_the_timed_steps():
    calls = []

    def step(i):
        calls.append(i)
        time.sleep(0.004 if i >= 2 else 0.0)
        return torch.tensor(float(i))

    ms, outs = bench.time_steps(step, warmup=2, steps=3, device=CPU)
    assert calls == [0, 1, 2, 3, 4] and [o.item() for o in outs] == [0, 1, 2, 3, 4]
    assert len(ms) == 3 and min(ms) >= 4.0
    with pytest.raises(bench.BenchError):
        bench.time_steps(step, warmup=0, steps=0, device=CPU)


def test_layer_mode_json(capsys):
    d = run_json(capsys, *tiny_args("qwen3_moe"), "--layer", "--with-loop", "--tokens", "48",
                 "--steps", "2", "--warmup", "1", "--variant", "model.moe.capacity_factor=1.0")
    assert d["mode"] == "layer" and d["tokens"] == 48 and d["dense_d_ff"] == 2 * 32
    names = [r["name"] for r in d["results"]]
    assert names == ["MoE, grouped_mm", "MoE, grouped_mm, model.moe.capacity_factor=1.0", "MoE, loop",
                     "dense swiglu, d_ff 64"]
    gm, capped, loop, dense = d["results"]
    assert dense["x_dense"] == 1.0 and gm["x_dense"] == pytest.approx(gm["ms_per_step"] / dense["ms_per_step"])
    # same weights, same input, fp32: grouped_mm computes what loop computes ...
    assert gm["rel_err_vs_loop"]["output"] < 1e-5 and gm["rel_err_vs_loop"]["input_grad"] < 1e-5
    assert gm["losses"][0] == pytest.approx(loop["losses"][0], rel=1e-5)
    # ... while a capacity factor makes another function (tokens may drop): not compared
    assert "rel_err_vs_loop" not in capped and len(capped["ms_all"]) == 2
    # same active FLOPs: 6 x tokens x (top-2 experts of 3 x 64 x 32 + router 64 x 8) vs 3 x 64 x 64
    assert d["flops_per_token"] == {"moe": 6 * (2 * 3 * 64 * 32 + 64 * 8), "dense": 6 * 3 * 64 * 64}
    assert gm["achieved_tflops"] == pytest.approx(48 * d["flops_per_token"]["moe"] / (gm["ms_per_step"] / 1e3) / 1e12)


def test_dense_gemma_and_pure_bf16(capsys):
    d = run_json(capsys, *tiny_args("gemma3"), "--steps", "1", "--warmup", "1", "--dtype", "bf16")
    assert d["precision"] == "bf16" and math.isfinite(d["results"][0]["first_step_loss"])


def test_table_is_printed_last_from_the_console():
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "bench", *tiny_args("qwen3_moe"),
                        "--steps", "1", "--warmup", "0", "--device", "cpu", "--measure-ceiling",
                        "--ceiling-n", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    assert lines[header + 2].startswith("moelab (experts grouped_mm, eager, plain CE)")
    assert "random tokens" in r.stdout and "matmul ceiling" in r.stdout


def test_peak_lookup_and_precedence():
    assert bench.lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.lookup_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.lookup_peak_tflops("NVIDIA H200") == 989.4
    assert bench.lookup_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.lookup_peak_tflops("cpu") is None
    assert bench.resolve_peak(100.0, 200.0, CPU) == (100.0, "--peak-tflops")
    assert bench.resolve_peak(None, 200.0, CPU) == (200.0, "train.peak_tflops")
    assert bench.resolve_peak(None, None, CPU)[0] is None


def test_precision_resolution():
    cuda = torch.device("cuda")
    assert bench.resolve_precision("auto", CPU).name == "fp32"
    assert bench.resolve_precision("auto", cuda).name == "bf16-mixed"
    assert bench.resolve_precision("auto", cuda, layer=True).name == "bf16"
    assert bench.resolve_precision("auto", cuda, recipe_precision="32-true").name == "fp32"
    assert bench.resolve_precision("bf16", CPU, recipe_precision="32-true").name == "bf16"  # --dtype wins
    with pytest.raises(bench.BenchError, match="train.precision"):
        bench.resolve_precision("auto", CPU, recipe_precision="16-mixed")


def test_matmul_ceiling_on_cpu():
    c = bench.measure_matmul_ceiling(CPU, n=64, iters=2)
    assert c["ceiling_tflops"] > 0 and c["ceiling_n"] == 64 and c["ceiling_dtype"] == "fp32"


def test_layer_rows_do_not_keep_earlier_rows_alive(monkeypatch):
    """Each row's peak memory must be its own: when a row starts, no earlier row's layer
    (weights, gradients) may still be referenced."""
    import gc

    live, time_steps = [], bench.time_steps
    gc.collect()  # parameters that earlier tests left alive (e.g. in torch.compile's caches) do not count
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)}

    def spy(step, warmup, steps, device):
        gc.collect()  # parameters still reachable (from a module, a closure, an autograd graph)
        live.append(sum(isinstance(o, torch.nn.Parameter) and id(o) not in before for o in gc.get_objects()))
        return time_steps(step, warmup, steps, device)

    monkeypatch.setattr(bench, "time_steps", spy)
    recipe = tiny_recipe("qwen3_moe", *SHAPE)
    bench.bench_layer(recipe, device=CPU, precision=bench.PRECISIONS["fp32"],
                      tokens=32, with_loop=True, warmup=1, steps=1)
    n_moe = len(list(bench.MOE.get("moe")(64, recipe.model.moe).parameters()))
    assert live == [n_moe, n_moe, 3]  # the dense SwiGLU: gate, up, down


def test_layer_variant_must_keep_the_weights(capsys):
    argv = tiny_args("qwen3_moe", "--layer", "--variant", "model.moe.d_expert=64", "--device", "cpu")
    assert main(["bench", *argv]) == 2
    assert "changes the layer's weights" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--variant", "model.moe.top_k=1", "--device", "cpu"], "--variant adds rows to --layer"),
    (["--layer", "--device", "cpu"], "model.moe.n_experts = 0"),
    (["--layer", "--vs-hf", "--device", "cpu"], "--vs-hf compares whole models"),
    (["--steps", "0", "--device", "cpu"], "--steps must be >= 1"),
])
def test_errors_are_one_sentence(capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", *tiny_args("qwen3"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("moelab bench: error:")


# ------------------------------------------------------------------ --vs-hf

def _needs_converter():
    pytest.importorskip("transformers")


@pytest.mark.parametrize("name, extra, detail", [
    # pooled: the HF loss function, so even the total losses must agree
    ("qwen3_moe", ["model.moe.balance.aux_scope=pooled"], "Qwen3MoeForCausalLM, attn sdpa, experts grouped_mm"),
    ("gemma3", [], "Gemma3ForCausalLM, attn sdpa"),
])
def test_vs_hf_same_weights_same_losses(capsys, name, extra, detail):
    _needs_converter()
    d = run_json(capsys, *tiny_args(name, *extra), "--steps", "2", "--warmup", "1", "--vs-hf")
    ours, hf = d["results"]
    assert (ours["name"], hf["name"], hf["detail"]) == ("moelab", "HF transformers", detail)
    assert abs(d["vs_hf"]["first_step_loss_diff"]) < 1e-5 and abs(d["vs_hf"]["first_step_ce_diff"]) < 1e-5
    # three AdamW steps later the two still agree: the gradients matched as well
    assert d["vs_hf"]["max_ce_diff_all_steps"] < 1e-4
    assert hf["losses"][0] != hf["losses"][-1]  # and the HF side did train
    assert d["vs_hf"]["speedup"] == pytest.approx(hf["ms_per_step"] / ours["ms_per_step"])


def test_vs_hf_global_scope_compares_cross_entropy(capsys):
    _needs_converter()
    d = run_json(capsys, *tiny_args("qwen3_moe"), "--steps", "1", "--warmup", "0", "--vs-hf")
    assert abs(d["vs_hf"]["first_step_ce_diff"]) < 1e-5
    assert any("compare the cross-entropy" in n for n in d["notes"])


def test_vs_hf_unconvertible_model_is_one_sentence(capsys):
    _needs_converter()
    argv = tiny_args("qwen3_moe", "model.moe.n_shared_experts=1", "model.moe.d_shared=32")
    assert main(["bench", *argv, "--vs-hf", "--device", "cpu", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moelab bench: error: --vs-hf:") and "n_shared_experts" in err


def test_bench_prepares_the_model_as_training_does(monkeypatch):
    """The benchmark times what `moelab train` runs: the model goes through
    strategy.parallelize (train.compile, train.activation_checkpointing) before it is
    materialised, and the table names the switches in force."""
    calls = []
    parallelize = bench.parallelize
    monkeypatch.setattr(bench, "parallelize", lambda model, train: calls.append(model.embed.weight.device.type)
                        or parallelize(model, train))
    recipe = tiny_recipe("qwen3_moe", *SHAPE, "train.compile=true", "model.fused_ce_chunk=8")
    model = bench.prepare_model(recipe, CPU, bench.PRECISIONS["fp32"])
    assert calls == ["meta"]  # before materialisation, as LightningModule.configure_model does
    assert all(block._compiled_call_impl is not None for block in model.layers)  # compiled lazily
    eager = tiny_recipe("qwen3_moe", *SHAPE)
    assert list(model.state_dict()) == list(bench.prepare_model(eager, CPU, bench.PRECISIONS["fp32"]).state_dict())
    assert bench.model_detail(recipe) == "experts grouped_mm, compiled blocks, fused CE chunk 8"
    assert bench.model_detail(eager) == "experts grouped_mm, eager, plain CE"
    fused = tiny_recipe("qwen3_moe", *SHAPE, "model.fused_ce_chunk=8", "model.fused_ce_compile=true")
    assert bench.model_detail(fused) == "experts grouped_mm, eager, fused CE chunk 8 compiled"


@pytest.mark.slow
def test_compiled_layer_rows_match_loop():
    """train.compile compiles the layer benchmark's rows (not the loop reference): the
    compiled grouped_mm row still computes what loop computes. bf16, because the
    grouped_mm kernel (and its compile-time shape check) takes bf16 only."""
    recipe = tiny_recipe("qwen3_moe", *SHAPE, "train.compile=true")
    d = bench.bench_layer(recipe, device=CPU, precision=bench.PRECISIONS["bf16"], tokens=64,
                          with_loop=True, warmup=1, steps=1)
    assert d["compiled"] is True
    rows = {r["name"]: r for r in d["results"]}
    assert rows["MoE, grouped_mm"]["detail"] == "moe, compiled" and rows["MoE, loop"]["detail"] == "moe"
    assert "compiled" in d["results"][-1]["detail"]  # the dense floor is compiled too
    err = rows["MoE, grouped_mm"]["rel_err_vs_loop"]
    assert err["output"] < 2e-2 and err["input_grad"] < 2e-2


def test_document_mask_bench_steps_with_document_masks(capsys):
    """train.document_mask: the timed steps are training's, with document masks over
    BENCH_DOCS_PER_SEQ documents per sequence (recomputed here)."""
    from arch.documents import document_ids, document_positions

    args = tiny_args("gemma3", "train.seq_len=32", "train.document_mask=true", "train.document_positions=true")
    d = run_json(capsys, *args, "--steps", "1", "--warmup", "1")
    plain = run_json(capsys, *tiny_args("gemma3", "train.seq_len=32"), "--steps", "1", "--warmup", "1")
    assert "document masks" in d["results"][0]["detail"]
    recipe = tiny_recipe("gemma3", *SHAPE, "train.seq_len=32")
    torch.manual_seed(recipe.train.seed)
    model = materialize(build_model(recipe.model, device="meta"), "cpu")
    tokens = torch.randint(0, 256, (1, 2, 33), generator=torch.Generator().manual_seed(recipe.train.seed))[0]
    tokens[:, 7::8] = bench.BENCH_EOS  # 32 / 4 tokens per document
    x, y = tokens[:, :-1], tokens[:, 1:]
    doc = document_ids(x, bench.BENCH_EOS)
    assert int(doc.max()) == bench.BENCH_DOCS_PER_SEQ - 1
    with torch.no_grad():
        want = model(x, targets=y, doc_ids=doc, positions=document_positions(doc)).loss
    assert d["results"][0]["first_step_ce"] == pytest.approx(want.item(), abs=1e-5)
    assert d["results"][0]["first_step_ce"] != pytest.approx(plain["results"][0]["first_step_ce"], abs=1e-4)


def test_hf_twin_delta_rule_follows_ours_where_fla_refuses_its_backward(monkeypatch):
    """Where fla refuses its backward, moelab trains its DeltaNet layers on the PyTorch rule,
    and the transformers twin must too while it is timed (transformers would dispatch to
    fla); elsewhere the twin is left as transformers built it."""
    import inspect

    pytest.importorskip("transformers")
    import arch.linear_attention as la
    from arch import load_recipe
    from lit_modules.tools.bench import hf_delta_rule_as_ours, hf_twin

    recipe = load_recipe("proxies/qwen3_next_tiny")
    model = materialize(build_model(recipe.model, device="meta"), torch.device("cpu"))
    twin, notes = hf_twin(model, recipe)
    module = sys.modules[type(twin).__module__]
    dispatcher = module.torch_chunk_gated_delta_rule
    monkeypatch.setattr(la, "fla_backward_refused", lambda: False)
    with hf_delta_rule_as_ours(twin, notes):
        assert module.torch_chunk_gated_delta_rule is dispatcher
    assert not any("refuses its backward" in n for n in notes)
    monkeypatch.setattr(la, "fla_backward_refused", lambda: True)
    with hf_delta_rule_as_ours(twin, notes):
        assert module.torch_chunk_gated_delta_rule is inspect.unwrap(dispatcher)
    assert module.torch_chunk_gated_delta_rule is dispatcher
    assert sum("refuses its backward" in n for n in notes) == 1
