"""Pruning through the whole run: sparsity survives export exactly, and channel-pruned stages resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.runner import RunOptions, run_recipe
from compress.sparsity import nm_violations

pytestmark = pytest.mark.slow


def _run(path: Path, out: Path) -> dict:
    return run_recipe(path, RunOptions(out=out, quiet=True))


def _onnx_weights(path: Path) -> list[np.ndarray]:
    """The weight initializer of every Conv and Gemm node (BatchNorm already folded in by the exporter)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return [initializers[node.input[1]] for node in graph.node if node.op_type in ("Conv", "Gemm")]


def test_prune_then_2to4_then_export_keeps_exact_sparsity(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"] = [
        {"name": "prune", "pass": "prune.magnitude", "params": {"sparsity": 0.5, "finetune": {"epochs": 1}}},
        {
            "name": "nm",
            "pass": "prune.magnitude",
            "params": {"granularity": "nm", "nm_rule": "divisible", "finetune": {"epochs": 1}},
        },
    ]
    out = tmp_path / "run"
    report = _run(write_recipe(tiny_recipe), out)
    assert report["status"] == "passed"
    last = report["stages"][-1]
    onnx_weights = _onnx_weights(out / report["export"]["fp32"]["path"])
    zeros = sum(int((w == 0).sum()) for w in onnx_weights)
    total = sum(w.size for w in onnx_weights)
    assert zeros == last["weights_zero_after"] and total == last["weights_total_after"]
    assert zeros / total == pytest.approx(last["sparsity"])

    # each 2:4 layer of the report, found in the ONNX file by its zero pattern (the fold rescales values)
    state_dict = torch.load(out / last["checkpoint"], weights_only=True)["state_dict"]
    assert last["nm"]["layers"] and last["nm"]["skipped"]
    for name in last["nm"]["layers"]:
        zero_mask = (state_dict[f"{name}.weight"] == 0).numpy()
        matches = [w for w in onnx_weights if w.shape == zero_mask.shape and np.array_equal(w == 0, zero_mask)]
        assert matches, f"{name}: no ONNX weight with its zero pattern"
        assert nm_violations(torch.tensor(matches[0]), 2, 4) == 0, name


def test_channels_stage_checkpoint_loads_weights_only_and_resumes(
    tiny_recipe: dict, write_recipe, tmp_path: Path
) -> None:
    tiny_recipe["export"] = None
    tiny_recipe["stages"] = [
        {
            "name": "channels",
            "pass": "prune.magnitude",
            "params": {"granularity": "channels", "sparsity": 0.5, "scope": "layer", "round_to": 4,
                       "finetune": {"epochs": 1}},
        },
        {"name": "sparse", "pass": "prune.magnitude", "params": {"sparsity": 0.5, "finetune": {"epochs": 1}}},
    ]
    recipe = write_recipe(tiny_recipe)
    out = tmp_path / "run"
    first = _run(recipe, out)
    channels = first["stages"][0]
    assert channels["params"] < first["baseline"]["params"] / 2
    assert channels["macs_ratio"] > 2

    second = _run(recipe, out)
    assert [s["resumed"] for s in second["stages"]] == [True, True]
    for key in ("metric", "test_metric", "params", "params_nonzero", "sparsity"):
        assert [s[key] for s in second["stages"]] == [s[key] for s in first["stages"]], key

    # only the second stage changes: the first is loaded (resized from its record), the second recomputed
    tiny_recipe["stages"][1]["params"]["sparsity"] = 0.6
    third = _run(write_recipe(tiny_recipe), out)
    assert [s["resumed"] for s in third["stages"]] == [True, False]
    assert third["stages"][1]["params"] == channels["params"]

    # the `compress eval` path: a model freshly built from the recipe takes the smaller checkpoint
    from compress.evaluate import evaluate_file

    payload = torch.load(out / channels["checkpoint"], weights_only=True)
    assert json.dumps(payload["structure"])  # plain data
    assert evaluate_file(out / channels["checkpoint"], recipe) == channels["test_metric"]
