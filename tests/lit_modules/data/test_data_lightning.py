"""The data module under a real Lightning Trainer: a run stopped at a checkpoint and
resumed from it sees exactly the batches the uninterrupted run saw, across an epoch
boundary, with validation running in between."""
from __future__ import annotations

import pytest
import torch

from _recorder import fit as recorder_fit
from arch import load_recipe

TOTAL = 24


def make_recipe(cache):
    # 18 batches of 32 windows of 129 tokens per epoch
    return load_recipe("qwen3/0.6b", [
        "model.vocab_size=512", "data.max_chars=200000", f"data.cache_dir={cache}",
        "train.seq_len=128", "train.micro_batch_size=8", "train.grad_accum=4",
    ])


def fit(recipe, max_steps, **kw):
    return recorder_fit(recipe, max_steps, val_check_interval=7, limit_val_batches=2, num_sanity_val_steps=1,
                        **kw)


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
    ref_val, resumed_val = ref.val_by_loader()[0], resumed.val_by_loader()[0]
    fixed = ref_val[1:3]
    assert len(ref_val) == 1 + 2 * (TOTAL // 7) and not torch.equal(fixed[0], fixed[1])
    for i, b in enumerate(ref_val[1:] + resumed_val):
        assert torch.equal(b, fixed[i % 2])
