"""Files from others are data, never code: a malicious checkpoint must not run on any
loading path, a model directory's index must not name files outside it, a run name
must not lead out of train.run_dir, and a run directory is held by one run at a time.

The malicious checkpoint is a valid moelab checkpoint (recipe, weights) with one more
entry whose unpickling would create a marker file; every test checks that the marker
never appears."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from arch import recipe_to_yaml
from arch.registry import RecipeError
from conftest import MarkerPayload, TINY_MOE_TRAIN, tiny_model, tiny_recipe
from lit_modules.checkpoints.model_dir import CheckpointError, load_model_dir, open_checkpoint, save_model_dir

RECIPE = "proxies/qwen3_moe_tiny"


@pytest.fixture
def evil(tmp_path):
    """(run directory whose last.ckpt is malicious, the .ckpt, the marker path)."""
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    recipe = tiny_recipe("qwen3")
    model = tiny_model("qwen3")
    ckpt = {"moelab_recipe": recipe_to_yaml(recipe), "global_step": 1,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"note": MarkerPayload(marker)}}
    path = run / "checkpoints" / "last.ckpt"
    torch.save(ckpt, path)
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    # the payload works: an unrestricted load would run it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return run, path, marker


def _refused(fn, marker, exc=(CheckpointError, RecipeError)):
    with pytest.raises(exc) as e:
        fn()
    assert not marker.exists(), "the checkpoint ran code"
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_malicious_checkpoint_is_refused_by_every_reader(evil):
    from lit_modules.checkpoints.training import AtomicCheckpointIO
    from lit_modules.checkpoints.training import check_resume
    from lit_modules.checkpoints.full import load_full_checkpoint

    run, path, marker = evil
    msg = _refused(lambda: open_checkpoint(path), marker)
    assert "refused" in msg and str(path) in msg
    _refused(lambda: open_checkpoint(run), marker)  # found in a run directory by its name
    _refused(lambda: load_model_dir(path), marker)
    _refused(lambda: check_resume(path, tiny_recipe("qwen3")), marker)  # train resume=
    _refused(lambda: AtomicCheckpointIO().load_checkpoint(path), marker)  # Lightning's resume (ddp, auto)

    class Strategy:  # load_full_checkpoint reads the file before it touches the strategy
        lightning_module = None

    _refused(lambda: load_full_checkpoint(Strategy(), path), marker)  # fsdp / expert-parallel resume


@pytest.mark.parametrize("command", ["eval", "export-hf", "convert", "train"])
def test_malicious_checkpoint_through_the_cli(evil, tmp_path, command):
    pytest.importorskip("safetensors")
    run, path, marker = evil
    text = tmp_path / "text.txt"
    text.write_text("hello world\n" * 20)
    argv = {
        "eval": ["eval", str(path), "--data", str(text), "--device", "cpu"],
        "export-hf": ["export-hf", str(run), str(tmp_path / "out")],
        "convert": ["convert", str(path), str(tmp_path / "out")],
        "train": ["train", RECIPE, *TINY_MOE_TRAIN, f"train.run_dir={tmp_path}/runs", f"resume={path}"],
    }[command]
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", *argv], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert not marker.exists(), "the checkpoint ran code"
    assert "refused" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_own_checkpoints_still_load(evil, tmp_path):
    """A plain moelab checkpoint (tensors and plain data) loads with weights_only."""
    run, path, _ = evil
    ckpt = torch.load(path, weights_only=False)
    del ckpt["hyper_parameters"]
    clean = tmp_path / "clean.ckpt"
    torch.save(ckpt, clean)
    recipe, model = load_model_dir(clean)
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------ model-directory index


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "/etc/passwd", "link.safetensors",
                                  "sub/../../outside.safetensors"])
def test_index_may_not_name_files_outside_the_directory(tmp_path, name):
    pytest.importorskip("safetensors")
    import json

    model_dir = tmp_path / "model"
    save_model_dir(tiny_model("qwen3"), tiny_recipe("qwen3"), model_dir)
    outside = tmp_path / "outside.safetensors"
    (model_dir / "model.safetensors").rename(outside)  # a real shard, but outside the directory
    if name == "ABSOLUTE":
        name = str(outside)
    if name == "link.safetensors":
        (model_dir / name).symlink_to(outside)
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as h:
        weight_map = {k: name for k in h.keys()}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside") as e:
        load_model_dir(model_dir)
    assert "\n" not in str(e.value)


def test_index_naming_a_missing_shard(tmp_path):
    pytest.importorskip("safetensors")
    import json

    model_dir = tmp_path / "model"
    save_model_dir(tiny_model("qwen3"), tiny_recipe("qwen3"), model_dir)
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model_dir(model_dir)


def test_checkpoint_tokenizer_path_is_not_followed(evil, tmp_path):
    """A checkpoint's stored recipe may name any data.tokenizer; only the tokenizer.json
    beside the checkpoint is used."""
    run, path, _ = evil
    ckpt = torch.load(path, weights_only=False)
    del ckpt["hyper_parameters"]
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    recipe = tiny_recipe("qwen3", f"data.tokenizer={secret}")
    ckpt["moelab_recipe"] = recipe_to_yaml(recipe)
    lone = tmp_path / "lone" / "x.ckpt"
    lone.parent.mkdir()
    torch.save(ckpt, lone)
    _, _, tok = open_checkpoint(lone)
    assert tok is None


# ------------------------------------------------------------------ run names and the run lock


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".", " x", "a\\b"])
def test_run_name_must_be_a_name(tmp_path, name):
    from lit_modules.train.run import train

    runs = tmp_path / "runs"
    with pytest.raises(RecipeError, match="run_name") as e:
        train(RECIPE, TINY_MOE_TRAIN + [f"train.run_dir={runs}", f"train.run_name='{name}'",
                                        "train.max_steps=1"])
    assert "\n" not in str(e.value)
    assert not runs.exists() and not (tmp_path / "escape").exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from lit_modules.checkpoints.layout import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def test_run_directory_is_held_by_one_run(tmp_path):
    from lit_modules.train.run import train
    from lit_modules.checkpoints.layout import RunLock

    run = tmp_path / "runs" / "same"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RecipeError, match=f"in use by process {holder.pid}") as e:
            RunLock(run).acquire()
        assert "train.run_name" in str(e.value)
        # moelab train refuses before it writes anything into the directory
        with pytest.raises(RecipeError, match=f"process {holder.pid}"):
            train(RECIPE, TINY_MOE_TRAIN + [f"train.run_dir={tmp_path / 'runs'}", "train.run_name=same",
                                            "train.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}"])
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run ...
        holder.wait()
    with RunLock(run):  # ... does not leave its directory stuck
        pass
    assert f"process {os.getpid()}" in (run / ".lock").read_text()


@pytest.mark.parametrize("base", ["/etc/passwd", "../outside.yaml", "ABSOLUTE"])
def test_recipe_base_stays_inside_its_folders(tmp_path, base):
    from arch import load_recipe

    (tmp_path / "outside.yaml").write_text("model:\n  n_layers: 3\n")
    (tmp_path / "mine").mkdir()
    if base == "ABSOLUTE":
        base = str(tmp_path / "outside.yaml")
    (tmp_path / "mine" / "r.yaml").write_text(f"base: {base}\n")
    with pytest.raises(RecipeError, match="stays inside") as e:
        load_recipe(tmp_path / "mine" / "r.yaml")
    assert "\n" not in str(e.value)
