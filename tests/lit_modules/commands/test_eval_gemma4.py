"""`moelab eval` on a Gemma 4 Hugging Face directory (the MoE + keys = values case):
the perplexity transformers computes on the same tokens and windows."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny_gemma4 import CASES, gemma4  # noqa: E402

SEQ_LEN = 24


def test_eval_gemma4_hf_dir_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lit_modules.cli import main

    text = open(__file__, encoding="utf-8").read()[:1200]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=160, special_tokens=["[UNK]"]))
    hf = gemma4(**{**CASES["moe-keqv"], "vocab_size": tok.get_vocab_size()})
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    ids = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))(text)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():  # transformers alone: non-overlapping windows, its own shifted loss
        for i in range(0, len(ids), SEQ_LEN):
            w = torch.tensor([ids[i:i + SEQ_LEN]])
            if w.shape[1] >= 2:
                total += hf(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
                n += w.shape[1] - 1
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "text.txt"), "--seq-len", str(SEQ_LEN),
                     "--json", "--device", "cpu"]) == 0
    got = json.loads(out.getvalue())
    assert got["tokens_predicted"] == n
    assert abs(got["perplexity"] / math.exp(total / n) - 1) < 1e-5
