"""benchmarks/step_overhead.py runs end to end on a CPU (the default mode only, no kernel
times there) and prints one row per micro-batch size."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SMALL = ["model.d_model=64", "model.n_layers=2", "model.vocab_size=512", "model.moe.n_experts=4",
         "model.moe.top_k=2", "model.moe.d_expert=32", "model.attention.n_heads=4", "model.attention.n_kv_heads=2",
         "model.attention.head_dim=16", "train.seq_len=32", "train.compile=false"]


def test_step_overhead_prints_a_row_per_micro_batch(capsys):
    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("step_overhead", root / "benchmarks" / "step_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["proxies/qwen3_moe_tiny", *SMALL, "--device", "cpu", "--micro", "1,2", "--modes",
                     "default,reduce-overhead", "--steps", "2", "--warmup", "2", "--host-profile", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d) \| (\S+) \| ([\d.]+) \| ([\d.]+) \| n/a \| n/a \| n/a \| ([\d,]+) \|$", out, re.M)
    assert [(m, mode) for m, mode, *_ in rows] == [("1", "default"), ("2", "default")]  # CPU: default only
    assert all(float(wall) > 0 and float(host) > 0 for _, _, wall, host, _ in rows)
    assert "micro 1, default: [" in out
    # the host profile names where the step's host time went, per micro-batch size
    assert out.count("host time under cProfile") == 2
    assert re.search(r"^ +[\d.]+ ms +[\d.]+x  \S+", out, re.M)
