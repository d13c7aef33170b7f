"""Data that is not what it claims: binary files, other encodings, broken .gz files,
symbolic-link loops, token caches that disagree with their meta.json, pathological
text for the BPE, and a cache folder that cannot be written. Each gets one sentence
naming the file (or is read as the recipe says), before any work that would be lost;
nothing half-written is left in the cache."""
from __future__ import annotations

import errno
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from arch import load_recipe
from conftest import refuse_writes
from lit_modules.data.corpus import Corpus, DataError
from lit_modules.data.datamodule import TokenDataModule
from lit_modules.disk import DiskError

ROOT = Path(__file__).resolve().parents[3]


def recipe(cache, source, *extra):
    r = load_recipe("qwen3/0.6b", ["model.vocab_size=512", f"data.cache_dir={cache}", "train.seq_len=16",
                                   "train.micro_batch_size=2", "data.val_fraction=0.0", *extra])
    r.data.source = str(source)
    return r


def refused(fn, exc=DataError, *words):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def prepare(cache, source, *extra):
    dm = TokenDataModule(recipe(cache, source, *extra), verbose=False)
    dm.prepare_data()
    return dm


def nothing_cached(cache: Path) -> None:
    """No tokenizer, no token folder with a meta.json, no temporary file."""
    assert not list(cache.glob("bpe-*.json"))
    assert not list(cache.glob("tokens-*/meta.json"))
    assert not list(cache.rglob("*.tmp-*"))


TEXT = "def add(a, b):\n    return a + b\n\n" * 200


# ------------------------------------------------------------------ binary files, encodings


def test_binary_file_is_refused_naming_it_and_the_offset(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.txt").write_text(TEXT)
    (tmp_path / "d" / "image.txt").write_bytes(b"GIF89a" + bytes(range(256)) * 4)
    cache = tmp_path / "cache"
    msg = refused(lambda: prepare(cache, tmp_path / "d" / "*.txt"), DataError,
                  f"{tmp_path / 'd' / 'image.txt'} holds NUL bytes (the first at byte offset 6)", "binary")
    assert "data.source" in msg
    nothing_cached(cache)


def test_other_encoding_is_refused_with_the_offset_and_the_fix(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes(TEXT.encode() + "caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
    cache = tmp_path / "cache"
    off = len(TEXT.encode()) + 3
    msg = refused(lambda: prepare(cache, f), DataError,
                  f"{f} is not utf-8 text: the byte at offset {off:,} (0xe9) does not decode",
                  "data.encoding=latin-1", "convert")
    assert msg.endswith(".")
    nothing_cached(cache)
    # read as the recipe says: latin-1 decodes it, and the choice is part of the cache key
    dm = prepare(cache, f, "data.encoding=latin-1")
    assert "café crème" in "".join(dm.corpus.split(dm._get_plan(), "train"))
    assert dm.corpus.fingerprint()["encoding"] == "latin-1"
    assert Corpus(recipe(cache, f).data).key() != dm.corpus.key()


def test_utf16_text_is_read_when_the_recipe_says_so(tmp_path):
    f = tmp_path / "wide.txt"
    f.write_bytes(TEXT.encode("utf-16"))
    refused(lambda: Corpus(recipe(tmp_path, f).data).plan(), DataError, "holds NUL bytes", "data.encoding=utf-16")
    plan = Corpus(recipe(tmp_path, f, "data.encoding=utf-16").data).plan()
    assert plan.chars == len(TEXT)


def test_undecodable_jsonl_and_gz_name_the_file(tmp_path):
    j = tmp_path / "dump.jsonl"
    j.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    refused(lambda: Corpus(recipe(tmp_path, j).data).plan(), DataError,
            f"{j} is not utf-8 text: the byte at offset 30 (0xe9)")
    assert Corpus(recipe(tmp_path, j, "data.encoding=cp1252").data).plan().n_docs == 2
    g = tmp_path / "notes.txt.gz"
    g.write_bytes(gzip.compress(b"fine\n" * 10 + b"\xff\xfe bad\n"))
    refused(lambda: Corpus(recipe(tmp_path, g).data).plan(), DataError,
            f"{g} is not utf-8 text: the byte at offset 50 of its decompressed data (0xff)")


@pytest.mark.parametrize("encoding", ["no-such-codec", "base64", "rot13"])
def test_unknown_encoding_is_one_sentence(tmp_path, encoding):
    (tmp_path / "a.txt").write_text(TEXT)
    refused(lambda: Corpus(recipe(tmp_path, tmp_path / "a.txt", f"data.encoding={encoding}").data), DataError,
            f"data.encoding = '{encoding}' is not a text encoding")


NOISE = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes().hex()  # compresses poorly
GZ = {
    "cut.txt.gz": gzip.compress(NOISE.encode())[:2000],
    "plain.txt.gz": TEXT.encode(),  # named .gz, not compressed
    "crc.txt.gz": gzip.compress(NOISE.encode())[:-8] + b"\0" * 8,
    "cut.jsonl.gz": gzip.compress(json.dumps({"text": NOISE}).encode())[:2000],
}


@pytest.mark.parametrize("name", sorted(GZ))
def test_truncated_or_corrupt_gz_names_the_file(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(GZ[name])
    cache = tmp_path / "cache"
    refused(lambda: prepare(cache, f), DataError, f"{f} is not a readable gzip file", "truncated or corrupt")
    nothing_cached(cache)


# ------------------------------------------------------------------ symbolic links


_LOOP = """
import sys, time
from arch.config import DataConfig
from lit_modules.data.corpus import Corpus
t = time.time()
c = Corpus(DataConfig(source=sys.argv[1]))
print(sorted(n for s in c.sources for n, _ in s.files), round(time.time() - t, 1))
"""


def test_symlink_loops_under_a_recursive_glob_neither_hang_nor_repeat(tmp_path):
    """Two links back up the tree: glob follows them until the path is too long, 2^40
    ways (it never returned); each file is read once, by its first name."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    (d / "sub" / "up").symlink_to("..")
    (d / "self").symlink_to(".")
    (d / "alias.txt").symlink_to("a.txt")  # a file reached by two names
    done = subprocess.run([sys.executable, "-c", _LOOP, f"{d}/**/*.txt"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names, seconds = done.stdout.rsplit(" ", 1)
    assert names == "['a.txt', 'sub/b.txt']" and float(seconds) < 10


def test_the_same_file_from_two_sources_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    r = recipe(tmp_path, tmp_path / "a.txt")
    r.data.source = [str(tmp_path / "a.txt"), str(tmp_path / "*.txt")]
    assert Corpus(r.data).plan().n_docs == 1


# ------------------------------------------------------------------ token caches


@pytest.fixture
def built(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 5)
    dm = prepare(tmp_path / "cache", tmp_path / "a.txt")
    return dm, {s: np.fromfile(dm._tokens_dir / f"{s}.bin", dtype=dm.meta["dtype"]) for s in ("train", "val")}


@pytest.mark.parametrize("damage,says", [
    ("id", "holds the id 65,535, past the tokenizer's"),
    ("size", "train.bin holds"),
    ("meta_vocab", "meta.json says uint16 ids of a 70000-token vocabulary"),
    ("meta_eos", "end-of-text id"),
])
def test_a_cache_that_disagrees_with_its_meta_is_said_and_rebuilt(built, capsys, damage, says):
    dm, good = built
    folder = dm._tokens_dir
    meta = json.loads((folder / "meta.json").read_text())
    if damage == "id":  # same size, one id past the vocabulary: sizes alone would pass it
        ids = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r+")
        ids[7] = 65535
        ids.flush()
        del ids
    elif damage == "size":
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\1\1")
    else:
        meta.update(vocab_size=70000) if damage == "meta_vocab" else meta.update(eos_id=meta["eos_id"] + 1)
        (folder / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    again = TokenDataModule(dm.recipe, verbose=False)
    again.prepare_data()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moelab data: the token cache {folder} is corrupt (") and says in err, err
    assert err.endswith("; rebuilding it.") and len(err.splitlines()) == 1
    for s, ids in good.items():
        assert np.array_equal(np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]), ids)
    assert json.loads((folder / "meta.json").read_text())["vocab_size"] == dm.vocab_size
    TokenDataModule(dm.recipe, verbose=False).prepare_data()  # now sound: nothing said
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ pathological text


def test_bpe_training_on_pathological_text_is_quick(tmp_path):
    """One run of 4M identical letters and a 2M-character line without a space: single
    words of that length took the trainer minutes (quadratic in a word's length)."""
    rng = np.random.default_rng(0)
    (tmp_path / "run.txt").write_text("a" * 4_000_000)
    (tmp_path / "line.txt").write_text("".join(rng.choice(list("abcdefghij"), 2_000_000)) + "\n" + TEXT)
    t = time.time()
    dm = prepare(tmp_path / "cache", tmp_path / "*.txt", "data.val_fraction=0.02")
    assert time.time() - t < 60 and dm.vocab_size > 258


def test_bounded_runs_leave_ordinary_text_alone():
    from lit_modules.data.tokenizer import BPE_MAX_RUN, bounded_runs

    assert list(bounded_runs([TEXT])) == [TEXT]
    long = "x " + "y" * (2 * BPE_MAX_RUN + 5) + " " + " " * (BPE_MAX_RUN + 1) + "z"
    pieces = list(bounded_runs([long]))
    assert "".join(pieces) == long and max(map(len, pieces)) <= BPE_MAX_RUN


# ------------------------------------------------------------------ a cache that cannot be written


@pytest.mark.parametrize("err,says", [(errno.EROFS, "the file system is read-only (EROFS)"),
                                      (errno.ENOSPC, "the disk is full (ENOSPC)"),
                                      (errno.EACCES, "permission is denied (EACCES)")])
def test_unwritable_cache_names_the_folder_and_why(tmp_path, monkeypatch, err, says):
    (tmp_path / "a.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    cache.mkdir()
    refuse_writes(monkeypatch, cache, err)
    refused(lambda: prepare(cache, tmp_path / "a.txt"), DiskError, f"cannot write the data cache {cache}",
            says, "data.cache_dir")
    monkeypatch.undo()
    assert list(cache.iterdir()) == []


def test_full_disk_while_tokenizing_leaves_no_partial_file(tmp_path, monkeypatch):
    """The BPE is saved; the token files then hit a full disk: no temporary file and no
    meta.json are left, and the next run (with room) builds the cache."""
    import lit_modules.data.datamodule as dmod

    (tmp_path / "a.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    real = dmod.os.replace

    def full(src, dst):
        if Path(dst).suffix == ".bin":
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(dmod.os, "replace", full)
    refused(lambda: prepare(cache, tmp_path / "a.txt"), DiskError, "cannot write the data cache", "(ENOSPC)")
    monkeypatch.undo()
    assert list(cache.glob("bpe-*.json")) and not list(cache.glob("tokens-*/*"))
    assert prepare(cache, tmp_path / "a.txt").train_tokens > 0


def test_cache_dir_below_a_file(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    refused(lambda: prepare(tmp_path / "a.txt" / "cache", tmp_path / "a.txt"), DiskError,
            f"data.cache_dir {tmp_path / 'a.txt' / 'cache'} lies below {tmp_path / 'a.txt'}, which is a file")


def test_embedded_corpus_reads_python_sources_in_their_declared_encoding(tmp_path):
    """The standard-library corpus must read on any Python version: a source with a
    PEP 263 coding cookie decodes as Python would, not as UTF-8."""
    from lit_modules.data.corpus import _python_source

    src = tmp_path / "legacy.py"
    src.write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    assert "café" in _python_source(src)
    plain = tmp_path / "plain.py"
    plain.write_bytes("x = 'café'\n".encode())
    assert "café" in _python_source(plain)
