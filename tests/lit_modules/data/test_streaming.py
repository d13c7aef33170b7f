"""data.streaming: the token cache exported as litdata chunks and streamed back;
litdata's loader state resumes exactly; bad settings get one sentence. Skipped where
litdata (the `streaming` extra) is not installed, except the checks before it."""
from __future__ import annotations

import pytest
import torch

from arch import RecipeError, load_recipe
from lit_modules.data.corpus import DataError
from lit_modules.data.datamodule import TokenDataModule

BASE = ["model.vocab_size=512", "data.max_chars=100000", "train.seq_len=32", "train.micro_batch_size=2",
        "train.grad_accum=2", "data.val_fraction=0.05"]


def one_sentence(e):
    msg = str(e)
    assert "\n" not in msg and msg.endswith(".") and isinstance(e, RecipeError), msg
    return msg


def test_streaming_settings_checked_first(tmp_path):
    r = load_recipe("qwen3/0.6b", BASE + [f"data.cache_dir={tmp_path}", "data.streaming=s3://bucket/run"])
    with pytest.raises(DataError) as e:
        TokenDataModule(r, verbose=False).prepare_data()
    assert "needs data.tokenizer" in one_sentence(e.value) and "s3://bucket/run/tokenizer.json" in str(e.value)
    with pytest.raises(DataError) as e:
        TokenDataModule(load_recipe("qwen3/0.6b", BASE + ["data.streaming=x", "data.mix=[{source: stdlib}]"]))
    assert "both set" in one_sentence(e.value)


def test_export_stream_and_resume(tmp_path):
    pytest.importorskip("litdata")
    from lit_modules.data.streaming import export

    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    local = TokenDataModule(load_recipe("qwen3/0.6b", BASE + cache), verbose=False)
    counts = export(local, str(tmp_path / "out"), chunk_tokens=8192)
    assert counts == {"train": local.train_tokens, "val": local.val_tokens}
    r = load_recipe("qwen3/0.6b", BASE + cache + [f"data.streaming={tmp_path / 'out'}",
                                                  f"data.tokenizer={tmp_path / 'out' / 'tokenizer.json'}"])

    def dm(state=None):
        d = TokenDataModule(r, verbose=False)
        if state is not None:
            d.load_state_dict(state)  # before setup, as Lightning does
        d.prepare_data()
        d.setup("fit")
        return d

    ref_dm = dm()
    it = iter(ref_dm.train_dataloader())
    ref = [next(it) for _ in range(8)]
    assert ref[0].shape == (4, 33) and ref[0].dtype == torch.int64
    # every block is a window of the local training stream (chunks cut at block boundaries)
    stream = torch.from_numpy(__import__("numpy").fromfile(local._tokens_dir / "train.bin",
                                                           dtype=local.meta["dtype"]).astype("int64"))
    text = stream.numpy().tobytes()
    assert all(row.numpy().tobytes() in text for b in ref for row in b)
    first = dm()
    it = iter(first.train_dataloader())
    for _ in range(3):
        next(it)
    resumed = dm(first.state_dict())
    it = iter(resumed.train_dataloader())
    assert all(torch.equal(next(it), b) for b in ref[3:])
    assert next(iter(ref_dm.val_dataloader())).shape == (2, 33)


def test_trainer_resume_streaming(tmp_path):
    pytest.importorskip("litdata")
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_modules.data.streaming import export

    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    export(TokenDataModule(load_recipe("qwen3/0.6b", BASE + cache), verbose=False), str(tmp_path / "out"),
           chunk_tokens=8192)
    r = load_recipe("qwen3/0.6b", BASE + cache + [f"data.streaming={tmp_path / 'out'}",
                                                  f"data.tokenizer={tmp_path / 'out' / 'tokenizer.json'}"])

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(512, 4)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.clone())
            return self.emb(batch[:, :-1]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None, resume=None):
        m = Recorder()
        cbs = [ModelCheckpoint(dirpath=ckpt, every_n_train_steps=steps, save_top_k=-1, filename="{step}")] if ckpt else []
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=cbs,
                             enable_checkpointing=bool(ckpt), enable_progress_bar=False, enable_model_summary=False,
                             val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
                             num_sanity_val_steps=0, use_distributed_sampler=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(m, datamodule=TokenDataModule(r, verbose=False), ckpt_path=resume)
        return m

    ref = fit(10)
    fit(4, ckpt=tmp_path / "ckpt")
    resumed = fit(10, resume=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert len(resumed.seen) == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, ref.seen[4:]))
