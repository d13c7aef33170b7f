"""train.stages (arch/stages.py): one run through several stages, each with its own
shapes, LR segment and RoPE; resume mid-stage; bad stage recipes refused at load.

The runs use the tiny MoE of conftest (0.2M parameters) on the shared data cache."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from arch import RecipeError, build_model, load_recipe
from arch.stages import recipe_at_step, stage_after, stage_of_update, stage_plan
from lit_modules.checkpoints.model_dir import recipe_from_yaml
from lit_modules.checkpoints.safe import load_torch_file
from lit_modules.checkpoints.training import check_resume
from lit_modules.train.optim import lr_multiplier, staged_lr_multiplier
from lit_modules.train.run import check_train, train

from conftest import TINY_MOE_TRAIN, overrides

RECIPE = "proxies/qwen3_stages_tiny"
# three stages of 4 steps: shapes change twice, the RoPE of the last is another
STAGES = ("train.stages=[{name: a, steps: 4},"
          " {name: b, steps: 4, seq_len: 64, micro_batch_size: 2, optim: {lr: 1e-3, warmup_steps: 1}},"
          " {name: c, steps: 4, seq_len: 128, micro_batch_size: 1, grad_accum: 2,"
          "  rope: {global: {theta: 4e6, scaling: linear, factor: 2}}}]")
EXPECTED = {"a": (32, 4, 1, 1e6, 1.0), "b": (64, 2, 1, 1e6, 1.0), "c": (128, 1, 2, 4e6, 2.0)}  # seq, mbs, acc, theta, factor


def staged(cache, run_dir, *extra):
    return overrides(cache, run_dir, "train.seq_len=32", "train.micro_batch_size=4", "model.max_seq_len=128",
                     "train.val_batches=2", "train.val_every=4", "train.log_every=1", STAGES, *extra)


class Record(Callback):
    """Per training step: the batch shape, the RoPE the model has and the loss; per
    validation batch: its step and shape."""

    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._pending = (tuple(batch.shape),)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rope = pl_module.model.ropes["global"]
        self.train[trainer.global_step] = (*self._pending, rope.theta, rope.factor,
                                           float(trainer.callback_metrics["loss"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append((trainer.global_step, tuple(batch.shape), pl_module.model.ropes["global"].theta))


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    """12 steps straight, a checkpoint every 2 steps, all kept."""
    runs = tmp_path_factory.mktemp("stage_runs")
    rec = Record()
    s = train(RECIPE, staged(cache, runs, "train.run_name=full", "train.ckpt_every=2", "train.keep_checkpoints=0"),
              callbacks=[rec])
    return Path(s["run_dir"]), s, rec


def test_run_goes_through_every_stage(full_run):
    run_dir, s, rec = full_run
    recipe = load_recipe(run_dir / "recipe.yaml")
    plan = stage_plan(recipe)
    assert [st.name for st in plan] == ["a", "b", "c"] and s["steps"] == recipe.train.max_steps == 12
    for step in range(1, 13):
        st = stage_of_update(plan, step - 1)
        seq, mbs, acc, theta, factor = EXPECTED[st.name]
        shape, got_theta, got_factor, loss = rec.train[step]
        assert shape == (mbs * acc, seq + 1) and (got_theta, got_factor) == (theta, factor), (step, rec.train[step])
        assert math.isfinite(loss)
    # validation at step 0 (sanity) and at each stage's end, in the stage just trained
    by_step = {}
    for step, shape, theta in rec.val:
        by_step.setdefault(step, set()).add((shape, theta))
    for step, seen in by_step.items():
        seq, mbs, _, theta, _ = EXPECTED[stage_after(plan, step).name]
        assert seen == {((mbs, seq + 1), theta)}, (step, seen)
    assert sorted(by_step) == [0, 4, 8, 12]
    assert s["tokens"] == 4 * (4 * 32 + 2 * 64 + 2 * 128) * 1
    assert [r["name"] for r in s["stages"]] == ["a", "b", "c"]
    assert [r["val_step"] for r in s["stages"]] == [4, 8, 12]
    assert all(r["first_train_loss"] is not None and r["val_loss"] is not None for r in s["stages"])


def test_checkpoints_record_the_stage_and_its_rope(full_run):
    run_dir, _, _ = full_run
    ckpts = run_dir / "checkpoints"
    for step, name, theta in [(4, "a", 1e6), (6, "b", 1e6), (10, "c", 4e6), (12, "c", 4e6)]:
        ck = load_torch_file(ckpts / f"step{step:08d}.ckpt")
        assert ck["moelab_stage"]["name"] == name and ck["global_step"] == step
        saved = recipe_from_yaml(ck["moelab_recipe"], "ckpt")
        assert saved.model.layer_kinds["global"].rope.theta == theta  # what eval / export will use
    # the data position is the step (2 steps into stage b, its first epoch)
    data = load_torch_file(ckpts / "step00000006.ckpt")["TokenDataModule"]
    assert (data["step"], data["stage"], data["epoch"], data["windows"]) == (6, 1, 0, 2 * 2)


def test_resume_mid_stage_two_matches_uninterrupted(full_run, cache, tmp_path):
    """From the checkpoint of step 6 (2 steps into stage b) to the end: the same loss
    at every step 7..12 as the run that never stopped (bit for bit on one CPU)."""
    run_dir, s, rec = full_run
    resumed_rec = Record()
    r = train(RECIPE, staged(cache, tmp_path, f"train.resume={run_dir}/checkpoints/step00000006.ckpt",
                             "train.run_name=resumed", "train.ckpt_every=0"), callbacks=[resumed_rec])
    assert r["steps"] == 12 and sorted(resumed_rec.train) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed_rec.train[step] == rec.train[step], step
    assert r["val_history"][-1] == s["val_history"][-1]


def test_resume_refuses_a_checkpoint_whose_stage_moved(full_run):
    run_dir, _, _ = full_run
    ckpt = run_dir / "checkpoints" / "step00000006.ckpt"
    recipe = load_recipe(run_dir / "recipe.yaml")
    assert check_resume(ckpt, recipe) == 6
    # the stage the checkpoint is in may be lengthened, and later stages changed
    longer = load_recipe(run_dir / "recipe.yaml", ["train.max_steps=null", STAGES.replace("steps: 4, seq_len: 64",
                                                                                          "steps: 9, seq_len: 64")])
    assert check_resume(ckpt, longer) == 6
    moved = load_recipe(run_dir / "recipe.yaml", ["train.max_steps=null", STAGES.replace("name: a, steps: 4",
                                                                                         "name: a, steps: 3")])
    with pytest.raises(RecipeError) as e:
        check_resume(ckpt, moved)
    msg = str(e.value)
    assert "\n" not in msg and "stage 'b' (begun at step 4)" in msg and "(begun at step 3)" in msg, msg
    # a checkpoint of the last stage holds its RoPE; the recipe at that step agrees (no refusal)
    assert check_resume(run_dir / "checkpoints" / "step00000010.ckpt", recipe) == 10


def test_lr_segments():
    r = load_recipe(RECIPE, TINY_MOE_TRAIN + ["train.seq_len=32", "train.micro_batch_size=4", "model.max_seq_len=128",
                                               "train.optim.warmup_steps=2", STAGES])
    plan, cfg, n = stage_plan(r), r.train.optim, r.train.max_steps
    run = dict(schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, max_steps=n, min_lr_ratio=cfg.min_lr_ratio,
               decay_fraction=cfg.decay_fraction)
    f = [staged_lr_multiplier(u, plan=plan, cfg=cfg, max_steps=n) for u in range(n)]
    # stages a and c follow the run's schedule; b its own: peak 1e-3 over its 4 steps, warmup 1
    for u in list(range(4)) + list(range(8, 12)):
        assert f[u] == lr_multiplier(u, **run)
    seg = dict(run, warmup_steps=1, max_steps=4)
    assert [f[u] * cfg.lr for u in range(4, 8)] == pytest.approx([1e-3 * lr_multiplier(j, **seg) for j in range(4)])
    assert f[4] * cfg.lr == pytest.approx(1e-3)


BAD = [
    (["train.stages=[{name: a, steps: 4}, {name: a, steps: 4}]"], ["train.stages[1]", "'a'", "its own name"]),
    (["train.stages=[{steps: 4, seq_len: 4096}]"], ["train.stages[0].seq_len = 4096", "model.max_seq_len = 1024"]),
    (["train.max_steps=10", "train.stages=[{steps: 4}]"], ["train.max_steps = 10", "add up to 4"]),
    (["train.max_steps=null"], ["train.max_steps is null", "train.stages is empty"]),
    (["train.stages=[{steps: 4, rope: {local: {theta: 1e6}}}]"], ["train.stages[0].rope.local", "layer kinds are global"]),
    (["train.stages=[{steps: 4, rope: {global: {thta: 1e6}}}]"], ["train.stages[0].rope.global", "'thta'", "'theta'"]),
    (["train.stages=[{steps: 4, rope: {global: {theta: 0}}}]"], ["train.stages[0].rope.global.theta = 0", "positive"]),
    (["train.stages=[{steps: 4, rope: {global: {scaling: yarm}}}]"], ["train.stages[0].rope.global.scaling", "'yarn'"]),
    (["train.stages=[{steps: 4, rope: {global: {partial: 0.5}}}]"], ["rope.global.partial cannot change"]),
    (["train.stages=[{steps: 4, optim: {weight_decay: 0}}]"], ["train.stages[0].optim.weight_decay", "lr, schedule"]),
    (["train.stages=[{steps: 4, optim: {lr: 1e-3}}]"], ["warmup_steps = 50 (train.optim's", "4 steps"]),
    (["train.stages=[{steps: 4, optim: {lr: -1, warmup_steps: 0}}]"], ["train.stages[0].optim.lr = -1", "positive"]),
    (["train.stages=[{steps: 4}, {seq_len: 64}]"], ["train.stages[1].steps", "required"]),
    (["train.stages=[{steps: 4, seqlen: 64}]"], ["train.stages[0].seqlen", "did you mean 'seq_len'"]),
    (["train.stages=[{steps: 0}]"], ["train.stages[0].steps = 0", "positive integer"]),
]


@pytest.mark.parametrize("ovs,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_stages_are_refused_in_one_sentence(ovs, words):
    extra = [] if any(o.startswith("train.max_steps") for o in ovs) else ["train.max_steps=null"]
    with pytest.raises(RecipeError) as e:
        load_recipe("proxies/qwen3_moe_tiny", extra + ovs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_stage_schedule_is_refused_before_training(cache, tmp_path):
    with pytest.raises(RecipeError, match=r"train.stages\[1\].optim.schedule = 'cosin'") as e:
        train(RECIPE, staged(cache, tmp_path, STAGES.replace("warmup_steps: 1", "warmup_steps: 1, schedule: cosin")))
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


def test_tiny_recipe_loads_and_trains(cache, tmp_path):
    """The shipped recipe's stages, each cut to 2 steps, on the shared tiny model and data."""
    r = load_recipe(RECIPE)
    plan = stage_plan(r)
    assert [(st.seq_len, st.rows) for st in plan] == [(128, 16), (256, 8), (512, 4)]
    assert all(st.seq_len * st.rows == 2048 for st in plan) and r.train.max_steps == sum(st.steps for st in plan)
    assert plan[-1].rope("global").theta > plan[0].rope("global").theta
    items = []
    for st, given in zip(plan, r.train.stages):
        fields = {"name": st.name, "steps": 2, "seq_len": st.seq_len, "micro_batch_size": st.micro_batch_size,
                  "grad_accum": st.grad_accum, "rope": {"global": {"theta": st.rope("global").theta}}}
        if given.optim:
            fields["optim"] = dict(given.optim, warmup_steps=1)
        items.append(str(fields).replace("'", ""))
    s = train(RECIPE, [*TINY_MOE_TRAIN, f"data.cache_dir={cache}", f"train.run_dir={tmp_path}", "train.val_every=2",
                       "train.val_batches=1", f"train.stages=[{', '.join(items)}]", "train.seq_len=128"])
    assert s["steps"] == 6 and [x["val_step"] for x in s["stages"]] == [2, 4, 6]
    assert s["tokens"] == 6 * 2048


def test_32k_recipe_on_the_meta_device():
    """The GPU proxy ends at 32K context with the RoPE base raised, activation
    checkpointing on; it passes the run's checks and its final model (the RoPE its
    checkpoints record) builds on the meta device, with 32K-position RoPE tables."""
    r = load_recipe("proxies/qwen3_stages_w2_32k")
    plan = stage_plan(r)
    last = plan[-1]
    assert last.seq_len == 32768 == r.model.max_seq_len and last.rows == 1
    assert last.rope("global").theta == 1e6 and plan[0].rope("global").theta == 1e4
    assert r.train.activation_checkpointing and r.train.max_steps == sum(st.steps for st in plan)
    final = recipe_at_step(r, r.train.max_steps).model
    assert final.layer_kinds["global"].rope.theta == 1e6
    check_train(r)
    model = build_model(final, device="meta")
    cos, sin = model.ropes["global"](last.seq_len, torch.device("meta"))
    assert cos.shape == sin.shape == (32768, r.model.attention.head_dim) and model.ropes["global"].theta == 1e6
    assert all(p.is_meta for p in model.parameters())
    from lit_modules.commands.inspect_cmd import stage_rows

    rows = dict(stage_rows(r))  # what `moelab inspect` prints
    assert rows["stages"] == "3, 460 steps" and "1 x 1 x 32768 tokens per rank, rope global 1e+06" in rows["  long"]


def test_set_rope_changes_the_tables_not_the_weights():
    r = load_recipe("proxies/qwen3_moe_tiny", TINY_MOE_TRAIN)
    torch.manual_seed(0)
    model = build_model(r.model, device="cpu").eval()
    ids = torch.randint(0, 512, (1, 48))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(ids).logits
    import dataclasses

    model.set_rope("global", dataclasses.replace(r.model.layer_kinds["global"].rope, theta=1e4))
    b = model(ids).logits
    assert not torch.allclose(a, b)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a model built with that RoPE gives the same logits
    r2 = load_recipe("proxies/qwen3_moe_tiny", TINY_MOE_TRAIN + ["model.layer_kinds.global.rope.theta=1e4"])
    fresh = build_model(r2.model, device="cpu").eval()
    fresh.load_state_dict(before)
    assert torch.equal(fresh(ids).logits, b)


def test_compile_is_static_per_stage_shape(monkeypatch):
    """Several stage shapes: each block compiles with dynamic=False (one static graph per
    shape, not symbolic sizes after the second), and the recompile limit leaves room for
    them; a run of one shape compiles as before."""
    import torch._dynamo

    from lit_modules.train.strategy import parallelize, stage_shapes

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(k))
    r = load_recipe(RECIPE, ["train.compile=true"])
    assert stage_shapes(r.train) == [(16, 128), (8, 256), (2, 512)]
    model = build_model(r.model, device="meta")
    # config.patch restores the limit afterwards (pytest's monkeypatch on torch 2.11's
    # config module left the option hidden for the tests after this one)
    with torch._dynamo.config.patch(recompile_limit=8):
        parallelize(model, r.train)
        assert torch._dynamo.config.recompile_limit >= 2 * 3 + 4
    assert calls == [{"dynamic": False}] * len(model.blocks())
    calls.clear()
    plain = load_recipe("proxies/qwen3_moe_tiny", ["train.compile=true"])
    parallelize(build_model(plain.model, device="meta"), plain.train)
    assert calls == [{}] * plain.model.n_layers


@pytest.mark.slow
def test_compiled_run_recompiles_for_new_shapes_only(cache, tmp_path):
    """A compiled staged run (dense: grouped_mm does not compile in float32 on a CPU)
    keeps one graph of the block per stage shape and grad mode: 3 shapes x (training,
    validation) = 6, whatever RoPE changes stage c makes (its tables are inputs)."""
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from arch.block import Block

    torch._dynamo.reset()
    s = train(RECIPE, staged(cache, tmp_path, "train.compile=true", "model.moe.n_experts=0", "train.ckpt_every=0"))
    assert s["steps"] == 12
    assert len(_debug_get_cache_entry_list(Block.forward.__code__)) == 6
    torch._dynamo.reset()


def test_sharded_checkpoint_resumes_mid_stage(full_run, cache, tmp_path):
    """The sharded format (a .dcp folder) records the stage too and resumes 2 steps into
    stage b to the same losses as the full-format run that never stopped."""
    _, _, rec = full_run
    first = train(RECIPE, staged(cache, tmp_path, "train.run_name=sh", "train.checkpoint_format=sharded",
                                 "train.ckpt_every=6", "train.keep_checkpoints=0", "train.val_every=0"))
    dcp = Path(first["run_dir"]) / "checkpoints" / "step00000006.dcp"
    from lit_modules.checkpoints.sharded import read_header

    assert read_header(dcp)["moelab_stage"]["name"] == "b"
    again = Record()
    train(RECIPE, staged(cache, tmp_path, f"train.resume={dcp}", "train.run_name=sh2",
                         "train.checkpoint_format=sharded", "train.ckpt_every=0", "train.val_every=0"),
          callbacks=[again])
    assert [again.train[s] for s in range(7, 13)] == [rec.train[s] for s in range(7, 13)]


def test_rope_changes_per_layer_kind_gemma3_style():
    """Gemma 3's extension: the global layers' RoPE interpolated x8 from the second
    stage on, the local layers' untouched; set on a model, only the global table moves."""
    r = load_recipe("proxies/gemma3_tiny", ["train.max_steps=null", "train.stages=[{name: short, steps: 2},"
                                            " {name: long, steps: 2, rope: {global: {scaling: linear, factor: 8}}}]"])
    plan = stage_plan(r)
    base_local, base_global = (r.model.layer_kinds[k].rope for k in ("local", "global"))
    assert plan[0].rope("global") == base_global and plan[1].rope("local") == base_local
    assert (plan[1].rope("global").scaling, plan[1].rope("global").factor) == ("linear", 8.0)
    assert plan[1].rope("global").theta == base_global.theta
    final = recipe_at_step(r, 4).model.layer_kinds
    assert final["global"].rope.factor == 8.0 and final["local"].rope == base_local
    model = build_model(r.model, device="cpu")
    before = {k: m(16, torch.device("cpu")) for k, m in model.ropes.items()}
    for k in model.ropes:
        model.set_rope(k, plan[1].rope(k))
    after = {k: m(16, torch.device("cpu")) for k, m in model.ropes.items()}
    assert torch.equal(before["local"][0], after["local"][0]) and not torch.equal(before["global"][0], after["global"][0])
