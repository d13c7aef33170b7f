"""`moelab train` refuses bad settings before any data work, and `resume=auto` finds
the newest run of the recipe."""
from __future__ import annotations

import os
import re
import time

import pytest

from arch import RecipeError, load_recipe
from lit_modules.train.run import check_on_accelerator, check_train, resolve_run

RECIPE = "proxies/qwen3_moe_tiny"


@pytest.mark.parametrize("override,words", [
    ("train.devices=abc", "train.devices = 'abc'"),
    ("train.devices=0", "train.devices = 0"),
    ("train.num_nodes=0", "train.num_nodes = 0"),
    ("train.max_steps=0", "train.max_steps = 0"),
    ("train.seq_len=4096", "exceeds model.max_seq_len"),
    # numbers (arch/ranges.py), refused by load_recipe already
    ("train.grad_clip=nan", "train.grad_clip = nan is not a finite number"),
    ("train.grad_clip=-1.0", "train.grad_clip = -1.0 is out of range"),
    ("train.optim.lr=nan", "train.optim.lr = nan is not a finite number"),
    ("train.optim.lr=inf", "train.optim.lr = inf is not a finite number"),
    ("train.optim.lr=0.0", "train.optim.lr = 0.0 is out of range"),
    ("train.optim.betas=[0.9,1.0]", "train.optim.betas[1] = 1.0 is out of range"),
    ("train.optim.betas=[-0.1,0.95]", "train.optim.betas[0] = -0.1 is out of range"),
    ("train.optim.eps=0.0", "train.optim.eps = 0.0 is out of range"),
    ("train.optim.weight_decay=-0.1", "train.optim.weight_decay = -0.1 is out of range"),
    ("train.optim.min_lr_ratio=1.5", "train.optim.min_lr_ratio = 1.5 is out of range"),
    ("train.optim.decay_fraction=nan", "train.optim.decay_fraction = nan is not a finite number"),
    ("train.optim.warmup_steps=-1", "train.optim.warmup_steps = -1 is out of range"),
    ("train.micro_batch_size=1000000000", "train.micro_batch_size = 1000000000 is out of range"),
    ("train.grad_accum=0", "train.grad_accum = 0 is out of range"),
    ("train.seed=-1", "train.seed = -1 is out of range"),
    ("train.peak_tflops=-inf", "train.peak_tflops = -inf is not a finite number"),
    ("train.expert_parallel=0", "train.expert_parallel = 0 is out of range"),
    ("data.val_fraction=1.0", "data.val_fraction = 1.0 is out of range"),
    ("data.max_chars=0", "data.max_chars = 0 is out of range"),
    ("train.checkpoint_format=shards", "train.checkpoint_format = 'shards' is not a checkpoint format (did you mean"),
    ("train.finite_check=defered", "train.finite_check = 'defered' is not a finite check (did you mean 'deferred'?); "
                                     "choose deferred or step."),
    ("train.optim.schedule=cosin", "train.optim.schedule = 'cosin' is not a schedule (did you mean 'cosine'?)"),
    ("train.document_positions=true", "train.document_positions = true needs train.document_mask = true"),
])
def test_train_settings_fail_in_one_sentence(override, words):
    with pytest.raises(RecipeError) as exc:
        check_train(load_recipe(RECIPE, [override]))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_strategy_and_precision_fail_in_one_sentence():
    from lit_modules.runtime import resolve_precision
    from lit_modules.train.strategy import build_strategy

    with pytest.raises(RecipeError) as exc:
        build_strategy(load_recipe(RECIPE, ["train.strategy=fsd"]).train)
    assert str(exc.value) == ("train.strategy = 'fsd' is not a strategy (did you mean 'fsdp'?); choose one of "
                              "auto, ddp, fsdp, model_parallel.")
    with pytest.raises(RecipeError) as exc:
        resolve_precision(load_recipe(RECIPE, ["train.precision=bf16"]).train, "cpu")
    assert str(exc.value) == ("train.precision = 'bf16' is not a precision (did you mean 'bf16-true'?); choose "
                              "one of auto, 32-true, bf16-mixed, bf16-true.")


def test_device_lists_and_auto_are_accepted():
    for override in ("train.devices=auto", "train.devices=2", "train.devices=[0,1]"):
        check_train(load_recipe(RECIPE, [override]))


def test_flex_attention_is_refused_on_cpu_only():
    recipe = load_recipe(RECIPE, ["model.attention.impl=flex"])
    with pytest.raises(RecipeError, match="no backward pass on CPU"):
        check_on_accelerator(recipe, "cpu")
    check_on_accelerator(recipe, "gpu")
    small = load_recipe(RECIPE, ["model.attention.impl=flex", "model.attention.head_dim=8"])
    with pytest.raises(RecipeError, match="needs head_dim >= 16 on CUDA"):
        check_on_accelerator(small, "gpu")


def test_triton_expert_backend_is_refused_where_it_cannot_run(monkeypatch):
    """Before any data work: on a CPU outside Triton's interpreter, and anywhere
    without the triton package; one sentence naming the field and the way out."""
    import experts.triton_backend as tb

    recipe = load_recipe(RECIPE, ["model.moe.backend=triton"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecipeError, match="model.moe.backend = 'triton'") as exc:
        check_on_accelerator(recipe, "cpu")
    assert "\n" not in str(exc.value) and "grouped_mm" in str(exc.value)
    monkeypatch.setattr(tb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match="needs the triton package"):
        check_on_accelerator(recipe, "gpu")


def test_resume_auto_takes_the_newest_run_of_the_recipe(tmp_path):
    def run(name, age):
        last = tmp_path / name / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"x")
        t = time.time() - age
        os.utime(last, (t, t))
        return last

    recipe = load_recipe(RECIPE, [f"train.run_dir={tmp_path}", "train.resume=auto"])
    run_dir, ckpt = resolve_run(recipe)  # nothing yet: a new run
    assert ckpt is None and run_dir.name.startswith("qwen3_moe_tiny-")
    run("qwen3_moe_tiny-20260101-000000", 100)
    newest = run("qwen3_moe_tiny-20260102-000000", 10)
    run("gemma3_tiny-20260103-000000", 0)  # another recipe: never picked
    assert resolve_run(recipe) == (newest.parent.parent, newest)


def test_optimizer_settings_built_in_code_meet_the_same_rules():
    import torch

    from arch.config import OptimConfig
    from lit_modules.train.optim import build_optimizer

    for bad, words in (({"lr": float("nan")}, "train.optim.lr = nan is not a finite number"),
                       ({"betas": [0.9, 1.5]}, "train.optim.betas[1] = 1.5 is out of range")):
        with pytest.raises(RecipeError, match=re.escape(words)):
            build_optimizer(torch.nn.Linear(2, 2), OptimConfig(**bad), max_steps=10, device_type="cpu")


@pytest.mark.parametrize("loss,grad_norm,says,never", [
    (float("nan"), 3.0, "the loss is nan (gradient norm 3.0)", "is finite"),
    (float("inf"), float("nan"), "the loss is inf (gradient norm nan)", "is finite"),
    # a finite loss, however large, is never called non-finite: the gradient norm is
    (1e30, float("inf"), "the gradient norm is inf (the loss, 1e+30, is finite)", "the loss is"),
])
def test_non_finite_message_names_the_value_and_the_fields_that_cause_it(loss, grad_norm, says, never):
    from lit_modules.train.run import non_finite_message
    from lit_modules.train.module import NonFiniteLoss

    recipe = load_recipe("proxies/gemma3_tiny")
    msg = non_finite_message(NonFiniteLoss(7, loss, grad_norm), recipe, None)
    assert msg.startswith(f"training stopped at step 7: {says}; ") and never not in msg
    assert "\n" not in msg and "none was written yet" in msg
    for field in ("train.optim.lr (now", "train.optim.warmup_steps (now", "train.grad_clip (now",
                  "model.init_std (now", "model.norm.eps (now", "model.layer_kinds.local.rope.theta (now",
                  "model.layer_kinds.global.rope.theta (now"):
        assert field in msg, field


def test_document_mask_needs_an_attention_kind_that_builds_masks(monkeypatch):
    """A registered attention kind without `block_mask` cannot stop at documents:
    refused by check_train, and by the model's forward if called anyway."""
    import torch
    from torch import nn

    from arch import build_model
    from arch.attention import Attention
    from arch.documents import document_ids
    from arch.registry import ATTENTION

    class Maskless(nn.Module):
        def __init__(self, d_model, cfg, norm, window, rope=None):
            super().__init__()
            self.inner = Attention(d_model, cfg, norm, window)

        def forward(self, x, rope):
            return self.inner(x, rope)

    monkeypatch.setitem(ATTENTION._entries, "maskless", Maskless)
    small = ["model.attention.kind=maskless", "model.n_layers=1", "model.d_model=32", "model.vocab_size=64",
             "model.moe.n_experts=0"]
    check_train(load_recipe(RECIPE, small))
    with pytest.raises(RecipeError, match="model.attention.kind = 'maskless' builds none") as exc:
        check_train(load_recipe(RECIPE, small + ["train.document_mask=true"]))
    assert "\n" not in str(exc.value)
    model = build_model(load_recipe(RECIPE, small).model, device="cpu")
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="cannot stop at document boundaries"):
        model(ids, doc_ids=document_ids(ids, 3))


def test_compiled_grouped_mm_in_float32_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """torch compiles grouped_mm for bf16 only (its meta rule refuses float32 even where
    the CPU kernel runs it): `moelab train` and `moelab bench` with compiled blocks in
    float32 say so in one sentence, with the ways out, before any data work, instead of
    Dynamo's traceback at the first step. bf16 compute, eager blocks and the loop
    backend pass; so would a torch whose rule took float32."""
    import torch

    import lit_modules.runtime as runtime
    from lit_modules.cli import main

    model = load_recipe(RECIPE, ["train.compile=true"]).model
    with pytest.raises(RecipeError) as exc:
        runtime.check_compiled_experts(model, True, torch.float32, "set train.precision=bf16-mixed")
    says = str(exc.value)
    assert "\n" not in says and says.startswith("train.compile = true with model.moe.backend = grouped_mm")
    assert "not float32" in says and "train.precision=bf16-mixed" in says and "model.moe.backend=loop" in says
    runtime.check_compiled_experts(model, True, torch.bfloat16, "-")
    runtime.check_compiled_experts(model, False, torch.float32, "-")
    runtime.check_compiled_experts(load_recipe(RECIPE, ["model.moe.backend=loop"]).model, True, torch.float32, "-")
    runtime.check_compiled_experts(load_recipe("proxies/dense_tiny").model, True, torch.float32, "-")

    if runtime._grouped_mm_compiles(torch.float32):
        pytest.skip("this torch compiles grouped_mm in float32: nothing to refuse")
    args = ["proxies/qwen3_moe_tiny", "train.compile=true", "train.accelerator=cpu", f"train.run_dir={tmp_path}"]
    assert main(["train", *args]) != 0
    err = capsys.readouterr().err
    assert "needs bf16 compute, not float32" in err and "set train.precision=bf16-mixed" in err
    assert not any(tmp_path.iterdir())  # refused before the run directory and the data
    assert main(["bench", *args[:2], "--device", "cpu", "--steps", "1"]) != 0
    assert "pass --dtype bf16-mixed or bf16" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "_grouped_mm_compiles", lambda dtype: True)
    runtime.check_compiled_experts(model, True, torch.float32, "-")
