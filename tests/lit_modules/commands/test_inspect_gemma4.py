"""`moelab inspect` on Gemma 4: the per-layer input table under embedding, the layer
kinds' own head widths / KV heads / keys = values, the KV-sharing layers."""
from __future__ import annotations

import subprocess
import sys

from arch import count, load_recipe


def moelab(*args):
    return subprocess.run([sys.executable, "-m", "lit_modules.cli", *args], capture_output=True, text=True)


def test_inspect_gemma4_rows():
    r = moelab("inspect", "gemma4/e2b")
    assert r.returncode == 0, r.stderr
    acc = count(load_recipe("gemma4/e2b").model)
    assert acc.params_per_layer_embedding == 262144 * 35 * 256
    assert "per-layer" in r.stdout and "35 x 256 per token" in r.stdout
    assert "KV sharing       layers 15-34 attend over the keys and values of layers 13 (local), 14 (global)" in r.stdout
    assert "head_dim 512, 25% proportional" in r.stdout
    r = moelab("inspect", "gemma4/26b_a4b")
    assert r.returncode == 0, r.stderr
    assert "head_dim 512, 2 kv, k = v" in r.stdout
    assert "d_ff 2112 (beside the experts in every MoE layer)" in r.stdout
