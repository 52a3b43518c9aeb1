"""A strict registry of passes: one name, one typed config, one entry function.

A pass receives the current ModelState and returns the new one plus what the report should say about it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from compress.state import ModelState, StageContext

PassFn = Callable[["ModelState", Any, "StageContext"], "PassResult"]


@dataclass
class PassResult:
    state: ModelState
    info: dict[str, Any]  # merged into the stage's entry in report.json


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_type: type[BaseModel]
    apply: PassFn


_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_type: type[BaseModel]) -> Callable[[PassFn], PassFn]:
    def decorate(fn: PassFn) -> PassFn:
        if name in _PASSES:
            raise ValueError(f"pass {name!r} is already registered")
        _PASSES[name] = PassSpec(name, config_type, fn)
        return fn

    return decorate


def get_pass(name: str) -> PassSpec:
    return _PASSES[name]


def pass_names() -> list[str]:
    return sorted(_PASSES)
