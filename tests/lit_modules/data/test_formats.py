"""Parquet files and `datasets` save_to_disk folders as corpus sources: the same
documents, names, split and fingerprint rules as JSONL; one sentence for each bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from arch import RecipeError  # noqa: E402
from arch.config import DataConfig  # noqa: E402
from lit_modules.data import corpus as corpus_mod  # noqa: E402
from lit_modules.data.corpus import Corpus, DataError  # noqa: E402

TEXTS = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(40)]


def one_sentence(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.endswith("."), msg
    assert isinstance(e, RecipeError)
    return msg


def write_parquet(path: Path, texts, column="text", row_group=16):
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group)


def write_arrow_stream(path: Path, texts, column="text"):
    table = pa.table({column: texts})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=8):
            w.write_batch(batch)


def write_datasets_dir(folder: Path, shards, column="text"):
    """What Dataset.save_to_disk writes: Arrow stream shards listed in state.json."""
    folder.mkdir(parents=True)
    names = []
    for i, texts in enumerate(shards):
        name = f"data-{i:05d}-of-{len(shards):05d}.arrow"
        write_arrow_stream(folder / name, texts, column)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def docs(source, **kw):
    return list(Corpus(DataConfig(source=str(source), **kw)).documents())


def test_parquet_rows_are_documents(tmp_path):
    write_parquet(tmp_path / "a.parquet", TEXTS[:20] + [None] + TEXTS[20:])
    got = docs(tmp_path / "a.parquet")
    assert [t for _, t in got] == TEXTS  # every row group, in order; the null row skipped
    assert got[0][0] == "a.parquet:1" and got[-1][0] == "a.parquet:41"  # rows counted from 1, nulls included


def test_parquet_folder_glob_and_text_field(tmp_path):
    write_parquet(tmp_path / "b.parquet", TEXTS[20:], column="content")
    write_parquet(tmp_path / "a.parquet", TEXTS[:20], column="content")
    by_folder = docs(tmp_path, text_field="content")
    assert [t for _, t in by_folder] == TEXTS  # sorted by path
    assert by_folder == docs(tmp_path / "*.parquet", text_field="content")


def test_datasets_dir_and_dict(tmp_path):
    write_datasets_dir(tmp_path / "ds", [TEXTS[:25], TEXTS[25:]])
    got = docs(tmp_path / "ds")
    assert [t for _, t in got] == TEXTS
    assert got[0][0] == "data-00000-of-00002.arrow:1"
    # a DatasetDict: every split, in dataset_dict.json's order
    write_datasets_dir(tmp_path / "dd" / "train", [TEXTS[10:]])
    write_datasets_dir(tmp_path / "dd" / "test", [TEXTS[:10]])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    assert [t for _, t in docs(tmp_path / "dd")] == TEXTS


def test_split_and_fingerprint_rules(tmp_path):
    write_parquet(tmp_path / "a.parquet", TEXTS)
    c = Corpus(DataConfig(source=str(tmp_path / "a.parquet"), val_fraction=0.2))
    plan = c.plan()
    val = list(c.split(plan, "val"))
    assert 0 < len(val) < len(TEXTS) and plan.n_docs == len(TEXTS)
    assert sorted(val + list(c.split(plan, "train"))) == sorted(TEXTS)
    other = Corpus(DataConfig(source=str(tmp_path / "a.parquet"), val_fraction=0.2, text_field="id"))
    assert other.key() != c.key()  # the column is part of the fingerprint
    key = c.key()
    write_parquet(tmp_path / "a.parquet", TEXTS[:-1])
    assert Corpus(DataConfig(source=str(tmp_path / "a.parquet"), val_fraction=0.2)).key() != key


def test_real_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(
        str(tmp_path / "real"), max_shard_size="1KB")
    assert [t for _, t in docs(tmp_path / "real")] == TEXTS


def test_bad_tables_one_sentence(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", TEXTS)
    with pytest.raises(DataError) as e:
        docs(tmp_path / "a.parquet", text_field="body")
    assert "no column 'body'" in one_sentence(e.value) and "text, id" in str(e.value)
    with pytest.raises(DataError) as e:
        docs(tmp_path / "a.parquet", text_field="id")
    assert "not strings" in one_sentence(e.value)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as e:
        docs(tmp_path / "bad.parquet")
    assert "not a readable Parquet file" in one_sentence(e.value)
    # .arrow files without state.json: not a datasets directory
    (tmp_path / "loose").mkdir()
    write_arrow_stream(tmp_path / "loose" / "x.arrow", TEXTS)
    with pytest.raises(DataError) as e:
        Corpus(DataConfig(source=str(tmp_path / "loose")))
    assert "not a datasets directory" in one_sentence(e.value)
    # state.json naming a file outside its folder
    write_datasets_dir(tmp_path / "ds", [TEXTS])
    (tmp_path / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../a.parquet"}]}))
    with pytest.raises(DataError) as e:
        Corpus(DataConfig(source=str(tmp_path / "ds")))
    assert "outside" in one_sentence(e.value)
    # pyarrow missing: said when the corpus is built, before any work
    real_import = __import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr("builtins.__import__", no_pyarrow)
    with pytest.raises(DataError) as e:
        Corpus(DataConfig(source=str(tmp_path / "a.parquet")))
    assert "needs pyarrow" in one_sentence(e.value)
