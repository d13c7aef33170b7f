"""Callbacks' parts that need no training run: atomic checkpoint writes, checkpoint
rotation, the expert-load image, the MFU peak."""
import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_modules.checkpoints.training import AtomicCheckpointIO, Checkpointing
from lit_modules.disk import DiskError
from lit_modules.runtime import peak_flops_per_device
from lit_modules.train.callbacks import load_image


def test_atomic_write_replaces_whole_files(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"x": torch.arange(3)}, path)
    io.save_checkpoint({"x": torch.arange(5)}, path)
    assert torch.load(path)["x"].tolist() == list(range(5))
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A writer dying mid-file (here: torch.save raising after a partial write) leaves
    the previous checkpoint intact under its name and no temporary file behind."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(DiskError) as e:  # one sentence naming the file, not an OSError traceback
        io.save_checkpoint({"step": 2}, path)
    assert str(e.value) == (f"cannot write checkpoint {path}: the disk is full (ENOSPC); free space on that disk "
                            f"or set train.run_dir to another.")
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


class FakeTrainer:
    """What Checkpointing uses of a Trainer."""

    def __init__(self):
        self.global_step = 0
        self.is_global_zero = True
        self.strategy = SimpleNamespace(barrier=lambda name=None: None)

    def save_checkpoint(self, path, weights_only=None):
        AtomicCheckpointIO().save_checkpoint({"global_step": self.global_step}, path)


def test_checkpoint_rotation_and_last(tmp_path):
    cb = Checkpointing(tmp_path / "checkpoints", every=10, keep=2)
    trainer = FakeTrainer()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.ckpt.tmp-999").write_bytes(b"killed writer")
    cb.setup(trainer, None, "fit")
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # stale temporary removed
    for step in range(1, 36):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    cb.on_train_end(trainer, None)  # step 35 is not a multiple of 10: saved at the end
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000030.ckpt", "step00000035.ckpt"]
    assert torch.load(cb.last_path)["global_step"] == 35
    assert cb.saved_path.name == "step00000035.ckpt"
    cb.on_train_end(trainer, None)  # already saved at this step: nothing new
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_checkpoint_every_minus_one_writes_nothing(tmp_path):
    cb = Checkpointing(tmp_path / "checkpoints", every=-1)
    trainer = FakeTrainer()
    cb.setup(trainer, None, "fit")
    for step in range(1, 4):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    cb.on_train_end(trainer, None)
    assert not (tmp_path / "checkpoints").exists() and cb.last_path is None


class FakeShardedTrainer(FakeTrainer):
    def save_checkpoint(self, path, weights_only=None):
        from lit_modules.checkpoints.sharded import LAYOUT_KEY

        AtomicCheckpointIO().save_checkpoint({"global_step": self.global_step, "state_dict": {"w": torch.ones(2)},
                                              LAYOUT_KEY: {"world_size": 1, "expert_parallel": 1}}, path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_rotation_and_last(tmp_path):
    """Sharded folders rotate like files; last.dcp is a relative symlink to the newest,
    and a run that changes format keeps a single last (the newest)."""
    from lit_modules.checkpoints import layout

    d = tmp_path / "checkpoints"
    full = Checkpointing(d, every=10, keep=2)
    trainer = FakeTrainer()
    trainer.global_step = 10
    full.save(trainer)
    cb = Checkpointing(d, every=10, keep=2, sharded=True)
    trainer = FakeShardedTrainer()
    (d / ".step00000020.dcp.partial").mkdir()  # a killed save
    cb.setup(trainer, None, "fit")
    assert cb.last_path == d / "last.ckpt" and not (d / ".step00000020.dcp.partial").exists()
    for step in range(11, 36):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    cb.on_train_end(trainer, None)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["last.dcp", "step00000030.dcp", "step00000035.dcp"]  # step 10's file rotated out too
    assert os.readlink(d / "last.dcp") == "step00000035.dcp"
    assert layout.last_checkpoint(tmp_path) == d / "last.dcp" == cb.last_path
    assert cb.saves == 3 and cb.seconds > 0


def test_load_image_colours():
    loads = np.array([[4, 4], [4, 0], [1, 1], [7, 15]], dtype=np.int64)  # experts x steps
    img = load_image(loads, cell=2)
    assert img.shape == (3, 8, 4) and img.dtype == np.uint8
    px = img[:, ::2, ::2]  # one pixel per cell: (3, E, S)
    # step 0: mean 4 -> experts 0, 1 balanced (white); expert 2 at 1/4 (blue); expert 3 over (red)
    assert px[:, 0, 0].tolist() == [255, 255, 255]
    assert px[:, 2, 0].tolist() == [0, 0, 255]
    r, g, b = px[:, 3, 0].tolist()
    assert r == 255 and g < 255 and b < 255
    assert px[:, 1, 1].tolist() == [0, 0, 0]  # no tokens: black
    fade = round(255 * (1 - np.log2(15 / 5) / 2))  # 3x the mean: log2 3 of the way to 4x
    assert px[:, 3, 1].tolist() == [255, fade, fade]


def test_peak_flops(monkeypatch):
    assert peak_flops_per_device(100.0, "32-true") == 100e12  # the recipe's figure wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops_per_device(None, "bf16-mixed") is None  # CPU: no MFU unless stated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device(None, "bf16-mixed") == 989.4e12  # the datasheet table
    assert peak_flops_per_device(None, "32-true") is None  # the table holds bf16 peaks only
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert peak_flops_per_device(None, "bf16-true") is None  # unknown device: set train.peak_tflops


def test_router_loads_record(tmp_path):
    """router_loads.jsonl: per layer, the tokens per expert summed over the steps since
    the previous line (here checked against bincounts of the routers' own choices),
    the dropped slots, the mean entropy; a line every image_every steps and at the
    last step; a resumed run drops the lines past its step."""
    import json

    from conftest import tiny_model
    from experts.layers import named_moe_layers
    from experts.losses import router_entropy
    from lit_modules.train.callbacks import RouterStats

    model = tiny_model("qwen3_moe", "model.moe.capacity_factor=1.0")  # capacity: some slots dropped
    E = 8
    chosen = {}  # layer index -> per step (E,) bincount, entropy
    for path, layer in named_moe_layers(model):
        i = int(path.split(".")[1])
        layer.router.register_forward_hook(
            lambda m, a, r, i=i: chosen.setdefault(i, []).append(
                (torch.bincount(r.ids_TK.flatten(), minlength=E), float(router_entropy(r.probs_TE)))))
    logged = {}
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, max_steps=7, loggers=[])
    pl_module = SimpleNamespace(model=model, log_scalars=lambda metrics: logged.update({trainer.global_step: metrics}))
    path = tmp_path / "router_loads.jsonl"
    cb = RouterStats(log_every=2, image_every=3, record_path=path)
    cb.on_train_start(trainer, pl_module)
    torch.manual_seed(1)
    dropped = {0: [], 1: []}
    for step in range(1, 8):
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 16)))
        for path_, layer in named_moe_layers(model):
            dropped[int(path_.split(".")[1])].append(int(layer.stats["dropped_tokens"]))
        trainer.global_step = step
        cb.on_train_batch_end(trainer, pl_module, None, None, step - 1)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(ln["step"], ln["steps"]) for ln in lines] == [(3, 3), (6, 3), (7, 1)]
    assert sum(dropped[0]) > 0
    # the scalars of logging steps (every 2nd and the last): that step's numbers, per layer
    assert sorted(logged) == [2, 4, 6, 7]
    for step, metrics in logged.items():
        for i in (0, 1):
            assert metrics[f"router/layer{i}/dropped"] == dropped[i][step - 1]
            assert metrics[f"router/layer{i}/entropy"] == pytest.approx(chosen[i][step - 1][1], rel=1e-6)
            counts = chosen[i][step - 1][0].float()
            assert metrics[f"router/layer{i}/max_over_mean_load"] == pytest.approx(float(counts.max() / counts.mean()))
    for ln, (a, b) in zip(lines, [(0, 3), (3, 6), (6, 7)]):
        for i in (0, 1):
            rec = ln["layers"][str(i)]
            want = torch.stack([c for c, _ in chosen[i][a:b]]).sum(0)
            assert rec["tokens_per_expert"] == want.tolist()
            assert rec["dropped"] == sum(dropped[i][a:b])
            assert rec["entropy"] == pytest.approx(np.mean([h for _, h in chosen[i][a:b]]), rel=1e-6)

    # resumed from step 3: the lines of steps 6 and 7 go (and a line cut short by a
    # kill), the next line covers 4..6
    with open(path, "a") as f:
        f.write('{"step": 8, "ste')
    trainer.global_step = 3
    cb = RouterStats(log_every=100, image_every=3, record_path=path)
    cb.on_train_start(trainer, pl_module)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [3]
    for step in range(4, 7):
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 16)))
        trainer.global_step = step
        cb.on_train_batch_end(trainer, pl_module, None, None, step - 1)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(ln["step"], ln["steps"]) for ln in lines] == [(3, 3), (6, 3)]
    assert sum(lines[1]["layers"]["0"]["tokens_per_expert"]) == 3 * 2 * 16 * 2  # steps x tokens x top-k


def test_host_syncs_benchmark_counts_each_sync_by_its_stack(cache, tmp_path, monkeypatch):
    """benchmarks/host_syncs.py over a CPU run: torch flags nothing there, so a
    callback raises torch's own warning inside the window, once; it is counted once, by
    the stack that raised it, and nothing outside the window is."""
    import importlib.util
    import warnings

    from lightning.pytorch.callbacks import Callback

    from conftest import RECIPE, overrides

    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("host_syncs", root / "benchmarks" / "host_syncs.py")
    host_syncs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_syncs)

    class Syncs(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (2, 10):  # step 2 is before the window
                warnings.warn("called a synchronizing CUDA operation")

    real = host_syncs.train
    monkeypatch.setattr(host_syncs, "train", lambda r, o, callbacks: real(r, o, callbacks=callbacks + [Syncs()]))
    out = tmp_path / "syncs"
    # on the CPU, where torch flags nothing (a GPU machine would count the real reads too)
    host_syncs.main([str(out), RECIPE, *overrides(cache, tmp_path, "train.val_every=0", "train.ckpt_every=-1",
                                                  "train.accelerator=cpu")])
    lines = (out / "syncs_rank0.txt").read_text().splitlines()
    assert lines[0].startswith("# rank 0: host syncs in steps 9-11")
    assert len(lines) == 2 and lines[1].startswith("  0.3/step") and "on_train_batch_end" in lines[1], lines
