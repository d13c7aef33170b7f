"""Registries: YAML names a component by key; a new variant is one class + one line.

    @FFN.register("swiglu")
    class SwiGLU(nn.Module): ...

A registry may name plugin modules that register into it when imported. That is
how arch/ reaches the MoE layers of experts/ without importing experts at module
level (the arrow goes lit_modules -> experts -> arch).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, Sequence


class RecipeError(ValueError):
    """A recipe that cannot be built; the message says what is wrong and how to fix it."""


def nearest(name: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' if none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choice_error(path: str, value, choices, noun: str = "valid") -> str:
    """The one sentence for a field set to none of its choices: the field, the value, the
    closest choice and every choice."""
    names = [str(c) for c in choices]
    listed = " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)
    return f"{path} = '{value}' is not {noun}{nearest(value, names)}; choose {listed}."


def check_choice(path: str, value, choices, noun: str = "valid") -> None:
    """Refuse a string field set to none of `choices` (RecipeError, choice_error's sentence)."""
    if value not in choices:
        raise RecipeError(choice_error(path, value, choices, noun))


class Registry:
    def __init__(self, name: str, plugins: Sequence[str] = ()):
        self.name = name
        self._plugins = tuple(plugins)
        self._plugins_loaded = False
        self._entries: Dict[str, Callable] = {}

    def register(self, key: str):
        def deco(obj):
            if key in self._entries and self._entries[key] is not obj:
                raise KeyError(f"{self.name} registry already has '{key}'")
            self._entries[key] = obj
            return obj

        return deco

    def _load_plugins(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            for mod in self._plugins:
                importlib.import_module(mod)

    def keys(self):
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        self._load_plugins()
        return key in self._entries

    def get(self, key: str, where: str = "") -> Callable:
        self._load_plugins()
        try:
            return self._entries[key]
        except KeyError:
            at = f"{where} = " if where else ""
            raise RecipeError(
                f"{at}'{key}' is not a registered {self.name}{nearest(key, self._entries)}; "
                f"choose one of {', '.join(self.keys())}."
            ) from None


ATTENTION = Registry("attention", plugins=["arch.attention", "arch.mla", "arch.linear_attention"])
FFN = Registry("ffn", plugins=["arch.ffn"])
NORM = Registry("norm", plugins=["arch.norm"])
# MoE layers, routers and expert backends live in experts/ and register themselves.
MOE = Registry("MoE layer", plugins=["experts"])
ROUTER = Registry("router", plugins=["experts"])
EXPERT_BACKEND = Registry("expert backend", plugins=["experts"])
