"""Data mixtures per stage (train.stages[k].mix): each stage draws its sources by its own
weights (shares within tolerance), the mixture switches at the stage boundary, a resumed
run lands on the uninterrupted run's batches mid-stage (bit for bit, under a Trainer
too), every source is validated in every stage, and bad stage mixes get one sentence."""
from __future__ import annotations

import json
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from _recorder import fit as recorder_fit
from arch import RecipeError, load_recipe
from arch.stages import stage_plan
from lit_modules.data.corpus import DataError
from lit_modules.data.datamodule import TokenDataModule
from lit_modules.train.run import check_train

MBS = 4
WEIGHTS = {"a": 5, "b": 3, "c": 2}  # data.mix: stage 'one' and stage 'three'
STAGE_TWO = {"b": 1, "c": 3}  # stage 'two' leaves 'a' out
STEPS = (60, 60, 20)
SEQS = (16, 32, 16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three JSONL sources, each with words of its own (a window's source is plain)."""
    root = tmp_path_factory.mktemp("stagemix")
    rng = np.random.default_rng(0)
    for name, docs in (("a", 120), ("b", 80), ("c", 150)):
        words = [f"{name}{w}" for w in ("x", "yy", "zzz", "q", "rr")]
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
    return root


def spec(d):
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def base_overrides(root):
    """A mixture of the three sources, without stages."""
    mix = "[" + ", ".join(f"{{source: {root / n}.jsonl, weight: {w}, name: {n}}}" for n, w in WEIGHTS.items()) + "]"
    return ["model.vocab_size=512", f"data.cache_dir={root / 'cache'}", f"train.seq_len={SEQS[0]}",
            f"train.micro_batch_size={MBS}", "train.val_batches=2", "data.val_fraction=0.1", f"data.mix={mix}"]


def make_recipe(root, *extra, stage_two=STAGE_TWO):
    two = f", mix: {spec(stage_two)}" if stage_two else ""
    stages = (f"train.stages=[{{name: one, steps: {STEPS[0]}}}, {{name: two, steps: {STEPS[1]}, seq_len: {SEQS[1]}"
              f"{two}}}, {{name: three, steps: {STEPS[2]}, seq_len: {SEQS[2]}}}]")
    return load_recipe("qwen3/0.6b", base_overrides(root) + ["train.max_steps=null", stages, *extra])


def make_dm(recipe, **kw):
    dm = TokenDataModule(recipe, verbose=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def sources_of(dm, batch):
    """Which source each row of a batch is a window of, by its words' first letter."""
    vocab = dm.tokenizer
    return [vocab.decode(row.tolist()).strip()[:1] or "?" for row in batch]


def test_shares_per_stage_and_the_switch_at_the_boundary(data):
    dm = make_dm(make_recipe(data))
    seen = batches(dm, sum(STEPS))
    starts = np.cumsum((0,) + STEPS)
    for k, want in enumerate((WEIGHTS, STAGE_TWO, WEIGHTS)):
        rows = [s for b in seen[starts[k]:starts[k + 1]] for s in sources_of(dm, b)]
        assert all(b.shape == (MBS, SEQS[k] + 1) for b in seen[starts[k]:starts[k + 1]])
        total = sum(want.values())
        for name in WEIGHTS:
            share = rows.count(name) / len(rows)
            assert abs(share - want.get(name, 0) / total) < 0.06, (k, name, share)
        assert set(rows) == set(want)  # stage 'two' never draws 'a'
    # stage one's draws are those of the same mixture without stages (stage 0 is seeded alike)
    plain = make_dm(load_recipe("qwen3/0.6b", base_overrides(data) + [f"train.max_steps={STEPS[0]}"]))
    assert all(torch.equal(a, b) for a, b in zip(batches(plain, 5), seen[:5]))
    # another stage-two mixture changes stage two only
    other = make_dm(make_recipe(data, stage_two={"a": 1, "b": 1}))
    again = batches(other, STEPS[0] + 1)
    assert torch.equal(again[STEPS[0] - 1], seen[STEPS[0] - 1]) and not torch.equal(again[-1], seen[STEPS[0]])
    assert "a" in [s for b in batches(other, STEPS[0] + 10)[STEPS[0]:] for s in sources_of(other, b)]


def test_resume_mid_stage_is_exact(data):
    recipe = make_recipe(data)
    ref = batches(make_dm(recipe), sum(STEPS))
    for stop in (7, STEPS[0] + 9, STEPS[0] + STEPS[1] + 3):  # in each stage
        first = make_dm(recipe)
        batches(first, stop)
        state = first.state_dict()
        again = TokenDataModule(recipe, verbose=False)
        again.load_state_dict(state)  # before setup, as Lightning does
        again.setup("fit")
        assert all(torch.equal(a, b) for a, b in zip(batches(again, sum(STEPS) - stop), ref[stop:])), stop
    # a recipe whose stage mixture changed resumes at the same step, and says the data differs
    assert state["mix"][1] == {"a": 0.0, "b": 0.25, "c": 0.75}
    other = TokenDataModule(make_recipe(data, stage_two={"b": 1}), verbose=False)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="data mixtures differ"):
        other.setup("fit")
    assert other._next_step() == state["step"]


def test_ranks_split_each_stage_step_as_one_process_draws_it(data):
    """Two ranks of micro_batch_size 2 take every other window of the step one process
    of micro_batch_size 4 draws, in every stage (the step's global batch is the same)."""
    one = batches(make_dm(make_recipe(data)), sum(STEPS))
    halves = make_recipe(data, "train.micro_batch_size=2",
                         f"train.stages=[{{name: one, steps: {STEPS[0]}}}, {{name: two, steps: {STEPS[1]}, "
                         f"seq_len: {SEQS[1]}, mix: {spec(STAGE_TWO)}}}, {{name: three, steps: {STEPS[2]}, "
                         f"seq_len: {SEQS[2]}}}]")
    ranks = [batches(make_dm(halves, rank=r, world_size=2), sum(STEPS)) for r in (0, 1)]
    for step in (0, STEPS[0] - 1, STEPS[0], sum(STEPS) - 1):
        assert torch.equal(ranks[0][step], one[step][0::2]) and torch.equal(ranks[1][step], one[step][1::2]), step


def fit(recipe, max_steps, **kw):
    module, dm, _ = recorder_fit(recipe, max_steps, val_check_interval=STEPS[0], **kw)
    return module, dm


def test_trainer_resume_mid_stage_and_validation_per_source_per_stage(data, tmp_path):
    recipe = make_recipe(data, f"train.val_every={STEPS[0]}")
    end = STEPS[0] + STEPS[1]
    ref, dm = fit(recipe, end)
    stop = STEPS[0] + 5  # 5 steps into stage two
    fit(recipe, stop, ckpt_dir=tmp_path / "ckpt", every=stop)
    resumed, _ = fit(recipe, end, resume=str(tmp_path / "ckpt" / f"step={stop}.ckpt"))
    assert len(resumed.seen) == end - stop
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, ref.seen[stop:]))
    # every source validated at the end of each stage, in that stage's windows, from its own split
    assert sorted(ref.val_seen) == [(s, i) for s in (STEPS[0], end) for i in range(3)]
    for (step, i), got in ref.val_seen.items():
        assert {b.shape[1] for b in got} == {(SEQS[0] if step == STEPS[0] else SEQS[1]) + 1}
        assert set(sources_of(dm, torch.cat(got))) == {dm.mix_names[i]}


BAD = [
    ("{a: 0}", ["train.stages[1].mix.a = 0", "positive weight"]),
    ("{a: -1, b: 1}", ["train.stages[1].mix.a = -1"]),
    ("{a: x}", ["train.stages[1].mix.a = 'x'"]),
    ("[a, b]", ["train.stages[1].mix must be a mapping"]),
]


@pytest.mark.parametrize("mix,words", BAD, ids=[b[0] for b in BAD])
def test_bad_stage_mixes_refused_at_load(data, mix, words):
    with pytest.raises(RecipeError) as e:
        load_recipe("qwen3/0.6b", base_overrides(data) + [
            "train.max_steps=null", f"train.stages=[{{steps: 2}}, {{steps: 2, mix: {mix}}}]"])
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg
    assert all(w in msg for w in words), msg


def test_stage_mix_without_data_mix_and_unknown_source(data):
    with pytest.raises(RecipeError) as e:
        load_recipe("qwen3/0.6b", ["train.max_steps=null", "train.stages=[{steps: 2, mix: {stdlib: 1}}]"])
    assert "train.stages[0].mix weighs sources of data.mix, but data.mix is not set" in str(e.value)
    assert "\n" not in str(e.value)
    r = make_recipe(data, stage_two={"b": 1, "cc": 2})  # loads: names are data.mix's business
    for check in (check_train, lambda rec: TokenDataModule(rec, verbose=False)):
        with pytest.raises(DataError) as e:
            check(r)
        msg = str(e.value)
        assert "\n" not in msg and "train.stages[1].mix names 'cc'" in msg and "did you mean 'c'" in msg, msg
    # a stage mix over a source's default name (its file's stem)
    plan = stage_plan(make_recipe(data))
    assert plan[1].mix == (("b", 1.0), ("c", 3.0)) and plan[0].mix == plan[2].mix == ()


def test_stages_with_streaming_refused_saying_why(data):
    r = load_recipe("qwen3/0.6b", ["train.max_steps=null", "train.stages=[{steps: 2}]", "data.streaming=/nowhere",
                                   "data.tokenizer=/nowhere/tokenizer.json"])
    with pytest.raises(DataError) as e:
        TokenDataModule(r, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and "train.stages with data.streaming" in msg and "fixed length" in msg, msg


class Losses(pl.Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = float(trainer.callback_metrics["loss"])


def test_shipped_recipe_trains_each_stage_on_its_mixture(cache, tmp_path):
    """proxies/qwen3_stages_mix_tiny, each stage cut to 2 steps, on the tiny model: the
    summary and TensorBoard hold each source's validation loss at each stage's end,
    val/loss weighs them by the stage's own mixture, and a run resumed one step into the
    knowledge stage has the uninterrupted run's losses, bit for bit."""
    from pathlib import Path

    from conftest import TINY_MOE_TRAIN
    from lit_modules.tools.compare import _scalars
    from lit_modules.train.run import train

    r = load_recipe("proxies/qwen3_stages_mix_tiny")
    plan = stage_plan(r)
    assert plan[1].mix and not plan[0].mix and not plan[2].mix
    items = []
    for st, given in zip(plan, r.train.stages):
        fields = {"name": st.name, "steps": 2, "seq_len": st.seq_len, "micro_batch_size": 2, "grad_accum": 1}
        if given.mix:
            fields["mix"] = dict(given.mix)
        items.append(str(fields).replace("'", ""))
    ovs = [*TINY_MOE_TRAIN, f"data.cache_dir={cache}", f"train.run_dir={tmp_path}", "train.val_every=2",
           "train.val_batches=1", f"train.stages=[{', '.join(items)}]", "train.seq_len=128"]
    full = Losses()
    s = train("proxies/qwen3_stages_mix_tiny", ovs + ["train.ckpt_every=3", "train.run_name=full"], callbacks=[full])
    resumed = Losses()
    ckpt = Path(s["run_dir"]) / "checkpoints" / "step00000003.ckpt"
    train("proxies/qwen3_stages_mix_tiny", ovs + [f"train.resume={ckpt}", "train.run_name=resumed",
                                                  "train.ckpt_every=0"], callbacks=[resumed])
    assert sorted(resumed.by_step) == [4, 5, 6]
    assert all(resumed.by_step[k] == full.by_step[k] for k in (4, 5, 6)), (resumed.by_step, full.by_step)
    rows = s["stages"]
    assert [x["val_step"] for x in rows] == [2, 4, 6]
    names = ["stdlib", "site-packages"]
    general, knowledge = {"stdlib": 0.75, "site-packages": 0.25}, {"stdlib": 0.25, "site-packages": 0.75}
    assert [x["mix"] for x in rows] == [general, knowledge, general]
    for x in rows:
        assert sorted(x["val_sources"]) == sorted(names)
        assert x["val_loss"] == pytest.approx(sum(x["mix"][n] * x["val_sources"][n] for n in names))
    curves = _scalars(Path(s["run_dir"]) / "tb")
    for n in names:
        assert [step for step, _ in curves[f"val/{n}/loss"]] == [0, 2, 4, 6]
    assert [v for _, v in curves["stage/mix/site-packages"]] == [0.25, 0.75, 0.25]
