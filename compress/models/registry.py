"""A strict name -> constructor registry for the built-in architectures (`builtin:NAME` in a recipe).

Strict because a silently replaced constructor would make two runs of the same recipe build different
networks; registering a name twice is a programming error, not a user error.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from torch import nn

ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)

_BUILTINS: dict[str, ModelFn] = {}

# Imported on first lookup so that `registry` alone is enough to resolve a name, without an import
# cycle (the model modules import `register_builtin` from here).
_BUILTIN_MODULES = ("compress.models.resnet_cifar", "compress.models.mobilenet", "compress.models.transformer")


def register_builtin(name: str) -> Callable[[F], F]:
    def wrapper(fn: F) -> F:
        if name in _BUILTINS:
            raise ValueError(f"builtin model {name!r} is already registered (by {_BUILTINS[name].__module__})")
        _BUILTINS[name] = fn
        return fn

    return wrapper


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_builtin(name: str) -> ModelFn:
    """The constructor for `name`; KeyError (with the known names) if there is none."""
    _load_builtins()
    try:
        return _BUILTINS[name]
    except KeyError:
        raise KeyError(f"unknown builtin {name!r} (known: {', '.join(builtin_names())})") from None


def builtin_names() -> list[str]:
    _load_builtins()
    return sorted(_BUILTINS)
