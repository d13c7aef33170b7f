"""Load a recipe: YAML files (with `base:` inheritance) + CLI dotlist -> Recipe.

    base yamls -> recipe yaml -> a.b=c overrides -> structured merge -> resolve/validate

A recipe is named by a path to a .yaml file or by a name under recipes/
(`qwen3/30b_a3b`). `base:` takes one such name or a list, resolved relative to the
file first and then under recipes/; later entries override earlier ones, and the
file's own keys override all of its bases.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from .config import ProxyConfig, Recipe, StageConfig
from .proxy import derive_proxy, is_active
from .ranges import check_numbers
from .registry import RecipeError, nearest
from .resolve import resolve_model
from .stages import check_stages


def recipes_root() -> Path:
    """recipes/ beside the packages (editable or installed), or $MOELAB_RECIPES."""
    env = os.environ.get("MOELAB_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "recipes"


def available_recipes() -> List[str]:
    root = recipes_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    name = str(name)
    candidates = []
    for base in ([relative_to] if relative_to else []) + [Path.cwd(), recipes_root()]:
        p = Path(name) if Path(name).is_absolute() else base / name
        candidates += [p, p.with_name(p.name + ".yaml")]
    for p in candidates:
        if p.is_file():
            return p
    raise RecipeError(
        f"recipe '{name}' is neither a file nor a name under {recipes_root()}"
        f"{nearest(name, available_recipes())}; `moelab recipes` lists them."
    )


def _find_base(name, recipe: Path) -> Path:
    """A `base:` named inside a recipe file: a file under the recipe's own folder or a
    name under recipes/. A path read from a file stays inside the folders it belongs
    to: no absolute paths, and no `..` that leaves them."""
    name = str(name)
    roots = [recipe.parent.resolve(), recipes_root().resolve()]
    if not Path(name).is_absolute():
        for root in roots:
            for p in (root / name, root / (name + ".yaml")):
                if p.is_file() and any(p.resolve().is_relative_to(r) for r in roots):
                    return p
    raise RecipeError(f"recipe {recipe}: base '{name}' is not a file under {recipe.parent} or a name under "
                      f"{recipes_root()}{nearest(name, available_recipes())}; a base is a relative name that "
                      f"stays inside those folders.")


def _load_chain(path: Path, stack: tuple = ()) -> DictConfig:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in stack + (path,))
        raise RecipeError(f"recipe {path} inherits from itself through base: ({chain}); remove the cycle.")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come with a line number
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping of keys (model:, train:, ...), not a {type(raw).__name__}.")
    bases = raw.pop("base", None)
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for b in bases or []:
        merged = OmegaConf.merge(merged, _load_chain(_find_base(b, path), stack + (path,)))
    return OmegaConf.merge(merged, raw)


def _explain(e: OmegaConfBaseException, source: str, prefix: str = "") -> RecipeError:
    """One sentence for OmegaConf's multi-line errors; `prefix`: the key path of the
    list item the error happened in (OmegaConf names only the key inside the item)."""
    key = prefix + str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(e):
        obj = getattr(e, "object_type", None)
        valid = [f.name for f in dataclasses.fields(obj)] if obj and dataclasses.is_dataclass(obj) else []
        leaf = str(key).split(".")[-1]
        return RecipeError(
            f"{source}: unknown key '{key}'{nearest(leaf, valid)}; valid keys here are {', '.join(valid)}."
        )
    if isinstance(e, MissingMandatoryValue):
        return RecipeError(f"{source}: '{key}' is required but not set; add it to the recipe or pass {key}=VALUE.")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return RecipeError(f"{source}: wrong type for '{key}': {msg}.")
    return RecipeError(f"{source}: {str(e).splitlines()[0]} (at '{key}').")


def _check_stage_items(raw: DictConfig, source: str) -> None:
    """Each item of train.stages against StageConfig on its own, so that an error names
    the item's index (merged as part of the list, OmegaConf loses it)."""
    stages = OmegaConf.select(raw, "train.stages", default=None)
    if not isinstance(stages, ListConfig):
        return
    for i, item in enumerate(stages):
        # a list where a mapping belongs stops OmegaConf's merge with a bare TypeError
        for key in ("optim", "rope", "mix"):
            value = item.get(key) if isinstance(item, DictConfig) else None
            if value is not None and not isinstance(value, DictConfig):
                shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
                raise RecipeError(f"{source}: train.stages[{i}].{key} must be a mapping of keys to values (e.g. "
                                  f"{{stdlib: 1, web: 3}} for a mix), not {shown!r}.")
        try:
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StageConfig), item))
        except OmegaConfBaseException as e:
            raise _explain(e, source, f"train.stages[{i}].") from None


def load_recipe(name: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge, resolve and validate a recipe. Raises RecipeError, allocates nothing."""
    path = find_recipe(name)
    raw = _load_chain(path)
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override '{o}' is not of the form key.path=value (e.g. model.moe.top_k=4).")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise RecipeError(f"overrides {list(overrides)} could not be parsed: {e}") from None
    schema = OmegaConf.structured(Recipe)
    source = str(path)
    _check_stage_items(OmegaConf.merge(raw, cli), "command-line override" if "stages" in cli.get("train", {})
                       else source)
    try:
        merged = OmegaConf.merge(schema, raw)
        source = "command-line override"
        merged = OmegaConf.merge(merged, cli)
        source = str(path)
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, source) from None
    if not recipe.name:
        try:
            recipe.name = str(path.resolve().relative_to(recipes_root().resolve()).with_suffix(""))
        except ValueError:
            recipe.name = path.stem
    return resolve_recipe(recipe)


def resolve_recipe(recipe: Recipe) -> Recipe:
    """Validate every section before any work: numbers (finite, in range: arch/ranges.py)
    everywhere, the model's rules (arch/resolve.py); then derive the proxy. All
    problems are raised together, one line each."""
    errors = [msg for f in dataclasses.fields(recipe) if f.name != "model"
              for msg in check_numbers(getattr(recipe, f.name), f.name).values()]
    try:
        recipe.model = resolve_model(recipe.model)
    except RecipeError as e:
        errors.insert(0, str(e))
    if errors:
        raise RecipeError("\n".join(errors))
    if is_active(recipe.proxy):
        recipe.model = resolve_model(derive_proxy(recipe.model, recipe.proxy))
    errors = check_stages(recipe)  # against the final model: its layer kinds and context
    if errors:
        raise RecipeError("\n".join(errors))
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written into every run directory). The proxy is
    already applied to `model`, so the section is cleared rather than applied twice."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(recipe, proxy=ProxyConfig())))
