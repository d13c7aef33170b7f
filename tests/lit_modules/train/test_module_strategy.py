"""Strategy, precision and device choices from train: (lit_modules/train/strategy.py)."""
import pytest
import torch

from arch import RecipeError
from arch.config import TrainConfig
from lit_modules.runtime import resolve_devices, resolve_precision
from lit_modules.train.strategy import build_strategy


def test_precision_auto():
    assert resolve_precision(TrainConfig(), "cpu") == "32-true"
    assert resolve_precision(TrainConfig(), "gpu") == "bf16-mixed"
    assert resolve_precision(TrainConfig(precision="bf16-true"), "cpu") == "bf16-true"
    with pytest.raises(RecipeError, match="did you mean 'bf16-mixed'"):
        resolve_precision(TrainConfig(precision="bf16-mixd"), "cpu")


def test_strategies():
    assert build_strategy(TrainConfig()) == "auto"
    # several processes under auto: moelab's DDP (sharded saves from every rank), not Lightning's
    for several in (TrainConfig(devices=2), TrainConfig(devices=[0, 1]), TrainConfig(num_nodes=2)):
        assert type(build_strategy(several)).__name__ == "MoelabDDPStrategy"
    assert build_strategy(TrainConfig(devices=[1])) == "auto"
    from lightning.pytorch.strategies import DDPStrategy
    assert isinstance(build_strategy(TrainConfig(strategy="ddp")), DDPStrategy)
    with pytest.raises(RecipeError, match="did you mean 'ddp'"):
        build_strategy(TrainConfig(strategy="dpp"))
    with pytest.raises(RecipeError, match="expert_parallel"):
        build_strategy(TrainConfig(expert_parallel=2))


def test_auto_devices_means_one_unless_parallel():
    assert resolve_devices(TrainConfig()) == 1
    assert resolve_devices(TrainConfig(strategy="ddp")) == "auto"
    assert resolve_devices(TrainConfig(devices=2)) == 2


def test_graphs_run_where_they_are_built_for():
    """train.compile = graphs: one process or DDP (gradients averaged after the backward),
    one micro-batch per step, no activation checkpointing, no expert parallelism;
    anything else is one sentence naming the setting before any work (DDP's own hooks
    beside the graphs gave NaN gradients on 4 H100s: lit_modules/runtime.py
    graphs_refusal)."""
    from arch.config import StageConfig
    from lit_modules.train.strategy import grad_sync

    assert build_strategy(TrainConfig(compile="graphs")) == "auto"
    for cfg in (TrainConfig(compile="graphs", strategy="ddp"), TrainConfig(compile="graphs", devices=2),
                TrainConfig(compile="graphs", strategy="ddp", grad_sync="step")):
        assert build_strategy(cfg) != "auto" and grad_sync(cfg) == "step"
    refused = {
        "train.strategy = fsdp": TrainConfig(compile="graphs", strategy="fsdp"),
        "train.expert_parallel = 2": TrainConfig(compile="graphs", strategy="ddp", devices=2, expert_parallel=2),
        "train.grad_sync=auto": TrainConfig(compile="graphs", strategy="ddp", grad_sync="hooks"),
        "train.grad_accum = 2": TrainConfig(compile="graphs", grad_accum=2),
        "train.grad_accum = 4": TrainConfig(compile="graphs", stages=[StageConfig(name="a", steps=2),
                                                                      StageConfig(name="b", steps=2, grad_accum=4)]),
        "activation_checkpointing": TrainConfig(compile="graphs", activation_checkpointing=True),
    }
    for what, cfg in refused.items():
        with pytest.raises(RecipeError) as e:
            build_strategy(cfg)
        msg = str(e.value)
        assert what in msg and "train.compile" in msg and "\n" not in msg, msg


def test_grad_sync_resolves_and_refuses():
    """train.grad_sync: auto is step under graphs and hooks otherwise; step has no
    meaning under FSDP2; an unknown value is one sentence."""
    from lit_modules.train.strategy import grad_sync

    assert grad_sync(TrainConfig(strategy="ddp")) == "hooks"
    assert grad_sync(TrainConfig(strategy="ddp", compile="graphs")) == "step"
    assert grad_sync(TrainConfig(strategy="ddp", grad_sync="step")) == "step"
    build_strategy(TrainConfig(strategy="ddp", grad_sync="step"))
    build_strategy(TrainConfig(strategy="fsdp"))  # auto: nothing to refuse
    for cfg, what in ((TrainConfig(strategy="fsdp", grad_sync="step"), "train.strategy = fsdp"),
                      (TrainConfig(strategy="ddp", grad_sync="after"), "train.grad_sync")):
        with pytest.raises(RecipeError) as e:
            build_strategy(cfg)
        assert what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_graphs_compile_the_blocks_in_reduce_overhead_mode(monkeypatch):
    """parallelize compiles every block with torch.compile's reduce-overhead mode (CUDA
    graphs) under train.compile = graphs, and in the default mode under true."""
    from arch import build_model, load_recipe
    from lit_modules.train.strategy import parallelize

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    recipe = load_recipe("proxies/qwen3_moe_tiny", ["model.n_layers=2"])
    for compile, mode in ((True, None), ("graphs", "reduce-overhead")):
        seen.clear()
        parallelize(build_model(recipe.model, device="meta"), TrainConfig(compile=compile))
        assert len(seen) == 2 and all(kw.get("mode") == mode for kw in seen), seen


def test_clip_is_torchs_clip_every_step():
    """ScalePlan.clip (one process) gives torch's clip_grad_norm_: the total norm and the
    clipped gradients, also on later steps (its parameter lists are found once) and when
    some parameters got no gradient."""
    import copy

    from lit_modules.train.strategy import ScalePlan

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    ref = copy.deepcopy(model)
    plan = ScalePlan()
    for step in range(3):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            out = m(torch.randn(5, 8)) if step != 2 else m[2](torch.randn(5, 8))  # step 2: layer 0 gets none
            (out ** 2).sum().backward()
        norm = plan.clip(model, 0.5)
        want = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
        assert torch.allclose(norm, want), step
        for p, q in zip(model.parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad), step
