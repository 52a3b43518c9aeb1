"""Per-layer sensitivity (compress analyze), its cache, the mixed-precision knapsack and weight_bits: auto."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import BadInput
from compress.recipe import parse_recipe
from compress.runner import RunOptions, run_recipe
from compress.sensitivity import knapsack_bits


def test_knapsack_matches_brute_force() -> None:
    costs = {
        "a": {2: 5.0, 4: 1.0, 8: 0.0},
        "b": {2: 0.5, 4: 0.2, 8: 0.0},
        "c": {2: 9.0, 4: 3.0, 8: 0.1},
        "d": {2: 0.1, 4: 0.0, 8: 0.0},
    }
    weights = {"a": 100, "b": 4000, "c": 50, "d": 800}
    for average in (2.5, 3, 4, 6):
        capacity = average * sum(weights.values())
        chosen = knapsack_bits(costs, weights, capacity)
        assert sum(weights[n] * b for n, b in chosen.items()) <= capacity
        best = min(
            sum(costs[n][b] for n, b in zip(costs, combo))
            for combo in itertools.product(*(costs[n] for n in costs))
            if sum(weights[n] * b for n, b in zip(costs, combo)) <= capacity
        )
        assert sum(costs[n][b] for n, b in chosen.items()) == pytest.approx(best)
    with pytest.raises(BadInput, match="below what the fewest bits need"):
        knapsack_bits(costs, weights, 1.5 * sum(weights.values()))


@pytest.mark.slow
def test_analyze_prints_table_writes_chart_and_caches(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"][0]["params"]["sparsity"] = 0.9
    recipe, out = write_recipe(tiny_recipe), tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", str(recipe), "--out", str(out), "--stage", "prune"])
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis" / "01-prune.json").read_text())
    assert (out / "analysis" / "01-prune.png").exists()
    layers = analysis["layers"]
    assert "fc" not in layers and "conv1" in layers  # the stage's own selection: classifier left dense
    assert all(set(e["results"]["0.9"]) == {"metric", "drop", "kl"} for e in layers.values())
    drops = [layers[n]["results"]["0.9"]["drop"] for n in layers]
    assert max(drops) > 0
    assert "sensitivity of stage 'prune'" in result.output and "layer1.0.conv1" in result.output
    # cached: a second analysis measures nothing (the file is not rewritten)
    stamp = (out / "analysis" / "01-prune.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["analyze", str(recipe), "--out", str(out), "--quiet"])
    assert again.exit_code == 0, again.output
    assert (out / "analysis" / "01-prune.json").stat().st_mtime_ns == stamp

    bad = CliRunner().invoke(app, ["analyze", str(recipe), "--out", str(out), "--stage", "nope"])
    assert bad.exit_code == 2 and "no stage 'nope'" in bad.output


@pytest.mark.slow
def test_auto_bits_meets_the_average_budget(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"] = [{
        "name": "quantize", "pass": "quantize.rtn",
        "params": {"weight_bits": "auto", "budget": {"average_bits": 4}, "bits_choices": [2, 4, 8],
                   "calibration_samples": 64, "layer_bits": {"fc": 8}},
        "gate": {"max_drop": 0.5},
    }]
    tiny_recipe["export"] = None
    out = tmp_path / "run"
    report = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    stage = report["stages"][0]
    auto = stage["auto_bits"]
    assert auto["average_bits"] <= 4 and auto["pinned"] == ["fc"] and stage["bits"]["fc"] == 8
    assert set(stage["bits"].values()) <= {2, 4, 8} and len(set(stage["bits"].values())) > 1
    assert stage["average_weight_bits"] == pytest.approx(auto["average_bits"])
    assert (out / "analysis" / "01-quantize.json").exists() and (out / "plots" / "bits-quantize.png").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"weight_bits": "auto"}, "budget: given exactly when weight_bits is auto"),
        ({"weight_bits": 4, "budget": {"average_bits": 4}}, "budget: given exactly when weight_bits is auto"),
        ({"weight_bits": "auto", "budget": {}}, "exactly one of average_bits, weight_bytes"),
        ({"weight_bits": 9}, "expected bits between 2 and 8, or auto"),
    ],
)
def test_auto_bits_params_are_checked(tiny_recipe: dict, params: dict, message: str) -> None:
    tiny_recipe["stages"] = [{"name": "q", "pass": "quantize.adaround", "params": params}]
    tiny_recipe["export"] = None
    with pytest.raises(BadInput, match=message):
        parse_recipe(tiny_recipe)
