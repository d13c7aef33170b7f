"""train.compile = graphs on a GPU: the compiled blocks replayed as CUDA graphs train
the same losses as the compiled blocks launched kernel by kernel (the same kernels),
validation included, and a resumed run goes on. CUDA only (elsewhere graphs are refused:
tests/lit_modules/test_runtime_speed.py)."""
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_modules.train.run import train
from conftest import RECIPE, overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = ["train.accelerator=gpu", "train.precision=bf16-mixed", "train.max_steps=6", "train.log_every=1",
       "train.val_every=3", "train.val_batches=2", "train.ckpt_every=3"]


class Losses(Callback):
    def __init__(self):
        self.train = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train[trainer.global_step] = pl_module.last_train["loss"]


def run(cache, tmp_path, compile, *extra):
    seen = Losses()
    s = train(RECIPE, overrides(cache, tmp_path, *GPU, f"train.compile={compile}", f"train.run_name={compile}",
                                *extra), callbacks=[seen])
    return s, seen.train


def test_graphs_train_what_compiled_blocks_train(cache, tmp_path):
    plain, plain_losses = run(cache, tmp_path, "true")
    graphs, graph_losses = run(cache, tmp_path, "graphs")
    assert sorted(graph_losses) == [1, 2, 3, 4, 5, 6]
    for step, loss in plain_losses.items():
        assert graph_losses[step] == pytest.approx(loss, abs=2e-2), step
    assert graphs["val_loss"] == pytest.approx(plain["val_loss"], abs=2e-2)
    # resumed from step 3's checkpoint, the graphs are recorded again and training goes on
    resumed, resumed_losses = run(cache, tmp_path / "again", "graphs",
                                  f"train.resume={tmp_path / 'graphs' / 'checkpoints' / 'step00000003.ckpt'}")
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(graph_losses[step], abs=2e-2), step


# every kind of block the recipes build: MLA with group routing and a shared expert,
# Gemma 3's local (flex attention) and global layers, gpt-oss's sinks and biased
# experts, Qwen3-Next's linear attention, Gemma 4's MoE beside a dense FFN, a dense model
ARCHITECTURES = ["proxies/deepseek_v3_tiny", "proxies/gemma3_tiny", "proxies/gpt_oss_tiny",
                 "proxies/qwen3_next_tiny", "proxies/gemma4_moe_tiny", "proxies/dense_tiny"]
SMALL = ["train.accelerator=gpu", "train.precision=bf16-mixed", "train.seq_len=128", "train.micro_batch_size=4",
         "train.max_steps=4", "train.log_every=1", "train.val_every=4", "train.val_batches=2",
         "train.ckpt_every=0", "data.max_chars=1000000"]


@pytest.mark.parametrize("recipe", ARCHITECTURES)
def test_graphs_train_every_architecture(recipe, cache, tmp_path):
    """What train.compile = auto picks on one GPU (graphs) trains each architecture as
    its compiled blocks launched kernel by kernel do, validation included."""
    auto_matches_compiled(recipe, SMALL + [f"data.cache_dir={cache}", f"train.run_dir={tmp_path}"], steps=4)


def auto_matches_compiled(recipe, common, steps):
    """Train `recipe` with train.compile = true and = auto (graphs on one GPU): the same
    loss at every step and in validation."""
    losses, summaries = {}, {}
    for compile in ("true", "auto"):
        seen = Losses()
        summaries[compile] = train(recipe, [*common, f"train.compile={compile}", f"train.run_name={compile}"],
                                   callbacks=[seen])
        losses[compile] = seen.train
    assert summaries["auto"]["compile"] == "graphs"
    assert sorted(losses["auto"]) == list(range(1, steps + 1))
    for step, loss in losses["true"].items():
        assert losses["auto"][step] == pytest.approx(loss, abs=2e-2), (recipe, common, step)
    assert summaries["auto"]["val_loss"] == pytest.approx(summaries["true"]["val_loss"], abs=2e-2)



# what a one-GPU run may turn on beside graphs (auto picks graphs for it): QAT switching on
# mid-run (a recompile, so new graphs), stages changing the shapes and the RoPE, document
# masks (flex block masks per batch), an online distillation teacher
FEATURES = {
    "qat": ["train.qat.format=int4", "train.qat.start_step=2"],
    "stages": ["model.max_seq_len=128", "train.max_steps=null",
               "train.stages=[{name: a, steps: 3}, {name: b, steps: 3, seq_len: 128, micro_batch_size: 4,"
               " rope: {global: {theta: 4e6, scaling: linear, factor: 2}}}]"],
    "document_mask": ["train.document_mask=true", "train.document_positions=true"],
    "distill": ["train.distill.kind=sampled", "train.distill.alpha=0.5"],
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_graphs_train_with_every_feature(feature, cache, tmp_path):
    """train.compile = auto (graphs on one GPU) beside each feature trains what the
    compiled blocks train, step by step and in validation."""
    extra = list(FEATURES[feature])
    if feature == "distill":
        from arch import build_model, load_recipe
        from lit_modules.checkpoints.model_dir import save_model_dir
        from lit_modules.data.datamodule import TokenDataModule

        recipe = load_recipe(RECIPE, overrides(cache, tmp_path))
        torch.manual_seed(1)
        save_model_dir(build_model(recipe.model, device="cpu"), recipe, tmp_path / "teacher",
                       tokenizer_path=TokenDataModule(recipe, verbose=False).tokenizer_path)
        extra.append(f"train.distill.teacher={tmp_path / 'teacher'}")
    auto_matches_compiled(RECIPE, overrides(cache, tmp_path, *GPU, "train.ckpt_every=0", *extra), steps=6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_graphs_under_ddp_train_what_compiled_blocks_train(cache, tmp_path):
    """train.compile = graphs on 2 GPUs under DDP (NCCL): no DDP wrapper, the gradients
    averaged after the backward (train.grad_sync = auto -> step). DDP's own hooks beside
    the graphs once gave NaN gradients from the first replayed step on; here every step
    is finite and follows DDP with compiled blocks launched kernel by kernel."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(__file__).resolve().parents[3]
    losses = {}
    for compile in ("true", "graphs"):
        cmd = [sys.executable, "-m", "lit_modules.cli", "train", RECIPE,
               *overrides(cache, tmp_path, *GPU, "train.strategy=ddp", "train.devices=2", "train.val_every=0",
                          "train.ckpt_every=0", f"train.compile={compile}", f"train.run_name=ddp_{compile}")]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((tmp_path / f"ddp_{compile}" / "summary.json").read_text())
        assert summary["compile"] == {"true": True, "graphs": "graphs"}[compile]
        acc = EventAccumulator(str(tmp_path / f"ddp_{compile}" / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        losses[compile] = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert "no DDP wrapper" in (tmp_path / "ddp_graphs" / "train.log").read_text()
    assert sorted(losses["graphs"]) == sorted(losses["true"]) == [1, 2, 3, 4, 5, 6]
    for step, loss in losses["true"].items():
        assert losses["graphs"][step] == pytest.approx(loss, abs=2e-2), (step, losses)
    assert len({round(v, 3) for v in losses["true"].values()}) > 1
