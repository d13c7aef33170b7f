"""`moelab train` on a data mixture: each source's validation loss is logged as
val/<name>/loss, and val/loss is their mean weighted by data.mix's weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lit_modules.train.run import train
from conftest import RECIPE, overrides


def test_per_source_validation_losses(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(0)
    for name, words in (("code", ["def", "x", "=", "return", "(", ")"]), ("prose", ["the", "cat", "sat", "on"])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(150):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 120))}) + "\n")
    mix = (f"data.mix=[{{source: {tmp_path}/code.jsonl, weight: 3}}, "
           f"{{source: {tmp_path}/prose.jsonl, weight: 1, name: prose}}]")
    s = train(RECIPE, overrides(tmp_path / "cache", tmp_path / "runs", mix, "data.val_fraction=0.1",
                                "train.run_name=mix", "train.max_steps=2", "train.val_every=2",
                                "train.ckpt_every=0", "train.accelerator=cpu", "train.val_batches=2"))
    acc = EventAccumulator(str(tmp_path / "runs" / "mix" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    last = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if tag.startswith("val/")}
    code, prose = last["val/code/loss"], last["val/prose/loss"]
    assert abs(code - prose) > 1e-3  # two sources, two losses
    assert last["val/loss"] == pytest.approx(0.75 * code + 0.25 * prose, rel=1e-5)
    assert s["val_loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert last["val/ppl"] == pytest.approx(math.exp(last["val/loss"]), rel=1e-4)
    assert {"val/code/acc", "val/prose/ppl"} <= set(last)
