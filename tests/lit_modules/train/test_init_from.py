"""train.init_from: a fresh run starts from a checkpoint's model weights; the upcycled
model of `moelab upcycle` starts where the dense run ended."""
import pytest

from arch import RecipeError
from lit_modules.train.run import train

from conftest import RECIPE, overrides


def test_upcycled_run_starts_at_the_dense_model(dense_and_upcycled_runs):
    dense, moe, model_dir = dense_and_upcycled_runs
    # same validation batches (same cache, seq_len, val_batches): the MoE at step 0 is the
    # dense model at its last step, which is far below an untrained model's loss
    assert moe["initial_val_loss"] == pytest.approx(dense["val_loss"], rel=1e-5, abs=1e-5)
    assert dense["initial_val_loss"] - dense["val_loss"] > 0.05
    assert moe["params_total"] > dense["params_total"]
    assert moe["steps"] == dense["steps"] == 4  # the dense run's train section was kept


def test_init_from_refuses_another_architecture(dense_and_upcycled_runs, cache, tmp_path):
    dense, _, _ = dense_and_upcycled_runs
    with pytest.raises(RecipeError, match="holds another architecture .*model.moe.n_experts"):
        train(RECIPE, overrides(cache, tmp_path, f"train.init_from={dense['run_dir']}"))
    with pytest.raises(RecipeError, match="train.init_from = .*nowhere.* is not a moelab checkpoint"):
        train(RECIPE, overrides(cache, tmp_path, f"train.init_from={tmp_path / 'nowhere'}"))
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_resumed_run_ignores_init_from(dense_and_upcycled_runs, tmp_path):
    """init_from is only a start: a resumed run (a copy of the upcycled one, one more
    step) restores its own checkpoint and does not read the upcycled weights again."""
    import shutil
    from pathlib import Path

    _, moe, model_dir = dense_and_upcycled_runs
    shutil.copytree(moe["run_dir"], tmp_path / "upcycled")
    summary = train(str(model_dir / "recipe.yaml"), [f"train.run_dir={tmp_path}", "train.run_name=upcycled",
                                                      "train.max_steps=5"])
    assert summary["resumed_from"] and summary["steps"] == 5
    log = (Path(summary["run_dir"]) / "train.log").read_text()
    assert log.count("model weights from") == 1  # the first run's start only
