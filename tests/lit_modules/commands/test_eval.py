"""`moelab eval`: the perplexity transformers computes, on the same tokens and windows."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _eval_text import eval_json, tiny_bpe, transformers_perplexity  # noqa: E402
from _hf_tiny import hf_model  # noqa: E402

SEQ_LEN = 24


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    """A small real text (the start of this module's source) and a BPE trained on it
    with `tokenizers`."""
    d = tmp_path_factory.mktemp("eval")
    text = open(__file__, encoding="utf-8").read()[:1200]
    (d / "text.txt").write_text(text, encoding="utf-8")
    tok = tiny_bpe(text, 160, d / "tokenizer.json")
    return d, text, tok.get_vocab_size()


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_moe"])
def test_eval_hf_dir_matches_transformers(kind, tmp_path, text_and_tokenizer):
    # --device cpu: float32 like the reference (on a CUDA machine, auto means bf16)
    from transformers import PreTrainedTokenizerFast

    d, text, vocab = text_and_tokenizer
    hf = hf_model(kind, vocab_size=vocab, max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    n_tokens = len(PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))(text)["input_ids"])
    seq_len = next(s for s in range(SEQ_LEN, SEQ_LEN + 8) if n_tokens % s >= 2)  # a short last window too
    want, n = transformers_perplexity(hf, d / "tokenizer.json", text, seq_len)
    assert n > 5 * seq_len

    got = eval_json(tmp_path / "hf", d / "text.txt", seq_len)
    assert got["tokens_predicted"] == n
    assert abs(got["perplexity"] / want - 1) < 1e-5, (got["perplexity"], want)

    # the same model imported to a moelab directory scores the same
    from lit_modules.checkpoints.hf import import_hf

    import_hf(tmp_path / "hf", tmp_path / "m")
    got = eval_json(tmp_path / "m", d / "text.txt", seq_len, "--batch-size", "3")
    assert abs(got["perplexity"] / want - 1) < 1e-5


def test_eval_cli_end_to_end_and_errors(tmp_path, text_and_tokenizer):
    d, text, vocab = text_and_tokenizer
    hf = hf_model("qwen3", vocab_size=vocab)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "eval", str(tmp_path / "hf"),
                        "--data", str(d / "text.txt"), "--seq-len", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "predicted tokens" in r.stdout

    from lit_modules.cli import main

    assert main(["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", str(tmp_path / "hf"), "--data", str(d / "text.txt"), "--seq-len", "100000"]) == 2
    small = hf_model("qwen3", vocab_size=50)  # the tokenizer's ids overflow this vocabulary
    small.save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    assert main(["eval", str(tmp_path / "small"), "--data", str(d / "text.txt")]) == 2
