"""freeze_moe_layers: the training loop's model remembers its MoE layers, so the per-step
helpers (bias updates, count clearing, router statistics) find them without walking
every module; the list is the one a walk gives."""
import torch

from conftest import tiny_model
from experts.layers import freeze_moe_layers, named_moe_layers, update_router_biases
from experts.moe import MoE


def walk(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MoE)]


def test_frozen_layers_are_the_walk_and_need_no_walk(monkeypatch):
    model = tiny_model("qwen3_moe", "model.n_layers=3", "model.moe.router.bias_update_rate=0.1")
    want = walk(model)
    assert len(want) == 3
    freeze_moe_layers(model)
    assert named_moe_layers(model) == want
    assert "_moelab_moe_layers" not in dict(model.named_modules())  # a plain attribute, no submodule
    assert not any("moelab" in k for k in model.state_dict())

    def no_walk(*a, **k):
        raise AssertionError("walked the modules")

    monkeypatch.setattr(type(model), "named_modules", no_walk)
    model.train()(torch.randint(0, 256, (2, 16)))  # a training forward counts the loads
    update_router_biases(model)  # a per-step helper, through the frozen list
    assert all(layer.router.expert_bias.abs().max() > 0 for _, layer in want)


def test_the_training_loops_model_is_frozen_with_its_layers(cache, tmp_path):
    from lightning.pytorch.callbacks import Callback

    from conftest import RECIPE, overrides
    from lit_modules.train.run import train

    seen = {}

    class Check(Callback):
        def on_train_end(self, trainer, pl_module):
            model = pl_module.model
            seen["frozen"] = model.__dict__.get("_moelab_moe_layers")
            seen["walk"] = walk(model)

    train(RECIPE, overrides(cache, tmp_path, "train.max_steps=1", "train.val_every=0", "train.ckpt_every=-1"),
          callbacks=[Check()])
    assert seen["frozen"] is not None and list(seen["frozen"]) == seen["walk"] and len(seen["walk"]) == 2


def test_a_frozen_model_keeps_its_list_until_frozen_again():
    """The contract: freeze only a model whose modules no longer change. One that does
    change is frozen again, and the new walk is what counts."""
    from torch import nn

    model = tiny_model("qwen3_moe", "model.n_layers=2")
    freeze_moe_layers(model)
    model.layers[1].ffn = nn.Identity()
    assert len(named_moe_layers(model)) == 2  # the remembered list
    freeze_moe_layers(model)
    assert named_moe_layers(model) == walk(model) and len(walk(model)) == 1
