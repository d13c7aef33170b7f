"""`moelab train` with train.document_mask on a corpus of short documents (several per
training window): the module reads the end-of-text id from the data module, the run
trains, and its losses differ from the run without the mask on the same batches."""
from __future__ import annotations

import random

import pytest
import torch
from lightning.pytorch import Callback

from lit_modules.train.run import train

from conftest import RECIPE, TINY_MOE_TRAIN

WORDS = "the a model token layer expert router attention window document packed loss step".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 documents of 8 to 30 words, one file each: a 64-token window holds several."""
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(120):
        (root / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))))
    return root


class SeeBatches(Callback):
    """Records the module's eos id and how many eos tokens the first training batch holds."""

    def __init__(self):
        self.eos_id, self.eos_in_batch = None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.eos_in_batch is None:
            self.eos_id = pl_module.eos_id
            self.eos_in_batch = int((batch == trainer.datamodule.eos_id).sum())


def run(corpus, tmp_path, name, *extra, callbacks=()):
    return train(RECIPE, TINY_MOE_TRAIN + [
        f"data.source={corpus}/*.txt", "data.val_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.run_dir={tmp_path / 'runs'}", f"train.run_name={name}", "train.micro_batch_size=2",
        "train.grad_accum=2", "train.max_steps=3", "train.val_every=3", "train.val_batches=2",
        "train.ckpt_every=-1", "model.vocab_size=320",
        # float32 on the CPU: at initialisation the mask moves the loss by ~1e-4, below what
        # bf16-mixed on a GPU resolves (tests/arch/test_document_mask.py covers the CUDA paths)
        "train.accelerator=cpu", *extra], callbacks=callbacks)


def test_document_mask_trains_and_changes_the_loss(corpus, tmp_path):
    seen = SeeBatches()
    masked = run(corpus, tmp_path, "masked", "train.document_mask=true", "train.document_positions=true",
                 callbacks=[seen])
    plain = run(corpus, tmp_path, "plain")
    assert seen.eos_id is not None and seen.eos_in_batch >= 4  # several documents per window
    for s in (masked, plain):
        assert s["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in s["val_history"])
    # the same weights and batches: step 0's validation and every training loss differ
    assert masked["val_history"][0]["loss"] != pytest.approx(plain["val_history"][0]["loss"], abs=1e-4)
    assert masked["train_loss"] != pytest.approx(plain["train_loss"], abs=1e-4)


def test_the_module_needs_an_eos_id():
    """Without moelab's data module the end-of-text id must be given; given, the
    module turns inputs into the model's document arguments."""
    from arch import RecipeError, load_recipe
    from lit_modules.train.module import CausalLM

    module = CausalLM(load_recipe(RECIPE, TINY_MOE_TRAIN + ["train.document_mask=true"]))
    with pytest.raises(RecipeError, match="needs the end-of-text id"):
        module.setup("fit")
    module.eos_id = 3
    module.setup("fit")  # an eos id given by hand is kept
    docs = module.documents(torch.tensor([[5, 3, 6, 7, 3, 8]]))
    assert docs["doc_ids"].tolist() == [[0, 0, 1, 1, 1, 2]] and docs["positions"] is None
    plain = CausalLM(load_recipe(RECIPE, TINY_MOE_TRAIN))
    plain.setup("fit")
    assert plain.documents(torch.tensor([[5, 3, 6]])) == {}
