"""Security contracts: no network anywhere, YAML never builds objects, checkpoints never run code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app

REPO = Path(__file__).resolve().parent.parent

# Loaded before anything else in the child process: every way out to the network records itself and fails.
NO_NETWORK = '''
import os, socket

_log = os.environ["NETWORK_ATTEMPTS"]

def _refuse(*args, **kwargs):
    with open(_log, "a") as handle:
        handle.write(repr(args[:2]) + "\\n")
    raise OSError("network disabled by the test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.socket.sendto = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


@pytest.mark.slow
def test_demo_recipe_runs_with_sockets_disabled(tmp_path: Path, isolated_cache: Path) -> None:
    # The demo recipe as shipped, with its training cut to one epoch: every code path it takes is the
    # demo's (reference training, pruning, export, ONNX Runtime), only shorter.
    recipe = yaml.safe_load((REPO / "recipes" / "mnist-resnet20.yaml").read_text())
    recipe["model"]["train"]["epochs"] = 1
    for stage in recipe["stages"]:
        stage["params"]["finetune"]["epochs"] = 1
        stage["gate"] = {"max_drop": 1.0}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    attempts = tmp_path / "attempts.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "NETWORK_ATTEMPTS": str(attempts),
        "COMPRESS_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "run", str(path), "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not attempts.exists(), attempts.read_text()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # one epoch of training: far from converged, but a real model (chance is 0.1)
    assert report["status"] == "passed" and report["export"]["fp32"]["metric"] > 0.3


def test_yaml_tags_never_build_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "invalid YAML" in result.output
    assert not marker.exists()


def test_checkpoint_with_code_runs_nothing_without_trust(tmp_path: Path, tiny_recipe: dict, write_recipe) -> None:
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    tiny_recipe["model"]["checkpoint"] = str(path)
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--trust-checkpoint" in result.output
    assert not marker.exists()
