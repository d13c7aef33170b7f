"""benchmarks/w1_moe_layer.py runs end to end (CPU, --small), so it cannot rot."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "w1_moe_layer.py"


def test_w1_benchmark_small_runs(capsys):
    spec = importlib.util.spec_from_file_location("w1_moe_layer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = bench.main(["--small", "--iters", "2", "--warmup", "1", "--loop-iters", "1"])
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "FAIL" not in out
    assert len(times) == 5 and all(ms > 0 for ms in times.values())
    table = out[out.index("| implementation"):].strip().splitlines()
    assert len(table) == 2 + len(times)  # header, rule, one row each; the table comes last
