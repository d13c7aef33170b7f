"""Sharded checkpoint folders on one process: the run-directory layout knows them
beside .ckpt files, consolidation gives back the saved weights, a save that dies half
way leaves nothing that looks like a checkpoint, and every reader refuses a hostile
index (.metadata, a pickle) without running it. The multi-process saves and resumes
are in tests/lit_modules/train/test_sharded_checkpoints.py."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arch import recipe_to_yaml
from arch.registry import RecipeError
from conftest import MarkerPayload, tiny_model, tiny_recipe
from lit_modules.checkpoints import layout
from lit_modules.checkpoints.sharded import LAYOUT_KEY, read_tensors, save_sharded
from lit_modules.checkpoints.layout import CheckpointError
from lit_modules.checkpoints.model_dir import load_model, open_checkpoint
from lit_modules.checkpoints.safe import SafeFileSystemReader, load_dcp_metadata
from lit_modules.checkpoints.training import Checkpointing, check_resume, read_checkpoint


def write_sharded(path: Path, name: str = "qwen3_moe", step: int = 1):
    """A sharded checkpoint of a tiny model written by this one process; returns the model."""
    recipe, model = tiny_recipe(name), tiny_model(name)
    save_sharded({"moelab_recipe": recipe_to_yaml(recipe), "global_step": step,
                  "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "optimizer_states": [], LAYOUT_KEY: {"world_size": 1, "expert_parallel": 1, "fsdp": False}},
                 path)
    return model


def test_layout_knows_files_and_folders(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    torch.save({}, d / "step00000001.ckpt")
    write_sharded(d / "step00000002.dcp", step=2)
    (d / "step00000003.dcp").mkdir()  # no completion marker: not a checkpoint
    (d / ".step00000004.dcp.partial").mkdir()  # a killed save
    assert [p.name for p in layout.step_files(d)] == ["step00000001.ckpt", "step00000002.dcp"]
    assert layout.last_checkpoint(tmp_path / "run") == d / "step00000002.dcp"  # no last: the newest step
    os.symlink("step00000002.dcp", d / "last.dcp")
    assert layout.last_checkpoint(tmp_path / "run") == d / "last.dcp"
    assert [p.name for p in layout.stale_partials(d)] == [".step00000004.dcp.partial"]
    assert sorted(os.listdir(d / "step00000002.dcp")) == [".metadata", "__0_0.distcp", "complete.json",
                                                          "trainer.pt"]


def test_consolidation_on_one_process(tmp_path):
    run = tmp_path / "run"
    model = write_sharded(run / "checkpoints" / "step00000001.dcp")
    os.symlink("step00000001.dcp", run / "checkpoints" / "last.dcp")
    (run / "recipe.yaml").write_text(recipe_to_yaml(tiny_recipe("qwen3_moe")))
    want = model.state_dict()
    for source in (run, run / "checkpoints" / "last.dcp", run / "checkpoints" / "step00000001.dcp"):
        _, loaded, _ = load_model(source)
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), source
    # read a few tensors at a time: every tensor comes, whole
    streamed = dict(read_tensors(run / "checkpoints" / "last.dcp", batch_bytes=4096))
    assert streamed.keys() == {f"model.{k}" for k in want}
    assert all(torch.equal(streamed[f"model.{k}"], v) for k, v in want.items())
    assert check_resume(run / "checkpoints" / "last.dcp", tiny_recipe("qwen3_moe")) == 1


@pytest.mark.parametrize("dies_at", ["tensors", "trainer state", "marker", "rename"])
def test_a_save_that_dies_leaves_no_checkpoint(tmp_path, monkeypatch, dies_at):
    """An exception at any stage of a sharded save: the folder is never named as a
    checkpoint, nothing reads the partial one as complete, the previous checkpoint
    stays the newest, and the next run's setup removes the leftovers."""
    import lit_modules.checkpoints.sharded as distributed

    d = tmp_path / "run" / "checkpoints"
    write_sharded(d / "step00000001.dcp", step=1)
    os.symlink("step00000001.dcp", d / "last.dcp")

    def dies(*args, **kwargs):
        raise OSError(f"killed while writing the {dies_at}")

    if dies_at == "tensors":
        monkeypatch.setattr(distributed.dcp, "save", dies)
    elif dies_at == "rename":
        monkeypatch.setattr(distributed, "_rename_into_place", dies)
    else:
        real = distributed._write
        name = layout.SHARDED_TRAINER_FILE if dies_at == "trainer state" else layout.SHARDED_COMPLETE_FILE
        monkeypatch.setattr(distributed, "_write",
                            lambda path, write: dies() if path.name == name else real(path, write))
    with pytest.raises(OSError, match="killed"):
        write_sharded(d / "step00000002.dcp", step=2)
    monkeypatch.undo()
    partial = d / ".step00000002.dcp.partial"
    assert partial.is_dir() and not (d / "step00000002.dcp").exists()
    assert not layout.is_sharded_checkpoint(partial)
    assert [p.name for p in layout.step_files(d)] == ["step00000001.dcp"]
    assert layout.last_checkpoint(tmp_path / "run") == d / "last.dcp"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(partial)
    with pytest.raises(CheckpointError, match="not a (complete|moelab) checkpoint"):
        open_checkpoint(partial)  # eval / export-hf

    class Trainer:
        is_global_zero = True

    Checkpointing(d, every=1, sharded=True).setup(Trainer(), None, "fit")
    assert sorted(os.listdir(d)) == ["last.dcp", "step00000001.dcp"]


def test_the_same_step_saved_again_replaces_the_folder(tmp_path):
    path = tmp_path / "step00000001.dcp"
    write_sharded(path, name="qwen3_moe")
    model = write_sharded(path, name="qwen3")  # another model under the same name
    _, loaded, _ = load_model(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert sorted(os.listdir(tmp_path)) == ["step00000001.dcp"]


# ------------------------------------------------------------------ hostile indexes


@pytest.fixture
def hostile(tmp_path):
    """A run directory whose newest checkpoint is a sharded folder with a genuine
    trainer.pt and tensors but a .metadata that would create a marker file when
    unpickled; (run, folder, marker)."""
    run = tmp_path / "run"
    folder = run / "checkpoints" / "step00000001.dcp"
    write_sharded(folder)
    os.symlink(folder.name, run / "checkpoints" / "last.dcp")
    (run / "recipe.yaml").write_text(recipe_to_yaml(tiny_recipe("qwen3_moe")))
    marker = tmp_path / "PWNED"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.planner_data["state_dict.model.embed.weight"] = MarkerPayload(marker)  # inside a genuine index
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    pickle.loads((folder / ".metadata").read_bytes())  # the payload works: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    return run, folder, marker


def _refused(fn, marker, exc=(CheckpointError, RecipeError)) -> str:
    with pytest.raises(exc) as e:
        fn()
    assert not marker.exists(), "the checkpoint ran code"
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hostile_index_is_refused_by_every_reader(hostile):
    run, folder, marker = hostile
    msg = _refused(lambda: load_dcp_metadata(folder / ".metadata"), marker)
    assert "refused" in msg and "Path.touch" in msg
    _refused(lambda: SafeFileSystemReader(folder).read_metadata(), marker)  # what DCP's load calls
    _refused(lambda: load_model(folder), marker)  # eval, export-hf, convert
    _refused(lambda: load_model(run), marker)  # ... of a run directory
    # a bare payload as the whole index, too
    (folder / ".metadata").write_bytes(pickle.dumps(MarkerPayload(marker)))
    _refused(lambda: load_model(folder), marker)


def test_hostile_index_when_resuming(hostile):
    """Resuming reads the index in CausalLM.on_load_checkpoint (load_shards): refused."""
    from types import SimpleNamespace

    from lit_modules.checkpoints.sharded import load_shards
    from lit_modules.train.strategy import ScalePlan

    run, folder, marker = hostile
    checkpoint = read_checkpoint(folder)  # trainer.pt: plain data, fine
    model = tiny_model("qwen3_moe")
    module = SimpleNamespace(scale_plan=ScalePlan(), model=model,
                             state_dict=lambda: {f"model.{k}": v for k, v in model.state_dict().items()},
                             named_parameters=lambda: ((f"model.{n}", p) for n, p in model.named_parameters()))
    _refused(lambda: load_shards(checkpoint, module), marker)


def test_index_naming_files_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "step00000001.dcp"
    write_sharded(folder)
    (tmp_path / "outside.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside"):
        load_model(folder)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pickled_entry_instead_of_a_tensor_is_refused(tmp_path):
    """torch.distributed.checkpoint stores a non-tensor value as a pickle and loads it
    without weights_only: moelab's planner refuses to."""
    import torch.distributed.checkpoint as dcp

    from lit_modules.checkpoints.sharded import _load  # what load_shards and read_tensors call

    marker = tmp_path / "PWNED"
    folder = tmp_path / "ckpt"
    dcp.save({"state_dict": {"w": MarkerPayload(marker)}}, checkpoint_id=folder, no_dist=True)
    assert not marker.exists()
    msg = _refused(lambda: _load({"state_dict": {"w": torch.zeros(2)}}, folder, distributed=False), marker)
    assert "pickled object" in msg


def test_hostile_index_through_the_cli(hostile, tmp_path):
    pytest.importorskip("safetensors")
    run, folder, marker = hostile
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "export-hf", str(run), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and not marker.exists(), r.stderr
    assert "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr
