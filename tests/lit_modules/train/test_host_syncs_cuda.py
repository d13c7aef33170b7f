"""On a GPU, a training step between logging steps never makes the host wait for the
device: the host runs ahead and keeps the GPU fed. The finite check's verdict is read
from a host copy one step later, and the progress bar holds host values. Counted with
torch.cuda's sync-debug mode through benchmarks/host_syncs.py's callback. CUDA only:
on a CPU nothing is flagged, so the test could not fail there."""
import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_modules.train.module import TrainingFailed
from lit_modules.train.run import train
from conftest import RECIPE, overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = ["train.accelerator=gpu", "train.devices=1", "train.precision=bf16-mixed", "train.finite_check=deferred",
       "train.optim.fused=true", "train.val_every=0", "train.ckpt_every=-1"]


def sync_finder():
    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("host_syncs", root / "benchmarks" / "host_syncs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("compile", ["false", "graphs"])
def test_steps_between_logging_steps_make_no_host_sync(cache, tmp_path, compile):
    mod = sync_finder()
    finder = mod.SyncFinder(tmp_path / "syncs", start=4, steps=3)
    train(RECIPE, overrides(cache, tmp_path, *GPU, "train.max_steps=8", "train.log_every=100",
                            "train.expert_image_every=0", f"train.compile={compile}"), callbacks=[finder])
    assert finder.seen == {}, "\n".join(f"{n}x {k}" for k, n in finder.seen.items())
    text = (tmp_path / "syncs" / "syncs_rank0.txt").read_text()
    assert "(CUDA)" in text


def test_a_nan_step_on_the_gpu_stops_the_run_naming_it(cache, tmp_path):
    """The deferred verdict, read from its host copy a step later, still stops the run at
    the step that went non-finite."""
    class NaNAt(Callback):  # step 3's forward returns NaN
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.hook = pl_module.model.layers[0].register_forward_hook(lambda m, i, o: o * float("nan"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.hook.remove()

    with pytest.raises(TrainingFailed) as e:
        train(RECIPE, overrides(cache, tmp_path, *GPU, "train.max_steps=6", "train.log_every=100"),
              callbacks=[NaNAt()])
    assert "training stopped at step 3" in str(e.value)
