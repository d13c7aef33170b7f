"""`moelab bench --vs-hf` on the tiny Gemma 4 MoE proxy (CPU): the transformers twin
gets the same weights and trains to the same losses. A small learning rate keeps the
two runs' routing choices identical over the steps: at the proxy's 3e-3 a rounding
difference can flip an expert after two updates, which then shows in the loss, and
at 1e-4 the 12-layer case flipped one on some CPUs (a 6e-3 loss difference at step
2, against 6e-6 at 1e-5; the gradients agree to 3e-5 either way)."""
from __future__ import annotations

import json

import pytest

from lit_modules.cli import main


@pytest.mark.parametrize("extra", [
    [],  # 26B-A4B's structure
    # with KV sharing (the last 6 of 12 layers), its double-wide FFN and per-layer inputs
    ["model.n_layers=12", "model.kv_shared_layers=6", "model.kv_shared_ffn_mult=2", "model.per_layer_input.dim=16"],
])
def test_vs_hf_gemma4_moe(capsys, extra):
    pytest.importorskip("transformers")
    argv = ["bench", "proxies/gemma4_moe_tiny", "train.seq_len=16", "train.micro_batch_size=2",
            "model.moe.backend=loop", "train.optim.lr=1e-5", *extra, "--device", "cpu", "--steps", "2",
            "--warmup", "1", "--vs-hf", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    ours, hf = d["results"]
    assert hf["detail"].startswith("Gemma4ForCausalLM")
    assert d["vs_hf"]["first_step_ce_diff"] == pytest.approx(0.0, abs=1e-5)
    assert d["vs_hf"]["max_ce_diff_all_steps"] < 1e-4
    assert hf["losses"][0] != hf["losses"][-1]


def test_layer_bench_builds_the_parallel_dense_layer(capsys):
    """--layer builds a parallel_dense layer with the model's dense FFN beside the
    experts, and compares it with a dense FFN of the same active FLOPs (2 x 32 + 96)."""
    argv = ["bench", "proxies/gemma4_moe_tiny", "train.seq_len=16", "train.micro_batch_size=2", "--layer",
            "--device", "cpu", "--steps", "1", "--warmup", "0", "--with-loop", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in d["results"]]
    assert "dense geglu, d_ff 160" in names
    moe = next(r for r in d["results"] if r["name"].startswith("MoE, grouped_mm"))
    assert moe["rel_err_vs_loop"]["output"] < 1e-5 and moe["rel_err_vs_loop"]["input_grad"] < 1e-5
