"""End-to-end runs of the tiny recipe on real data: the contracts of DESIGN.md, gates, resume."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import GateFailed
from compress.runner import RunOptions, run_recipe

pytestmark = pytest.mark.slow


def _run(path: Path, out: Path, **kwargs) -> dict:
    return run_recipe(path, RunOptions(out=out, quiet=True, **kwargs))


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compress.cli", *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_run_writes_the_contract(tiny_run: tuple[dict, Path]) -> None:
    report, out = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["status"] == report["status"] == "passed"
    stage = on_disk["stages"][0]
    assert {"name", "pass", "metric", "drop", "gate", "seconds", "params", "params_nonzero", "sparsity"} <= set(stage)
    # global 50% over every conv but the classifier: overall sparsity just under 0.5
    assert 0.45 < stage["sparsity"] < 0.5
    assert stage["params_nonzero"] < on_disk["baseline"]["params_nonzero"]
    payload = torch.load(out / stage["checkpoint"], weights_only=True)
    for key, mask in payload["masks"].items():
        assert torch.all(payload["state_dict"][key][~mask] == 0), key
    assert (out / "recipe.yaml").read_text().startswith("# recipe hash:")
    assert "| prune | prune.magnitude |" in (out / "report.md").read_text()
    fp32 = on_disk["export"]["fp32"]
    assert (out / fp32["path"]).is_file() and fp32["size_bytes"] > 0
    assert fp32["parity"]["top1_agreement"] >= 0.999
    assert fp32["latency_ms"]["batch1"] > 0 and fp32["latency_ms"]["batch64"] > 0
    assert fp32["gate"]["passed"]
    # the unmodified model exported and measured like the compressed files, first in the table
    original = on_disk["export"]["original"]
    assert list(on_disk["export"])[0] == "original" and (out / original["path"]).is_file()
    assert original["metric"] == pytest.approx(on_disk["baseline"]["test_metric"], abs=0.002)
    assert original["latency_ms"]["batch64"] > 0 and original["gate"]["passed"]
    line = on_disk["headline"]
    assert line["format"] == "fp32"
    assert line["smaller"] == pytest.approx(original["size_bytes"] / fp32["size_bytes"])
    assert line["test_change"] == pytest.approx(fp32["metric"] - original["metric"])
    assert "x smaller" in (out / "report.md").read_text()


def test_second_run_resumes_and_changed_stage_reruns(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["export"] = None
    tiny_recipe["stages"].append(
        {"name": "more", "pass": "prune.magnitude", "params": {"sparsity": 0.6, "finetune": {"epochs": 1}}}
    )
    out = tmp_path / "run"
    first = _run(write_recipe(tiny_recipe), out)
    second = _run(write_recipe(tiny_recipe), out)
    assert [s["resumed"] for s in second["stages"]] == [True, True]
    assert [s["metric"] for s in second["stages"]] == [s["metric"] for s in first["stages"]]
    tiny_recipe["stages"][1]["params"]["sparsity"] = 0.7
    third = _run(write_recipe(tiny_recipe), out)
    assert [s["resumed"] for s in third["stages"]] == [True, False]
    assert third["stages"][1]["sparsity"] > second["stages"][1]["sparsity"]
    fresh = _run(write_recipe(tiny_recipe), out, resume=False)
    assert [s["resumed"] for s in fresh["stages"]] == [False, False]


def test_gate_failure_exits_3_and_keeps_earlier_stages(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"].append(
        {
            "name": "crush",
            "pass": "prune.magnitude",
            "params": {"sparsity": 0.99, "finetune": {"epochs": 0}},
            "gate": {"max_drop": 0.001},
        }
    )
    out = tmp_path / "run"
    with pytest.raises(GateFailed):
        _run(write_recipe(tiny_recipe), out)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "gate_failed" and report["failed_stage"] == "crush"
    assert report["stages"][-1]["gate"]["passed"] is False
    assert (out / "stages" / "01-prune" / "model.pt").is_file()
    assert (out / "stages" / "01-prune" / "metrics.json").is_file()
    assert not (out / "stages" / "02-crush" / "metrics.json").exists()
    assert not (out / "export").exists()

    proc = _cli("run", str(write_recipe(tiny_recipe)), "--out", str(tmp_path / "cli"))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, output
    assert "crush" in output and "Traceback" not in output


def test_torn_checkpoint_is_not_taken_as_finished(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["export"] = None
    out = tmp_path / "run"
    _run(write_recipe(tiny_recipe), out)
    checkpoint = out / "stages" / "01-prune" / "model.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    again = _run(write_recipe(tiny_recipe), out)
    assert again["stages"][0]["resumed"] is False
    torch.load(checkpoint, weights_only=True)  # rewritten whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_run_on_cuda_prunes_quantizes_and_exports(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    # the reference trains on the GPU, so the input check, every pass and the export start from a model there
    tiny_recipe["stages"].append(
        {"name": "quantize", "pass": "quantize.adaround", "params": {"weight_bits": 4, "iterations": 20},
         "gate": {"max_drop": 0.2}}  # fmt: skip
    )
    tiny_recipe["export"]["onnx"]["precisions"] = ["fp32", "int8-trt"]
    report = _run(write_recipe(tiny_recipe), tmp_path / "cuda", device="cuda")
    assert report["status"] == "passed" and report["device"] == "cuda"
    assert [stage["name"] for stage in report["stages"]] == ["prune", "quantize"]
    assert report["export"]["int8-trt"]["parity"]["top1_agreement"] >= 0.98
