"""Gate `on_fail: search` (compress/search.py) on the tiny digits recipe: pruning bisection, quantization
fallback, the trials in the report, no passing trial -> exit 3 with the best failing model saved, and a
search killed mid-way that resumes without repeating a finished trial."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import BadInput
from compress.recipe import parse_recipe
from compress.runner import Runner, RunOptions, run_recipe


def _prune_search(recipe: dict, **search) -> dict:
    # no fine-tuning: each trial is a prune and two evaluations, so the search takes seconds
    recipe["stages"] = [{
        "name": "prune", "pass": "prune.magnitude",
        "params": {"sparsity": 0.99, "finetune": {"epochs": 0}, "measure_dnr": False},
        "gate": {"max_drop": 0.05, "on_fail": "search", "search": {"trials": 5, **search}},
    }]
    recipe["export"] = None
    return recipe


@pytest.fixture(scope="module")
def prune_search(tmp_path_factory: pytest.TempPathFactory, session_cache: Path, tiny_recipe_template: dict):
    """The recipe and one uninterrupted search run of it."""
    base = tmp_path_factory.mktemp("search")
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(_prune_search(copy.deepcopy(tiny_recipe_template)), sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_CACHE_DIR", str(session_cache))
        report = run_recipe(path, RunOptions(out=base / "straight", quiet=True))
    return path, report, base / "straight"


@pytest.mark.slow
def test_prune_search_keeps_the_sparsest_passing_trial(prune_search) -> None:
    _, report, out = prune_search
    assert report["status"] == "passed"
    stage = report["stages"][0]
    search = stage["search"]
    trials = search["trials"]
    assert len(trials) == 5 and trials[0]["phase"] == "target" and not trials[0]["passed"]
    assert all({"changes", "metric", "size_bytes", "sparsity", "seconds"} <= t.keys() for t in trials)
    passing = [t for t in trials if t["passed"]]
    best = max(passing, key=lambda t: t["sparsity"])
    assert search["best_trial"] == best["trial"] and stage["metric"] == best["metric"]
    assert stage["sparsity"] == pytest.approx(best["sparsity"]) and stage["gate"]["passed"]
    # bisection on the density scale: the levels tried lie between the dense input and the target
    levels = [t["changes"]["sparsity"] for t in trials[1:]]
    assert levels[0] == pytest.approx(0.9) and all(0 < s < 0.99 for s in levels)
    assert (out / "stages" / "01-prune" / "metrics.json").exists()
    assert (out / "plots" / "search-prune.png").exists()
    assert "## Search: search of stage 'prune'" in (out / "report.md").read_text()


@pytest.mark.slow
def test_search_killed_mid_way_resumes_without_repeating_a_trial(
    prune_search, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, straight, _ = prune_search
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COMPRESS_PAUSE_AT": "search:prune:trial:2", "COMPRESS_PAUSE_MARKER": str(marker)},
    )
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before the pause point: {proc.communicate()[0]}")
        assert time.time() < deadline, "never reached the pause point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = json.loads((out / "stages" / "01-prune" / "search" / "trials.json").read_text())["trials"]
    assert [t["trial"] for t in recorded] == [0, 1, 2]
    assert not (out / "stages" / "01-prune" / "metrics.json").exists()

    ran: list[float | None] = []
    original = Runner._run_stage

    def counting(self, index, stage, config, state, progress):  # noqa: ANN001, ANN202
        ran.append(config.sparsity)
        return original(self, index, stage, config, state, progress)

    monkeypatch.setattr(Runner, "_run_stage", counting)
    report = run_recipe(recipe, RunOptions(out=out, quiet=True))
    search = report["stages"][0]["search"]
    assert search["trials_replayed"] == 3 and search["trials_run_now"] == 2
    # only the two unfinished trials ran; none of the recorded ones again
    assert ran == [t["changes"]["sparsity"] for t in search["trials"][3:]]
    assert not set(ran) & {t["changes"].get("sparsity", 0.99) for t in recorded}
    # and the outcome is the uninterrupted run's
    for key in ("metric", "sparsity", "size_bytes"):
        assert [t[key] for t in search["trials"]] == [t[key] for t in straight["stages"][0]["search"]["trials"]]
    assert report["stages"][0]["metric"] == straight["stages"][0]["metric"]

    # a finished search is a finished stage: run again, nothing runs
    ran.clear()
    again = run_recipe(recipe, RunOptions(out=out, quiet=True))
    assert ran == [] and again["stages"][0]["resumed"] is True

    # a larger budget continues the finished search from its trials: only the new trial runs
    bigger = yaml.safe_load(recipe.read_text())
    bigger["stages"][0]["gate"]["search"]["trials"] = 6
    recipe.with_name("bigger.yaml").write_text(yaml.safe_dump(bigger, sort_keys=False))
    more = run_recipe(recipe.with_name("bigger.yaml"), RunOptions(out=out, quiet=True))
    assert len(ran) == 1 and more["stages"][0]["search"]["trials_replayed"] == 5
    trials = more["stages"][0]["search"]["trials"]
    assert len(trials) == 6
    # from the stage's own (dense) input, not from the finished stage's model: the bisection goes on
    densities = [(1 - t["changes"].get("sparsity", 0.99), t["passed"]) for t in trials[:5]]
    passing = min([1.0] + [d for d, ok in densities if ok])
    failing = max(d for d, ok in densities if not ok and d < passing)
    assert ran[0] == pytest.approx(1 - (passing * failing) ** 0.5, abs=1e-4)


@pytest.mark.slow
def test_no_passing_trial_saves_the_best_failing_one_and_exits_3(
    tiny_recipe: dict, write_recipe, tmp_path: Path
) -> None:
    recipe = _prune_search(tiny_recipe, trials=2)
    recipe["stages"][0]["gate"] = {"min_metric": 1.01, "on_fail": "search", "search": {"trials": 2}}
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write_recipe(recipe)), "--out", str(out), "--quiet"])
    assert result.exit_code == 3, result.output
    assert "no trial passed" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "gate_failed" and report["failed_stage"] == "prune"
    search = report["stages"][0]["search"]
    assert "no trial passed in 2" in search["outcome"]
    best = max(search["trials"], key=lambda t: t["metric"])
    assert search["best_trial"] == best["trial"] and report["stages"][0]["metric"] == best["metric"]
    assert (out / "stages" / "01-prune" / "search" / "best_failing.pt").exists()
    assert not (out / "stages" / "01-prune" / "metrics.json").exists()


@pytest.mark.slow
def test_quantization_search_moves_sensitive_layers_to_8_bits(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"] = [{
        "name": "quantize", "pass": "quantize.rtn", "params": {"weight_bits": 2, "calibration_samples": 64},
        "gate": {"max_drop": 0.05, "on_fail": "search", "search": {"trials": 5, "group": 4}},
    }]
    tiny_recipe["export"] = None
    out = tmp_path / "run"
    report = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    stage = report["stages"][0]
    trials = stage["search"]["trials"]
    assert report["status"] == "passed" and stage["gate"]["passed"]
    assert [t["phase"] for t in trials[:2]] == ["target", "to 8 bits"]
    assert len(trials[1]["changes"]["layer_bits"]) == 4
    assert 2 in stage["bits"].values() and 8 in stage["bits"].values()  # mixed precision
    # the layers moved first are the most sensitive ones at 2 bits (the cached analysis)
    layers = json.loads((out / "analysis" / "01-quantize.json").read_text())["layers"]
    ranking = sorted(layers, key=lambda n: (-layers[n]["results"]["2"]["drop"], -layers[n]["results"]["2"]["kl"]))
    assert list(trials[1]["changes"]["layer_bits"]) == ranking[:4]
    assert stage["size_bytes_packed"] < max(t["size_bytes"] for t in trials)
    assert (out / "plots" / "bits-quantize.png").exists()


def test_search_settings_are_checked(tiny_recipe: dict) -> None:
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"][0]["gate"] = {"max_drop": 0.1, "search": {"trials": 3}}
    with pytest.raises(BadInput, match="search: only used with on_fail: search"):
        parse_recipe(recipe)
    recipe["stages"][0]["gate"] = {"max_drop": 0.1, "on_fail": "search", "search": {"trials": None}}
    with pytest.raises(BadInput, match="a search needs a budget"):
        parse_recipe(recipe)
    recipe["stages"][0].update({"pass": "distill.dot", "params": {"epochs": 1}})
    recipe["stages"][0]["gate"] = {"max_drop": 0.1, "on_fail": "search"}
    with pytest.raises(BadInput, match="search backs off prune"):
        parse_recipe(recipe)


def test_nm_pruning_cannot_be_searched(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"][0]["params"] = {"granularity": "nm"}
    tiny_recipe["stages"][0]["gate"] = {"max_drop": 0.1, "on_fail": "search"}
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "N:M" in result.output
    assert not (tmp_path / "r").exists()
