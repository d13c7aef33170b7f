"""Tokenizers: a byte-level BPE trained on the training split and cached, or any
`tokenizer.json` (a Qwen3 or Gemma 3 one, say) given by path in `data.tokenizer`.

Documents are packed into one token stream, each followed by an end-of-text token:
the trained BPE adds `<|endoftext|>` as a special token; a given tokenizer must
define one of EOS_CANDIDATES (Qwen3: `<|endoftext|>`, Gemma 3: `<eos>`).
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_modules.data.corpus import DataError

EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "<eos>", "</s>", "<|end_of_text|>")
BPE_VERSION = 3  # bump when train_bpe changes what it produces for the same input
# The BPE learns its merges from at most this many characters of the training split:
# merges settle long before that, and training time grows with the text.
BPE_MAX_CHARS = 200_000_000
# The trainer's time grows with the square of a word's length (a word: what the
# pre-tokenizer leaves whole, such as a run of letters or of spaces): one run of 100k
# letters takes seconds, of 1M minutes. Longer runs of non-space or of space are
# learnt from in pieces of this length; real text has none (the standard library's
# longest is 138 characters), so its tokenizer is unchanged.
BPE_MAX_RUN = 1024
# from the start of a run only (the look-behind), so the scan stays linear
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (BPE_MAX_RUN + 1, BPE_MAX_RUN + 1))


def bounded_runs(texts: Iterable[str]) -> Iterator[str]:
    """The texts, with every run longer than BPE_MAX_RUN handed on in pieces of that
    length (each a separate text, so no word spans two)."""
    for text in texts:
        start = 0
        for m in _LONG_RUN.finditer(text):
            if m.start() > start:
                yield text[start:m.start()]
            for i in range(m.start(), m.end(), BPE_MAX_RUN):
                yield text[i:min(i + BPE_MAX_RUN, m.end())]
            start = m.end()
        if start < len(text):
            yield text[start:]


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown)
    with `<|endoftext|>` as its only special token. vocab_size counts the 256 byte
    symbols and the special token; a small corpus may stop short of it (it runs out
    of pairs seen twice)."""
    if vocab_size < 258:
        raise DataError(f"model.vocab_size = {vocab_size} is too small for a byte-level BPE, which needs "
                        f"256 byte symbols plus {EOS}; use at least 258.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # min_frequency 2: a pair seen once is not a pattern; without it a small corpus
    # fills a large vocabulary with whole lines of itself
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(bounded_runs(texts), trainer)
    return tok


def tokenizer_file(path) -> Path:
    """data.tokenizer as a file: `~` expanded, a folder means its tokenizer.json,
    relative to the working directory."""
    p = Path(os.path.expanduser(str(path))).absolute()
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer_file(path) -> Tokenizer:
    p = tokenizer_file(path)
    if not p.is_file():
        raise DataError(f"data.tokenizer '{path}' is not a file; give the path of a tokenizer.json "
                        f"(or of the folder holding one), or null to train a BPE.")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers error is a one-line serde message
        raise DataError(f"data.tokenizer '{path}' could not be read as a tokenizers JSON file "
                        f"({str(e).splitlines()[0]}); give a Hugging Face tokenizer.json.") from None


def vocab_size(tok: Tokenizer) -> int:
    """Rows an embedding needs: the vocabulary size, or one past the largest id if an
    added token sits beyond it."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def check_vocab(tok: Tokenizer, model_vocab: int, what: str) -> None:
    v = vocab_size(tok)
    if v > model_vocab:
        raise DataError(
            f"the tokenizer {what} has {v:,} tokens but model.vocab_size is {model_vocab:,}; "
            f"set model.vocab_size (or proxy.vocab_size) to at least {v:,} or use a smaller tokenizer."
        )


def eos_id(tok: Tokenizer, what: str) -> int:
    for t in EOS_CANDIDATES:
        i = tok.token_to_id(t)
        if i is not None:
            return i
    raise DataError(f"the tokenizer {what} defines none of {', '.join(EOS_CANDIDATES)} to separate "
                    f"documents; add one as a special token.")


def tokenizer_sha(tok: Tokenizer) -> str:
    """Identity of a tokenizer's behaviour: the hash of its canonical serialisation."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def save_atomic(tok: Tokenizer, path: Path) -> None:
    """Write to a temporary name, then rename: a killed process leaves no file that
    looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")  # what tok.save writes, with Python's OSError
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -------------------------------------------------- worker processes (data.num_proc)

_WORKER_TOK = None  # the tokenizer of a tokenizing worker process, set once at its start


def init_encode_worker(tokenizer_json: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer.from_str(tokenizer_json)


def encode_pieces(pieces, ends, eos: int, dtype: str, tok=None):
    """Token ids of a batch of document pieces as one array, eos after each piece that
    ends a document. The same function in this process and in the workers, so the
    cache does not depend on data.num_proc."""
    import numpy as np

    tok = tok if tok is not None else _WORKER_TOK
    ids = []
    for enc, end in zip(tok.encode_batch(pieces, add_special_tokens=False), ends):
        ids.extend(enc.ids)
        if end:
            ids.append(eos)
    return np.asarray(ids, dtype=dtype)


def default_log(verbose: bool) -> Callable[[str], None]:
    if not verbose:
        return lambda msg: None
    return lambda msg: print(f"moelab data: {msg}", flush=True)
