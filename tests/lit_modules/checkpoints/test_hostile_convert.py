"""import-hf / export-hf / convert on hostile input: a config.json that is not JSON,
has wrong types or leaves out sizes, a missing or truncated shard, an OUT_DIR below a
file, a full or read-only disk. Each is one line on stderr (exit 2, no traceback),
and no output directory, complete or partial, is left behind."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from conftest import refuse_writes, tiny_model, tiny_recipe
from lit_modules.cli import main

pytest.importorskip("safetensors")
pytest.importorskip("transformers")


def one_line_error(capsys, argv, *words) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from _hf_tiny import hf_model

    d = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    hf_model("qwen3_moe").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lit_modules.checkpoints.model_dir import save_model_dir

    d = tmp_path_factory.mktemp("moelab") / "qwen3"
    save_model_dir(tiny_model("qwen3"), tiny_recipe("qwen3"), d)
    return d


def copy_of(hf_dir: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    return d


@pytest.mark.parametrize("case,words", [
    ("not json", ["config.json is not valid JSON (Expecting", "repair it or download it again"]),
    ("a list", ["config.json holds a JSON list, not an object of config fields"]),
    ("latin-1", ["config.json is not valid JSON ('utf-8' codec can't decode byte 0xe9"]),
    ("wrong type", ["transformers rejects", "Field 'num_hidden_layers' expected int, got str (value: 'two')"]),
    ("architectures", ["field architectures = 'Qwen3MoeForCausalLM' is not a list of class names"]),
    ("left out", ["do not match its config.json", "config.json leaves out hidden_size, so transformers' "
                                                  "defaults stood in."]),
])
def test_malformed_config_json(hf_dir, tmp_path, capsys, case, words):
    d = copy_of(hf_dir, tmp_path)
    good = json.loads((d / "config.json").read_text())
    text = {
        "not json": "{not json",
        "a list": "[1, 2]",
        "wrong type": json.dumps(dict(good, num_hidden_layers="two")),
        "architectures": json.dumps(dict(good, architectures="Qwen3MoeForCausalLM")),
        "left out": json.dumps({k: v for k, v in good.items() if k != "hidden_size"}),
    }.get(case)
    if case == "latin-1":
        (d / "config.json").write_bytes(json.dumps(good).encode()[:-1] + b', "note": "caf\xe9"}')
    else:
        (d / "config.json").write_text(text)
    out = tmp_path / "out"
    one_line_error(capsys, ["import-hf", str(d), str(out)], *words)
    nothing_written(out)


@pytest.mark.parametrize("case,words", [
    ("no shard", ["holds no .safetensors file"]),
    ("index names a missing shard", ["names 1 shard(s) that are not in", "the download or copy is incomplete"]),
    ("truncated shard", ["model.safetensors is not a readable safetensors file", "truncated or corrupt"]),
])
def test_missing_or_broken_shard(hf_dir, tmp_path, capsys, case, words):
    d = copy_of(hf_dir, tmp_path)
    shard = d / "model.safetensors"
    if case == "no shard":
        shard.unlink()
    elif case == "index names a missing shard":
        shard.rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    for command in ("import-hf", "convert"):
        one_line_error(capsys, [command, str(d), str(out)], *words)
        nothing_written(out)


@pytest.mark.parametrize("command", ["import-hf", "export-hf", "convert"])
@pytest.mark.parametrize("below", ["/etc/passwd/x", "FILE/x/y"])
def test_out_dir_below_a_file(hf_dir, model_dir, tmp_path, capsys, command, below):
    (tmp_path / "FILE").write_text("a file")
    out = below.replace("FILE", str(tmp_path / "FILE"))
    file = "/etc/passwd" if below.startswith("/etc") else str(tmp_path / "FILE")
    source = hf_dir if command == "import-hf" else model_dir
    one_line_error(capsys, [command, str(source), out], f"OUT_DIR {out} lies below {file}, which is a file")
    assert Path(file).is_file()


@pytest.mark.parametrize("command", ["import-hf", "export-hf"])
@pytest.mark.parametrize("err,says", [(errno.ENOSPC, "the disk is full (ENOSPC)"),
                                      (errno.EROFS, "the file system is read-only (EROFS)")])
def test_unwritable_out_dir(hf_dir, model_dir, tmp_path, monkeypatch, capsys, command, err, says):
    """A full disk hits the shard files (the partial folder exists, then is removed);
    a read-only one refuses the first folder."""
    parent = tmp_path / "disk"
    parent.mkdir()
    out = parent / "out"
    source = hf_dir if command == "import-hf" else model_dir
    if err == errno.ENOSPC:
        import lit_modules.checkpoints.model_dir as md

        real_add = md.ShardWriter.add

        def add(self, name, tensor):
            if self.total > 1000:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "x.data"))
            return real_add(self, name, tensor)

        monkeypatch.setattr(md.ShardWriter, "add", add)
    else:
        refuse_writes(monkeypatch, parent, err)
    one_line_error(capsys, [command, str(source), str(out)], f"cannot write OUT_DIR {out}: {says}",
                   "choose another OUT_DIR")
    monkeypatch.undo()
    nothing_written(out)
    assert list(parent.iterdir()) == []
