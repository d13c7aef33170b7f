"""`moelab generate` and KV-cached decoding of imported models: greedy tokens equal
transformers' `generate`; the CLI streams what the sampler produces, stops at EOS and
refuses bad input in one sentence."""
from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch

from arch import build_model
from arch.generate import generate
from conftest import tiny_recipe

TEXT = ("def generate(model, prompt):\n    return model(prompt)\n\n"
        "class Cache:\n    def update(self, key, value):\n        self.keys.append(key)\n") * 8


@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "deepseek_v3", "gpt_oss"])
def test_greedy_tokens_equal_transformers_generate(kind, tmp_path):
    """Gemma 3's local layers have a window of 5, gpt-oss's too (with sinks): the
    6-token prompt and 20 new tokens wrap their rings several times. DeepSeek-V3: MLA's
    cached per-head keys and values. The logits of every step agree with those
    transformers' generate computes with its own cache; the greedy tokens are the same
    (the tiny gpt-oss repeats one token, so its logits are what tests it)."""
    pytest.importorskip("transformers")
    from _hf_tiny import hf_model, import_and_load, max_diff, tokens

    from arch.cache import KVCache

    hf = hf_model(kind)
    _, ours = import_and_load(hf, tmp_path)
    prompt = tokens(seed=3, batch=1, seq=6)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    want = out.sequences[:, 6:]
    got = torch.stack(list(generate(ours, prompt, 20, prefill_chunk=4)), dim=1)
    assert got.tolist() == want.tolist()
    if kind != "gpt_oss":
        assert len(set(want[0].tolist())) > 5  # a varied continuation, not one token repeated
    cache = KVCache.for_model(ours, 26)
    with torch.no_grad():
        steps = [ours(prompt, cache=cache).logits[:, -1]]
        steps += [ours(want[:, i:i + 1], cache=cache).logits[:, -1] for i in range(19)]
    assert max_diff(torch.stack(steps, 1), torch.stack(out.logits, 1)) < 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 saved as a moelab model directory with a byte-level BPE trained on
    TEXT (id 0 is <|endoftext|>)."""
    from lit_modules.checkpoints.model_dir import save_model_dir
    from lit_modules.data.tokenizer import EOS, train_bpe

    d = tmp_path_factory.mktemp("generate")
    tok = train_bpe([TEXT], vocab_size=300)
    assert tok.token_to_id(EOS) == 0
    tok.save(str(d / "tokenizer.json"))
    recipe = tiny_recipe("qwen3", "model.vocab_size=320", "model.max_seq_len=64")
    torch.manual_seed(0)
    model = build_model(recipe.model, device="cpu")
    save_model_dir(model, recipe, d / "model", tokenizer_path=d / "tokenizer.json")
    # the same model whose final norm is 0: every logit is 0 and greedy picks id 0, EOS
    with torch.no_grad():
        model.norm.weight.zero_()
    save_model_dir(model, recipe, d / "eos_model", tokenizer_path=d / "tokenizer.json")
    return d


def cli(*argv):
    from lit_modules.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", *map(str, argv), "--device", "cpu"])
    return rc, out.getvalue()


def test_cli_streams_the_sampled_continuation(model_dir):
    from tokenizers import Tokenizer

    from lit_modules.checkpoints.model_dir import load_model

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = "class Cache:\n    def"
    rc, out = cli(model_dir / "model", "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0,
                  "--ignore-eos")
    assert rc == 0
    _, model, _ = load_model(model_dir / "model")
    ids = tok.encode(prompt).ids
    new = torch.stack(list(generate(model, torch.tensor([ids]), 12)), dim=1)[0].tolist()
    whole = tok.decode(ids + new, skip_special_tokens=False)
    assert out == whole[len(tok.decode(ids, skip_special_tokens=False)):] + "\n"

    # sampling: the seed decides
    args = ["--prompt", prompt, "--max-new-tokens", 16, "--temperature", 1.0, "--top-p", 0.95, "--ignore-eos"]
    a, b, c = (cli(model_dir / "model", *args, "--seed", s)[1] for s in (1, 1, 2))
    assert a == b and a != c


def test_cli_stops_at_eos(model_dir):
    rc, out = cli(model_dir / "eos_model", "--prompt", "def", "--max-new-tokens", 5, "--temperature", 0)
    assert rc == 0 and out == "\n"
    rc, out = cli(model_dir / "eos_model", "--prompt", "def", "--max-new-tokens", 5, "--temperature", 0,
                  "--ignore-eos")
    assert rc == 0 and out == "<|endoftext|>" * 5 + "\n"


def test_cli_end_to_end_subprocess(model_dir):
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "generate", str(model_dir / "model"), "--prompt",
                        "def", "--max-new-tokens", "8", "--top-k", "5", "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and r.stdout.endswith("\n")


@pytest.mark.parametrize("extra, words", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "def " * 80], "max_seq_len (64)"),
    (["--prompt", "def", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "def", "--top-p", "0"], "--top-p 0"),
    (["--prompt", "def", "--temperature", "-1"], "--temperature -1"),
    (["--prompt", "def", "--top-k", "-2"], "--top-k -2"),
])
def test_cli_errors(model_dir, extra, words, capsys):
    from lit_modules.cli import main

    assert main(["generate", str(model_dir / "model"), *extra, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_incremental_decoding_holds_split_characters():
    """Byte-level BPE splits a character of several bytes over tokens: nothing is
    printed until the character is whole, and the pieces add up to the text."""
    from lit_modules.commands.generate_cmd import IncrementalDecoder
    from lit_modules.data.tokenizer import train_bpe

    tok = train_bpe([TEXT], vocab_size=300)
    text = "naïve café ☃ → 雪"
    prompt, ids = tok.encode("def ").ids, tok.encode(text).ids
    assert len(ids) > len(text)  # some characters really are split
    dec = IncrementalDecoder(tok, prompt)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
