"""`moelab train` end to end on a CPU: the loss falls, TensorBoard holds the tags,
bad inputs fail before training, a SIGKILLed run resumes to the same loss.

All runs share one tokenizer/token cache (a 300k-character slice of the standard
library, a 512-token BPE) and use a ~0.2M-parameter Qwen3-MoE."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arch import RecipeError
from lit_modules.train.run import train

from conftest import RECIPE, overrides
from conftest import TRAIN_TINY as TINY

ROOT = Path(__file__).resolve().parents[3]


def scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def short_run(cache, tmp_path_factory):
    """12 steps with validation, checkpoints, router images and a stated peak (so MFU
    is defined on a CPU); shared by the tests that inspect a finished run."""
    runs = tmp_path_factory.mktemp("runs")
    summary = train(RECIPE, overrides(cache, runs, "train.run_name=short", "train.max_steps=12",
                                      "train.val_every=6", "train.ckpt_every=5", "train.expert_image_every=4",
                                      "train.peak_tflops=0.5"))
    return Path(summary["run_dir"]), summary


def test_run_directory_and_summary(short_run):
    run_dir, summary = short_run
    assert run_dir.name == "short"
    names = {p.name for p in run_dir.iterdir()}
    assert {"recipe.yaml", "tokenizer.json", "train.log", "tb", "checkpoints", "summary.json"} <= names
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "tokens", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "checkpoint"):
        assert on_disk[key] is not None, key
    assert on_disk["steps"] == 12 and on_disk["tokens"] == 12 * 8 * 64
    assert on_disk["val_ppl"] == pytest.approx(math.exp(on_disk["val_loss"]))
    assert [h["step"] for h in on_disk["val_history"]] == [0, 6, 12]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step00000005.ckpt", "step00000010.ckpt", "step00000012.ckpt"]
    assert Path(on_disk["checkpoint"]).name == "step00000012.ckpt"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12 and "moelab_recipe" in ckpt
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert "model.layers.0.ffn.router.expert_bias" in ckpt["state_dict"]
    log = (run_dir / "train.log").read_text()
    assert "step 12" in log and "val loss" in log


def test_run_directory_evaluates_without_a_tokenizer_argument(short_run, tmp_path):
    """The run carries its tokenizer: `moelab eval RUN_DIR` needs nothing else."""
    import subprocess
    import sys

    run_dir, _ = short_run
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    r = subprocess.run([sys.executable, "-m", "lit_modules.cli", "eval", str(run_dir), "--data", str(text),
                        "--seq-len", "32", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"] > 1


def test_tensorboard_tags(short_run):
    run_dir, _ = short_run
    acc = scalars(run_dir)
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/ce_loss", "train/aux_loss", "train/lr", "train/grad_norm",
                "perf/tokens_per_s", "perf/mfu", "val/loss", "val/ppl", "val/acc"}
    for layer in (0, 1):
        expected |= {f"router/layer{layer}/{s}" for s in ("max_over_mean_load", "entropy", "dropped", "bias_norm")}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 6, 12]
    mfu = [e.value for e in acc.Scalars("perf/mfu")]
    assert all(0 < v < 1 for v in mfu)
    images = acc.Tags()["images"]
    assert {"router/layer0/load", "router/layer1/load"} <= set(images)
    img = acc.Images("router/layer0/load")[-1]
    assert img.step == 12 and img.height == 8 * 4 and img.width == 4 * 4  # 8 experts x 4 steps, 4 px cells
    # the loss that reaches the optimizer is CE + the weighted balancing loss
    total, ce, aux = (acc.Scalars(t)[-1].value for t in ("train/loss", "train/ce_loss", "train/aux_loss"))
    assert total == pytest.approx(ce + aux, rel=1e-6)


@pytest.mark.slow
def test_validation_loss_falls(cache, tmp_path):
    """100 steps of 512 tokens: the validation loss falls by at least 1 nat from the
    untrained model's (~ln 512 = 6.2), i.e. perplexity drops by a factor e or more
    (seen: 6.26 -> 4.73)."""
    s = train(RECIPE, overrides(cache, tmp_path, "train.max_steps=100", "train.val_every=100",
                                "train.ckpt_every=0", "train.log_every=10", "train.optim.lr=1e-2"))
    first, last = s["val_history"][0], s["val_history"][-1]
    assert first["step"] == 0 and last["step"] == 100
    assert first["loss"] == pytest.approx(math.log(512), abs=0.3)
    assert last["loss"] < first["loss"] - 1.0, s["val_history"]


# ------------------------------------------------------------------ errors before training


def fails_before_training(cache, tmp_path, *extra, match):
    with pytest.raises(RecipeError, match=match) as e:
        train(RECIPE, overrides(cache, tmp_path, "train.max_steps=2", *extra))
    msg = str(e.value)
    assert "\n" not in msg
    assert not list(tmp_path.rglob("*.ckpt"))
    return msg


def test_error_data_path_matches_nothing(cache, tmp_path):
    fails_before_training(cache, tmp_path, f"data.source={tmp_path}/nowhere/*.txt", match="nowhere")


def test_error_empty_corpus(cache, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    fails_before_training(cache, tmp_path, f"data.source={tmp_path}/empty.txt", match="(?i)empty|no text")


def test_error_tokenizer_larger_than_vocab(cache, tmp_path, short_run):
    bpe = next(Path(cache).glob("bpe-*.json"))  # the 512-token BPE of the shared cache
    fails_before_training(cache, tmp_path, f"data.tokenizer={bpe}", "model.vocab_size=300", match="vocab")


def test_error_resume_other_architecture(cache, tmp_path, short_run):
    run_dir, _ = short_run
    msg = fails_before_training(cache, tmp_path, f"resume={run_dir}/checkpoints/last.ckpt",
                                "model.d_model=96", match="another architecture")
    assert "model.d_model: checkpoint 64, recipe 96" in msg


def test_error_truncated_checkpoint(cache, tmp_path, short_run):
    run_dir, _ = short_run
    (tmp_path / "elsewhere").mkdir()
    bad = tmp_path / "elsewhere" / "half.ckpt"
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    fails_before_training(cache, tmp_path / "runs", f"train.resume={bad}", match="cannot be read")


def test_a_resumed_run_says_how_long_the_restore_took(cache, tmp_path, short_run, capsys):
    """Also when it writes no checkpoint of its own (train.ckpt_every=-1: a benchmark's
    resume), the closing line says the restore time, as summary.json does."""
    s = train(RECIPE, overrides(cache, tmp_path, "train.run_name=again", "train.max_steps=13",
                                "train.ckpt_every=-1", "train.val_every=0",
                                f"train.resume={short_run[0]}"))
    assert s["checkpoint_saves"] == 0 and s["checkpoint_load_seconds"] > 0
    assert f"(full: restored in {s['checkpoint_load_seconds']:.2f} s)" in capsys.readouterr().out


def test_cli_error_is_one_line(cache, tmp_path, capsys):
    from lit_modules.cli import main

    code = main(["train", RECIPE, *overrides(cache, tmp_path, "train.max_steps=2", "train.resume=/no/such.ckpt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("moelab train: error: train.resume = /no/such.ckpt")
    assert len(err.splitlines()) == 1


# ------------------------------------------------------------------ resume after SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(cache, tmp_path, short_run):
    """Run A trains 40 steps straight. Run B, the same command in a subprocess, is
    killed with SIGKILL once its first checkpoint (step 10) exists, then started again:
    it resumes from checkpoints/last.ckpt and must reach the same loss at step 40
    (bit for bit on one CPU: same data order, same optimizer and schedule state)."""
    common = overrides(cache, tmp_path, "train.max_steps=40", "train.ckpt_every=10", "train.val_every=20",
                       "train.log_every=5")
    a = train(RECIPE, common + ["train.run_name=a"])

    cmd = [sys.executable, "-m", "lit_modules.cli", "train", RECIPE, *common, "train.run_name=b"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "b" / "checkpoints" / "step00000010.ckpt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert first.exists() and not (tmp_path / "b" / "summary.json").exists()

    b = train(RECIPE, common + ["train.run_name=b"])  # auto-resume from b/checkpoints/last.ckpt
    assert b["resumed_from"] and Path(b["resumed_from"]).name == "last.ckpt"
    assert b["steps"] == a["steps"] == 40
    assert b["train_loss"] == a["train_loss"] and b["val_loss"] == a["val_loss"]
    assert b["val_history"] == a["val_history"]  # steps 0, 20, 40; 0 and maybe 20 from before the kill


# ------------------------------------------------------------------ data parallel


@pytest.mark.slow
def test_ddp_two_ranks_match_one(cache, tmp_path, short_run):
    """The same 3 steps of 8 sequences on one process (1 x 8) and on two gloo ranks
    (each 2 micro-batches of 2, DDP syncing on the last only), with the global-batch
    balancing loss and the bias update: the same loss and the same weights. Twice on
    two ranks: DDP's hooks, and train.grad_sync = step (no DDP wrapper, gradients
    averaged after the backward: what CUDA graphs use under DDP)."""
    # both on the CPU, so float32 (precision auto): what makes 1e-5 true. With CUDA
    # present the one-process run would otherwise take the GPU and bf16-mixed
    # (8.26770 against 8.26785, issue 21).
    common = overrides(cache, tmp_path, "train.max_steps=3", "train.val_every=0", "train.accelerator=cpu",
                       "model.moe.balance.aux_coef=0.5", "model.moe.router.bias_update_rate=0.01")
    runs = {"one": ["train.micro_batch_size=8"],
            "two": ["train.micro_batch_size=2", "train.grad_accum=2", "train.strategy=ddp", "train.devices=2"]}
    runs["step"] = runs["two"] + ["train.grad_sync=step"]
    for name, extra in runs.items():  # a subprocess: Lightning's launcher re-runs the command per rank
        cmd = [sys.executable, "-m", "lit_modules.cli", "train", RECIPE, *common, f"train.run_name={name}", *extra]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("no DDP wrapper" in (tmp_path / name / "train.log").read_text()) == (name == "step"), name
    summary = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in runs}
    state = {n: torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for n in runs}
    a, bias = state["one"], "model.layers.0.ffn.router.expert_bias"
    assert a[bias].abs().max() > 0
    for name in ("two", "step"):
        assert summary[name]["tokens"] == summary["one"]["tokens"] == 3 * 8 * 64
        assert summary[name]["train_loss"] == pytest.approx(summary["one"]["train_loss"], abs=1e-5), name
        b = state[name]
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
        assert torch.equal(a[bias], b[bias]), name


def test_progress_bar_loss_is_read_at_logging_steps_only(cache, tmp_path):
    """The bar's loss is the logged (rank-mean) training loss of the last logging step,
    read on the host only there: between logging steps it keeps that value."""
    from lightning.pytorch.callbacks import Callback

    class Seen(Callback):  # the bar's metrics after each step (Lightning updates them after the step's hooks)
        def __init__(self):
            self.loss = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.loss[trainer.global_step] = trainer.progress_bar_metrics.get("loss")

        def on_train_end(self, trainer, pl_module):
            self.loss[trainer.global_step] = trainer.progress_bar_metrics.get("loss")

    seen = Seen()
    s = train(RECIPE, overrides(cache, tmp_path, "train.run_name=bar", "train.max_steps=5", "train.log_every=2",
                                "train.val_every=0", "train.ckpt_every=0"), callbacks=[seen])
    logged = {e.step: e.value for e in scalars(Path(s["run_dir"])).Scalars("train/loss")}
    assert sorted(logged) == [2, 4, 5]
    assert seen.loss[1] is None  # no logging step yet
    for step, at in ((2, 2), (3, 2), (4, 4), (5, 5)):
        assert seen.loss[step] == pytest.approx(logged[at], rel=1e-6), step


def test_ctrl_c_vote_of_several_processes_at_logging_steps_only():
    """With several processes the ranks vote on stopping (an all-reduce and a host read
    each) every vote_every steps and at the last step; one process decides alone."""
    from types import SimpleNamespace

    from lit_modules.train.callbacks import StopOnInterrupt

    votes = []

    def vote(decision, all=True):
        votes.append(trainer.global_step)
        return decision

    trainer = SimpleNamespace(world_size=2, max_steps=8, global_step=0, should_stop=False, limit_val_batches=1.0,
                              strategy=SimpleNamespace(reduce_boolean_decision=vote))
    stop = StopOnInterrupt(vote_every=3)
    for step in range(1, 9):
        trainer.global_step = step
        if step == 4:
            stop.requested = True  # a Ctrl-C during step 4: the ranks stop at the next vote
        stop.on_train_batch_end(trainer, None, None, None, 0)
        if trainer.should_stop:
            break
    assert votes == [3, 6] and stop.stopped_at == 6
    single = StopOnInterrupt(vote_every=3)
    trainer.world_size, trainer.should_stop, trainer.global_step = 1, False, 4
    single.requested = True
    single.on_train_batch_end(trainer, None, None, None, 0)
    assert single.stopped_at == 4 and votes == [3, 6]


def test_profile_steps_writes_a_kernel_table(cache, tmp_path):
    s = train(RECIPE, overrides(cache, tmp_path, "train.run_name=prof", "train.max_steps=7", "train.val_every=0",
                                "train.profile_steps=1", "train.ckpt_every=0"))
    prof = Path(s["run_dir"]) / "profile"
    table = (prof / "rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert (prof / "trace.json").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["proxies/deepseek_v3_tiny", "proxies/gpt_oss_tiny"])
def test_field_proxies_train(recipe, cache, tmp_path):
    """The DeepSeek-V3 (MLA, group-limited routing, shared expert, dense first layer)
    and gpt-oss (sinks, windows, biased clamped experts) proxies train as shipped, only
    shorter and smaller-batched: 40 steps lower the validation loss by 1 nat or more."""
    s = train(recipe, [f"data.cache_dir={cache}", f"train.run_dir={tmp_path}", "train.max_steps=40",
                       "train.val_every=40", "train.ckpt_every=0", "train.micro_batch_size=4", "train.seq_len=128",
                       "train.val_batches=4", "data.max_chars=300000", "train.optim.lr=1e-2", "train.optim.warmup_steps=5"])
    first, last = s["val_history"][0], s["val_history"][-1]
    assert last["step"] == 40 and last["loss"] < first["loss"] - 1.0, s["val_history"]


def test_recipe_yaml_keeps_compile_auto(cache, tmp_path):
    """train.compile = auto picks per machine (lit_modules/runtime.py resolve_speed), so the
    run's recipe.yaml keeps auto, and the summary says what this run picked: repeating
    the run elsewhere picks again instead of inheriting, say, graphs on a CPU."""
    from arch import load_recipe

    summary = train(RECIPE, overrides(cache, tmp_path, "train.run_name=auto", "train.max_steps=1",
                                      "train.val_every=0", "train.accelerator=cpu", "train.compile=auto"))
    assert summary["compile"] is False
    assert load_recipe(Path(summary["run_dir"]) / "recipe.yaml").train.compile == "auto"
