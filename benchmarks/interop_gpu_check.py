"""`moelab eval` on CUDA agrees with CPU float32 and with transformers on the same GPU.

Builds tiny random Qwen3-MoE and Gemma 3 Hugging Face directories (with a tokenizer
trained by `tokenizers`), then prints the perplexity from: moelab on CPU float32,
moelab on CUDA float32 and bf16, and transformers on CUDA float32 (eager attention)
over the same windows. float32 figures must agree to ~1e-5 relative; bf16 is close.

    python benchmarks/interop_gpu_check.py
"""
from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "lit_modules"))
from _hf_tiny import hf_model  # noqa: E402

from lit_modules.cli import main  # noqa: E402


def moelab_ppl(source, data, seq_len, *flags):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["eval", str(source), "--data", str(data), "--seq-len", str(seq_len), "--json", *flags]) == 0
    return json.loads(out.getvalue())["perplexity"]


def hf_ppl(hf, tok_file, text, seq_len, device):
    from transformers import PreTrainedTokenizerFast

    ids = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))(text)["input_ids"]
    hf = hf.to(device)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]], device=device)
            if w.shape[1] >= 2:
                total += hf(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
                n += w.shape[1] - 1
    return math.exp(total / n)


def run() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    assert torch.cuda.is_available(), "needs a CUDA device"
    d = Path(tempfile.mkdtemp())
    text = Path(torch.__file__).read_text()[:20000]
    (d / "text.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(d / "tokenizer.json"))
    for kind in ("qwen3_moe", "gemma3"):
        hf = hf_model(kind, vocab_size=tok.get_vocab_size(), max_position_embeddings=256)
        hf.save_pretrained(d / kind)
        (d / kind / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
        seq = 64
        row = {
            "moelab cpu fp32": moelab_ppl(d / kind, d / "text.txt", seq, "--device", "cpu"),
            "moelab cuda fp32": moelab_ppl(d / kind, d / "text.txt", seq, "--device", "cuda", "--dtype", "float32"),
            "moelab cuda bf16": moelab_ppl(d / kind, d / "text.txt", seq, "--device", "cuda", "--dtype", "bfloat16"),
            "transformers cuda fp32": hf_ppl(hf, d / "tokenizer.json", text, seq, "cuda"),
        }
        ref = row["transformers cuda fp32"]
        print(kind, {k: f"{v:.6f} ({v / ref - 1:+.1e})" for k, v in row.items()})


if __name__ == "__main__":
    run()
