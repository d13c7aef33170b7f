"""`moelab compare`: two tiny runs (dense, and the MoE upcycled from it) on common
axes; the table's figures come from the runs' own records."""
import json
import math
from pathlib import Path

import pytest

from lit_modules.cli import main
from lit_modules.tools import compare as cmp


def test_table_and_files(dense_and_upcycled_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    dense, moe, _ = dense_and_upcycled_runs
    assert main(["compare", dense["run_dir"], moe["run_dir"], "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| run |" in printed and "| dense |" in printed and "| upcycled |" in printed
    png = tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == printed.split("\nwrote ")[0].strip()
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    for summary, name in ((dense, "dense"), (moe, "upcycled")):
        row = rows[name]
        assert row["steps"] == summary["steps"] and row["tokens"] == summary["tokens"]
        assert row["flops"] == pytest.approx(summary["tokens"] * summary["flops_per_token"])
        assert row["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
        assert row["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
        assert row["train_loss"] == pytest.approx(summary["train_ce_loss"], rel=1e-6)
        assert row["params_active"] == summary["params_active"]
        curves = data["curves"][name]
        assert [s for s, _ in curves["val"]] == [h["step"] for h in summary["val_history"]]
        assert [s for s, _ in curves["train"]] == list(range(1, summary["steps"] + 1))  # log_every=1
    # the MoE costs more per token than the dense model it came from: its FLOPs axis is longer
    assert rows["upcycled"]["flops"] > rows["dense"]["flops"]


def test_unfinished_run_uses_tensorboard(dense_and_upcycled_runs, tmp_path):
    """Without summary.json (a run still going, or killed) the curves and the tokens per
    step come from TensorBoard."""
    import shutil

    dense, _, _ = dense_and_upcycled_runs
    run = tmp_path / "dense"
    shutil.copytree(dense["run_dir"], run)
    (run / "summary.json").unlink()
    r = cmp.read_run(run)
    assert r.tokens_per_step_source == "TensorBoard perf/tokens"
    assert r.final()["tokens"] == dense["tokens"] and not r.final()["finished"]


def test_no_matplotlib_one_sentence(dense_and_upcycled_runs, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    dense, _, _ = dense_and_upcycled_runs
    assert main(["compare", dense["run_dir"], "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "matplotlib, which is not installed" in err and "--no-plot" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()  # refused before anything was read or written
    assert main(["compare", dense["run_dir"], "--out", str(tmp_path / "b"), "--no-plot"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["compare.json", "compare.md"]


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--no-plot", "--out", str(tmp_path / "o")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
