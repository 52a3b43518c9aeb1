"""Shared fixtures: a tiny, fast recipe on real data (scikit-learn's 8x8 digits) and an isolated cache."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TINY_RECIPE = {
    "version": 1,
    "name": "tiny",
    "seed": 0,
    "model": {
        "arch": "builtin:resnet8",
        "kwargs": {"width": 8},
        "train": {"epochs": 4, "lr": 0.05, "shift": 0, "schedule": "onecycle"},
    },
    "data": {"dataset": "digits", "batch_size": 64},
    "stages": [
        {
            "name": "prune",
            "pass": "prune.magnitude",
            "params": {"sparsity": 0.5, "finetune": {"epochs": 1, "lr": 0.01}},
            "gate": {"max_drop": 0.2},
        }
    ],
    "export": {"onnx": {"precisions": ["fp32"]}, "verify": {"latency_runs": 3}},
}


def _session_cache(factory: pytest.TempPathFactory) -> Path:
    # One cache per test session: the tiny reference trains once, the tests still never touch ~/.cache.
    return factory.getbasetemp() / "compress-cache"


@pytest.fixture(autouse=True)
def seeded_rng() -> None:
    # every test starts from the same random state whatever ran before it in the process (test order,
    # pytest-xdist's distribution), so a property checked on random tensors is checked on the same ones
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = _session_cache(tmp_path_factory)
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One real run of the tiny recipe (with export), shared by the tests that only read its outputs."""
    import copy

    from compress.runner import RunOptions, run_recipe

    base = tmp_path_factory.mktemp("tiny-run")
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(copy.deepcopy(TINY_RECIPE), sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_CACHE_DIR", str(_session_cache(tmp_path_factory)))
        report = run_recipe(recipe, RunOptions(out=base / "run", quiet=True))
    return report, base / "run"


@pytest.fixture
def tiny_recipe() -> dict:
    import copy

    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _session_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_recipe_template() -> dict:
    import copy

    return copy.deepcopy(TINY_RECIPE)
