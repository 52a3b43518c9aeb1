"""SIGKILL a real run at exact points (compress.faults pause points), resume, and get the same result.

Also the determinism contract: the same recipe and seed give identical metrics and identical ONNX bytes.
"""
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

from compress.runner import RunOptions, run_recipe

pytestmark = pytest.mark.slow

COMPARED = ("metric", "test_metric", "sparsity", "params_nonzero")


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory, session_cache: Path, tiny_recipe_template: dict):
    """The recipe and one uninterrupted run of it: what every killed-and-resumed run must reproduce."""
    recipe = copy.deepcopy(tiny_recipe_template)
    recipe["stages"].append(
        {"name": "recover", "pass": "prune.magnitude", "params": {"sparsity": 0.7, "finetune": {"epochs": 3}}}
    )
    base = tmp_path_factory.mktemp("crash")
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_CACHE_DIR", str(session_cache))
        report = run_recipe(path, RunOptions(out=base / "straight", quiet=True))
    return path, report, base / "straight"


def _start(recipe: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )


def _kill_at(recipe: Path, out: Path, point: str, tmp_path: Path) -> None:
    marker = tmp_path / "paused"
    proc = _start(recipe, out, {"COMPRESS_PAUSE_AT": point, "COMPRESS_PAUSE_MARKER": str(marker)})
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before reaching {point!r}: {proc.communicate()[0]}")
        assert time.time() < deadline, f"never reached {point!r}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    ("point", "first_stage_done", "second_stage_done"),
    [
        ("recover: fine-tune:epoch:2", True, False),  # mid-stage
        ("after-stage:prune", True, False),  # between stages
        ("write:02-recover/model.pt", True, False),  # while the checkpoint is half-written
        ("exported:model.fp32.onnx", True, True),  # mid-export
    ],
)
def test_kill_then_resume_equals_uninterrupted(
    two_stage, tmp_path: Path, point: str, first_stage_done: bool, second_stage_done: bool
) -> None:
    recipe, straight, straight_dir = two_stage
    out = tmp_path / "run"
    _kill_at(recipe, out, point, tmp_path)
    stages = out / "stages"
    assert (stages / "01-prune" / "metrics.json").exists() == first_stage_done
    assert (stages / "02-recover" / "metrics.json").exists() == second_stage_done
    if point.startswith("write:"):
        assert list((stages / "02-recover").glob(".model.pt.*.tmp")), "the kill did not land mid-write"

    resumed = _start(recipe, out, {})
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    report = json.loads((out / "report.json").read_text())
    assert [s["resumed"] for s in report["stages"]] == [first_stage_done, second_stage_done]
    for key in COMPARED:
        assert [s[key] for s in report["stages"]] == [s[key] for s in straight["stages"]], key
    assert report["export"]["fp32"]["metric"] == straight["export"]["fp32"]["metric"]
    onnx = "export/model.fp32.onnx"
    assert (out / onnx).read_bytes() == (straight_dir / onnx).read_bytes()


def test_same_recipe_and_seed_give_identical_metrics_and_onnx(two_stage, tmp_path: Path) -> None:
    recipe, straight, straight_dir = two_stage
    again = run_recipe(recipe, RunOptions(out=tmp_path / "again", quiet=True, resume=False))
    for key in COMPARED:
        assert [s[key] for s in again["stages"]] == [s[key] for s in straight["stages"]], key
    onnx = "export/model.fp32.onnx"
    assert (tmp_path / "again" / onnx).read_bytes() == (straight_dir / onnx).read_bytes()
