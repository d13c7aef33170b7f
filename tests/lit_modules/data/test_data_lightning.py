"""The data module under a real Lightning Trainer: a run stopped at a checkpoint and
resumed from it sees exactly the batches the uninterrupted run saw, across an epoch
boundary, with validation running in between."""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from arch import load_recipe
from lit_modules.data.datamodule import TokenDataModule

TOTAL = 24


def make_recipe(cache):
    # 18 batches of 32 windows of 129 tokens per epoch
    return load_recipe("qwen3/0.6b", [
        "model.vocab_size=512", "data.max_chars=200000", f"data.cache_dir={cache}",
        "train.seq_len=128", "train.micro_batch_size=8", "train.grad_accum=4",
    ])


class Recorder(pl.LightningModule):
    """Records every training batch; one optimizer step per batch, as moelab's module."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.seen, self.val_seen = [], []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.emb(batch[:, :-1]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append(batch.clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(recipe, max_steps, ckpt_dir=None, every=None, resume=None):
    dm = TokenDataModule(recipe, verbose=False)
    dm.prepare_data()
    module = Recorder(recipe.model.vocab_size)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                 filename="{step}")] if ckpt_dir else []
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=7, check_val_every_n_epoch=None, limit_val_batches=2, num_sanity_val_steps=1,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and such
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module, dm, trainer


@pytest.mark.parametrize("stop", [10, "epoch"])
def test_resume_from_checkpoint_sees_the_uninterrupted_batches(tmp_path, stop):
    recipe = make_recipe(tmp_path / "cache")
    ref, dm, trainer = fit(recipe, TOTAL)
    n = dm.batches_per_epoch
    assert 4 < n < TOTAL - 4  # the runs cross an epoch boundary
    stop = n if stop == "epoch" else stop
    assert len(ref.seen) == TOTAL
    assert len({tuple(b.flatten().tolist()) for b in ref.seen}) == TOTAL

    first, _, _ = fit(recipe, stop, ckpt_dir=tmp_path / "ckpt", every=stop)
    assert all(torch.equal(a, b) for a, b in zip(first.seen, ref.seen[:stop]))
    ckpt = tmp_path / "ckpt" / f"step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=False)["TokenDataModule"]
    assert (state["epoch"], state["windows"] // state["step_windows"]) == divmod(stop, n)

    resumed, _, _ = fit(recipe, TOTAL, resume=str(ckpt))
    assert len(resumed.seen) == TOTAL - stop
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, ref.seen[stop:]))
    # without the data module's state the position follows the restored global_step
    stripped = torch.load(ckpt, weights_only=False)
    del stripped["TokenDataModule"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    again, _, _ = fit(recipe, TOTAL, resume=str(tmp_path / "stripped.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(again.seen, ref.seen[stop:]))
    # validation is the same fixed pair of batches every time (after the uninterrupted
    # run's one-batch sanity check; a resumed run skips that)
    fixed = ref.val_seen[1:3]
    assert len(ref.val_seen) == 1 + 2 * (TOTAL // 7) and not torch.equal(fixed[0], fixed[1])
    for i, b in enumerate(ref.val_seen[1:] + resumed.val_seen):
        assert torch.equal(b, fixed[i % 2])
