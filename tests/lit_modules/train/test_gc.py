"""train.gc_every: automatic garbage collection is off during fit, a generation-1
collection runs every gc_every optimizer steps (once per step, whatever the
accumulation), and the collector's previous state comes back when training ends or
fails; 0 leaves Python's collector alone."""
from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Callback

from arch import RecipeError, load_recipe
from conftest import RECIPE, overrides
from lit_modules.train.callbacks import SyncedGC
from lit_modules.train.run import train


@pytest.fixture
def collections(monkeypatch):
    """gc.collect records (step, generation) of each call instead of collecting; the
    step is `collections.trainer.global_step` once a trainer is set. The collector's
    state is restored whatever the test does."""
    calls = []
    log = SimpleNamespace(calls=calls, trainer=None)
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(
        (log.trainer.global_step if log.trainer else None, generation)))
    was = gc.isenabled()
    yield log
    gc.enable() if was else gc.disable()


def test_collects_once_per_optimizer_step_at_every_nth(collections):
    trainer = SimpleNamespace(global_step=0)
    collections.trainer = trainer
    cb = SyncedGC(every=2)
    cb.on_train_start(trainer, None)
    assert not gc.isenabled() and collections.calls == [(0, 1)]
    # moelab's manual optimization: on_train_batch_end once per step, after it
    for step in range(1, 7):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step)
    assert collections.calls == [(0, 1), (2, 1), (4, 1), (6, 1)]
    # Lightning's own accumulation (2 micro-batches): the hook runs per micro-batch,
    # global_step reads the last step until the second micro-batch's update
    collections.calls.clear()
    for batch_idx, step in enumerate([6, 7, 7, 8, 8, 9, 9, 10]):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert collections.calls == [(8, 1), (10, 1)]
    cb.on_train_end(trainer, None)
    assert gc.isenabled()


def test_restoring_is_idempotent_and_keeps_a_disabled_collector_disabled(collections):
    trainer = SimpleNamespace(global_step=0)
    cb = SyncedGC(every=5)
    cb.teardown(trainer, None, "fit")  # before training started: nothing to restore
    assert gc.isenabled()
    cb.on_train_start(trainer, None)
    cb.on_exception(trainer, None, RuntimeError())
    cb.teardown(trainer, None, "fit")
    assert gc.isenabled()
    gc.disable()  # the caller had turned it off: it stays off
    cb.on_train_start(trainer, None)
    cb.on_train_end(trainer, None)
    cb.teardown(trainer, None, "fit")
    assert not gc.isenabled()


class Probe(Callback):
    """Records gc.isenabled() at each step and hands the trainer to `collections`."""

    def __init__(self, collections, fail_at: int = 0):
        self.collections, self.fail_at, self.enabled, self.callbacks = collections, fail_at, [], []

    def setup(self, trainer, pl_module, stage):
        self.collections.trainer = trainer
        self.callbacks = [type(cb).__name__ for cb in trainer.callbacks]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.enabled.append(gc.isenabled())
        if trainer.global_step + 1 == self.fail_at:
            raise RecipeError("stopped by the test")


def _run(cache, tmp_path, probe, *extra):
    return train(RECIPE, overrides(cache, tmp_path, "train.max_steps=4", "train.val_every=0", "train.ckpt_every=-1",
                                   *extra), callbacks=[probe])


def test_training_collects_every_n_steps_with_gc_off_and_restores_it(cache, tmp_path, collections):
    assert gc.isenabled()
    probe = Probe(collections)
    _run(cache, tmp_path, probe, "train.gc_every=2", "train.grad_accum=2")
    assert "SyncedGC" in probe.callbacks
    assert probe.enabled == [False] * 4
    assert [c for c in collections.calls if c[1] == 1] == [(0, 1), (2, 1), (4, 1)]
    assert gc.isenabled()


def test_a_failed_training_restores_gc(cache, tmp_path, collections):
    probe = Probe(collections, fail_at=2)
    with pytest.raises(RecipeError, match="stopped by the test"):
        _run(cache, tmp_path, probe)  # the default, train.gc_every = 50
    assert probe.enabled == [False, False]
    assert gc.isenabled()


def test_gc_every_0_leaves_gc_alone(cache, tmp_path, collections):
    probe = Probe(collections)
    _run(cache, tmp_path, probe, "train.gc_every=0")
    assert "SyncedGC" not in probe.callbacks
    assert probe.enabled == [True] * 4
    assert collections.calls == []
    assert gc.isenabled()


def test_negative_gc_every_is_refused_before_any_work(cache, tmp_path):
    with pytest.raises(RecipeError) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.gc_every=-1", "train.run_name=refused"))
    assert str(e.value) == ("train.gc_every = -1 is out of range; the steps between garbage collections (0: Python's "
                            "automatic gc) must be an integer >= 0 no larger than 1000000000.")
    assert not (tmp_path / "refused").exists()
    assert load_recipe(RECIPE).train.gc_every == 50
