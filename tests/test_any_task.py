"""Any task end to end (issue 18): samples, targets and outputs of any structure through the whole run,
label-free fidelity gates, and each door the issue found closed either open or a one-line message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app
from compress.data import load_data
from compress.recipe import DataConfig

runner = CliRunner()

TASK_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Embedder(nn.Module):
    """int64 token ids [B, 16] -> an embedding [B, 24]."""

    def __init__(self, vocab=50, dim=24, classes=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Sequential(nn.Linear(dim, 48), nn.ReLU(), nn.Linear(48, classes or dim))

    def forward(self, ids):
        return self.mix(self.embed(ids).mean(1))


def embedder(classes=None):
    torch.manual_seed(0)
    return Embedder(classes=classes)


def _ids(n, seed=0):
    return torch.randint(0, 50, (n, 16), generator=torch.Generator().manual_seed(seed))


def embeddings():
    """Token ids with float targets: the embeddings of a model these are meant to stay close to."""
    ids = _ids(160)
    with torch.no_grad():
        targets = embedder()(ids)
    return TensorDataset(ids[:120], targets[:120]), TensorDataset(ids[120:], targets[120:])


def far_labels():
    """Class targets up to 930 for a model of 24 outputs."""
    ids = _ids(40)
    labels = torch.arange(40) * 23 + 33
    return TensorDataset(ids, labels), TensorDataset(ids.clone(), labels.clone())


def index_labels():
    """'Labels' that are just each item's index: one sample per class."""
    ids = _ids(300)
    return TensorDataset(ids[:250], torch.arange(250)), TensorDataset(ids[250:], torch.arange(250, 300))


class TinyHead(nn.Module):
    """A detector-like head: images [B, 1, 16, 16] -> (boxes [B, 16, 4], scores [B, 16, 3])."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.boxes = nn.Conv2d(16, 4, 1, stride=2)
        self.scores = nn.Conv2d(16, 3, 1, stride=2)

    def forward(self, x):
        features = self.body(x)
        return self.boxes(features).flatten(2).transpose(1, 2), self.scores(features).flatten(2).transpose(1, 2)


def tiny_head():
    torch.manual_seed(0)
    return TinyHead()


def canvases():
    """Unlabelled images: items (image,)."""
    x = torch.rand(96, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x[:72]), TensorDataset(x[72:])
'''


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    (tmp_path / "any_task_mod.py").write_text(TASK_MODULE)  # beside the recipe: found through it
    return tmp_path


def _recipe(directory: Path, body: dict) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": "any", "seed": 0, **body}, sort_keys=False))
    return path


def _one_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_token_ids_with_embedding_targets_run_and_export(task_dir: Path) -> None:
    """The doors issue 18 found closed for an embedder: int64 token-id samples of shape [16] (not images),
    float [24] targets (not class indices), an output that is not class scores; the model trains on mse
    (loss auto), is pruned and fine-tuned, and its ONNX file takes int64 ids."""
    recipe = _recipe(task_dir, {
        "model": {"arch": "python:any_task_mod:embedder", "train": {"epochs": 2, "lr": 0.05, "shift": 2}},
        "data": {"dataset": "python:any_task_mod:embeddings", "batch_size": 32},
        "metric": "cosine",
        "stages": [{"name": "prune", "pass": "prune.magnitude",
                    "params": {"sparsity": 0.5, "finetune": {"epochs": 1, "lr": 0.01}}, "gate": {"min_metric": 0.5}}],
        "export": {"onnx": {"precisions": ["fp32"]}, "verify": {"latency": False}},
    })  # fmt: skip
    out = task_dir / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["targets"] == "other" and report["data"]["split"] == "random"
    assert report["baseline"]["metric"] == pytest.approx(1.0)  # the reference compared with itself
    assert 0.5 <= report["stages"][0]["metric"] < 1.0
    assert report["export"]["fp32"]["drop"] == pytest.approx(0.0, abs=1e-4)


def test_indices_used_as_labels_split_at_random(task_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample per 'class' leaves a per-class split without validation samples: a seeded random split
    takes over (the same on every run)."""
    monkeypatch.syspath_prepend(str(task_dir))
    first = load_data(DataConfig(dataset="python:any_task_mod:index_labels"))
    again = load_data(DataConfig(dataset="python:any_task_mod:index_labels"))
    assert first.split == "random" and len(first.val) == 25 and len(first.train) == 225
    assert first.val.indices == again.val.indices


def test_class_targets_beyond_the_model_outputs_are_one_line(task_dir: Path) -> None:
    recipe = _recipe(task_dir, {
        "model": {"arch": "python:any_task_mod:embedder", "train": {"epochs": 1}},
        "data": {"dataset": "python:any_task_mod:far_labels", "batch_size": 16},
        "export": None,
    })  # fmt: skip
    result = runner.invoke(app, ["run", str(recipe), "--out", str(task_dir / "run")])
    assert result.exit_code == 2
    assert "does not give 931 class scores per sample" in _one_line(result)
    assert not (task_dir / "run").exists()


@pytest.mark.parametrize(("weight_bits", "min_metric", "exit_code"), [(8, 0.95, 0), (4, 0.9999, 3)])
def test_unlabelled_data_gates_on_cosine(task_dir: Path, weight_bits: int, min_metric: float, exit_code: int) -> None:
    """No targets anywhere: the model is used as constructed, fine-tuning distils alone, the gates and the
    ONNX verification compare outputs with the uncompressed model's; a gate above what W4A8 reaches stops."""
    recipe = _recipe(task_dir, {
        "model": {"arch": "python:any_task_mod:tiny_head"},
        "data": {"dataset": "python:any_task_mod:canvases", "batch_size": 24, "calibration_samples": 48},
        "metric": "cosine",
        "stages": [
            {"name": "prune", "pass": "prune.magnitude",
             "params": {"sparsity": 0.3, "finetune": {"epochs": 1, "lr": 0.001, "distill": 1.0}}, "gate": {"min_metric": 0.9}},
            {"name": "quantize", "pass": "quantize.rtn",
             "params": {"weight_bits": weight_bits, "activation_bits": 8}, "gate": {"min_metric": min_metric}},
        ],
        "export": {"onnx": {"precisions": ["int8-trt", "int8-ort"]}, "verify": {"latency": False, "max_drop": 0.02}},
    })  # fmt: skip
    out = task_dir / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == exit_code, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["source"] == "constructed" and report["data"]["targets"] == "none"
    assert report["stages"][0]["metric"] >= 0.9
    # compress eval reads the same fidelity for a stage's checkpoint, against the model as constructed
    evaluated = runner.invoke(app, ["eval", str(out / "stages" / "01-prune" / "model.pt"), "--recipe", str(recipe)])
    assert evaluated.exit_code == 0, evaluated.output
    assert float(evaluated.output.split()[-1]) == pytest.approx(report["stages"][0]["test_metric"], abs=1e-4)  # printed to 4 places
    if exit_code == 0:
        assert report["status"] == "passed"
        for name in ("int8-trt", "int8-ort"):
            assert report["export"][name]["metric"] >= 0.95
            assert set(report["export"][name]["parity"]["outputs"]) == {"output_0", "output_1"}
    else:
        assert report["status"] == "gate_failed" and report["failed_stage"] == "quantize"
        assert report["stages"][1]["metric"] < min_metric
