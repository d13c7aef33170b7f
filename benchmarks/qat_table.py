"""The table of benchmarks/qat.sh: validation loss of the base run at steps T and
T + N, unquantized and after PTQ, and of each QAT run at T + N after quantization.
Scored with `moelab eval`'s own functions (load_source, quantize_weights_ as
--quantize applies it, window_loss), each checkpoint loaded once, in float32 (on CUDA
when there is one).
Also written to WORK/table.json. With --seeds, the summary of several such runs
(benchmarks/qat.sh with SEEDS=): each column's mean and sample standard deviation over
the seeds, and the share of the gap recovered per seed.
Usage: python3 benchmarks/qat_table.py WORK T N FORMAT...
       python3 benchmarks/qat_table.py --seeds WORK SEED...   (reads WORK/seed<S>/table.json)"""
from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from arch.quant import quantize_weights_
from lit_modules.checkpoints.layout import step_name
from lit_modules.commands.eval_cmd import load_source, load_tokenizer, window_loss


NOISE = 1e-3  # nats: the size of the difference between two training trajectories here
COLUMNS = ["float32 @T", "PTQ @T", "float32 @T+N (no QAT)", "PTQ @T+N (no QAT)", "QAT @T+N, quantized",
           "PTQ gap", "QAT gap"]


def recovered(ptq_gap: float, qat_gap: float) -> str:
    """The share of the PTQ gap that QAT recovers; below NOISE there is nothing to recover."""
    return f"{(ptq_gap - qat_gap) / ptq_gap:.0%}" if abs(ptq_gap) >= NOISE else "(no gap)"


def main(work: str, T: str, N: str, *formats: str) -> None:
    work, T, N = Path(work), int(T), int(N)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = {}

    def loss(ckpt: Path, fmt=None) -> float:
        if ckpt not in cache:
            recipe, model, tok = load_source(ckpt, dev, torch.float32)
            ids = load_tokenizer(Path(tok), str(ckpt)).encode((work / "val.txt").read_text(encoding="utf-8")).ids
            cache[ckpt] = (recipe, model, ids)
        recipe, model, ids = cache[ckpt]
        if fmt is not None:
            model = copy.deepcopy(model)
            quantize_weights_(model, fmt, recipe.train.qat.include)
        return window_loss(model, ids, recipe.train.seq_len, 8, dev)["loss"]

    base_T = work / "base" / "checkpoints" / step_name(T)
    base_E = work / "base" / "checkpoints" / step_name(T + N)
    fT, fE = loss(base_T), loss(base_E)
    n_tokens = len(cache[base_T][2])
    print(f"validation: {n_tokens:,} tokens; T = {T}, N = {N}; scored on {dev}\n")
    print("| format | " + " | ".join(COLUMNS) + " | gap recovered |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    rows = {}
    for f in formats:
        pT, pE = loss(base_T, f), loss(base_E, f)
        qE = loss(work / f"qat_{f}" / "checkpoints" / step_name(T + N), f)
        rows[f] = dict(zip(COLUMNS, [fT, pT, fE, pE, qE, pE - fE, qE - fE]))
        print(f"| {f} | {fT:.4f} | {pT:.4f} | {fE:.4f} | {pE:.4f} | {qE:.4f} | {pE - fE:+.4f} | {qE - fE:+.4f} | "
              f"{recovered(pE - fE, qE - fE)} |", flush=True)
    (work / "table.json").write_text(json.dumps({"T": T, "N": N, "tokens": n_tokens, "rows": rows}, indent=1))


def seeds(work: str, *names: str) -> None:
    """Mean +- sample standard deviation of every column over the seeds' table.json."""
    tables = {s: json.loads((Path(work) / f"seed{s}" / "table.json").read_text()) for s in names}
    first = next(iter(tables.values()))
    print(f"{len(tables)} seeds ({', '.join(names)}); T = {first['T']}, N = {first['N']}; "
          f"validation {first['tokens']:,} tokens; mean +- standard deviation over the seeds\n")
    print("| format | " + " | ".join(COLUMNS) + " | recovered (of the mean gaps) | recovered, per seed |")
    print("|---" * (len(COLUMNS) + 3) + "|")

    def cell(values, signed):
        m = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{m:+.4f} +- {sd:.4f}" if signed else f"{m:.4f} +- {sd:.4f}"

    for f in first["rows"]:
        per = [t["rows"][f] for t in tables.values()]
        cells = [cell([r[c] for r in per], c.endswith("gap")) for c in COLUMNS]
        mean_gap = statistics.fmean(r["PTQ gap"] for r in per)
        mean_qat = statistics.fmean(r["QAT gap"] for r in per)
        each = ", ".join(recovered(r["PTQ gap"], r["QAT gap"]) for r in per)
        print(f"| {f} | " + " | ".join(cells) + f" | {recovered(mean_gap, mean_qat)} | {each} |")


if __name__ == "__main__":
    seeds(*sys.argv[2:]) if sys.argv[1:2] == ["--seeds"] else main(*sys.argv[1:])
