"""`moelab inspect` end to end, as a user runs it."""
from __future__ import annotations

import json
import subprocess
import time
import sys

import pytest


def moelab(*args):
    return subprocess.run([sys.executable, "-m", "lit_modules.cli", *args], capture_output=True, text=True)


def test_inspect_json_qwen3_moe():
    r = moelab("inspect", "qwen3/30b_a3b", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert abs(d["params_total"] / 30.532e9 - 1) < 0.005
    assert abs(d["params_active"] / 3.353e9 - 1) < 0.005
    for key in ("params_embedding", "params_non_embedding", "flops_per_token", "kv_bytes_per_token",
                "n_layers", "layer_kinds"):
        assert key in d
    assert d["n_layers"] == 48 == len(d["layer_kinds"])


def test_inspect_table_gemma_and_proxy():
    r = moelab("inspect", "gemma3/27b", "--context", "32768")
    assert r.returncode == 0, r.stderr
    assert "[local x5, global x1] cycled: 52 local, 10 global" in r.stdout
    assert "25.600B" in r.stdout  # non-embedding
    r = moelab("inspect", "qwen3/30b_a3b", "proxy.d_model=768", "proxy.n_layers=8",
               "proxy.n_experts=32", "proxy.vocab_size=32768", "--json")
    d = json.loads(r.stdout)
    assert 80e6 < d["params_active"] < 130e6  # a ~100M-active proxy
    assert d["top_k"] == 8 and d["n_heads"] // d["n_kv_heads"] == 8 and d["head_dim"] == 128


def test_inspect_bad_input_is_one_line_exit_2():
    r = moelab("inspect", "qwen3/30b_a3b", "model.moe.top_k=200")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.moe.top_k (200)" in r.stderr
    assert r.stdout == ""


def test_recipes_lists_every_shipped_recipe():
    from arch import available_recipes

    r = moelab("recipes")
    assert r.returncode == 0
    listed = r.stdout.split()
    # every recipe but the shared bases (_base.yaml), which are not models on their own
    assert listed == [n for n in available_recipes() if not n.split("/")[-1].startswith("_")]
    assert {"qwen3/30b_a3b", "gemma3/27b", "proxies/qwen3_moe_tiny"} <= set(listed)


def test_help_names_every_command():
    r = moelab("--help")
    assert r.returncode == 0
    for command in ("recipes", "inspect", "train", "bench", "eval", "import-hf", "export-hf", "convert"):
        assert command in r.stdout, command


def test_inspect_rejects_non_positive_lengths_and_names_only_the_recipe_as_required():
    r = moelab("inspect", "qwen3/30b_a3b", "--seq-len", "0")
    assert r.returncode == 2 and "--seq-len must be a positive number of tokens" in r.stderr
    r = moelab("inspect")
    assert r.returncode == 2 and r.stderr.strip().endswith("the following arguments are required: recipe")


@pytest.mark.parametrize("ov", ["model.n_layers=1000000000", "model.vocab_size=1000000000000",
                                "model.moe.balance.aux_coef=nan"])
def test_inspect_refuses_absurd_numbers_at_once_in_one_line(ov):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "inspect", "qwen3/30b_a3b", ov],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"moelab inspect: error: {ov.split('=')[0]} = ") and r.stderr.count("\n") == 1
    assert time.perf_counter() - t0 < 60  # an interpreter start; the check itself is instant


def test_inspect_at_the_caps_is_quick(capsys):
    """The largest sizes validation lets through: inspect's work grows with the layers
    only, and linearly (an override breaks the pattern's period at the last layer)."""
    from arch.ranges import MAX_LAYERS
    from lit_modules.cli import main

    t0 = time.perf_counter()
    assert main(["inspect", "qwen3/30b_a3b", f"model.n_layers={MAX_LAYERS}", "model.vocab_size=16777216",
                 "model.max_seq_len=16777216", "model.moe.n_experts=65536",
                 f"model.layer_overrides.{MAX_LAYERS - 1}.moe=false"]) == 0
    assert time.perf_counter() - t0 < 10
    assert f" {MAX_LAYERS}: {MAX_LAYERS - 1} global+moe, 1 global\n" in capsys.readouterr().out
