"""`moelab eval` on a Gemma 4 Hugging Face directory (the MoE + keys = values case):
the perplexity transformers computes on the same tokens and windows."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _eval_text import eval_json, tiny_bpe, transformers_perplexity  # noqa: E402
from _hf_tiny_gemma4 import CASES, gemma4  # noqa: E402

SEQ_LEN = 24


def test_eval_gemma4_hf_dir_matches_transformers(tmp_path):
    text = open(__file__, encoding="utf-8").read()[:1200]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = tiny_bpe(text, 160, tmp_path / "tokenizer.json")
    hf = gemma4(**{**CASES["moe-keqv"], "vocab_size": tok.get_vocab_size()})
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    want, n = transformers_perplexity(hf, tmp_path / "tokenizer.json", text, SEQ_LEN)
    got = eval_json(tmp_path / "hf", tmp_path / "text.txt", SEQ_LEN)
    assert got["tokens_predicted"] == n
    assert abs(got["perplexity"] / want - 1) < 1e-5
