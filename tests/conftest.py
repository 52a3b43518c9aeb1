"""Shared fixtures: a tiny, fast recipe on real data (scikit-learn's 8x8 digits) and an isolated cache."""
from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # One cache per test session: the tiny reference trains once, the tests still never touch ~/.cache.
    cache = tmp_path_factory.getbasetemp() / "compress-cache"
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))
    return cache


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
