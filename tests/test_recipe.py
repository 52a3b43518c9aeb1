from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from compress.errors import BadInput
from compress.recipe import parse_recipe


def test_defaults_fill_in(tiny_recipe: dict) -> None:
    recipe = parse_recipe(tiny_recipe)
    resolved = recipe.resolved()
    assert resolved["stages"][0]["pass"] == "prune.magnitude"
    assert resolved["stages"][0]["params"]["scope"] == "global"
    assert resolved["data"]["split"] == {"val": 0.1, "test": 0.2, "seed": 0}
    assert resolved["export"]["onnx"]["opset"] == 17


def test_stage_params_are_typed(tiny_recipe: dict) -> None:
    (config,) = parse_recipe(tiny_recipe).pass_configs()
    assert config.sparsity == 0.5 and config.finetune.epochs == 1


def _axes(declared: dict) -> Callable[[dict], None]:
    return lambda r: r["export"]["onnx"].update(dynamic_axes=declared)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["stages"][0]["gate"].update(max_drop="abc"), "stages[0].gate.max_drop: expected a number"),
        (lambda r: r.update(stagse=[]), "stagse: unknown key"),
        (lambda r: r["stages"][0].update({"pass": "prune.nope"}), "stages[0].pass: unknown pass 'prune.nope'"),
        (lambda r: r["stages"][0]["params"].update(sparsity=1.5), "stages[0].params.sparsity:"),
        (lambda r: r["stages"][0]["params"].update(sparsty=0.5), "stages[0].params.sparsty: unknown key"),
        (lambda r: r["stages"].append(dict(r["stages"][0])), "duplicate stage name 'prune'"),
        (lambda r: r.pop("model"), "model: required field is missing"),
        (lambda r: r["export"]["onnx"].update(opset=30), "export.onnx.opset:"),
        (lambda r: r["model"].update(arch="resnet20"), "model.arch: expected builtin:NAME"),
        (lambda r: r["stages"][0]["gate"].update(against="yesterday"), "stages[0].gate.against:"),
        (lambda r: r["stages"][0].update(name="a/b"), "stages[0].name:"),
        (lambda r: r.update(version=2), "version:"),
        (lambda r: r["export"]["onnx"].update(precisions=["int8"]), "int8-ort needs a quantize stage"),
        (lambda r: r["export"]["onnx"].update(precisions=["fp32", "fp32"]), "export.onnx.precisions: each precision once"),
        (_axes({"input": {0: "rows"}}), "export.onnx.dynamic_axes: input: axis 0: axis 0 is the batch axis"),
        (_axes({"input": {2: "batch"}}), "input: axis 2: expected a label such as 'sequence'"),
        (_axes({"input": {"two": "h"}}), "export.onnx.dynamic_axes.input.two"),
        (
            lambda r: r["export"].update(onnx={"dynamic_axes": {"input": {2: "h"}}}, tensorrt={"build": "required"}),
            "export: onnx.dynamic_axes: TensorRT engine profiles here vary only the batch axis",
        ),
        (
            lambda r: (r["stages"].append({"name": "q", "pass": "quantize.rtn", "params": {"unsigned_symmetric": True}}),
                       r["export"]["onnx"].update(precisions=["int8-trt"])),
            "int8-trt needs signed activations (TensorRT's int8), but stage 'q' sets unsigned_symmetric: true",
        ),
    ],
)
def test_bad_recipes_name_the_field(tiny_recipe: dict, mutate, expected: str) -> None:
    mutate(tiny_recipe)
    with pytest.raises(BadInput) as info:
        parse_recipe(tiny_recipe, "r.yaml")
    message = str(info.value)
    assert message.startswith("r.yaml: ") and expected in message
    assert "\n" not in message


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(BadInput, match="expected a mapping at the top level"):
        parse_recipe([1, 2], "r.yaml")


def test_int8_means_the_cpu_flavor(tiny_recipe: dict) -> None:
    tiny_recipe["stages"].append({"name": "quantize", "pass": "quantize.rtn", "params": {}})
    tiny_recipe["export"]["onnx"]["precisions"] = ["fp32", "int8", "int8-trt"]
    assert parse_recipe(tiny_recipe, "r.yaml").export.onnx.precisions == ["fp32", "int8-ort", "int8-trt"]


def test_dynamic_axes_default_to_none_and_take_yaml_integer_keys(tiny_recipe: dict) -> None:
    assert parse_recipe(tiny_recipe, "r.yaml").export.onnx.dynamic_axes == {}
    tiny_recipe["export"]["onnx"]["dynamic_axes"] = yaml.safe_load("{input: {2: height, 3: width}}")
    assert parse_recipe(tiny_recipe, "r.yaml").export.onnx.dynamic_axes == {"input": {2: "height", 3: "width"}}
