"""Resolving `python:module:callable` references (models, datasets, metrics), and optional dependencies.

The one way every `python:` reference is imported, so that all report a bad reference the same way and
find a module in the same places: the working directory and the directory of the recipe that names it.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from compress.errors import BadInput


def split_ref(ref: str, field: str) -> tuple[str, str]:
    """`python:pkg.mod:fn` -> ("pkg.mod", "fn")."""
    body = ref.removeprefix("python:")
    module, sep, attr = body.rpartition(":")
    if not sep or not module or not attr:
        raise BadInput(f"{field}: expected python:module:callable, got {ref!r}")
    return module, attr


# Directories of the recipes loaded in this process (compress.recipe.load_recipe adds each one).
_recipe_dirs: list[str] = []


def add_recipe_dir(directory: str | Path) -> None:
    """Let `python:` references import modules that sit beside a recipe, wherever it is run from."""
    path = str(Path(directory).resolve())
    if path not in _recipe_dirs:
        _recipe_dirs.append(path)


def _on_sys_path(directory: str) -> bool:
    return any(os.path.abspath(p or os.curdir) == directory for p in sys.path)


def _ensure_importable() -> None:
    # `python -m` and pytest put the working directory on sys.path, an installed console script
    # does not; a user's `python:mymodels:net` next to the recipe must import either way. Recipe
    # directories go last, so a file there never shadows an installed package.
    cwd = os.getcwd()
    if not _on_sys_path(cwd):
        sys.path.insert(0, cwd)
    for directory in _recipe_dirs:
        if not _on_sys_path(directory):
            sys.path.append(directory)


def import_callable(ref: str, field: str) -> Callable[..., Any]:
    """Import the module of `python:module:callable` and return the callable; BadInput otherwise."""
    module_name, attr = split_ref(ref, field)
    _ensure_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user's module can fail to import in any way: report, never crash
        raise BadInput(
            f"{field}: cannot import module {module_name!r} ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if target is None or not callable(target):
        raise BadInput(f"{field}: module {module_name!r} has no callable {attr!r}")
    return target


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def require(module: str, extra: str, field: str, what: str) -> ModuleType:
    """Import an optional dependency (torchvision, mlxtend, scikit-learn) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BadInput(
            f"{field}: {what} needs {module.split('.')[0]}, which is not installed "
            f"(pip install 'compress[{extra}]'; {type(exc).__name__}: {first_line(exc)})"
        ) from None
