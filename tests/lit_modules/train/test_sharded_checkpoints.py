"""Sharded checkpoints (train.checkpoint_format=sharded) across layouts, with `moelab
train` on gloo processes (CPU, float32, the global batch of test_scale.py): a
checkpoint saved by 2 processes under FSDP2 + EP=2 resumes on 1 process and on 4
processes (DDP, EP=2 in a 2 x 2 mesh) with the uninterrupted one-process run's
next-step loss; consolidating it gives exactly the weights of the single-file
checkpoint of the same run; and a rank killed in the middle of a sharded save never
leaves a checkpoint that looks complete. (One process, hostile indexes:
tests/lit_modules/checkpoints/test_sharded_format.py.)"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lit_modules.checkpoints import layout
from test_scale import FOUR, ONE, RECIPE, ROOT, TINY, TWO, losses, run

SHARDED = "train.checkpoint_format=sharded"
FSDP_EP2 = [*TWO, "train.strategy=fsdp", "train.expert_parallel=2"]
DDP_EP2 = ["train.strategy=ddp", "train.expert_parallel=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, the one-process run's losses for steps 1-4, the run directory of a
    3-step FSDP2 + EP=2 run on 2 processes that saved sharded at steps 2 and 3)."""
    tmp = tmp_path_factory.mktemp("sharded")
    one = losses(run(tmp, "one", 4, *ONE))
    assert len({round(v, 4) for v in one.values()}) > 1  # the steps differ: the comparisons can fail
    return tmp, one, run(tmp, "ep2", 3, *FSDP_EP2, SHARDED, "train.ckpt_every=2")


@pytest.mark.slow
def test_every_rank_writes_its_shards(saved):
    tmp, one, ep2 = saved
    for step, loss in losses(ep2).items():  # the mid-run save left training alone
        assert loss == pytest.approx(one[step], abs=1e-5), (step, loss, one)
    d = layout.checkpoint_dir(ep2)
    assert sorted(p.name for p in d.iterdir()) == ["last.dcp", "step00000002.dcp", "step00000003.dcp"]
    assert os.readlink(d / "last.dcp") == "step00000003.dcp"
    files = sorted(os.listdir(d / "last.dcp"))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "complete.json", "trainer.pt"]
    marker = json.loads((d / "last.dcp" / "complete.json").read_text())
    assert (marker["step"], marker["world_size"], marker["expert_parallel"]) == (3, 2, 2)
    summary = json.loads((ep2 / "summary.json").read_text())
    assert summary["checkpoint_format"] == "sharded" and summary["checkpoint_saves"] == 2
    assert summary["checkpoint_seconds"] > 0 and summary["checkpoint_load_seconds"] is None


@pytest.mark.slow
def test_strategy_auto_on_two_processes_writes_from_every_rank(saved):
    """train.strategy=auto with train.devices=2 is moelab's DDP, so every rank writes its
    part of a sharded save. It was Lightning's own DDP, which wrote on rank 0 alone while
    the other rank waited at the save's barrier: the run hung at its first save."""
    tmp, one, _ = saved
    auto = run(tmp, "auto2", 2, *TWO, SHARDED, "train.ckpt_every=2")
    for step, loss in losses(auto).items():
        assert loss == pytest.approx(one[step], abs=1e-5), (step, loss, one)
    assert sorted(os.listdir(layout.checkpoint_dir(auto) / "last.dcp")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "complete.json", "trainer.pt"]


@pytest.mark.slow
def test_resumes_on_one_process(saved):
    """EP=2 on 2 processes -> 1 process (strategy auto), from the run directory; the
    resumed run saves sharded too, on its one process."""
    tmp, one, ep2 = saved
    to_one = run(tmp, "to_one", 4, *ONE, SHARDED, f"resume={ep2}")
    assert losses(to_one)[4] == pytest.approx(one[4], abs=1e-5), (losses(to_one), one)
    summary = json.loads((to_one / "summary.json").read_text())
    assert summary["resumed_from"].endswith("last.dcp") and summary["checkpoint_load_seconds"] > 0
    assert sorted(os.listdir(layout.checkpoint_dir(to_one) / "last.dcp")) == [
        ".metadata", "__0_0.distcp", "complete.json", "trainer.pt"]


@pytest.mark.slow
def test_resumes_on_four_processes(saved):
    """EP=2 on 2 processes -> EP=2 on 4 (DDP, a 2 data x 2 expert mesh: each expert
    shard read by two ranks), from the step folder itself."""
    tmp, one, ep2 = saved
    four = run(tmp, "to_four", 4, *FOUR, *DDP_EP2, f"resume={layout.checkpoint_dir(ep2) / 'step00000003.dcp'}")
    assert losses(four)[4] == pytest.approx(one[4], abs=1e-5), (losses(four), one)


@pytest.mark.slow
def test_consolidation_equals_the_single_file(saved):
    """What eval / export-hf / convert read of the sharded checkpoint is exactly the
    single-file checkpoint the same run writes with train.checkpoint_format=full."""
    from lit_modules.checkpoints.model_dir import load_model

    tmp, one, ep2 = saved
    full = run(tmp, "ep2_full", 3, *FSDP_EP2)
    _, sharded_model, tok = load_model(ep2)  # the run directory: its last.dcp
    _, full_model, _ = load_model(layout.checkpoint_dir(full) / "last.ckpt")
    a, b = sharded_model.state_dict(), full_model.state_dict()
    assert a.keys() == b.keys() and tok == ep2 / "tokenizer.json"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["layers.0.ffn.w_in"].shape[0] == 8  # all experts, from both ranks' files


# the driver of the kill test: `moelab train`, with rank 0 killed (SIGKILL) in the
# save of step 2 once every rank's tensors and DCP's index are written, before
# trainer.pt and the completion marker; Lightning re-runs this script for rank 1
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import lit_modules.checkpoints.sharded as distributed
    from lit_modules import cli

    write = distributed._write

    def dying_write(path, fn):
        if os.environ.get("LOCAL_RANK", "0") == "0" and ".step00000002.dcp.partial" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, fn)

    distributed._write = dying_write
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_during_a_sharded_save(saved):
    tmp, one, _ = saved
    driver = tmp / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    args = ["train", RECIPE, *TINY, f"data.cache_dir={tmp / 'cache'}", f"train.run_dir={tmp}",
            "train.run_name=killed", *TWO, *DDP_EP2, SHARDED, "train.ckpt_every=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = tmp / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(driver), *args, "train.max_steps=3"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(timeout=240) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        try:  # rank 1, left waiting for rank 0 (it started in this session)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run_dir = tmp / "killed"
    d = layout.checkpoint_dir(run_dir)
    partial = d / ".step00000002.dcp.partial"
    # DCP's part finished (every rank's chunks and the index): on its own that would
    # pass for a checkpoint; without trainer.pt, the marker and the rename it is none
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(partial))
    assert not (d / "step00000002.dcp").exists() and not layout.is_sharded_checkpoint(partial)
    assert [p.name for p in layout.step_files(d)] == ["step00000001.dcp"]
    assert layout.last_checkpoint(run_dir) == d / "last.dcp" and os.readlink(d / "last.dcp") == "step00000001.dcp"

    # the same command again resumes from step 1, removes the partial folder and
    # reaches the uninterrupted run's losses
    resumed = run(tmp, "killed", 3, *TWO, *DDP_EP2, SHARDED, "train.ckpt_every=1")
    assert not partial.exists()
    again = losses(resumed)
    for step in (2, 3):
        assert again[step] == pytest.approx(one[step], abs=1e-5), (step, again, one)
