"""Each task recipe in recipes/ (segmentation, detector head, embeddings, a Hugging Face encoder to int8;
README "Any model, any task")
runs end to end on a tiny version of its own data: every stage, every export file verified in ONNX
Runtime. The gates are opened here: what is tested is that each step runs on the task's samples,
targets and outputs, not the quality a few samples and one epoch reach (the recipes' own gates are for
the full data)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from compress.runner import RunOptions, run_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = {
    "mnist-seg-lraspp.yaml": {"samples": 40, "size": 32},
    "mnist-seg-deeplabv3.yaml": {"samples": 40, "size": 32},
    "mnist-detector-head.yaml": {"samples": 24, "size": 64},
    "minilm-embeddings.yaml": {"samples": 40, "length": 16},
    "minilm-int8.yaml": {"samples": 40, "length": 16},
}


def _tiny(name: str, directory: Path) -> Path:
    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe = copy.deepcopy(recipe)
    recipe["data"]["kwargs"].update(TINY[name])
    recipe["data"]["batch_size"] = 8
    recipe["data"]["calibration_samples"] = 8
    recipe["model"].setdefault("train", {})["epochs"] = 1
    if name.startswith("minilm"):
        recipe["model"]["kwargs"] = {"layers": 1, "hidden": 32}  # a small BERT from a config, not the 22M one
    for stage in recipe["stages"]:
        stage["gate"] = {"max_drop": 1.0e6}
        if "finetune" in stage["params"]:
            stage["params"]["finetune"]["epochs"] = 1
        if "iterations" in stage["params"]:
            stage["params"]["iterations"] = 5
    recipe["export"]["verify"] = {"latency": False, "max_drop": 1.0e6}
    path = directory / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    # python: references resolve beside the recipe: keep them there
    for module in RECIPES.glob("*.py"):
        (directory / module.name).write_text(module.read_text())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_task_recipe_runs_every_step(name: str, tmp_path: Path) -> None:
    report = run_recipe(_tiny(name, tmp_path), RunOptions(out=tmp_path / "run", quiet=True))
    assert report["status"] == "passed"
    recipe = yaml.safe_load((RECIPES / name).read_text())
    assert [s["name"] for s in report["stages"]] == [s["name"] for s in recipe["stages"]]
    for precision in recipe["export"]["onnx"]["precisions"]:
        entry = report["export"][precision]
        assert (tmp_path / "run" / entry["path"]).is_file()
        assert entry["metric"] == entry["metric"]  # a number, not NaN
    if recipe["metric"] in ("cosine", "agreement"):
        assert report["baseline"]["metric"] == pytest.approx(1.0)  # the uncompressed model against itself
    if name == "minilm-int8.yaml":  # BertModel as transformers builds it: quantizers placed by module swap
        stage = report["stages"][-1]
        assert stage["placement"] == "modules" and "torch.fx" in stage["placement_reason"]
        assert stage["quantized_matmuls"] == 2 and "encoder.embeddings.word_embeddings" in stage["quantized_embeddings"]
        for precision in ("int8-trt", "int8-ort"):  # each file computes what the torch model does
            assert abs(report["export"][precision]["metric"] - stage["test_metric"]) < 0.002
