"""Single-device model math: recipe schema, blocks, model assembly, accounting.

    recipe = load_recipe("qwen3/30b_a3b", ["proxy.d_model=768"])
    print(count(recipe.model).params_active)
    model = build_model(recipe.model, device="meta")   # nothing allocated
    model = materialize(model, "cuda")                  # allocate + init
"""
from __future__ import annotations

import torch

from .accounting import Accounting, count
from .config import ModelConfig, Recipe
from .model import LMOutput, Transformer
from .recipe import available_recipes, load_recipe, recipe_to_yaml, recipes_root
from .registry import RecipeError
from .resolve import resolve_model


def build_model(cfg: ModelConfig, device="meta") -> Transformer:
    """Build from a resolved config. On a real device the weights are initialised
    with the recipe's init; on "meta" nothing is allocated."""
    with torch.device(device):
        model = Transformer(cfg)
    if torch.device(device).type != "meta":
        model.init_weights()
    return model


def materialize(model: Transformer, device) -> Transformer:
    """Allocate a meta-built model on `device` and initialise it."""
    model = model.to_empty(device=device)
    model.init_weights()
    return model


__all__ = [
    "Accounting", "LMOutput", "ModelConfig", "Recipe", "RecipeError", "Transformer",
    "available_recipes", "build_model", "count", "load_recipe", "materialize",
    "recipe_to_yaml", "recipes_root", "resolve_model",
]
