"""A strict registry of passes: one name, one typed config, one entry function.

A pass receives the current ModelState and returns the new one plus what the report should say about it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from compress.recipe import Recipe
    from compress.state import ModelState, StageContext

PassFn = Callable[["ModelState", Any, "StageContext"], "PassResult"]
# (config, recipe directory, "PREFIX: stages[i].params") -> None or BadInput; for what a schema cannot see
PassCheck = Callable[[Any, "Path | None", str], None]


@dataclass
class PassResult:
    state: ModelState
    info: dict[str, Any]  # merged into the stage's entry in report.json


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_type: type[BaseModel]
    apply: PassFn
    check: PassCheck | None = None


_PASSES: dict[str, PassSpec] = {}


def register_pass(
    name: str, config_type: type[BaseModel], check: PassCheck | None = None
) -> Callable[[PassFn], PassFn]:
    def decorate(fn: PassFn) -> PassFn:
        if name in _PASSES:
            raise ValueError(f"pass {name!r} is already registered")
        _PASSES[name] = PassSpec(name, config_type, fn, check)
        return fn

    return decorate


def get_pass(name: str) -> PassSpec:
    return _PASSES[name]


def pass_names() -> list[str]:
    return sorted(_PASSES)


def check_stages(recipe: Recipe, recipe_path: str | Path | None) -> None:
    """Each pass's own check of its params (files they name, say): a run calls this before it writes
    anything, so such bad input leaves no run directory behind."""
    recipe_dir = Path(recipe_path).resolve().parent if recipe_path else None
    for index, (stage, config) in enumerate(zip(recipe.stages, recipe.pass_configs())):
        check = get_pass(stage.pass_name).check
        if check is not None:
            check(config, recipe_dir, f"{recipe_path or 'recipe'}: stages[{index}].params")
