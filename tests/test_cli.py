"""`compress validate` and friends: bad input is one line naming the field, exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


def _validate(path: Path):
    return runner.invoke(app, ["validate", str(path)])


def test_valid_recipe_passes(tiny_recipe: dict, write_recipe) -> None:
    result = _validate(write_recipe(tiny_recipe))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_shipped_recipes_validate() -> None:
    for recipe in sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml")):
        result = _validate(recipe)
        assert result.exit_code == 0, (recipe, result.output)


BROKEN = {
    "bad_yaml": ("name: x\nstages: [\n", "invalid YAML at line"),
    "unknown_key": (lambda r: r.update(stagse=[]), "stagse: unknown key"),
    "wrong_type": (lambda r: r["stages"][0]["gate"].update(max_drop="abc"), "stages[0].gate.max_drop: expected a number"),
    "unknown_pass": (lambda r: r["stages"][0].update({"pass": "prune.nope"}), "stages[0].pass: unknown pass"),
    "missing_checkpoint": (lambda r: r["model"].update(checkpoint="nowhere.pt"), "model.checkpoint: file not found"),
    "bad_gate": (lambda r: r["stages"][0]["gate"].update(against="yesterday"), "stages[0].gate.against"),
    "impossible_sparsity": (lambda r: r["stages"][0]["params"].update(sparsity=1.5), "stages[0].params.sparsity"),
    "unknown_builtin": (lambda r: r["model"].update(arch="builtin:resnet21"), "model.arch: unknown builtin"),
    "unknown_dataset": (lambda r: r["data"].update(dataset="cifar1000"), "data.dataset"),
    "missing_imagefolder": (lambda r: r["data"].update(dataset="imagefolder:no/such/dir"), "data.dataset"),
    "duplicate_stage": (lambda r: r["stages"].append(dict(r["stages"][0])), "duplicate stage name"),
    "bad_metric": (lambda r: r.update(metric="python:no_such_module_xyz:f"), "metric: cannot import"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_recipe_exits_2_with_one_line(case: str, tiny_recipe: dict, write_recipe) -> None:
    change, expected = BROKEN[case]
    if callable(change):
        change(tiny_recipe)
        path = write_recipe(tiny_recipe)
    else:
        path = write_recipe(change)
    result = _validate(path)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expected in lines[0] and "Traceback" not in result.output


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = _validate(tmp_path / "absent.yaml")
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_console_script_gives_no_traceback(tiny_recipe: dict, write_recipe) -> None:
    tiny_recipe["stages"][0]["params"]["sparsity"] = "lots"
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "validate", str(write_recipe(tiny_recipe))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "stages[0].params.sparsity" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_device_flag(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--device", "tpu", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--device" in result.output
    assert not (tmp_path / "o").exists()
