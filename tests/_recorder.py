"""TokenDataModule under a real Lightning Trainer, for the data tests (resume, mixtures,
stages): a module that records every batch it is fed, and `fit` around it."""
from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_modules.data.datamodule import TokenDataModule


class Recorder(pl.LightningModule):
    """Records every training batch (`seen`) and every validation batch under (global
    step, loader index) (`val_seen`); one optimizer step per batch, as moelab's module."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.seen: List[torch.Tensor] = []
        self.val_seen: Dict[Tuple[int, int], List[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.emb(batch[:, :-1]).pow(2).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_seen.setdefault((self.global_step, dataloader_idx), []).append(batch.clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def val_by_loader(self) -> Dict[int, List[torch.Tensor]]:
        """The validation batches of each loader, in the order they came."""
        out: Dict[int, List[torch.Tensor]] = {}
        for (_, i), batches in sorted(self.val_seen.items()):
            out.setdefault(i, []).extend(batches)
        return out


def fit(recipe, max_steps, ckpt_dir=None, every=None, resume=None, **trainer_kw):
    """(module, data module, trainer) after `max_steps` on the CPU; a checkpoint every
    `every` steps into `ckpt_dir` (named step=N.ckpt), resumed from `resume`."""
    dm = TokenDataModule(recipe, verbose=False)
    dm.prepare_data()
    module = Recorder(recipe.model.vocab_size)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                 filename="{step}")] if ckpt_dir else []
    kw = {"check_val_every_n_epoch": None, "num_sanity_val_steps": 0, **trainer_kw}
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and such
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return module, dm, trainer
