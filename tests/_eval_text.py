"""What the `moelab eval` tests share: a tiny BPE trained on a real text, the reference
perplexity written with transformers alone, and `moelab eval --json` run in-process."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import torch


def tiny_bpe(text: str, vocab_size: int, path: Path):
    """A `tokenizers` BPE (whitespace pre-tokenizer, [UNK]) trained on `text`, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return tok


def transformers_perplexity(hf, tokenizer_file, text: str, seq_len: int):
    """(perplexity, predicted tokens), the reference: transformers' fast tokenizer over the
    same tokenizer.json, non-overlapping windows, HF's own label-shifted loss, averaged
    over every predicted token."""
    from transformers import PreTrainedTokenizerFast

    ids = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))(text)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            if w.shape[1] >= 2:
                total += hf(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
                n += w.shape[1] - 1
    return math.exp(total / n), n


def eval_json(model, data, seq_len: int, *extra: str) -> dict:
    """`moelab eval MODEL --data DATA --seq-len N --json --device cpu [extra]`'s figures
    (float32 on the CPU, like the references; on a CUDA machine auto means bf16)."""
    from lit_modules.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["eval", str(model), "--data", str(data), "--seq-len", str(seq_len), "--json",
                     "--device", "cpu", *extra]) == 0
    return json.loads(out.getvalue())
