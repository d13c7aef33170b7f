"""moelab model directories, Lightning checkpoints and run directories as sources."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("safetensors")

from conftest import tiny_model, tiny_recipe  # noqa: E402

from arch import recipe_to_yaml  # noqa: E402
from lit_modules.checkpoints.model_dir import CheckpointError, ShardWriter, load_model_dir, save_model_dir  # noqa: E402


def logits(model, vocab, seed=0):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_model_dir_round_trip_sharded(tmp_path, tiny_name):
    recipe, model = tiny_recipe(tiny_name), tiny_model(tiny_name)
    files = save_model_dir(model, recipe, tmp_path / "m", max_shard_bytes=20_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded_recipe, loaded = load_model_dir(tmp_path / "m")
    assert recipe_to_yaml(loaded_recipe) == recipe_to_yaml(recipe)
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(logits(loaded, recipe.model.vocab_size), logits(model, recipe.model.vocab_size))


def _lightning_ckpt(path, recipe, model):
    """What the Lightning helper writes: the resolved recipe YAML and the module's
    state_dict, whose model weights are prefixed "model."."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["train_ppl.total"] = torch.tensor(3.0)  # another member of the LightningModule
    torch.save({"epoch": 1, "global_step": 7, "state_dict": state, "moelab_recipe": recipe_to_yaml(recipe),
                "optimizer_states": []}, path)


def test_lightning_checkpoint_and_run_dir(tmp_path):
    recipe, model = tiny_recipe("qwen3_moe"), tiny_model("qwen3_moe")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "recipe.yaml").write_text(recipe_to_yaml(recipe))  # as `moelab train` leaves it
    _lightning_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", recipe, model)
    want = logits(model, recipe.model.vocab_size)
    for source in (tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run"):
        _, loaded = load_model_dir(source)
        assert torch.equal(logits(loaded, recipe.model.vocab_size), want)


def test_checkpoint_of_another_architecture_is_one_sentence(tmp_path):
    recipe = tiny_recipe("qwen3")
    other = tiny_model("qwen3", "model.ffn.d_ff=96", "model.n_layers=3")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    _lightning_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", recipe, other)
    with pytest.raises(CheckpointError) as e:
        load_model_dir(tmp_path / "run")
    msg = str(e.value)
    assert "do not match the architecture" in msg and "unexpected" in msg and "(96, 64) vs (128, 64)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "is not a moelab checkpoint"),
    (lambda p: (p / "checkpoints").mkdir(parents=True), "no checkpoints/last.ckpt"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "import-hf"),
    (lambda p: (p.mkdir(), torch.save({"state_dict": {}}, p / "x.ckpt")), "moelab_recipe"),
])
def test_bad_sources(tmp_path, make, needle):
    src = tmp_path / "src"
    make(src)
    target = src / "x.ckpt" if (src / "x.ckpt").exists() else src
    with pytest.raises(CheckpointError) as e:
        load_model_dir(target)
    assert needle in str(e.value)


def test_refuses_non_empty_out_dir_and_leaves_nothing_half_written(tmp_path):
    recipe, model = tiny_recipe("qwen3"), tiny_model("qwen3")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError):
        save_model_dir(model, recipe, tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_shard_writer_files_are_plain_safetensors(tmp_path):
    """The streaming writer's files read back with safetensors itself, every dtype and
    odd shape included, split where the size limit says."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(7, 5, generator=g), "b.bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 3, 4, generator=g).half(), "d.i64": torch.arange(9), "e.bool": torch.tensor([True, False]),
        "f.scalar": torch.tensor(2.5), "g.empty": torch.zeros(0, 4), "h.view": torch.randn(6, 6, generator=g)[:, 1:3],
    }
    w = ShardWriter(tmp_path, max_shard_bytes=100)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    back = {}
    for f in files:
        back.update(load_file(str(tmp_path / f)))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert not list(tmp_path.glob(".*"))  # no scratch files left
