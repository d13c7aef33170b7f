"""Scale-out with `moelab train` on two gloo processes (CPU): expert parallel
(EP=2 under DDP, and under FSDP2) gives the single-process losses for the same global batch of 8
sequences (1 x 8 against 2 ranks x 2 micro-batches x 2), and a checkpoint written at
EP=2 resumes at EP=1 (and one written at EP=1 at FSDP2 + EP=2) with the same next-step loss
as the uninterrupted single-process run. EP=2 inside a world of 4 (a 2 data x 2 expert
mesh: each expert shard on two ranks) gives the same losses, weights and router biases.
Strategy errors are one sentence."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arch import RecipeError, load_recipe
from arch.config import TrainConfig
from lit_modules.train.strategy import build_strategy, check_scale

from conftest import TINY_MOE_TRAIN

ROOT = Path(__file__).resolve().parents[3]
RECIPE = "proxies/qwen3_moe_tiny"
TINY = TINY_MOE_TRAIN + [
    "train.val_every=0", "train.optim.schedule=constant",
    # the global-batch balancing loss and the bias update: both must survive the split
    "model.moe.balance.aux_coef=0.5", "model.moe.router.bias_update_rate=0.01",
    # every run, the one-process reference included, on the CPU and so in float32
    # (precision auto): what makes the 1e-5 agreements true. With CUDA present the
    # reference would otherwise train on the GPU in bf16-mixed (issue 21).
    "train.accelerator=cpu",
]
ONE = ["train.micro_batch_size=8"]
TWO = ["train.micro_batch_size=2", "train.grad_accum=2", "train.devices=2"]
FOUR = ["train.micro_batch_size=1", "train.grad_accum=2", "train.devices=4"]


def run(tmp_path, name, steps, *extra):
    """A subprocess: Lightning's launcher re-runs the command per rank."""
    cmd = [sys.executable, "-m", "lit_modules.cli", "train", RECIPE, *TINY,
           f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path}", f"train.run_name={name}",
           f"train.max_steps={steps}", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


def losses(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.mark.slow
def test_ddp_and_ep2_match_one_process_and_resume_across_ep(tmp_path):
    # (DDP alone: tests/lit_modules/train/test_train.py::test_ddp_two_ranks_match_one, same batches)
    one_dir = run(tmp_path, "one", 4, *ONE, "train.ckpt_every=3")
    one = losses(one_dir)
    # a checkpoint at step 2 too: saving mid-run must leave the running optimizer's
    # expert moments alone (they were once replaced by the gathered whole experts)
    ep2_dir = run(tmp_path, "ep2", 3, *TWO, "train.strategy=ddp", "train.expert_parallel=2", "train.ckpt_every=2")
    ep2 = losses(ep2_dir)
    # fused AdamW asked for: FSDP2 + EP mixes DTensors and plain tensors (fails fused);
    # and the static all-gather dispatch (ddp above: the token all-to-all)
    fsdp_ep2 = losses(run(tmp_path, "fsdp_ep2", 3, *TWO, "train.strategy=fsdp", "train.expert_parallel=2",
                          "train.optim.fused=true", "train.ep_dispatch=allgather"))
    # no DDP wrapper (train.grad_sync = step): rank 0's weights broadcast but not its expert
    # shards, the replicated gradients averaged after the backward, the shards' over their group
    ep2_step = losses(run(tmp_path, "ep2_step", 3, *TWO, "train.strategy=ddp", "train.expert_parallel=2",
                          "train.grad_sync=step"))
    assert sorted(one) == [1, 2, 3, 4] and sorted(ep2) == sorted(fsdp_ep2) == sorted(ep2_step) == [1, 2, 3]
    for step in (1, 2, 3):
        assert ep2[step] == pytest.approx(one[step], abs=1e-5), (step, ep2, one)
        assert fsdp_ep2[step] == pytest.approx(one[step], abs=1e-5), (step, fsdp_ep2, one)
        assert ep2_step[step] == pytest.approx(one[step], abs=1e-5), (step, ep2_step, one)
    assert len({round(v, 4) for v in one.values()}) > 1  # the steps differ: the comparison can fail

    # the EP=2 checkpoint holds whole experts (and whole AdamW moments)
    ckpt = torch.load(ep2_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["moelab_expert_parallel"] == 2
    assert ckpt["state_dict"]["model.layers.0.ffn.w_in"].shape[0] == 8
    from lit_modules.checkpoints.model_dir import load_model_dir  # what export-hf and eval read

    _, model = load_model_dir(ep2_dir / "checkpoints" / "last.ckpt")
    assert torch.equal(model.layers[0].ffn.w_in, ckpt["state_dict"]["model.layers.0.ffn.w_in"])

    # EP=2 -> EP=1 (one process); step 4 is the uninterrupted run's step 4
    resumed = losses(run(tmp_path, "ep2_to_ep1", 4, *ONE, f"resume={ep2_dir / 'checkpoints' / 'last.ckpt'}"))
    assert resumed[4] == pytest.approx(one[4], abs=1e-5), (resumed, one)
    # and the other way: the single-process checkpoint of step 3 resumed at EP=2 under
    # FSDP2 (its own loader: expert slices, optimizer keys matched by position)
    back = losses(run(tmp_path, "ep1_to_fsdp_ep2", 4, *TWO, "train.strategy=fsdp", "train.expert_parallel=2",
                      f"resume={one_dir / 'checkpoints' / 'step00000003.ckpt'}"))
    assert back[4] == pytest.approx(one[4], abs=1e-5), (back, one)


@pytest.mark.slow
def test_ddp_ep2_in_world_of_4_matches_one_process(tmp_path):
    """Expert-data-parallel groups: each EP group of 2 exchanges its own tokens, the
    ranks holding the same shard average its gradients, counts and loads are summed
    over all 4 ranks (tests/experts/test_parallel_world4.py checks one step exactly)."""
    one_dir = run(tmp_path, "one", 3, *ONE)
    four_dir = run(tmp_path, "four", 3, *FOUR, "train.strategy=ddp", "train.expert_parallel=2")
    one, four = losses(one_dir), losses(four_dir)
    assert sorted(one) == sorted(four) == [1, 2, 3] and len({round(v, 4) for v in one.values()}) > 1
    for step in (1, 2, 3):
        assert four[step] == pytest.approx(one[step], abs=1e-5), (step, four, one)
    # same global batch: 4 ranks x 1 sequence x 2 micro-batches = 1 x 8
    summary = [json.loads((d / "summary.json").read_text()) for d in (one_dir, four_dir)]
    assert summary[0]["tokens"] == summary[1]["tokens"]
    # the checkpoint holds whole experts gathered from the EP groups; after 3 AdamW
    # steps every weight is the one-process weight (an update of the wrong sign would
    # be off by about the learning rate) and the router biases are bit-identical
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (one_dir, four_dir))
    assert b["moelab_expert_parallel"] == 2 and b["state_dict"]["model.layers.0.ffn.w_in"].shape[0] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        if k.endswith("expert_bias"):
            assert v.ne(0).any() and torch.equal(b["state_dict"][k], v), k
        else:
            assert torch.allclose(b["state_dict"][k], v, rtol=0, atol=1e-4), k


def test_strategy_choices():
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert isinstance(build_strategy(TrainConfig(strategy="fsdp")), ModelParallelStrategy)
    assert isinstance(build_strategy(TrainConfig(strategy="model_parallel", expert_parallel=2)),
                      ModelParallelStrategy)
    with pytest.raises(RecipeError, match="train.expert_parallel = 2 needs several processes"):
        build_strategy(TrainConfig(expert_parallel=2))
    # auto over several processes is moelab's DDP, which expert parallelism runs under
    assert type(build_strategy(TrainConfig(expert_parallel=2, devices=2))).__name__ == "MoelabDDPStrategy"
    with pytest.raises(RecipeError, match="train.expert_parallel = 0 is out of range"):
        build_strategy(TrainConfig(strategy="ddp", expert_parallel=0))


def test_expert_parallel_recipe_checks():
    check_scale(load_recipe(RECIPE, ["train.expert_parallel=4"]))  # 16 experts
    with pytest.raises(RecipeError) as e:
        check_scale(load_recipe(RECIPE, ["train.expert_parallel=3"]))
    assert str(e.value) == ("model.moe.n_experts = 16 is not divisible by train.expert_parallel = 3; choose an "
                            "expert_parallel size that divides the number of experts.")
    with pytest.raises(RecipeError, match="no MoE layers"):
        check_scale(load_recipe("proxies/dense_tiny", ["train.expert_parallel=2"]))
    check_scale(load_recipe(RECIPE, ["train.expert_parallel=2", "train.ep_dispatch=allgather"]))
    with pytest.raises(RecipeError) as e:
        check_scale(load_recipe(RECIPE, ["train.ep_dispatch=allgathr"]))
    assert str(e.value) == ("train.ep_dispatch = 'allgathr' is not a dispatch (did you mean 'allgather'?); "
                            "choose alltoall or allgather.")
