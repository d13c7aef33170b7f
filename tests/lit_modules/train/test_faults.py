"""Faults during `moelab train`: Ctrl-C, a full or read-only disk, a failure before the
first checkpoint. Each ends in one sentence saying what was kept; a checkpoint is
never half-written, the previous good one is kept, and a new run that kept nothing
leaves no run directory behind."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from arch import RecipeError
from conftest import RECIPE, overrides, refuse_writes
from lit_modules.disk import DiskError
from lit_modules.train.callbacks import StopOnInterrupt, TrainingInterrupted
from lit_modules.train.run import train

ROOT = Path(__file__).resolve().parents[3]


class At(Callback):
    """Calls `fn()` as optimizer step `step` (1-based) starts."""

    def __init__(self, step: int, fn):
        self.step, self.fn = step, fn

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            self.fn()


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def one_sentence(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def no_temporary_files(run_dir: Path) -> None:
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], list(run_dir.rglob("*"))


# ------------------------------------------------------------------ Ctrl-C


@pytest.fixture
def python_sigint():
    """SIGINT handled as Python sets it up in a terminal (a job started in the background
    inherits it ignored), so that a test can see the run hand Python's handler back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_checkpoints_the_step_and_resumes_to_the_same_loss(cache, tmp_path, python_sigint):
    """Ctrl-C as step 5 starts: step 5 finishes, its checkpoint is written (no
    validation on the way out) and the run resumes from it to the loss of a run never
    interrupted."""
    common = overrides(cache, tmp_path, "train.max_steps=10", "train.ckpt_every=4", "train.val_every=5")
    a = train(RECIPE, common + ["train.run_name=a"])
    with pytest.raises(TrainingInterrupted) as e:
        train(RECIPE, common + ["train.run_name=b"], callbacks=[At(5, ctrl_c)])
    step5 = tmp_path / "b" / "checkpoints" / "step00000005.ckpt"
    assert one_sentence(e) == f"interrupted at step 5; checkpoint {step5} (resume with resume={step5})"
    assert isinstance(e.value, KeyboardInterrupt)
    assert sorted(p.name for p in step5.parent.iterdir()) == ["last.ckpt", "step00000004.ckpt", "step00000005.ckpt"]
    assert torch.load(step5, weights_only=True)["global_step"] == 5
    assert not (tmp_path / "b" / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    b = train(RECIPE, common + ["train.run_name=b", f"resume={step5}"])
    assert b["resumed_from"] == str(step5) and b["steps"] == a["steps"] == 10
    assert b["train_loss"] == a["train_loss"] and b["val_loss"] == a["val_loss"]


def test_sigterm_checkpoints_the_step_like_ctrl_c(cache, tmp_path):
    """SIGTERM (a scheduler preempting the job) as step 5 starts: step 5 finishes and its
    checkpoint is written, as for Ctrl-C (Lightning alone stopped with no checkpoint);
    the handler Lightning found is handed back."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=10", "train.ckpt_every=4", "train.val_every=0",
                                "train.run_name=t"), callbacks=[At(5, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    step5 = tmp_path / "t" / "checkpoints" / "step00000005.ckpt"
    assert one_sentence(e) == f"interrupted at step 5; checkpoint {step5} (resume with resume={step5})"
    assert torch.load(step5, weights_only=True)["global_step"] == 5
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_on_a_checkpoint_step_writes_no_second_file(cache, tmp_path):
    with pytest.raises(TrainingInterrupted) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=10", "train.ckpt_every=3", "train.val_every=0",
                                "train.run_name=c"), callbacks=[At(3, ctrl_c)])
    assert "interrupted at step 3; checkpoint" in one_sentence(e)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == ["last.ckpt", "step00000003.ckpt"]


def test_a_second_ctrl_c_or_one_before_training_stops_at_once():
    stop = StopOnInterrupt()
    with pytest.raises(KeyboardInterrupt):  # before the first step: at once
        stop._handler(signal.SIGINT, None)
    assert stop.hard
    stop = StopOnInterrupt()
    stop._training = True
    stop._handler(signal.SIGINT, None)  # the first: noted
    assert stop.requested and not stop.hard
    with pytest.raises(KeyboardInterrupt):  # the second: at once
        stop._handler(signal.SIGINT, None)
    assert stop.hard


def test_ctrl_c_twice_mid_run_names_the_last_checkpoint(cache, tmp_path):
    run = tmp_path / "twice"
    with pytest.raises(TrainingInterrupted) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=10", "train.ckpt_every=2", "train.val_every=0",
                                "train.run_name=twice"), callbacks=[At(4, lambda: (ctrl_c(), ctrl_c()))])
    step2 = run / "checkpoints" / "step00000002.ckpt"
    assert one_sentence(e) == (f"interrupted at step 3, stopped at once; the last checkpoint is {step2} (resume "
                               f"with resume={step2})")
    assert sorted(p.name for p in step2.parent.iterdir()) == ["last.ckpt", "step00000002.ckpt"]
    no_temporary_files(run)


_WAIT = 240


def _with_tests_importable() -> dict:
    """The environment for a script that imports the project and tests/conftest.py (the
    paths already on PYTHONPATH kept: a machine may install dependencies there)."""
    paths = [str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _popen(cache, runs, *extra):
    cmd = [sys.executable, "-m", "lit_modules.cli", "train", RECIPE,
           *overrides(cache, runs, "train.max_steps=300", "train.val_every=0", "train.ckpt_every=0", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_ctrl_c_through_the_command_line_exits_130(cache, tmp_path):
    """SIGINT to `moelab train` after its first logged step: exit 130, one line saying
    where the checkpoint is, and that checkpoint loads as a model."""
    from lit_modules.checkpoints.model_dir import load_model

    proc = _popen(cache, tmp_path, "train.run_name=cli")
    log = tmp_path / "cli" / "train.log"
    deadline = time.time() + _WAIT
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "step 1 " in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=_WAIT)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("moelab train: interrupted at step ") and "Traceback" not in err, err[-3000:]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    ckpt = tmp_path / "cli" / "checkpoints" / f"step{step:08d}.ckpt"
    assert last == f"moelab train: interrupted at step {step}; checkpoint {ckpt} (resume with resume={ckpt})"
    recipe, model, tok = load_model(ckpt)
    assert tok is not None and sum(p.numel() for p in model.parameters()) > 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == step >= 1
    no_temporary_files(tmp_path / "cli")


class AtFitStart(Callback):
    def on_fit_start(self, trainer, pl_module):
        ctrl_c()


def test_ctrl_c_before_the_first_step_leaves_no_run_directory(cache, tmp_path, capsys, python_sigint):
    """Before training starts (here: as fit starts, before the sanity validation) Ctrl-C
    stops at once; nothing was trained, so the new run directory goes."""
    with pytest.raises(TrainingInterrupted) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=4", "train.run_name=early"),
              callbacks=[AtFitStart()])
    assert one_sentence(e) == "interrupted at step 0, before any checkpoint was written; nothing was kept"
    assert not (tmp_path / "early").exists()
    out = capsys.readouterr().out
    assert f"removed the run directory {tmp_path / 'early'}: the run stopped before its first checkpoint" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not Lightning's SIG_IGN


# ------------------------------------------------------------------ failures before the first checkpoint


def _boom():
    raise RecipeError("stopped by the test")


def test_a_failure_before_the_first_checkpoint_removes_the_new_run_directory(cache, tmp_path, capsys):
    with pytest.raises(RecipeError, match="stopped by the test"):
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=4", "train.run_name=gone"),
              callbacks=[At(2, _boom)])
    assert not (tmp_path / "gone").exists()
    assert f"removed the run directory {tmp_path / 'gone'}" in capsys.readouterr().out
    # after a checkpoint the directory stays: it holds something to resume
    with pytest.raises(RecipeError):
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=4", "train.ckpt_every=1", "train.run_name=kept"),
              callbacks=[At(3, _boom)])
    assert (tmp_path / "kept" / "checkpoints" / "step00000002.ckpt").is_file()


def test_a_failed_run_in_an_existing_directory_is_left_alone(cache, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError):
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=4", "train.run_name=mine"),
              callbacks=[At(1, _boom)])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ full or read-only disk


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(cache, tmp_path, monkeypatch):
    import lit_modules.checkpoints.training as training

    real = training.os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step00000004.ckpt.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(training.os, "fsync", fsync)
    run = tmp_path / "full"
    with pytest.raises(DiskError) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.val_every=0",
                                "train.run_name=full"))
    step2, step4 = run / "checkpoints" / "step00000002.ckpt", run / "checkpoints" / "step00000004.ckpt"
    assert one_sentence(e) == (
        f"training stopped at step 4: cannot write checkpoint {step4}: the disk is full (ENOSPC); free space on "
        f"that disk or set train.run_dir to another; the last good checkpoint, {step2}, is kept: resume from it "
        f"with resume={step2}.")
    assert sorted(p.name for p in step2.parent.iterdir()) == ["last.ckpt", "step00000002.ckpt"]
    no_temporary_files(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    monkeypatch.undo()
    assert train(RECIPE, overrides(cache, tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.val_every=0",
                                   "train.run_name=full"))["steps"] == 6  # resumes, with room again


@pytest.mark.parametrize("err,says", [(errno.EROFS, "the file system is read-only (EROFS)"),
                                      (errno.EACCES, "permission is denied (EACCES)"),
                                      (errno.ENOSPC, "the disk is full (ENOSPC)")])
def test_unwritable_run_directory_is_one_sentence(cache, tmp_path, monkeypatch, err, says):
    runs = tmp_path / "runs"
    runs.mkdir()
    refuse_writes(monkeypatch, runs, err)
    with pytest.raises(DiskError) as e:
        train(RECIPE, overrides(cache, runs, "train.max_steps=2", "train.run_name=ro"))
    assert one_sentence(e).startswith(f"cannot write the run directory {runs / 'ro'}: {says}; ")
    monkeypatch.undo()
    assert list(runs.iterdir()) == []


def test_full_disk_while_opening_the_run_leaves_nothing(cache, tmp_path, monkeypatch):
    """recipe.yaml written, the tokenizer copy hits a full disk: the new directory goes."""
    import shutil

    def full(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(DiskError, match=r"\(ENOSPC\)"):
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=2", "train.run_name=half"))
    assert not (tmp_path / "half").exists()


def test_run_dir_below_a_file(cache, tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(DiskError) as e:
        train(RECIPE, overrides(cache, tmp_path / "f" / "runs", "train.max_steps=2", "train.run_name=x"))
    assert one_sentence(e).startswith(f"the run directory {tmp_path / 'f' / 'runs' / 'x'} lies below "
                                      f"{tmp_path / 'f'}, which is a file, not a folder")


@pytest.mark.slow
def test_ctrl_c_to_rank_0_of_two_stops_both_at_the_same_step(cache, tmp_path):
    """DDP on two gloo ranks; SIGINT reaches rank 0 only (a terminal's Ctrl-C reaches
    both, at slightly different moments): the ranks agree on the step, so neither waits
    forever in a collective, and rank 0 alone says where the checkpoint is."""
    proc = _popen(cache, tmp_path, "train.run_name=ddp", "train.strategy=ddp", "train.devices=2",
                  "train.accelerator=cpu", "train.micro_batch_size=4")
    log = tmp_path / "ddp" / "train.log"
    deadline = time.time() + _WAIT
    while proc.poll() is None and time.time() < deadline and not (log.exists() and "step 2 " in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if "interrupted at step" in line]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    step = int(said[0].split("interrupted at step ")[1].split(";")[0])
    ckpt = tmp_path / "ddp" / "checkpoints" / f"step{step:08d}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == step


_SIGTERM_TO_RANK_0 = '''
import os, signal, sys, torch
from lightning.pytorch.callbacks import Callback
from conftest import RECIPE, overrides
from lit_modules.train.run import train

class Watch(Callback):
    """Counts broadcasts during training steps (Lightning's per-step SIGTERM check was
    one); SIGTERM to rank 0 as step 4 starts."""
    def __init__(self):
        self.n, real = 0, torch.distributed.broadcast
        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)
        torch.distributed.broadcast = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            self.n = 0
        if trainer.global_step == 3 and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, pl_module):
        print(f"rank {trainer.global_rank}: {self.n} broadcasts", file=sys.stderr, flush=True)

train(RECIPE, overrides(sys.argv[1], sys.argv[2], *sys.argv[3:]), callbacks=[Watch()])
'''


@pytest.mark.slow
def test_sigterm_to_rank_0_of_two_stops_both_with_no_broadcast_per_step(cache, tmp_path):
    """DDP on two gloo ranks: no rank broadcasts anything during training steps (Lightning
    broadcast and read a SIGTERM flag at every step), and SIGTERM to rank 0 still stops
    both at the same step (the next vote: train.log_every), with that step's checkpoint."""
    script = tmp_path / "sigterm.py"
    script.write_text(_SIGTERM_TO_RANK_0)
    cmd = [sys.executable, str(script), str(cache), str(tmp_path), "train.run_name=term", "train.max_steps=20",
           "train.val_every=0", "train.ckpt_every=0", "train.log_every=3", "train.strategy=ddp", "train.devices=2",
           "train.accelerator=cpu", "train.micro_batch_size=4"]
    env = _with_tests_importable()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=_WAIT, env=env)
    assert "interrupted at step 6; checkpoint" in done.stderr, done.stderr[-3000:]
    # found anywhere, not line by line: the two ranks share one stderr pipe, and their
    # lines have come out run together ("rank 1: 0 broadcastsrank 0: 0 broadcasts")
    assert sorted(re.findall(r"rank (\d+): (\d+) broadcasts", done.stderr)) == [("0", "0"), ("1", "0")], \
        done.stderr[-3000:]
    ckpt = tmp_path / "term" / "checkpoints" / "step00000006.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6


def test_full_disk_under_the_loggers_is_one_sentence(cache, tmp_path):
    """A write outside the checkpoint writer (TensorBoard, a callback) failing for want
    of room stops training with the step and the last good checkpoint."""
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk" / "tb" / "events"))

    with pytest.raises(RecipeError) as e:
        train(RECIPE, overrides(cache, tmp_path / "disk", "train.max_steps=6", "train.ckpt_every=2",
                                "train.val_every=0", "train.run_name=x"), callbacks=[At(4, full)])
    step2 = tmp_path / "disk" / "x" / "checkpoints" / "step00000002.ckpt"
    assert one_sentence(e) == (f"training stopped at step 3: cannot write {tmp_path / 'disk' / 'tb' / 'events'}: the "
                               f"disk is full (ENOSPC); free space there, or set train.run_dir to a writable folder "
                               f"with room; the last good checkpoint is {step2}.")


def test_train_log_that_cannot_be_written_is_said_once(tmp_path, capsys):
    from lit_modules.train.run import _RunLog

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    log = _RunLog(tmp_path / "train.log")
    try:
        log.handler.stream = Full()
        for i in range(3):
            log.loggers[0].info("step %d", i)
    finally:
        log.close()
    err = capsys.readouterr().err.strip()
    assert err == (f"moelab train: cannot write {tmp_path / 'train.log'}: the disk is full (ENOSPC); its lines are "
                   f"lost from here on")


# ------------------------------------------------------------------ non-finite steps

_NAN_ON_RANK_1 = '''
import sys, torch
from lightning.pytorch.callbacks import Callback
from conftest import RECIPE, overrides
from lit_modules.train.run import train

class NaNOnRank1(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            self.hook = pl_module.model.layers[0].register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(self, "hook", None) is not None:
            self.hook.remove()
            self.hook = None

train(RECIPE, overrides(sys.argv[1], sys.argv[2], *sys.argv[3:]), callbacks=[NaNOnRank1()])
'''


@pytest.mark.slow
@pytest.mark.parametrize("check", ["deferred", "step"])
def test_a_nan_on_one_rank_of_two_stops_both(cache, tmp_path, check):
    """DDP on two gloo ranks, fused AdamW; step 3's loss is NaN on rank 1 only. The
    gradients are averaged, so the gradient norm is NaN on both: each rank stops naming
    step 3 (deferred: a step later, the update skipped on the device by both), and
    neither waits forever for the other. The last checkpoint is step 2's."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    cmd = [sys.executable, str(script), str(cache), str(tmp_path), "train.run_name=nan", "train.max_steps=6",
           "train.val_every=0", "train.ckpt_every=2", "train.strategy=ddp", "train.devices=2",
           "train.accelerator=cpu", "train.micro_batch_size=4", "train.optim.fused=true",
           f"train.finite_check={check}"]
    env = _with_tests_importable()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=_WAIT, env=env)
    assert done.returncode != 0
    assert done.stderr.count("training stopped at step 3: the gradient norm is nan") >= 1, done.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step00000002.ckpt"], ckpts
    assert torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
