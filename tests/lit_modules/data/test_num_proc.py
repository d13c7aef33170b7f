"""data.num_proc: the corpus tokenized by worker processes gives the very cache that
one process writes (batches are encoded apart and written in their order)."""
from __future__ import annotations

import json

import pytest

from arch import RecipeError, load_recipe
from lit_modules.data import datamodule as dm_mod
from lit_modules.data.datamodule import TokenDataModule


def recipe(cache, *extra):
    return load_recipe("qwen3/0.6b", ["model.vocab_size=512", "data.max_chars=120000", f"data.cache_dir={cache}",
                                      "data.val_fraction=0.05", *extra])


def test_workers_write_the_single_process_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(dm_mod, "ENCODE_BATCH_CHARS", 4000)  # ~30 batches: several in flight per worker
    pools = []
    enter = dm_mod._Encoder.__enter__

    def spy(self):
        out = enter(self)
        pools.append(self.pool is not None)
        return out

    monkeypatch.setattr(dm_mod._Encoder, "__enter__", spy)
    one = TokenDataModule(recipe(tmp_path / "one"), verbose=False)
    one.prepare_data()
    many = TokenDataModule(recipe(tmp_path / "many", "data.num_proc=3", f"data.tokenizer={one.tokenizer_path}"),
                           verbose=False)
    many.prepare_data()
    assert pools == [False, False, True, True]  # train and val, each way
    assert many._tokens_dir.name == one._tokens_dir.name  # num_proc is not part of the cache key
    for split in ("train", "val"):
        a = (one._tokens_dir / f"{split}.bin").read_bytes()
        assert len(a) > 10_000 and a == (many._tokens_dir / f"{split}.bin").read_bytes()
    drop = ("tokenizer",)
    assert ({k: v for k, v in one.meta.items() if k not in drop}
            == {k: v for k, v in many.meta.items() if k not in drop})


def test_num_proc_range():
    with pytest.raises(RecipeError) as e:
        load_recipe("qwen3/0.6b", ["data.num_proc=0"])
    assert "data.num_proc" in str(e.value)
