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
