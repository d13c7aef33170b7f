"""Weighted data mixtures (data.mix): realised shares match the weights, a run
stopped and resumed sees the uninterrupted run's batches (under a Trainer too), each
source is cached and validated on its own, and bad mixes get one sentence."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from _recorder import fit as recorder_fit
from arch import RecipeError, load_recipe
from lit_modules.data.corpus import DataError
from lit_modules.data.datamodule import TokenDataModule
from lit_modules.data.mix import MIX_CHUNK, MixSchedule

SEQ, MBS, ACCUM = 32, 2, 2
WEIGHTS = {"a": 5, "b": 3, "c": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three JSONL sources of different sizes and vocabularies."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    for name, docs in (("a", 120), ("b", 60), ("c", 200)):
        words = [f"{name}{w}" for w in ("x", "yy", "zzz", "q", "rr")]
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
    return root


def mix_spec(root, weights=WEIGHTS):
    return "[" + ", ".join(f"{{source: {root / n}.jsonl, weight: {w}, name: {n}}}" for n, w in weights.items()) + "]"


def make_recipe(root, *extra, weights=WEIGHTS):
    return load_recipe("qwen3/0.6b", [
        "model.vocab_size=512", f"data.cache_dir={root / 'cache'}", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MBS}", f"train.grad_accum={ACCUM}", "train.val_batches=2", "data.val_fraction=0.1",
        f"data.mix={mix_spec(root, weights)}", *extra,
    ])


def make_dm(recipe, **kw):
    dm = TokenDataModule(recipe, verbose=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(dm, n):
    """The next n training batches; outside a Trainer a loader ends with the epoch and
    iterating it again continues from the data position."""
    loader, out = dm.train_dataloader(), []
    while len(out) < n:
        out += [b for _, b in zip(range(n - len(out)), loader)]
    return out


def source_of_rows(dm, batch):
    """Which source each row of a batch is a window of (by content)."""
    window = SEQ + 1
    lookup = {}
    for i, part in enumerate(dm._parts):
        ids = np.fromfile(part._tokens_dir / "train.bin", dtype=part.meta["dtype"]).astype(np.int64)
        for k in range(len(ids) // window):
            lookup.setdefault(ids[k * window:(k + 1) * window].tobytes(), set()).add(i)
    out = []
    for row in batch.numpy():
        hit = lookup[row.tobytes()]
        assert len(hit) == 1
        out.append(hit.pop())
    return out


def test_schedule_counts_are_exact_at_chunk_boundaries():
    w = np.array([0.55, 0.3, 0.15])
    s = MixSchedule(w, seed=7)
    for m in (1, 3, 10):
        src, _ = s.locate(np.arange(s.chunk_start(m)))
        assert np.bincount(src, minlength=3).tolist() == np.floor(m * MIX_CHUNK * w).astype(int).tolist()
    # draws of each source are 0, 1, 2, ... in slot order: no window skipped or repeated early
    src, draws = s.locate(np.arange(3 * MIX_CHUNK))
    for i in range(3):
        assert draws[src == i].tolist() == list(range(int((src == i).sum())))
    # located one by one from anywhere (as a resumed run does), the same
    some = np.concatenate([[5000, 17, 12287, 4095, 4096], np.random.default_rng(1).integers(0, 3 * MIX_CHUNK, 300)])
    src2, draws2 = MixSchedule(w, seed=7).locate(some)
    assert src2.tolist() == src[some].tolist() and draws2.tolist() == draws[some].tolist()
    assert MixSchedule(w, seed=8).locate(np.arange(64))[0].tolist() != src[:64].tolist()


def test_realised_shares_match_the_weights(data):
    dm = make_dm(make_recipe(data))
    steps = 300  # 1,200 windows; crosses several mix epochs
    assert steps > 2 * dm.batches_per_epoch
    counts = np.zeros(3)
    for b in batches(dm, steps):
        counts += np.bincount(source_of_rows(dm, b), minlength=3)
    total = sum(WEIGHTS.values())
    shares = counts / counts.sum()
    expected = np.array([w / total for w in WEIGHTS.values()])
    assert np.abs(shares - expected).max() < 0.04, shares
    # each source is its own cache, with one tokenizer
    assert len({p._tokens_dir for p in dm._parts}) == 3
    assert len({p.meta["tokenizer_sha"] for p in dm._parts}) == 1
    assert dm.meta["train_tokens"] == sum(p.meta["train_tokens"] for p in dm._parts)


def test_resume_mid_run_is_exact(data):
    recipe = make_recipe(data)
    ref_dm = make_dm(recipe)
    n = ref_dm.batches_per_epoch
    total = n + 7  # across an epoch boundary of the mix
    ref = batches(ref_dm, total)
    assert len({tuple(b.flatten().tolist()) for b in ref}) == total
    for stop in (5, n):
        first = make_dm(recipe)
        batches(first, stop)
        state = first.state_dict()
        again = TokenDataModule(recipe, verbose=False)
        again.load_state_dict(state)  # before setup, as Lightning does
        again.setup("fit")
        assert all(torch.equal(a, b) for a, b in zip(batches(again, total - stop), ref[stop:]))
    # another seed or other weights: another order
    other = make_dm(make_recipe(data, weights={"a": 1, "b": 1, "c": 1}))
    assert not torch.equal(batches(other, 1)[0], ref[0])


def fit(recipe, max_steps, **kw):
    module, dm, _ = recorder_fit(recipe, max_steps, val_check_interval=4, **kw)
    return module, dm


def test_trainer_resume_and_per_source_validation(data, tmp_path):
    recipe = make_recipe(data)
    ref, dm = fit(recipe, 12)
    stop = 6
    fit(recipe, stop, ckpt_dir=tmp_path / "ckpt", every=stop)
    resumed, _ = fit(recipe, 12, resume=str(tmp_path / "ckpt" / f"step={stop}.ckpt"))
    assert len(resumed.seen) == 12 - stop
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, ref.seen[stop:]))
    # one validation loader per source, each batch from that source's validation stream
    assert sorted(ref.val_by_loader()) == [0, 1, 2] and dm.mix_names == ["a", "b", "c"]
    for i, part in enumerate(dm._parts):
        val = np.fromfile(part._tokens_dir / "val.bin", dtype=part.meta["dtype"]).astype(np.int64)
        windows = {val[k * (SEQ + 1):(k + 1) * (SEQ + 1)].tobytes() for k in range(len(val) // (SEQ + 1))}
        rows = [r.tobytes() for b in ref.val_by_loader()[i] for r in b.numpy()]
        assert rows and all(r in windows for r in rows)


def test_per_source_text_field(data, tmp_path):
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"dd{i} " * 30}) + "\n")
    spec = f"[{{source: {data}/a.jsonl}}, {{source: {tmp_path}/d.jsonl, text_field: body}}]"
    r = load_recipe("qwen3/0.6b", ["model.vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}", f"data.mix={spec}"])
    dm = TokenDataModule(r, verbose=False)
    dm.prepare_data()
    assert dm.mix_names == ["a", "d"] and dm._parts[1].meta["documents"] == 30


def test_tokenizer_for_a_mix(data, tmp_path):
    # the trained BPE depends on the weights (its sample does); a given tokenizer.json is shared
    a = TokenDataModule(make_recipe(data), verbose=False).tokenizer_path
    b = TokenDataModule(make_recipe(data, weights={"a": 1, "b": 1, "c": 8}), verbose=False).tokenizer_path
    assert a != b and a.name.startswith("bpe-")
    dm = make_dm(make_recipe(data, f"data.tokenizer={a}"))
    assert {p.tokenizer_path for p in dm._parts} == {a}


def one_sentence(e):
    msg = str(e)
    assert "\n" not in msg and msg.endswith("."), msg
    assert isinstance(e, RecipeError)
    return msg


def test_bad_mixes_one_sentence(data):
    cases = [
        ("[]", "empty list"),
        (f"[{{source: {data}/a.jsonl}}, {{source: {data}/a.jsonl}}]", "names 'a' twice"),
        (f"[{{source: [{data}/a.jsonl, {data}/b.jsonl]}}]", "data.mix[0].name"),
        (f"[{{source: {data}/a.jsonl, name: 'a b'}}]", "not a usable name"),
        (f"[{{name: x}}]", "has no source"),
        (f"[{{source: {data}/a.jsonl}}, {{source: {data}/nothing.txt}}]", "data.mix[1].source"),
    ]
    for spec, words in cases:
        r = load_recipe("qwen3/0.6b", ["model.vocab_size=512", f"data.cache_dir={data / 'cache'}",
                                       f"data.mix={spec}"])
        with pytest.raises(DataError) as e:
            TokenDataModule(r, verbose=False).prepare_tokenizer()
        assert words in one_sentence(e.value), e.value
    with pytest.raises(RecipeError) as e:
        load_recipe("qwen3/0.6b", [f"data.mix=[{{source: {data}/a.jsonl, weight: 0}}]"])
    assert "data.mix[0].weight" in one_sentence(e.value)
