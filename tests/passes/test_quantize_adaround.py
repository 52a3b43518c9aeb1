"""quantize.rtn / quantize.adaround through the runner on the tiny digits recipe: report, resume, export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.errors import BadInput
from compress.recipe import parse_recipe
from compress.runner import RunOptions, run_recipe


def _quantize_stage(pass_name: str = "quantize.adaround", **params) -> dict:
    defaults = {"weight_bits": 4, "calibration_samples": 128}
    if pass_name == "quantize.adaround":
        defaults.update(iterations=20, batch_size=16)
    return {"name": "quantize", "pass": pass_name, "params": {**defaults, **params},
            "gate": {"max_drop": 0.3, "against": "previous"}}


@pytest.mark.slow
def test_prune_then_adaround_runs_resumes_and_exports(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"].append(_quantize_stage(first_last_8bit=True, residual_quantizers="both"))
    tiny_recipe["export"]["onnx"]["precisions"] = ["fp32", "int8-trt", "int8-ort"]
    out = tmp_path / "run"
    first = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    stage = first["stages"][1]
    assert stage["bits"]["conv1"] == 8 and stage["bits"]["fc"] == 8 and stage["bits"]["layer1.0.conv1"] == 4
    assert stage["first_last_8bit"] is True and len(stage["folded_bn"]) == 9
    assert [layer["name"] for layer in stage["layers"]] == list(stage["bits"])
    assert all(layer["seconds"] > 0 and layer["loss_after"] >= 0 for layer in stage["layers"])
    assert stage["size_bytes"] < first["baseline"]["size_bytes"] / 2

    payload = torch.load(out / stage["checkpoint"], weights_only=True)
    state = payload["state_dict"]
    assert state["layer1.0.conv1.weight_int"].dtype == torch.int8
    # W4 on the default full grid [-8, 7] (weight_grid: narrow gives -7..7)
    assert stage["weight_grid"] == "full"
    assert state["layer1.0.conv1.weight_int"].min() >= -8 and state["layer1.0.conv1.weight_int"].max() <= 7
    # pruning masks survive quantization: every pruned weight is the integer 0
    for key, mask in payload["masks"].items():
        assert torch.all(state[key.replace(".weight", ".weight_int")][~mask] == 0), key

    # the exported QDQ model predicts what the torch stage model predicts (ONNX Runtime's fused int8
    # kernels round the bias to int32 and requantize in fixed point: logits move by a step here and there;
    # the exact-semantics check is tests/quant/test_quant_core.py)
    parity = first["export"]["fp32"]["parity"]
    assert parity["top1_agreement"] >= 0.99 and parity["mean_abs_diff"] < 0.05
    for flavor in ("int8-trt", "int8-ort"):
        entry = first["export"][flavor]
        assert entry["parity"]["top1_agreement"] >= 0.99, flavor
        assert entry["size_bytes"] < first["export"]["fp32"]["size_bytes"] * 0.5, flavor
        assert (out / entry["path"]).is_file()
    assert first["export"]["int8-trt"]["lint"]["findings"] == []
    assert first["export"]["int8-trt"]["gate"]["passed"]

    again = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    assert [s["resumed"] for s in again["stages"]] == [True, True]
    for key in ("metric", "test_metric"):
        assert again["stages"][1][key] == stage[key]
    assert again["export"]["fp32"]["metric"] == first["export"]["fp32"]["metric"]


@pytest.mark.slow
def test_rtn_and_zero_iteration_adaround_agree(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"] = [_quantize_stage("quantize.rtn", weight_bits=3, activation_bits="off")]
    tiny_recipe["export"] = None
    rtn = run_recipe(write_recipe(tiny_recipe), RunOptions(out=tmp_path / "rtn", quiet=True))
    tiny_recipe["stages"] = [_quantize_stage(weight_bits=3, activation_bits=False, iterations=0)]
    ada = run_recipe(write_recipe(tiny_recipe), RunOptions(out=tmp_path / "ada", quiet=True))
    assert ada["stages"][0]["metric"] == rtn["stages"][0]["metric"]
    a = torch.load(tmp_path / "rtn" / rtn["stages"][0]["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ada" / ada["stages"][0]["checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(json.dumps(ada["stages"][0]["activation_bits"])) == "off"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"activation_bits": 4}, "activation_bits"),
        ({"layer_bits": {"conv*": 9}}, "layer_bits"),
        ({"iterations": -1}, "iterations"),
        ({"weight_grid": "wide"}, "weight_grid"),
        ({"threads": 0}, "threads"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_params_name_the_field(tiny_recipe: dict, params: dict, field: str) -> None:
    tiny_recipe["stages"] = [{"name": "q", "pass": "quantize.adaround", "params": params}]
    with pytest.raises(BadInput, match=rf"stages\[0\]\.params\.{field}"):
        parse_recipe(tiny_recipe)


def test_pattern_matching_no_layer_is_bad_input() -> None:
    from compress.models.resnet_cifar import resnet8
    from compress.quant import make_plan

    with pytest.raises(BadInput, match=r"params\.skip: pattern 'layer9\*'"):
        make_plan(resnet8(), weight_bits=4, activation_bits=8, layer_bits={}, skip=["layer9*"], first_last_8bit=False)
