"""The data module: corpus -> tokenizer -> cached memmaps -> deterministic, resumable
batches. Small on purpose: a 200k-character slice of the standard library and a
512-token BPE, built once per module."""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from arch import RecipeError, load_recipe
from arch.config import DataConfig
from lit_modules.data.corpus import Corpus, DataError, stdlib_files
from lit_modules.data.datamodule import TokenDataModule, load_or_train_tokenizer

SEQ, MBS, ACCUM = 64, 4, 2


def make_recipe(cache, *extra, source=None, tokenizer=None):
    r = load_recipe("qwen3/0.6b", [
        "model.vocab_size=512", "data.max_chars=200000", f"data.cache_dir={cache}",
        f"train.seq_len={SEQ}", f"train.micro_batch_size={MBS}", f"train.grad_accum={ACCUM}",
        "train.val_batches=3", *extra,
    ])
    if source is not None:
        r.data.source = source
    if tokenizer is not None:
        r.data.tokenizer = str(tokenizer)
    return r


def make_dm(recipe, **kw):
    dm = TokenDataModule(recipe, verbose=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("moelab_cache")


@pytest.fixture(scope="module")
def stdlib_dm(cache):
    return make_dm(make_recipe(cache))


def stream(dm, split):
    d = dm._tokens_dir
    return np.fromfile(d / f"{split}.bin", dtype=dm.meta["dtype"])


def one_sentence(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.endswith("."), msg
    assert isinstance(e, RecipeError) and isinstance(e, ValueError)
    return msg


# ------------------------------------------------------------------ stdlib + BPE


def test_stdlib_corpus_bpe_memmap_and_shapes(stdlib_dm, cache):
    dm = stdlib_dm
    tok = dm.tokenizer
    assert dm.vocab_size == tok.get_vocab_size() <= 512
    assert dm.eos_id == tok.token_to_id("<|endoftext|>")
    assert (cache / dm.tokenizer_path.name).is_file() and dm.tokenizer_path.name.startswith("bpe-")
    assert dm.meta["dtype"] == "uint16"
    assert dm.train_tokens == stream(dm, "train").size > 0 and dm.val_tokens == stream(dm, "val").size > 0

    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (MBS * ACCUM, SEQ + 1) and batch.dtype == torch.long
    val = list(dm.val_dataloader())
    assert len(val) == 3 and all(b.shape == (MBS, SEQ + 1) for b in val)
    # every row is one of the non-overlapping windows of the stream
    windows = stream(dm, "train")[: (dm.train_tokens // (SEQ + 1)) * (SEQ + 1)].reshape(-1, SEQ + 1)
    rows = {tuple(w) for w in windows.tolist()}
    assert all(tuple(r) in rows for r in batch.tolist())


def test_token_stream_is_the_split_text_with_eos_between_documents(stdlib_dm):
    dm = stdlib_dm
    corpus = Corpus(dm.recipe.data)
    plan = corpus.plan()
    for split in ("train", "val"):
        docs = list(corpus.split(plan, split))
        text = dm.tokenizer.decode(stream(dm, split).tolist(), skip_special_tokens=False)
        assert text == "".join(d + "<|endoftext|>" for d in docs)


def test_split_is_by_file_stable_and_excludes_tests():
    files = [rel for rel, _ in stdlib_files()]
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for rel in files for part in rel.split("/")[:-1])
    from arch.config import DataConfig

    def assignment(cap):
        c = Corpus(DataConfig(max_chars=cap, val_fraction=0.1))
        plan = c.plan()
        return {name: plan.assign(name) for name, _ in c.documents()}, plan

    small, plan_s = assignment(300_000)
    big, plan_b = assignment(3_000_000)
    assert {"train", "val"} <= set(big.values())
    # a document keeps its split whatever else is in the corpus (unless forced to
    # keep a split non-empty)
    forced = {plan_s.forced_val, plan_s.forced_train, plan_b.forced_val, plan_b.forced_train}
    common = [n for n in small if n in big and n not in forced]
    assert common and all(small[n] == big[n] for n in common)
    share = sum(v == "val" for v in big.values()) / len(big)
    assert 0.02 < share < 0.3


# ---------------------------------------------------------------- determinism


def test_same_seed_same_batches_new_epoch_new_order(cache):
    r = make_recipe(cache)
    a, b = make_dm(r), make_dm(r)
    n = a.batches_per_epoch
    ia, ib = iter(a.train_dataloader()), iter(b.train_dataloader())
    for x, y in zip(take(ia, 3), take(ib, 3)):
        assert torch.equal(x, y)
    # an epoch is a permutation of the windows: no window twice
    ds = a._train
    perm0, perm1 = ds.order(0), ds.order(1)
    ids0 = np.concatenate([ds.batch_ids(perm0, i) for i in range(n)])
    assert len(set(ids0.tolist())) == len(ids0) == n * MBS * ACCUM
    assert not np.array_equal(perm0, perm1)
    # iterating again continues into epoch 1, whose first batch is perm1's
    epoch0 = list(a.train_dataloader())
    assert len(epoch0) == n - 3
    first1 = next(iter(a.train_dataloader()))
    assert torch.equal(first1, ds.windows.batch(ds.batch_ids(perm1, 0)))
    # another seed, another order
    c = make_dm(make_recipe(cache, "train.seed=7"))
    assert not torch.equal(next(iter(c.train_dataloader())), next(iter(make_dm(r).train_dataloader())))


@pytest.mark.parametrize("k", [5, "epoch", "epoch+2"])
def test_resume_continues_with_the_next_batch(cache, k):
    r = make_recipe(cache)
    ref = make_dm(r)
    n = ref.batches_per_epoch
    k = {"epoch": n, "epoch+2": n + 2}.get(k, k)
    it = iter(ref.train_dataloader())
    expected = []
    while len(expected) < k + 2:
        try:
            expected.append(next(it))
        except StopIteration:  # the epoch ended: a new pass is the next epoch
            it = iter(ref.train_dataloader())

    run = make_dm(r)
    it, seen = iter(run.train_dataloader()), 0
    while seen < k:
        try:
            next(it)
            seen += 1
        except StopIteration:
            it = iter(run.train_dataloader())
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file

    fresh = TokenDataModule(r, verbose=False)
    fresh.load_state_dict(state)  # as Lightning does it: before the loaders exist
    fresh.prepare_data()
    fresh.setup("fit")
    resumed = take(iter(fresh.train_dataloader()), 2)
    assert torch.equal(resumed[0], expected[k]) and torch.equal(resumed[1], expected[k + 1])

    late = make_dm(r)  # loading after setup works too
    late.load_state_dict(state)
    assert torch.equal(next(iter(late.train_dataloader())), expected[k])


def test_resume_with_a_larger_batch_continues_at_the_first_unseen_window(cache):
    ref = make_dm(make_recipe(cache))
    expected = take(iter(ref.train_dataloader()), 6)
    run = make_dm(make_recipe(cache))
    take(iter(run.train_dataloader()), 4)
    bigger = make_dm(make_recipe(cache, f"train.grad_accum={2 * ACCUM}"))
    bigger.load_state_dict(run.state_dict())
    nxt = next(iter(bigger.train_dataloader()))
    assert torch.equal(nxt, torch.cat([expected[4], expected[5]]))


def test_workers_give_the_same_batches(cache):
    r = make_recipe(cache)
    ref = take(iter(make_dm(r).train_dataloader()), 5)
    r.data.num_workers = 2
    dm = make_dm(r)
    it = iter(dm.train_dataloader())
    assert all(torch.equal(x, y) for x, y in zip(take(it, 5), ref))
    val = list(dm.val_dataloader())
    r.data.num_workers = 0
    assert all(torch.equal(x, y) for x, y in zip(val, list(make_dm(r).val_dataloader())))


def test_ddp_ranks_take_disjoint_slices_of_the_same_global_batch(cache):
    r2 = make_recipe(cache)
    ranks = [make_dm(r2, rank=i, world_size=2) for i in range(2)]
    # world 1 with twice the accumulation sees the same windows per optimizer step
    single = make_dm(make_recipe(cache, f"train.grad_accum={2 * ACCUM}"))
    assert single.batches_per_epoch == ranks[0].batches_per_epoch
    its = [iter(dm.train_dataloader()) for dm in ranks]
    seen = set()
    for s, whole in enumerate(take(iter(single.train_dataloader()), 4)):
        parts = [next(it) for it in its]
        assert all(p.shape == (MBS * ACCUM, SEQ + 1) for p in parts)
        rows = [tuple(x) for p in parts for x in p.tolist()]
        assert len(set(rows)) == len(rows) and not (set(rows) & seen)
        assert sorted(rows) == sorted(tuple(x) for x in whole.tolist())
        seen |= set(rows)
    v = [list(dm.val_dataloader()) for dm in ranks]
    assert len(v[0]) == len(v[1]) >= 1
    assert not {tuple(x) for b in v[0] for x in b.tolist()} & {tuple(x) for b in v[1] for x in b.tolist()}


# ------------------------------------------------------------ other sources


def test_text_glob_folder_and_jsonl_sources(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "notes").mkdir(parents=True)
    texts = [f"note {i}: " + "the quick brown fox jumps over the lazy dog. " * (20 + i) for i in range(6)]
    for i, t in enumerate(texts):
        (data / "notes" / f"n{i}.txt").write_text(t)
    with gzip.open(data / "notes" / "zipped.txt.gz", "wt") as f:
        f.write("compressed text, " * 50)
    records = [{"content": f"record {i} " + "lorem ipsum dolor sit amet " * 10, "id": i} for i in range(8)]
    (data / "d.jsonl").write_text("\n".join(json.dumps(x) for x in records) + "\n\n")
    cache = tmp_path / "cache"
    src = [str(data / "notes" / "*.txt"), str(data / "notes" / "*.gz"), str(data / "d.jsonl")]
    r = make_recipe(cache, "data.text_field=content", "data.val_fraction=0.2", "train.seq_len=16", source=src)
    dm = make_dm(r)
    everything = "".join(dm.tokenizer.decode(stream(dm, s).tolist(), skip_special_tokens=False)
                         for s in ("train", "val"))
    docs = [d for d in everything.split("<|endoftext|>") if d]
    assert sorted(docs) == sorted(texts + ["compressed text, " * 50] + [x["content"] for x in records])
    assert dm.val_tokens > 0 and dm.train_tokens > 0
    assert next(iter(dm.train_dataloader())).shape == (MBS * ACCUM, 17)
    # a folder takes its .txt/.md/.jsonl files; relative paths are from the CWD
    monkeypatch.chdir(tmp_path)
    folder = Corpus(make_recipe(cache, source="data").data)
    assert sorted(n for n, _ in folder.sources[0].files) == sorted(
        ["d.jsonl"] + [f"notes/n{i}.txt" for i in range(6)] + ["notes/zipped.txt.gz"])


def test_single_document_is_split_at_a_line(tmp_path):
    lines = [f"line {i} of the only document\n" for i in range(400)]
    (tmp_path / "one.txt").write_text("".join(lines))
    dm = make_dm(make_recipe(tmp_path / "c", "data.val_fraction=0.1", "train.seq_len=8",
                             "train.micro_batch_size=2", source=str(tmp_path / "one.txt")))
    corpus, plan = dm.corpus, dm.corpus.plan()
    train, val = list(corpus.split(plan, "train")), list(corpus.split(plan, "val"))
    assert train[0] + val[0] == "".join(lines) and val[0].startswith("line ")
    assert 0.05 < len(val[0]) / len("".join(lines)) < 0.15


def test_no_validation_when_val_fraction_is_zero(cache):
    dm = make_dm(make_recipe(cache, "data.val_fraction=0"))
    assert dm.val_tokens == 0 and dm.val_dataloader() == []
    assert next(iter(dm.train_dataloader())).shape == (MBS * ACCUM, SEQ + 1)


# ------------------------------------------------------------- tokenizer.json


def _write_bpe(path: Path, texts, vocab: int, special: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[special], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def test_tokenizer_json_path(tmp_path, stdlib_dm):
    texts = list(Corpus(stdlib_dm.recipe.data).documents())[:5]
    tok = _write_bpe(tmp_path / "tokenizer.json", [t for _, t in texts], 400, "</s>")
    r = make_recipe(tmp_path / "c", tokenizer=tmp_path)  # a folder holding tokenizer.json works
    dm = make_dm(r)
    assert dm.vocab_size == tok.get_vocab_size() <= 400  # smaller than the model's 512 is fine
    assert dm.eos_id == tok.token_to_id("</s>") and dm.tokenizer_path == tmp_path / "tokenizer.json"
    assert not list((tmp_path / "c").glob("bpe-*"))  # nothing trained
    assert load_or_train_tokenizer(r, verbose=False).to_str() == tok.to_str()
    assert stream(dm, "train")[-1] == dm.eos_id


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    n = 70_000
    vocab = {f"w{i}": i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(tmp_path / "big.json"))
    words = " ".join(f"w{i}" for i in range(n - 2000, n)) * 3
    (tmp_path / "t.txt").write_text(words)
    dm = make_dm(make_recipe(tmp_path / "c", f"model.vocab_size={n + 1}", "data.val_fraction=0",
                             "train.seq_len=16", source=str(tmp_path / "t.txt"), tokenizer=tmp_path / "big.json"))
    assert dm.meta["dtype"] == "uint32" and dm.eos_id == n
    s = stream(dm, "train")
    assert s.max() == n and s[0] == n - 2000


# -------------------------------------------------------------------- errors


def _no_tokens_written(cache: Path) -> bool:
    return not cache.exists() or not list(cache.glob("tokens-*"))


def test_error_path_matches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = TokenDataModule(make_recipe(tmp_path / "c", source="nowhere/*.txt"), verbose=False)
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = one_sentence(e.value)
    assert "data.source 'nowhere/*.txt' matches no file" in msg and str(tmp_path) in msg
    assert _no_tokens_written(tmp_path / "c")
    (tmp_path / "real.txt").write_text("some text\n")
    with pytest.raises(DataError, match=r"data.source\[1\] 'missing.jsonl' matches no file"):
        TokenDataModule(make_recipe(tmp_path / "c", source=["real.txt", "missing.jsonl"]), verbose=False).prepare_data()


def test_error_empty_corpus(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text(" \n\t\n" if i else "")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    dm = TokenDataModule(make_recipe(tmp_path / "c", source=[str(tmp_path / "*.txt"), str(tmp_path / "e.jsonl")]),
                         verbose=False)
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    assert "the corpus is empty" in one_sentence(e.value)
    assert _no_tokens_written(tmp_path / "c") and not list((tmp_path / "c").glob("bpe-*"))


def test_error_tokenizer_larger_than_model_vocab(tmp_path, stdlib_dm):
    texts = [t for _, t in list(Corpus(stdlib_dm.recipe.data).documents())[:5]]
    _write_bpe(tmp_path / "tok.json", texts, 600, "<|endoftext|>")
    dm = TokenDataModule(make_recipe(tmp_path / "c", tokenizer=tmp_path / "tok.json"), verbose=False)
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = one_sentence(e.value)
    assert "has 600 tokens but model.vocab_size is 512" in msg and "model.vocab_size" in msg
    assert _no_tokens_written(tmp_path / "c")


def test_a_data_config_built_in_code_meets_the_recipe_rules():
    # a recipe's data.val_fraction is refused by load_recipe (tests/arch/test_errors.py)
    with pytest.raises(DataError, match=r"data.val_fraction = 1.0 is out of range"):
        Corpus(DataConfig(val_fraction=1.0))


@pytest.mark.parametrize("case,words", [
    ("jsonl_field", ["no 'text' field", "data.text_field"]),
    ("bad_json", ["is not valid JSON"]),
    ("no_eos", ["defines none of", "<|endoftext|>"]),
    ("missing_tokenizer", ["is not a file"]),
    ("too_small", ["fewer than one step needs", "data.max_chars", "train.seq_len / train.micro_batch_size"]),
    ("too_small_stage", ["fewer than one step of stage 'long' needs", "train.stages[1].seq_len"]),
    ("too_small_stage_val", ["validation split", "fewer than one sequence of stage 'long'",
                             "train.stages[1].seq_len + 1 = 16385", "data.val_fraction"]),
])
def test_other_input_errors_are_one_sentence(tmp_path, case, words):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1}, unk_token="hello"))
    tok.save(str(tmp_path / "noeos.json"))
    r = {
        "jsonl_field": lambda: make_recipe(tmp_path, source=str(tmp_path / "a.jsonl")),
        "bad_json": lambda: make_recipe(tmp_path, source=str(tmp_path / "b.jsonl")),
        "no_eos": lambda: make_recipe(tmp_path, source=str(tmp_path / "t.txt"), tokenizer=tmp_path / "noeos.json"),
        "missing_tokenizer": lambda: make_recipe(tmp_path, tokenizer=tmp_path / "nope.json"),
        "too_small": lambda: make_recipe(tmp_path, "data.max_chars=2000", "train.seq_len=4096"),
        "too_small_stage": lambda: make_recipe(tmp_path, "train.max_steps=null",
                                               "train.stages=[{steps: 2}, {name: long, steps: 2, seq_len: 40960}]"),
        # 16,385-token windows: a few in the training split, none in its validation split
        "too_small_stage_val": lambda: make_recipe(tmp_path, "train.max_steps=null", "data.val_fraction=0.01",
                                                   "train.stages=[{steps: 2}, {name: long, steps: 2, seq_len: 16384, "
                                                   "micro_batch_size: 1, grad_accum: 1}]"),
    }[case]()
    with pytest.raises(DataError) as e:
        make_dm(r)
    msg = one_sentence(e.value)
    assert all(w in msg for w in words), msg


# --------------------------------------------------------------------- cache


def test_half_written_cache_is_ignored_and_rebuilt(tmp_path):
    cache = tmp_path / "c"
    r = make_recipe(cache)
    dm = make_dm(r)
    folder = dm._tokens_dir
    good = {s: stream(dm, s).copy() for s in ("train", "val")}
    # a killed writer: a partial temp file, a truncated stream and no meta.json
    (folder / "train.bin.tmp-999999999-dead").write_bytes(b"\0" * 100)
    (folder / "meta.json").unlink()
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(50)
    bpe = dm.tokenizer_path
    (bpe.parent / f"{bpe.name}.tmp-999999999-dead").write_text("{ half a tokeni")
    again = make_dm(r)
    assert again._tokens_dir == folder and (folder / "meta.json").is_file()
    assert all(np.array_equal(stream(again, s), good[s]) for s in good)
    clean = make_dm(make_recipe(tmp_path / "d"))  # built in an untouched folder
    assert torch.equal(next(iter(again.train_dataloader())), next(iter(clean.train_dataloader())))
    # a complete cache whose stream does not match its meta is rebuilt too
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\1\1")
    assert np.array_equal(stream(make_dm(r), "val"), good["val"])
    # the dead writer's temp file goes once it is old
    old = time.time() - 3600
    os.utime(folder / "train.bin.tmp-999999999-dead", (old, old))
    (folder / "meta.json").unlink()
    make_dm(r)
    assert not (folder / "train.bin.tmp-999999999-dead").exists()


def test_cache_is_reused_and_keyed_by_inputs(cache, stdlib_dm):
    n = len(list(cache.glob("tokens-*")))
    dm = TokenDataModule(make_recipe(cache), verbose=False)
    dm.prepare_data()
    assert dm._tokens_dir == stdlib_dm._tokens_dir and len(list(cache.glob("tokens-*"))) == n
    other = TokenDataModule(make_recipe(cache, "data.max_chars=150000"), verbose=False)
    other.prepare_data()
    assert other._tokens_dir != dm._tokens_dir and other.tokenizer_path != dm.tokenizer_path


def test_concurrent_preparation_builds_once(tmp_path, capsys):
    import threading

    r = make_recipe(tmp_path / "c", "data.max_chars=100000")
    dms = [TokenDataModule(r, verbose=True) for _ in range(3)]
    threads = [threading.Thread(target=dm.prepare_data) for dm in dms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = capsys.readouterr().out
    assert out.count("training a byte-level BPE") == 1 and out.count("cached in") == 1
    assert len({dm._tokens_dir for dm in dms}) == 1 and all(dm._meta == dms[0]._meta for dm in dms)


def test_quiet_when_not_verbose(tmp_path, capsys):
    make_dm(make_recipe(tmp_path / "c", "data.max_chars=50000"))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    dm = TokenDataModule(make_recipe(tmp_path / "c", "data.max_chars=50000"), verbose=True)
    dm.prepare_data()
    assert "moelab data: tokens: cached" in capsys.readouterr().out
