"""The table of benchmarks/qat.sh: validation loss of the base run at steps T and
T + N, unquantized and after PTQ, and of each QAT run at T + N after quantization.
Scored with `moelab eval`'s own functions (load_source, quantize_weights_ as
--quantize applies it, window_loss), each checkpoint loaded once, in float32 (on CUDA
when there is one).
Usage: python3 benchmarks/qat_table.py WORK T N FORMAT..."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from arch.quant import quantize_weights_
from lit_modules.checkpoints.layout import step_name
from lit_modules.commands.eval_cmd import load_source, load_tokenizer, window_loss


NOISE = 1e-3  # nats: the size of the difference between two training trajectories here


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
    print("| format | float32 @T | PTQ @T | float32 @T+N (no QAT) | PTQ @T+N (no QAT) | QAT @T+N, quantized "
          "| PTQ gap | QAT gap | gap recovered |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in formats:
        pT, pE = loss(base_T, f), loss(base_E, f)
        qE = loss(work / f"qat_{f}" / "checkpoints" / step_name(T + N), f)
        g, h = pE - fE, qE - fE
        # below a thousandth of a nat two training runs differ by as much: nothing to recover
        recovered = f"{(g - h) / g:.0%}" if abs(g) >= NOISE else "(no gap)"
        print(f"| {f} | {fT:.4f} | {pT:.4f} | {fE:.4f} | {pE:.4f} | {qE:.4f} | {g:+.4f} | {h:+.4f} | "
              f"{recovered} |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
