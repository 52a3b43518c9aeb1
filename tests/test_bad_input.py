"""The catalogue of bad input: each case exits 2 with one line naming what is wrong, no traceback, and
leaves no run directory behind (the run checks everything before it writes anything)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()

DATASET_MODULE = '''
import torch
import yaml
from torch.utils.data import TensorDataset

def _pair(x, y):
    return TensorDataset(x, y), TensorDataset(x.clone(), y.clone())

def labels_out_of_range():
    x = torch.randn(40, 1, 8, 8)
    y = torch.arange(40) % 4
    y[3] = -2  # num_classes comes from the largest label, so only negatives can be out of range
    return _pair(x, y)

def nan_inputs():
    x = torch.randn(40, 1, 8, 8)
    x[5, 0, 0, 0] = float("nan")
    return _pair(x, torch.arange(40) % 4)

def flat_inputs():
    return _pair(torch.randn(40, 64), torch.arange(40) % 4)

def empty():
    return _pair(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))

def not_a_pair():
    return 3
'''


def _checkpoint(tmp_path: Path, arch: str, name: str) -> Path:
    from compress.models import build_model
    from compress.recipe import ModelConfig

    model = build_model(ModelConfig(arch=arch, kwargs={"width": 8}), in_channels=1, num_classes=10, input_size=8)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def _truncated(tmp_path: Path) -> Path:
    path = _checkpoint(tmp_path, "builtin:resnet8", "truncated.pt")
    path.write_bytes(path.read_bytes()[:500])
    return path


def _pickled_module(tmp_path: Path) -> Path:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # unpickling a module runs code: refused without trust
    return path


Change = Callable[[dict, Path], None]
CASES: dict[str, tuple[Change | str, str]] = {
    # recipe
    "yaml_syntax": ("name: x\nstages: [\n", "invalid YAML"),
    "yaml_not_mapping": ("- 1\n- 2\n", "expected a mapping at the top level"),
    "unknown_key": (lambda r, d: r.update(stagse=[]), "stagse: unknown key"),
    "wrong_type": (lambda r, d: r["stages"][0]["gate"].update(max_drop="abc"), "stages[0].gate.max_drop: expected a number"),
    "unknown_pass": (lambda r, d: r["stages"][0].update({"pass": "prune.bogus"}), "stages[0].pass: unknown pass"),
    "sparsity_1_5": (lambda r, d: r["stages"][0]["params"].update(sparsity=1.5), "stages[0].params.sparsity"),
    "negative_epochs": (lambda r, d: r["stages"][0]["params"]["finetune"].update(epochs=-1), "params.finetune.epochs"),
    "duplicate_stage": (lambda r, d: r["stages"].append(dict(r["stages"][0])), "duplicate stage name 'prune'"),
    "missing_model": (lambda r, d: r.pop("model"), "model: required field is missing"),
    "bad_version": (lambda r, d: r.update(version=7), "version"),
    "stage_name_path": (lambda r, d: r["stages"][0].update(name="../up"), "stages[0].name"),
    "opset_out_of_range": (lambda r, d: r["export"]["onnx"].update(opset=9), "export.onnx.opset"),
    "dynamic_axes_unknown_name": (
        lambda r, d: r["export"]["onnx"].update(dynamic_axes={"inptu": {2: "height"}}),
        "export.onnx.dynamic_axes: 'inptu' is not an input or output of the ONNX file (inputs: input; outputs: logits)",
    ),
    "dynamic_axes_out_of_range": (
        lambda r, d: r["export"]["onnx"].update(dynamic_axes={"logits": {2: "classes"}}),
        "export.onnx.dynamic_axes: logits: axis 2 is out of range for a tensor of rank 2",
    ),
    "bad_split": (lambda r, d: r["data"].update(split={"val": 0.5, "test": 0.45}), "data.split"),
    # model
    "unknown_builtin": (lambda r, d: r["model"].update(arch="builtin:resnet21"), "model.arch: unknown builtin"),
    "missing_torchvision": (lambda r, d: r["model"].update(arch="torchvision:resnet19", kwargs={}), "model.arch"),
    "python_no_import": (lambda r, d: r["model"].update(arch="python:no_such_mod_xyz:make"), "cannot import module"),
    "python_no_callable": (lambda r, d: r["model"].update(arch="python:bad_data_mod:nothing_here"), "nothing_here"),
    "bad_model_kwargs": (lambda r, d: r["model"].update(kwargs={"depth": 3}), "model.kwargs"),
    "pretrained_weights": (lambda r, d: r["model"].update(arch="torchvision:resnet18", kwargs={"weights": "DEFAULT"}), "weights"),
    "checkpoint_missing": (lambda r, d: r["model"].update(checkpoint=str(d / "absent.pt")), "absent.pt"),
    "checkpoint_truncated": (lambda r, d: r["model"].update(checkpoint=str(_truncated(d))), "truncated.pt"),
    "checkpoint_other_arch": (
        lambda r, d: r["model"].update(checkpoint=str(_checkpoint(d, "builtin:resnet20", "r20.pt"))),
        "r20.pt",
    ),
    "checkpoint_pickle_code": (
        lambda r, d: r["model"].update(checkpoint=str(_pickled_module(d))),
        "--trust-checkpoint",
    ),
    # data
    "unknown_dataset": (lambda r, d: r["data"].update(dataset="cifar1000"), "data.dataset"),
    "missing_folder": (lambda r, d: r["data"].update(dataset=f"imagefolder:{d / 'none'}"), "folder not found"),
    "empty_folder": (lambda r, d: (d / "empty").mkdir() or r["data"].update(dataset=f"imagefolder:{d / 'empty'}"), "empty"),
    "labels_out_of_range": (lambda r, d: r["data"].update(dataset="python:bad_data_mod:labels_out_of_range"), "label"),
    "nan_inputs": (lambda r, d: r["data"].update(dataset="python:bad_data_mod:nan_inputs"), "NaN"),
    "wrong_input_shape": (lambda r, d: r["data"].update(dataset="python:bad_data_mod:flat_inputs"), "takes (C, H, W) images; the data's samples are tensor [1, 64]"),
    "empty_dataset": (lambda r, d: r["data"].update(dataset="python:bad_data_mod:empty"), "empty"),
    "dataset_not_a_pair": (lambda r, d: r["data"].update(dataset="python:bad_data_mod:not_a_pair"), "data.dataset"),
    "bad_metric": (lambda r, d: r.update(metric="python:no_such_mod_xyz:top5"), "metric: cannot import"),
}


@pytest.fixture
def bad_data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_data_mod.py").write_text(DATASET_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def _one_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(
    case: str, tiny_recipe: dict, write_recipe, tmp_path: Path, bad_data_module: None
) -> None:
    change, expected = CASES[case]
    if callable(change):
        change(tiny_recipe, tmp_path)
        recipe = write_recipe(tiny_recipe)
    else:
        recipe = write_recipe(change)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expected in _one_line(result), result.output
    assert not out.exists(), "bad input must leave no run directory"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--device", "tpu"], "--device"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--out", "FILE/run"], "not a directory"),
    ],
)
def test_bad_flags_exit_2(flags: list[str], expected: str, tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has CUDA")
    (tmp_path / "FILE").write_text("a file where a directory should be")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    out = ["--out", str(tmp_path / "run")] if "--out" not in flags else []
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), *out, *flags])
    assert result.exit_code == 2, result.output
    assert expected in _one_line(result)
    assert not (tmp_path / "run").exists()


def test_symlink_out_of_the_run_directory_is_refused(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "stages").symlink_to(elsewhere)
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 2 and "outside the run directory" in _one_line(result)
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["stages"]


def test_memory_budget_is_checked_before_anything_runs(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["resources"] = {"memory_mb": 0.1}  # the digits alone take about 0.5 MB
    tiny_recipe["model"]["train"]["epochs"] = 50  # would take minutes if the check came after training
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 2 and "resources.memory_mb" in _one_line(result)
    assert not out.exists()


METRIC_MODULE = '''
def boom(logits, labels):
    raise ValueError("labels are not what this metric expects")

def not_a_number(logits, labels):
    return "high"

def accuracy(logits, labels):
    return float((logits.argmax(1) == labels).float().mean())
'''


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("boom", "metric: python:{module}:boom failed: ValueError: labels are not what this metric expects"),
        ("not_a_number", "metric: python:{module}:not_a_number returned str, expected a number"),
    ],
)
def test_a_failing_user_metric_is_one_line_before_anything_is_written(
    name: str, expected: str, tiny_recipe: dict, tmp_path: Path
) -> None:
    module = f"user_metric_{name}"
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / f"{module}.py").write_text(METRIC_MODULE)
    tiny_recipe["metric"] = f"python:{module}:{name}"
    recipe = recipe_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expected.format(module=module) in _one_line(result)
    assert not out.exists(), "a failing metric must leave no run directory"


def test_python_references_import_from_the_recipe_directory(tiny_recipe: dict, tmp_path: Path) -> None:
    # the module sits beside the recipe, not in the working directory nor on sys.path: the metric finds
    # it as model.arch and data.dataset references do (issue 18: the metric alone failed to import)
    recipe_dir = tmp_path / "elsewhere"
    recipe_dir.mkdir()
    (recipe_dir / "metric_beside_recipe.py").write_text(METRIC_MODULE)
    tiny_recipe["metric"] = "python:metric_beside_recipe:accuracy"
    recipe = recipe_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe, sort_keys=False))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
